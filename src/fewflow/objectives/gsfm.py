"""Gumbel-softmax flow matching (GSFM) for categorical sequences, and the simplex Euler sampler.

Tang, Zhang, Tong, Chatterjee, "Gumbel-Softmax Flow Matching with Straight-Through Guidance for
Controllable Biological Sequence Generation" (arXiv 2503.17361). GSFM's time runs from the smooth simplex
centre (t = 0, large temperature) to a vertex (t = 1, data): fewflow's convention unchanged.

Data are one-hot sequences ``x1`` of shape ``(B, L, K)``. With the temperature ``tau(t) = tau_max
exp(-lambda t)`` (Eq. 8) and Gumbel noise ``g``, the noisy point is ``x_t = softmax((x1 + g / beta) /
tau(t))`` (Eq. 9, :func:`fewflow.paths.simplex.gumbel_interpolant`). A denoiser predicts clean-token
logits and is trained by the per-token cross-entropy (Eq. 11)

    L(theta) = E_{t ~ U[0, 1], x1, g} [ (1 / L) sum_l -log p_theta(x1_l | x_t, t) ],

whose minimiser is the posterior ``p(e_k | x_t)``. Sampling integrates the marginal velocity (Eq. 12)
``u_i = (lambda / tau) x_i (p_i - <p, x>)`` with Euler steps on the simplex (:class:`SimplexEuler`).
Defaults ``tau_max = 10``, ``lambda = 3``, ``beta = 2`` are the paper's (quoted by a third-party
implementation; no official code was available). Inferred here, not stated in the paper: the sampler's
start ``softmax(g / (beta tau_max))`` (the t = 0 interpolant without the unknown target term), the
projection after each step (clamp at 0 and renormalise), the temperature floor ``tau_min`` of the
velocity, and the final read-out ``one_hot(argmax p)`` from the last denoiser call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fewflow._validate import FewflowError, check_finite, unknown_name
from fewflow.methods.registry import (
    BuildContext,
    DefaultSampler,
    MethodSpec,
    Needs,
    SamplingPlan,
    Stage,
    register,
)
from fewflow.objectives.base import LossOutput
from fewflow.objectives.common import drop_labels
from fewflow.paths.simplex import (
    PROJECTIONS,
    gumbel_interpolant,
    gumbel_marginal_velocity,
    gumbel_softmax_start,
    linear_simplex_velocity,
    project_simplex,
    uniform_like,
)
from fewflow.solvers.steppers import Stepper

__all__ = [
    "FINALS",
    "GSFMConfig",
    "GSFMLoss",
    "SimplexEuler",
    "TokenProbabilities",
    "check_one_hot",
    "sample_gsfm",
    "sample_simplex",
    "sequence_cross_entropy",
]

FINALS = ("argmax", "sample")


def check_one_hot(name: str, x1: Tensor) -> None:
    """Require a batch of sequences on the simplex ``(B, L, K)``, ``K >= 2`` (one-hot clean tokens)."""
    if not torch.is_tensor(x1) or not x1.is_floating_point():
        raise FewflowError(f"{name} must be a floating-point one-hot tensor (B, L, K)")
    if x1.dim() != 3 or x1.shape[-1] < 2 or x1.shape[0] == 0:
        raise FewflowError(f"{name} must be one-hot sequences of shape (B, L, K) with K >= 2, got "
                           f"{tuple(x1.shape)}; simplex methods train on sequence data (e.g. --data markov)")
    check_finite(name, x1)
    if bool((x1 < 0).any()) or bool(((x1.sum(-1) - 1.0).abs() > 1e-3).any()):
        raise FewflowError(f"{name} must hold one probability vector (non-negative, sum 1) per position")


def sequence_cross_entropy(logits: Tensor, x1: Tensor) -> Tensor:
    """Per-sequence mean over positions of ``-sum_k x1_k log softmax(logits)_k`` (``-log p(x1)`` for
    one-hot ``x1``), shape ``(B,)``."""
    if logits.shape != x1.shape:
        raise FewflowError(f"model output has shape {tuple(logits.shape)}, expected the shape of x "
                           f"{tuple(x1.shape)} (clean-token logits)")
    return -(x1 * torch.log_softmax(logits, dim=-1)).sum(-1).mean(-1)


def _cond_like(cond: dict[str, Any], x1: Tensor, p: float, num_classes: int | None,
               generator: torch.Generator | None) -> dict[str, Any]:
    return drop_labels(cond, p, num_classes, x1, generator)[0]


class GSFMLoss:
    """GSFM's objective (Eq. 11): ``loss(model, x1, *, generator=None, **cond) -> LossOutput``.

    ``model(x_t, t, **cond)`` returns clean-token logits ``(B, L, K)``; ``x_t`` is the Gumbel-softmax
    interpolant of the one-hot ``x1`` at ``t ~ U[0, 1]``. Diagnostics: ``loss`` (mean per-token
    cross-entropy, nats), ``accuracy`` (argmax of the logits equals the clean token).

    Args:
        tau_max, lam, beta: the temperature ``tau(t) = tau_max exp(-lam t)`` and the noise scale ``1/beta``.
        label_dropout, num_classes: classifier-free-guidance training (null class ``num_classes``).
    """

    def __init__(self, tau_max: float = 10.0, lam: float = 3.0, beta: float = 2.0, label_dropout: float = 0.0,
                 num_classes: int | None = None) -> None:
        for name, v in (("tau_max", tau_max), ("beta", beta)):
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise FewflowError(f"{name} must be a positive number, got {v!r}")
        if not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam >= 0):
            raise FewflowError(f"lam must be a number >= 0, got {lam!r}")
        if not (0.0 <= label_dropout <= 1.0):
            raise FewflowError(f"label_dropout must lie in [0, 1], got {label_dropout}")
        self.tau_max, self.lam, self.beta = float(tau_max), float(lam), float(beta)
        self.label_dropout, self.num_classes = float(label_dropout), num_classes

    def noisy(self, x1: Tensor, t: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``x_t`` of Eq. 9 for the one-hot ``x1`` at times ``t``."""
        return gumbel_interpolant(x1, t, tau_max=self.tau_max, lam=self.lam, beta=self.beta,
                                  generator=generator)

    def __call__(self, model: Any, x1: Tensor, *, generator: torch.Generator | None = None,
                 **cond: Any) -> LossOutput:
        check_one_hot("x1", x1)
        t = uniform_like(x1[:, 0, 0], generator)
        x_t = self.noisy(x1, t, generator)
        cond = _cond_like(cond, x1, self.label_dropout, self.num_classes, generator)
        logits = model(x_t, t, **cond)
        return _ce_output(logits, x1, t)

    def __repr__(self) -> str:
        return f"GSFMLoss(tau_max={self.tau_max:g}, lam={self.lam:g}, beta={self.beta:g})"


