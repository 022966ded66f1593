"""Transition Matching: DTM, ARTM and FHTM.

Shaul, Singer, Gat, Lipman, "Transition Matching: Scalable and Flexible Generative Modeling"
(arXiv 2506.23589). The paper's discrete time ``t in {0 .. T}`` runs from noise ``X_0`` to data ``X_T``,
fewflow's direction: state ``X_t`` sits at fewflow time ``t / T``.

A generative Markov chain ``X_0 ~ N(0, I) -> X_1 -> ... -> X_T`` is learned through a *supervising
process* ``q(X_0 .. X_{T-1} | X_T)`` and a latent ``Y`` with ``X_{t+1}`` a known function of
``(X_t, Y)``; the model's kernel ``p(Y | X_t)`` is itself a flow-matching model (a per-token head in its
own time ``s in [0, 1]``, noise ``Y_0 ~ N(0, I)`` at ``s = 0``):

    L = E_{t, X_T, (X_t, Y) ~ q, s, Y_0} || g(Y_s, s, f(X_t, t)) - (Y - Y_0) ||^2,
    Y_s = (1 - s) Y_0 + s Y.

* **DTM** (difference TM): the linear process ``X_t = (1 - t/T) X_0 + (t/T) X_T``, latent
  ``Y = X_T - X_0``, transition ``X_{t+1} = X_t + Y / T``; the head draws every token independently given
  the backbone's features. Theorem 1: ``E[X_{t+1} | X_t] = X_t + E[Y | X_t] / T`` and ``E[Y | X_t]`` is the
  marginal flow-matching velocity at ``t / T``, so the mean update is the FM Euler step and DTM tends to
  FM Euler as ``T`` grows; with few steps its stochastic kernel can be multimodal where Euler is not.
* **ARTM**: the independent linear process ``X_t = (1 - t/T) X_{0,t} + (t/T) X_T`` with a fresh
  ``X_{0,t}`` for every ``t`` (the same marginals as DTM's, a much wider ``q(X_{t+1} | X_t)``); latent
  ``Y = X_{t+1}``; the head is autoregressive over the tokens of ``X_{t+1}``.
* **FHTM**: as ARTM, with a causal backbone over the full history ``X_0 .. X_t`` (teacher forcing: one
  backbone pass trains all ``T`` transitions of a chain).

Sampling costs ``T`` backbone evaluations and ``T x head_steps`` (DTM) or ``T x n_tokens x head_steps``
(ARTM / FHTM) head evaluations plus ``T x n_tokens`` autoregressive-context evaluations; :func:`tm_sample`
counts them separately.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fewflow._validate import FewflowError, check_batch, check_finite
from fewflow.couplings.base import rand, randn_like
from fewflow.methods.registry import (
    BuildContext,
    DefaultSampler,
    MethodSpec,
    Needs,
    SamplingPlan,
    Stage,
    register,
)
from fewflow.models.transition import TransitionNet
from fewflow.objectives.base import LossOutput
from fewflow.objectives.common import check_linear_path, drop_labels, sample_source, unwrap
from fewflow.solvers.steppers import Stepper

__all__ = [
    "ARTMLoss",
    "DTMLoss",
    "FHTMLoss",
    "TMStepper",
    "dtm_process",
    "independent_process",
    "make_transition_model",
    "tm_sample",
]


def _check_model(model: Any, kinds: tuple[str, ...], who: str) -> TransitionNet:
    m = unwrap(model)
    if not isinstance(m, TransitionNet) or m.kind not in kinds:
        got = getattr(m, "kind", type(m).__name__)
        raise FewflowError(f"{who} needs a TransitionNet of kind {' or '.join(kinds)}, got {got}")
    return m


def _check_T(T: int) -> int:
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise FewflowError(f"T (number of transitions) must be a positive integer, got {T!r}")
    return T


def _ex(v: Tensor, x: Tensor) -> Tensor:
    return v.reshape(-1, *([1] * (x.dim() - 1)))


def dtm_process(x0: Tensor, x1: Tensor, tau: Tensor) -> tuple[Tensor, Tensor]:
    """DTM's supervising process at fewflow time ``tau = t / T`` (``(B,)``): ``(X_t, Y)`` with
    ``X_t = (1 - tau) X_0 + tau X_T`` and the difference latent ``Y = X_T - X_0``."""
    return (1 - _ex(tau, x1)) * x0 + _ex(tau, x1) * x1, x1 - x0


def independent_process(x0a: Tensor, x0b: Tensor, x1: Tensor, t: Tensor, T: int) -> tuple[Tensor, Tensor]:
    """ARTM's independent linear process: ``(X_t, X_{t+1})`` for integer ``t`` (``(B,)``) with independent
    noises ``X_{0,t} = x0a`` and ``X_{0,t+1} = x0b``: ``X_k = (1 - k/T) X_{0,k} + (k/T) X_T``."""
    a, b = _ex(t / T, x1), _ex((t + 1) / T, x1)
    return (1 - a) * x0a + a * x1, (1 - b) * x0b + b * x1


def _head_fm(model: TransitionNet, y: Tensor, h: Tensor, generator: torch.Generator | None) -> Tensor:
    """Per-sample inner FM loss of the head on target tokens ``y`` given features ``h``."""
    s = rand(y.shape[0] * y.shape[1], y, generator).reshape(y.shape[0], y.shape[1], 1)
    y0 = randn_like(y, generator)
    pred = model.head((1 - s) * y0 + s * y, s, h)
    return (pred - (y - y0).detach()).pow(2).flatten(1).mean(1)


class _TMLoss:
    """Shared checks and conditioning of the three losses."""

    kinds: tuple[str, ...] = ()
    who = ""

    def __init__(self, source: Any, label_dropout: float, num_classes: int | None) -> None:
        if not (0.0 <= label_dropout <= 1.0):
            raise FewflowError(f"label_dropout must lie in [0, 1], got {label_dropout}")
        if source is not None and not hasattr(source, "sample_like"):
            raise FewflowError(f"source needs .sample_like(x1, generator=...), got {type(source).__name__}")
        self.source, self.label_dropout, self.num_classes = source, float(label_dropout), num_classes

    def _prepare(self, model: Any, x1: Tensor, cond: dict[str, Any], generator: torch.Generator | None
                 ) -> tuple[TransitionNet, dict[str, Any]]:
        m = _check_model(model, self.kinds, self.who)
        check_finite("x1", x1)
        check_batch("x1", x1)
        if cond.get("c") is not None:
            raise FewflowError(f"{self.who} takes class labels y only, not a condition tensor c")
        cond = drop_labels(cond, self.label_dropout, self.num_classes, x1, generator)[0]
        return m, {k: v for k, v in cond.items() if k == "y"}


class DTMLoss(_TMLoss):
    """Difference Transition Matching (module docstring): ``loss(model, x1, generator=None, y=None)``.

    Args:
        source: draws ``X_0`` (``None``: ``N(0, I)``).
        T: number of transitions; times ``t / T`` with ``t`` uniform on ``{0 .. T-1}``.
        continuous_time: draw ``tau ~ U[0, 1)`` instead (one model then samples with any number of
            transitions; DTM's kernel at ``tau`` does not depend on ``T``).
        label_dropout, num_classes: classifier-free-guidance label dropout (null class ``num_classes``).
    """

    kinds = ("dtm",)
    who = "DTM"

    def __init__(self, source: Any = None, T: int = 16, continuous_time: bool = True,
                 label_dropout: float = 0.0, num_classes: int | None = None) -> None:
        super().__init__(source, label_dropout, num_classes)
        self.T, self.continuous_time = _check_T(T), bool(continuous_time)

    def __call__(self, model: Any, x1: Tensor, *, generator: torch.Generator | None = None,
                 **cond: Any) -> LossOutput:
        m, cond = self._prepare(model, x1, cond, generator)
        b = x1.shape[0]
        x0 = sample_source(self.source, x1, generator)
        u = rand(b, x1, generator)
        tau = u if self.continuous_time else torch.floor(u * self.T) / self.T
        x_t, y = dtm_process(x0, x1, tau)
        h = model(x_t, tau, **cond)
        per = _head_fm(m, m.tokens.tokenize(y), h, generator)
        loss = per.mean()
        return LossOutput(loss, {"loss": float(loss.detach()), "t_mean": float(tau.mean())})


class ARTMLoss(_TMLoss):
    """Autoregressive Transition Matching (module docstring): the independent linear process, latent
    ``Y = X_{t+1}``, a head autoregressive over tokens (teacher-forced context).

    Args: as :class:`DTMLoss`; ``T`` is the number of transitions (``t`` uniform on ``{0 .. T-1}``)."""

    kinds = ("artm",)
    who = "ARTM"

    def __init__(self, source: Any = None, T: int = 3, label_dropout: float = 0.0,
                 num_classes: int | None = None) -> None:
        super().__init__(source, label_dropout, num_classes)
        self.T = _check_T(T)

    def __call__(self, model: Any, x1: Tensor, *, generator: torch.Generator | None = None,
                 **cond: Any) -> LossOutput:
        m, cond = self._prepare(model, x1, cond, generator)
        b = x1.shape[0]
        x0a, x0b = sample_source(self.source, x1, generator), sample_source(self.source, x1, generator)
        t = torch.floor(rand(b, x1, generator) * self.T).clamp_max(self.T - 1)
        x_t, x_next = independent_process(x0a, x0b, x1, t, self.T)
        h = model(x_t, t / self.T, **cond)
        y = m.tokens.tokenize(x_next)
        loss = _head_fm(m, y, m.context(y, h), generator).mean()
        return LossOutput(loss, {"loss": float(loss.detach()), "t_mean": float(t.mean() / self.T)})


class FHTMLoss(_TMLoss):
    """Full-History Transition Matching (module docstring): the independent linear process over a whole
    chain ``X_0 .. X_T`` (``X_0`` pure noise, ``X_T`` data), a causal backbone over the history and the
    autoregressive head; every transition of the chain is trained in one teacher-forced pass.

    Args: as :class:`ARTMLoss`; the model's ``transitions`` must equal ``T``."""

    kinds = ("fhtm",)
    who = "FHTM"

    def __init__(self, source: Any = None, T: int = 3, label_dropout: float = 0.0,
                 num_classes: int | None = None) -> None:
        super().__init__(source, label_dropout, num_classes)
        self.T = _check_T(T)

    def chain(self, x1: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """A chain ``(B, T + 1, ...)`` of the independent linear process ending at ``x1``."""
        states = []
        for k in range(self.T + 1):
            noise = sample_source(self.source, x1, generator) if k < self.T else torch.zeros_like(x1)
            states.append((1 - k / self.T) * noise + (k / self.T) * x1)
        return torch.stack(states, 1)

    def __call__(self, model: Any, x1: Tensor, *, generator: torch.Generator | None = None,
                 **cond: Any) -> LossOutput:
        m, cond = self._prepare(model, x1, cond, generator)
        if m.transitions != self.T:
            raise FewflowError(f"FHTM model was built for {m.transitions} transitions, the loss has "
                               f"T={self.T}")
        b, T = x1.shape[0], self.T
        chain = self.chain(x1, generator)
        feats = unwrap(model).history_features(chain[:, :T], **cond)  # (B, T, n, H)
        n = m.tokens.n_tokens
        y = m.tokens.tokenize(chain[:, 1:].reshape(b * T, *m.shape))
        h = feats.reshape(b * T, n, -1)
        loss = _head_fm(m, y, m.context(y, h), generator).mean()
        return LossOutput(loss, {"loss": float(loss.detach())})


# --------------------------------------------------------------------------- sampling


def _noise(shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None) -> Tensor:
    return randn_like(torch.empty(shape, device=like.device, dtype=like.dtype), generator)


def _head_ode(m: TransitionNet, h: Tensor, head_steps: int, generator: torch.Generator | None,
              counts: dict[str, int] | None = None) -> Tensor:
    """Sample every token of ``Y`` independently: ``head_steps`` Euler steps of the head from noise."""
    y = _noise((h.shape[0], m.tokens.n_tokens, m.tokens.token_dim), h, generator)
    for k in range(head_steps):
        s = torch.full(y.shape[:2], k / head_steps, device=y.device, dtype=y.dtype)
        y = y + m.head(y, s, h) / head_steps
        if counts is not None:
            counts["head"] += 1
    return y


def _head_ar(m: TransitionNet, h: Tensor, head_steps: int, generator: torch.Generator | None,
             counts: dict[str, int] | None = None) -> Tensor:
    """Sample the tokens of ``X_{t+1}`` in order: token ``i`` by ``head_steps`` Euler steps of the head
    conditioned on ``h`` and the tokens ``< i`` (one context evaluation per token)."""
    b, n, d = h.shape[0], m.tokens.n_tokens, m.tokens.token_dim
    y = torch.zeros(b, n, d, device=h.device, dtype=h.dtype)
    for i in range(n):
        ctx = m.context(y, h)[:, i : i + 1]  # causal: position i sees tokens < i only
        yi = _noise((b, 1, d), h, generator)
        for k in range(head_steps):
            s = torch.full((b, 1), k / head_steps, device=h.device, dtype=h.dtype)
            yi = yi + m.head(yi, s, ctx) / head_steps
            if counts is not None:
                counts["head"] += 1
        y = torch.cat([y[:, :i], yi, y[:, i + 1 :]], 1)
        if counts is not None:
            counts["context"] += 1
    return y


def _check_steps(T: int, head_steps: int) -> None:
    _check_T(T)
    if isinstance(head_steps, bool) or not isinstance(head_steps, int) or head_steps < 1:
        raise FewflowError(f"head_steps must be a positive integer, got {head_steps!r}")


@torch.no_grad()
def tm_sample(
    model: Any,
    n: int,
    *,
    T: int,
    head_steps: int,
    generator: torch.Generator | None = None,
    x0: Tensor | None = None,
    **cond: Any,
) -> tuple[Tensor, dict[str, int]]:
    """Draw ``n`` samples from a transition-matching model with ``T`` transitions of ``head_steps`` head
    Euler steps each, starting from ``x0`` (default ``N(0, I)``; use the run's source for norm-aligned runs).

    Returns ``(x, counts)``: counts of network evaluations per sample (each a batched forward):
    ``backbone`` (``T``), ``head`` (``T head_steps`` for DTM, ``T n_tokens head_steps`` for ARTM / FHTM)
    and ``context`` (autoregressive context passes, ``T n_tokens``; 0 for DTM). DTM steps
    ``X_{t+1} = X_t + Y / T``; ARTM / FHTM set ``X_{t+1} = Y``; FHTM's backbone sees the whole history.
    """
    m = _check_model(model, ("dtm", "artm", "fhtm"), "tm_sample")
    _check_steps(T, head_steps)
    if m.kind == "fhtm" and T != m.transitions:
        raise FewflowError(f"this FHTM model samples with T={m.transitions} transitions, got T={T}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise FewflowError(f"number of samples must be a positive integer, got {n!r}")
    p = next(m.parameters())
    if x0 is None:
        x0 = _noise((n, *m.shape), p, generator)
    elif tuple(x0.shape) != (n, *m.shape):
        raise FewflowError(f"x0 must have shape {(n, *m.shape)}, got {tuple(x0.shape)}")
    counts = {"backbone": 0, "head": 0, "context": 0}
    x, hist = x0, [x0]
    for t in range(T):
        tau = torch.full((n,), t / T, device=x.device, dtype=x.dtype)
        h = m(torch.stack(hist, 1), tau, **cond) if m.kind == "fhtm" else m(x, tau, **cond)
        counts["backbone"] += 1
        if m.kind == "dtm":
            x = x + m.tokens.untokenize(_head_ode(m, h, head_steps, generator, counts)) / T
        else:
            x = m.tokens.untokenize(_head_ar(m, h, head_steps, generator, counts))
            hist.append(x)
    return x, counts


class TMStepper(Stepper):
    """One transition per grid step for :func:`fewflow.solvers.solve` (so ``fewflow sample`` works): the
    loop's ``f(x, t)`` is the backbone (counted as the NFE); the head runs ``head_steps`` Euler steps.

    DTM: ``x + (t_next - t) Y`` (any grid); ARTM: ``x_next = Y``; FHTM: the backbone is called with the
    history ``(B, k + 1, ...)`` of this solve (rebuilt when a step does not continue the last one).
    """

    stochastic = True

    def __init__(self, model: Any, steps: int, head_steps: int) -> None:
        self.m = _check_model(model, ("dtm", "artm", "fhtm"), "TMStepper")
        _check_steps(steps, head_steps)
        self.steps, self.head_steps = steps, head_steps
        self._hist: list[Tensor] = []

    def step(self, f: Any, x: Tensor, t: Tensor, t_next: Tensor,
             generator: torch.Generator | None = None) -> Tensor:
        m = self.m
        if m.kind == "dtm":
            y = m.tokens.untokenize(_head_ode(m, f(x, t), self.head_steps, generator))
            return x + _ex(t_next - t, x) * y
        if m.kind == "artm":
            return m.tokens.untokenize(_head_ar(m, f(x, t), self.head_steps, generator))
        if not self._hist or self._hist[-1] is not x:
            self._hist = [x]
        h = f(torch.stack(self._hist, 1), t)
        x_next = m.tokens.untokenize(_head_ar(m, h, self.head_steps, generator))
        self._hist.append(x_next)
        return x_next

    def step_last(self, f: Any, x: Tensor, t: Tensor, t_next: Tensor,
                  generator: torch.Generator | None = None) -> Tensor:
        out = self.step(f, x, t, t_next, generator)
        self._hist = []
        return out

    def __repr__(self) -> str:
        return f"TMStepper(kind={self.m.kind}, steps={self.steps}, head_steps={self.head_steps})"


# --------------------------------------------------------------------------- registration

_MODEL_FIELDS = ("patch", "arch", "width", "depth", "heads", "head_hidden", "head_depth")


@dataclass
class DTMConfig:
    """DTM's settings (paper: T = 32 / 16 transitions on a 1.7B DiT; ours are CPU-sized)."""

    T: int = field(default=16, metadata={"help": "transitions (backbone evaluations) when sampling"})
    continuous_time: bool = field(default=True, metadata={"help": "train on t ~ U[0,1): any T samples"})
    head_steps: int = field(default=4, metadata={"help": "Euler steps of the flow head per transition"})
    patch: int = field(default=0, metadata={"help": "token size; 0: whole vector / 2x2 image patches"})
    arch: str = field(default="auto", metadata={"help": "backbone mlp | transformer | auto (mlp for vectors, "
                                                         "transformer for images)"})
    width: int = field(default=128, metadata={"help": "backbone width (feature size per token)"})
    depth: int = field(default=3, metadata={"help": "backbone layers / blocks"})
    heads: int = 4
    head_hidden: int = field(default=64, metadata={"help": "flow head hidden width"})
    head_depth: int = field(default=2, metadata={"help": "flow head hidden layers"})


@dataclass
class ARTMConfig:
    """ARTM's settings (paper: T = 2 or 3 transitions)."""

    T: int = field(default=3, metadata={"help": "transitions (backbone evaluations)"})
    head_steps: int = field(default=4, metadata={"help": "Euler steps of the flow head per token"})
    patch: int = field(default=0, metadata={"help": "token size; 0: one coordinate / 2x2 image patches"})
    arch: str = field(default="auto", metadata={"help": "backbone mlp | transformer | auto (by data)"})
    width: int = 128
    depth: int = 3
    heads: int = 4
    head_hidden: int = 64
    head_depth: int = 2


@dataclass
class FHTMConfig:
    """FHTM's settings (paper: T = 2 or 3 transitions, a fully causal transformer)."""

    T: int = field(default=3, metadata={"help": "transitions (history length)"})
    head_steps: int = field(default=4, metadata={"help": "Euler steps of the flow head per token"})
    patch: int = field(default=0, metadata={"help": "token size; 0: one coordinate / 2x2 image patches"})
    width: int = 64
    depth: int = 2
    heads: int = 4
    head_hidden: int = 64
    head_depth: int = 2


def make_transition_model(kind: str, cfg: Any, meta: dict[str, Any]) -> TransitionNet:
    """The network of a TM run from its config and the run's ``meta`` (``shape``, classes)."""
    shape = tuple(int(v) for v in meta["shape"])
    image = len(shape) == 3
    patch = int(cfg.patch) or (2 if image else (shape[0] if kind == "dtm" else 1))
    arch = getattr(cfg, "arch", "auto")
    if arch == "auto":
        arch = "transformer" if image else "mlp"
    k = meta.get("num_classes") if meta.get("conditional") else None
    return TransitionNet(shape, kind=kind, patch=patch, arch=arch, width=cfg.width, depth=cfg.depth,
                         heads=cfg.heads, head_hidden=cfg.head_hidden, head_depth=cfg.head_depth,
                         transitions=cfg.T, num_classes=k)


def _build(kind: str, loss_cls: type, extra: tuple[str, ...]) -> Any:
    def build(cfg: Any, ctx: BuildContext) -> list[Stage]:
        check_linear_path(ctx.path, kind.upper())
        kw = {name: getattr(cfg, name) for name in extra}
        return [Stage(kind, loss_cls(source=ctx.source, T=cfg.T, **kw, **ctx.conditioning()))]

    return build


def _sampling(kind: str) -> Any:
    def sampling(model: Any, cfg: Any, *, nfe: int | None = None, meta: Any = None, **_: Any) -> SamplingPlan:
        # continuous-time DTM samples with any number of transitions (the NFE budget); the others with T
        steps = int(nfe) if kind == "dtm" and cfg.continuous_time and nfe else cfg.T
        grid = [k / steps for k in range(steps + 1)]
        return SamplingPlan(model, stepper=TMStepper(model, steps, cfg.head_steps), grid=grid)

    return sampling


_PAPER = ("Shaul, Singer, Gat, Lipman, Transition Matching: Scalable and Flexible Generative Modeling "
          "(2506.23589)")

for _kind, _label, _cfg, _loss, _extra, _summary in (
    ("dtm", "DTM", DTMConfig, DTMLoss, ("continuous_time",),
     "difference transition matching: few stochastic transitions, a per-token flow head samples X_T - X_0"),
    ("artm", "ARTM", ARTMConfig, ARTMLoss, (),
     "autoregressive transition matching: independent linear process, token-autoregressive flow head"),
    ("fhtm", "FHTM", FHTMConfig, FHTMLoss, (),
     "full-history transition matching: causal backbone over X_0..X_t, token-autoregressive flow head"),
):
    register(MethodSpec(
        name=_kind,
        label=_label,
        paper=_PAPER,
        summary=_summary,
        config=_cfg,
        loss=_loss,
        build=_build(_kind, _loss, _extra),
        needs=Needs(model="custom", coupling="fixed", ddp_mode="allreduce"),  # the head runs outside forward
        sampler=DefaultSampler("euler", nfe=_cfg().T),
        sampling=_sampling(_kind),
        make_model=lambda cfg, meta, _k=_kind: make_transition_model(_k, cfg, meta),
        recipe_fields=("head_steps", *[f for f in _MODEL_FIELDS if f in _cfg.__dataclass_fields__]),
        small_scale={"width": 64, "depth": 2} if _kind != "fhtm" else {},
        docs="transition_matching",
    ))