def _ce_output(logits: Tensor, x1: Tensor, t: Tensor) -> LossOutput:
    per = sequence_cross_entropy(logits, x1)
    loss = per.mean()
    with torch.no_grad():
        acc = (logits.argmax(-1) == x1.argmax(-1)).to(x1.dtype).mean()
    return LossOutput(loss, {"loss": float(loss.detach()), "accuracy": float(acc), "t_mean": float(t.mean())})


# --------------------------------------------------------------------------- sampling


class TokenProbabilities:
    """Wrap a logits network into ``p(x, t, **cond) = softmax(net(x, t, **cond))``: the shape of ``x``, so
    the shared solve loop and classifier-free guidance (a linear combination of ``p``, hence of the
    velocity, which is linear in ``p``) apply unchanged."""

    def __init__(self, net: Any) -> None:
        self.net = net

    def parameters(self) -> Any:
        return self.net.parameters()

    def __call__(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        return torch.softmax(self.net(x, t, **cond), dim=-1)


def _gaussian_to_uniform(z: Tensor) -> Tensor:
    return (0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))).clamp(1e-7, 1.0 - 1e-7)


class SimplexEuler(Stepper):
    """Euler on the simplex with a projection after each step, for a model returning clean-token
    probabilities ``p = f(x, t)`` (:class:`TokenProbabilities`).

    ``kind="gumbel"`` (GSFM): ``x <- proj(x + h [u(x, p, t) + guidance(x, t)])`` with
    ``u = (lambda / tau) x (p - <p, x>)`` and ``tau = max(tau(t), tau_min)``. The Euler step keeps every
    coordinate positive while ``h lambda / tau < 1`` (``u_i >= -(lambda / tau) x_i``); ``tau_min`` bounds the
    rate where the schedule gets stiff (larger ``lam``, smaller ``tau_max``). With the paper's defaults
    ``tau(1) = 10 e^-3 = 0.50`` so the default floor 0.05 is inactive.

    ``kind="linear"``: ``x <- proj(x + h [(p - x) / (1 - t) + guidance])`` (without guidance a convex
    combination of ``x`` and ``p``).

    The last step (the ``steps``-th) returns the read-out of the last ``p``: ``one_hot(argmax p)``
    (``final="argmax"``), or a categorical draw from ``p`` (``final="sample"``, uses ``generator``).
    ``from_gaussian=True`` maps a standard normal ``x0`` (what :func:`fewflow.sampling.generate` draws) to
    the method's start first, exactly in distribution: ``U = Phi(z)`` then ``g = -log(-log U)`` and
    ``softmax(g / (beta tau_max))`` (gumbel), or ``E = -log(1 - U)`` normalised, a uniform Dirichlet
    (linear). ``guidance(x, t) -> velocity`` (e.g. :class:`fewflow.guidance.stg.STGuided`) is added to the
    model's velocity. State travels in the loop's carry (the step index), so the object is reusable.
    """

    nfe_per_step = 1
    stateful = True

    def __init__(
        self, steps: int, *, kind: str = "gumbel", tau_max: float = 10.0, lam: float = 3.0, beta: float = 2.0,
        tau_min: float = 0.05, projection: str = "clamp", final: str = "argmax", from_gaussian: bool = False,
        guidance: Any = None, generator: torch.Generator | None = None,
    ) -> None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise FewflowError(f"steps must be a positive integer, got {steps!r}")
        if kind not in ("gumbel", "linear"):
            raise unknown_name("simplex sampler kind", kind, ("gumbel", "linear"))
        if projection not in PROJECTIONS:
            raise unknown_name("projection", projection, PROJECTIONS)
        if final not in FINALS:
            raise unknown_name("final read-out", final, FINALS)
        if not (math.isfinite(tau_min) and tau_min >= 0):
            raise FewflowError(f"tau_min must be a number >= 0, got {tau_min}")
        self.steps, self.kind = steps, kind
        self.tau_max, self.lam, self.beta = float(tau_max), float(lam), float(beta)
        self.tau_min = float(tau_min)
        self.projection, self.final, self.from_gaussian = projection, final, bool(from_gaussian)
        self.guidance, self.generator = guidance, generator

    def init_carry(self) -> object:
        return 0

    def start(self, z: Tensor) -> Tensor:
        """The method's start point from standard normal draws ``z`` (see the class docstring)."""
        u = _gaussian_to_uniform(z)
        if self.kind == "gumbel":
            g = -torch.log(-torch.log(u))
            return gumbel_softmax_start(z, tau_max=self.tau_max, beta=self.beta, gumbel=g)
        e = -torch.log1p(-u)
        return e / e.sum(-1, keepdim=True)

    def velocity(self, x: Tensor, p: Tensor, t: Tensor) -> Tensor:
        """The model's velocity at ``x`` from its clean-token probabilities ``p``."""
        if self.kind == "gumbel":
            return gumbel_marginal_velocity(x, p, t, tau_max=self.tau_max, lam=self.lam, tau_min=self.tau_min)
        return linear_simplex_velocity(x, p, t)

    def readout(self, p: Tensor) -> Tensor:
        """One-hot tokens from the clean-token probabilities ``p``."""
        k = p.shape[-1]
        if self.final == "argmax":
            idx = p.argmax(-1)
        else:
            gdev = self.generator.device if self.generator is not None else p.device
            flat = p.reshape(-1, k).clamp_min(0).to(gdev, torch.float64)
            idx = torch.multinomial(flat, 1, generator=self.generator).reshape(p.shape[:-1]).to(p.device)
        return F.one_hot(idx, k).to(p.dtype)

    def step_carry(
        self, f: Any, x: Tensor, t: Tensor, t_next: Tensor, carry: object
    ) -> tuple[Tensor, object]:
        i = int(carry)  # type: ignore[call-overload]
        if i == 0 and self.from_gaussian:
            x = self.start(x)
        p = f(x, t)
        if p.shape != x.shape:
            raise FewflowError(f"the model returned shape {tuple(p.shape)}, expected {tuple(x.shape)}")
        v = self.velocity(x, p, t)
        if self.guidance is not None:
            v = v + self.guidance(x, t)
        h = (t_next - t).reshape(-1, *([1] * (x.dim() - 1)))
        x = project_simplex(x + h * v, self.projection)
        if i == self.steps - 1:
            x = self.readout(p)
        return x, i + 1

    def step(
        self, f: Any, x: Tensor, t: Tensor, t_next: Tensor, generator: torch.Generator | None = None
    ) -> Tensor:
        raise FewflowError("SimplexEuler carries its step index: run it through fewflow.solvers.solve")

    def __repr__(self) -> str:
        return f"SimplexEuler(steps={self.steps}, kind={self.kind!r}, final={self.final!r})"


def sample_simplex(
    model: Any, n: int, L: int, K: int, steps: int, *, kind: str = "gumbel", tau_max: float = 10.0,
    lam: float = 3.0, beta: float = 2.0, tau_min: float = 0.05, projection: str = "clamp",
    final: str = "argmax", guidance: Any = None, generator: torch.Generator | None = None,
    y: Tensor | None = None, trajectory: bool = False,
) -> tuple[Tensor, Tensor]:
    """Draw ``n`` sequences from a simplex denoiser ``model(x, t, y=None) -> logits (B, L, K)``.

    Returns ``(x, tokens)``: the one-hot samples ``(n, L, K)`` (points of the simplex) and their token
    indices ``(n, L)``. ``steps`` Euler steps on a uniform grid from 0 to 1 (one network call each) with
    :class:`SimplexEuler`. With ``trajectory=True`` the first value is the ``(steps + 1, n, L, K)``
    trajectory (its last entry is the one-hot read-out). ``guidance(x, t)`` adds a velocity (STGFlow).
    """
    from fewflow.solvers import solve

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise FewflowError(f"number of samples must be a positive integer, got {n!r}")
    try:
        p0 = next(iter(model.parameters()))
        device, dtype = p0.device, p0.dtype
    except (AttributeError, StopIteration):
        device, dtype = torch.device("cpu"), torch.get_default_dtype()
    st = SimplexEuler(steps, kind=kind, tau_max=tau_max, lam=lam, beta=beta, tau_min=tau_min,
                      projection=projection, final=final, from_gaussian=True, guidance=guidance,
                      generator=generator)
    gdev = generator.device if generator is not None else device
    z = torch.randn((n, L, K), generator=generator, device=gdev, dtype=dtype).to(device)
    cond = {"y": y} if y is not None else None
    # guidance (STGFlow) enables autograd itself; the denoiser runs without a graph
    res = solve(TokenProbabilities(model), z, steps=steps, stepper=st, cond=cond, trajectory=trajectory)
    x = res.x.detach()
    out = res.trajectory.detach() if trajectory and res.trajectory is not None else x
    if trajectory:
        out = out.clone()
        out[0] = st.start(z)
    return out, x.argmax(-1)


def sample_gsfm(
    model: Any, n: int, L: int, K: int, steps: int = 100, *, cfg: GSFMConfig | None = None,
    guidance: Any = None, generator: torch.Generator | None = None, y: Tensor | None = None,
    trajectory: bool = False,
) -> tuple[Tensor, Tensor]:
    """GSFM sampling with the settings of ``cfg`` (:class:`GSFMConfig`, default: the paper's); see
    :func:`sample_simplex`. Returns ``(x_simplex (n, L, K) one-hot, tokens (n, L))``."""
    cfg = cfg if cfg is not None else GSFMConfig()
    return sample_simplex(model, n, L, K, steps, kind="gumbel", tau_max=cfg.tau_max, lam=cfg.lam,
                          beta=cfg.beta, tau_min=cfg.tau_min, projection=cfg.projection, final=cfg.final,
                          guidance=guidance, generator=generator, y=y, trajectory=trajectory)


# --------------------------------------------------------------------------- registration


@dataclass
class GSFMConfig:
    """GSFM's loss settings (the paper's defaults), its sampler's and its network's."""

    tau_max: float = field(default=10.0, metadata={"help": "temperature at t = 0 (Eq. 8)"})
    lam: float = field(default=3.0, metadata={"help": "temperature decay rate lambda (Eq. 8)"})
    beta: float = field(default=2.0, metadata={"help": "Gumbel noise scale 1/beta (Eq. 9)"})
    tau_min: float = field(default=0.05, metadata={"help": "sampler: temperature floor of the velocity"})
    projection: str = field(default="clamp", metadata={"help": "sampler: clamp | euclidean"})
    final: str = field(default="argmax", metadata={"help": "sampler: argmax | sample of the last p"})
    width: int = field(default=64, metadata={"help": "denoiser width"})
    depth: int = field(default=2, metadata={"help": "denoiser transformer blocks"})
    heads: int = field(default=4, metadata={"help": "denoiser attention heads"})


SEQUENCE_RECIPE = ("tau_min", "projection", "final", "width", "depth", "heads")


def make_sequence_model(cfg: Any, meta: dict[str, Any]) -> Any:
    """The :class:`~fewflow.models.sequence.SequenceDenoiser` for data of shape ``meta["shape"] = (L, K)``."""
    from fewflow.models.sequence import SequenceDenoiser

    shape = [int(v) for v in meta["shape"]]
    if len(shape) != 2:
        raise FewflowError(f"simplex methods need one-hot sequence data (N, L, K); got samples of shape "
                           f"{tuple(shape)} (use a sequence data set, e.g. --data markov)")
    k = int(meta["num_classes"]) if meta.get("conditional") else None
    return SequenceDenoiser(shape[0], shape[1], width=cfg.width, depth=cfg.depth, heads=cfg.heads,
                            num_classes=k)


def _build_gsfm(cfg: GSFMConfig, ctx: BuildContext) -> list[Stage]:
    return [Stage("gsfm", GSFMLoss(cfg.tau_max, cfg.lam, cfg.beta, **ctx.conditioning()))]


def _sampling_gsfm(model: Any, cfg: GSFMConfig, *, nfe: int, **_: Any) -> SamplingPlan:
    st = SimplexEuler(int(nfe), kind="gumbel", tau_max=cfg.tau_max, lam=cfg.lam, beta=cfg.beta,
                      tau_min=cfg.tau_min, projection=cfg.projection, final=cfg.final, from_gaussian=True)
    return SamplingPlan(TokenProbabilities(model), st)


register(MethodSpec(
    name="gsfm",
    label="GSFM",
    paper="Tang et al., Gumbel-Softmax Flow Matching with Straight-Through Guidance for Controllable "
    "Biological Sequence Generation (2503.17361)",
    summary="flow matching on the simplex along a Gumbel-softmax path with a cooling temperature (sequences)",
    config=GSFMConfig,
    loss=GSFMLoss,
    build=_build_gsfm,
    needs=Needs(model="custom", coupling="fixed", data="sequence"),
    sampler=DefaultSampler("euler", nfe=100),
    sampling=_sampling_gsfm,
    make_model=make_sequence_model,
    recipe_fields=SEQUENCE_RECIPE,
    docs="gsfm",
))
