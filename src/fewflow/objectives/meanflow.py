"""MeanFlow: one-step generation with an average-velocity (flow-map) model.

From "Mean Flows for One-step Generative Modeling" (Geng, Deng, Bai, Kolter, He, 2025; arXiv 2505.13447),
written in **fewflow time** (t = 0 source/noise, t = 1 data; the paper puts noise at t = 1).

A flow-map model ``u(x, s, t)`` is the average velocity of the probability-flow ODE on ``[s, t]``,
evaluated at the *start* point ``x_s``::

    x_t = x_s + (t - s) u(x_s, s, t),        (t - s) u(x_s, s, t) = int_s^t v(x_tau, tau) dtau.

**The MeanFlow identity in fewflow time.** Hold the end time ``t`` fixed and move the start ``s`` along the
trajectory (``dx_s/ds = v(x_s, s)``). Differentiating ``(t - s) u(x_s, s, t) = int_s^t v`` in ``s`` gives
``-u + (t - s) du/ds = -v(x_s, s)``, i.e.::

    u(x_s, s, t) = v(x_s, s) + (t - s) * du/ds,      du/ds = v . d_x u + d_s u,

one forward-mode JVP of ``(x, s, t) -> u(x, s, t)`` with tangents ``(v, 1, 0)``. This is the paper's
identity ``u = v - (t - r) du/dt`` (tangents ``(v, 0, 1)`` in its ``(z, r, t)`` ordering) under the change
of variables ``s = 1 - t_paper``, ``t = 1 - r_paper``, ``u = -u_paper``, ``v = -v_paper``: the paper
differentiates in its ``t``, which is *our start time* ``s``. (Tangents ``(v, 0, 1)`` in fewflow's
``(x, s, t)`` ordering correspond to the paper's *wrong* ``(v, 1, 0)`` ablation; see ``tangents``.)

**Loss.** With the linear path ``x_s = s x1 + (1 - s) x0`` and the conditional velocity ``v = x1 - x0``::

    u_tgt = sg( v + (t - s) * JVP(u_theta; (x_s, s, t), (v, 1, 0)) ),
    L_i   = || u_theta(x_s, s, t) - u_tgt ||^2  (summed over data dimensions),
    loss  = mean_i  L_i / sg((L_i + c)^p)        (adaptive weighting; p = 0 is plain MSE).

A fraction ``1 - ratio`` of each batch has ``s = t``: those rows are exactly conditional flow matching on
the instantaneous velocity ``u(x, t, t)`` (the boundary condition).

**Training-time guidance** (the official code's ``guidance_fn``): inside the guidance interval the velocity
``v`` (in the target *and* as the JVP tangent) becomes::

    v~ = omega v + kappa u(x_s, s, s | y) + (1 - omega - kappa) u(x_s, s, s | null)

with both model calls under stop-gradient; rows whose label was dropped (``label_dropout``) keep ``v``.
Effective guidance scale is ``omega / (1 - kappa)``; sampling stays one network evaluation. The
unconditional branch ``u(. | null)`` is trained only by the dropped rows, so ``omega`` requires
``label_dropout > 0`` (the code uses 0.1); ``label_dropout = 0`` is refused at construction.

Distributed training: ``torch.func.jvp`` cannot trace through a ``DistributedDataParallel`` wrapper. With a
DDP model (``jvp_mode="auto"`` -> ``"split"``), the tangent is computed by a no-grad JVP on ``model.module``
and the differentiated prediction ``u`` by an ordinary forward through the wrapper, so DDP's own hooks
all-reduce the gradients (no manual sync in the trainer; costs about one extra forward). The RNG state is
forked so both calls see the same dropout masks. Without DDP (``"fused"``) the JVP's primal output carries
the gradient (py-meanflow does this), saving that forward.

Longer than fewflow's ~400-line guide on purpose: the loss, its JVP machinery and its (s, t) sampler are
one method.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from fewflow._validate import FewflowError, expand_like, unknown_name
from fewflow.methods.registry import (
    BuildContext,
    DefaultSampler,
    MethodSpec,
    Needs,
    Stage,
    register,
    register_variant,
)
from fewflow.objectives.base import LossOutput
from fewflow.objectives.common import (
    SampledTimesObjective,
    check_flow_map,
    check_linear_path,
    is_ddp,
    per_sample_sq,
    unwrap,
)
from fewflow.objectives.time_samplers import LogitNormalTime, TimeSampler, UniformTime

__all__ = [
    "TimePairSampler",
    "MeanFlowLoss",
    "meanflow_target",
    "flow_map_jvp",
    "adaptive_weighted_loss",
    "TANGENTS",
]

#: JVP tangent directions for ``(x, s, t)``, as multiples of ``(v, 1, 1)``. ``"correct"`` follows from the
#: MeanFlow identity in fewflow time; the others are the paper's tangent ablations (which it reports as
#: catastrophic): ``"no_time"`` = paper's ``(v, 0, 0)``, ``"end_time"`` = paper's ``(v, 1, 0)`` (that is,
#: d/dt of the *end* time in fewflow's ordering).
TANGENTS: dict[str, tuple[float, float]] = {
    "correct": (1.0, 0.0),
    "no_time": (0.0, 0.0),
    "end_time": (0.0, 1.0),
}


class TimePairSampler:
    """Draws time pairs ``(s, t)`` with ``s <= t`` (fewflow time) for flow-map objectives.

    * ``TimePairSampler(base)``: two i.i.d. draws from ``base``, sorted (MeanFlow's ImageNet/JAX ``sample_tr``
      and the paper's v0 CIFAR config).
    * ``TimePairSampler(start, end)``: ``s ~ start``, ``t' ~ end``, ``t = max(s, t')`` (py-meanflow's
      improved CIFAR config v1, which samples ``r`` and ``t`` separately and sets ``r = min(t, r)``).

    The paper's logit-normal times are over noise-level time; ``LogitNormalTime.from_noise_time`` converts.
    """

    def __init__(self, start: TimeSampler, end: TimeSampler | None = None) -> None:
        for name, smp in (("start", start), ("end", end)):
            if smp is not None and not hasattr(smp, "sample"):
                raise FewflowError(
                    f"TimePairSampler {name} must have .sample(n, ...), got {type(smp).__name__}"
                )
        self.start, self.end = start, end

    @classmethod
    def uniform(cls) -> TimePairSampler:
        """Sorted pair of ``U[0, 1]`` draws (the best choice at toy scale in calibration runs)."""
        return cls(UniformTime())

    @classmethod
    def logit_normal(cls, mean: float = 0.4, std: float = 1.0) -> TimePairSampler:
        """Sorted pair of logit-normal draws in fewflow time. Default = MeanFlow's ImageNet
        logit-normal(-0.4, 1.0) over noise time, i.e. ``LogitNormalTime(0.4, 1.0)`` here."""
        return cls(LogitNormalTime(mean, std))

    @classmethod
    def meanflow_cifar(cls) -> TimePairSampler:
        """py-meanflow CIFAR-10 v1: noise-time ``t ~ LN(-0.6, 1.6)``, ``r ~ LN(-4.0, 1.6)``,
        ``r = min(t, r)``; here ``s ~ LN(0.6, 1.6)``, ``t' ~ LN(4.0, 1.6)``, ``t = max(s, t')``."""
        return cls(LogitNormalTime.from_noise_time(-0.6, 1.6), LogitNormalTime.from_noise_time(-4.0, 1.6))

    def sample(
        self,
        n: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Return ``(s, t)``, two ``(n,)`` tensors with ``0 <= s <= t <= 1``."""
        a = self.start.sample(n, device=device, dtype=dtype, generator=generator)
        if self.end is None:
            b = self.start.sample(n, device=device, dtype=dtype, generator=generator)
            return torch.minimum(a, b), torch.maximum(a, b)
        b = self.end.sample(n, device=device, dtype=dtype, generator=generator)
        return a, torch.maximum(a, b)

    def __repr__(self) -> str:
        return f"TimePairSampler({self.start!r}" + ("" if self.end is None else f", {self.end!r}") + ")"


def adaptive_weighted_loss(sq_err: Tensor, p: float, c: float) -> tuple[Tensor, Tensor]:
    """MeanFlow's adaptive weighting: ``loss = mean_i L_i / sg((L_i + c)^p)`` for per-sample losses ``L_i``.

    ``p = 0`` is plain MSE, ``p = 0.5`` behaves like a pseudo-Huber loss, ``p = 1`` makes the loss roughly
    scale-free ("Mean Flows for One-step Generative Modeling", Sec. 4.3 / official code). Returns
    ``(loss, weights)``.
    """
    if p == 0.0:
        return sq_err.mean(), torch.ones_like(sq_err)
    w = 1.0 / (sq_err.detach() + c).pow(p)
    return (w * sq_err).mean(), w


# ------------------------------------------------------------------------------------------ the JVP target


def flow_map_jvp(
    model: Callable[..., Tensor],
    x: Tensor,
    s: Tensor,
    t: Tensor,
    dx: Tensor,
    ds: Tensor | float,
    dt: Tensor | float,
    *,
    cond: dict[str, Any] | None = None,
    mode: str = "auto",
) -> tuple[Tensor, Tensor]:
    """``(u, du)``: the flow-map prediction ``u(x, s, t)`` and its derivative along ``(dx, ds, dt)``.

    One forward-mode JVP (``torch.func.jvp``) of the closure ``(x, s, t) -> model(x, s, t, **cond)``, with
    autocast off and the math SDPA backend (fused attention kernels lack forward-mode AD). ``du`` is
    detached. ``mode="fused"`` returns the JVP's primal ``u`` (carrying gradients to the parameters);
    ``"split"`` computes ``du`` under no-grad on ``model.module`` and ``u`` by a separate forward through
    ``model`` (for DDP, whose hooks then all-reduce the gradients); ``"auto"`` picks split for DDP wrappers.
    """
    cond = cond or {}
    if mode == "auto":
        mode = "split" if is_ddp(model) else "fused"
    if mode not in ("fused", "split"):
        raise unknown_name("jvp mode", mode, ("auto", "fused", "split"))
    inner = unwrap(model)
    # dual tensors must own their memory: an expanded view (several elements, one location) is refused
    ds = torch.as_tensor(ds, device=s.device, dtype=s.dtype).expand_as(s).contiguous()
    dt = torch.as_tensor(dt, device=t.device, dtype=t.dtype).expand_as(t).contiguous()
    x, s, t, dx = x.contiguous(), s.contiguous(), t.contiguous(), dx.contiguous()

    def f(x_: Tensor, s_: Tensor, t_: Tensor) -> Tensor:
        return inner(x_, s_, t_, **cond)

    with torch.autocast(device_type=x.device.type, enabled=False), sdpa_kernel([SDPBackend.MATH]):
        if mode == "fused":
            u, du = torch.func.jvp(f, (x, s, t), (dx, ds, dt))
            return u, du.detach()
        devices = [x.device] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            _, du = torch.func.jvp(f, (x, s, t), (dx, ds, dt))
    u = model(x, s, t, **cond)
    return u, du.detach()


def meanflow_target(
    model: Callable[..., Tensor],
    x: Tensor,
    s: Tensor,
    t: Tensor,
    v: Tensor,
    *,
    tangents: str = "correct",
    cond: dict[str, Any] | None = None,
    mode: str = "auto",
) -> tuple[Tensor, Tensor]:
    """``(u, u_tgt)`` with ``u = model(x, s, t)`` and the MeanFlow target (fewflow time, ``s <= t``)::

        u_tgt = sg( v + (t - s) * (v . d_x u + d_s u) )

    ``x`` is the state at the start time ``s`` and ``v`` the velocity there (conditional ``x1 - x0`` in
    training; with the exact marginal velocity and the exact flow map, ``u_tgt == u``). ``tangents`` selects
    the JVP direction (:data:`TANGENTS`; the wrong ones exist for the paper's ablation). From "Mean Flows for
    One-step Generative Modeling" (Geng et al., 2025), Eq. (6), converted to t = 0 noise.
    """
    if tangents not in TANGENTS:
        raise unknown_name("tangents", tangents, TANGENTS)
    if bool((s > t).any()):
        raise FewflowError("MeanFlow needs s <= t (start before end in fewflow time, t = 1 is data)")
    ds_w, dt_w = TANGENTS[tangents]
    u, du = flow_map_jvp(model, x, s, t, v, ds_w, dt_w, cond=cond, mode=mode)
    u_tgt = (v + expand_like(t - s, x) * du).detach()
    return u, u_tgt


# ------------------------------------------------------------------------------------------- the objective


class MeanFlowLoss(SampledTimesObjective):
    """MeanFlow objective ``objective(model, x1, *, generator=None, **cond) -> LossOutput``.

    From "Mean Flows for One-step Generative Modeling" (Geng, Deng, Bai, Kolter, He, 2025), in fewflow time;
    see the module docstring for the identity and its derivation. Sample with the flow map:
    ``x1 = x0 + u(x0, 0, 1)`` (1 NFE) or ``fewflow.solvers.solve(..., stepper="flowmap")``.

    Args:
        path: ``None``/``"linear"`` or an affine path with the linear schedule (others raise).
        source: a ``Source`` (``.sample_like(x1, generator=)``); default standard Gaussian noise.
        time_sampler: a :class:`TimePairSampler`; default ``TimePairSampler.logit_normal(0.4, 1.0)`` = the
            paper's ImageNet logit-normal(-0.4, 1.0) over noise time. At toy scale
            ``TimePairSampler.uniform()`` trains the 1-step map far better (logit-normal rarely visits t ~ 1).
        ratio: fraction of each batch with ``s != t`` (default 0.25, ImageNet config; CIFAR-10 uses 0.75).
            ``ratio = 0`` is plain conditional flow matching.
        adaptive_p, adaptive_c: adaptive loss weighting ``L / sg((L + c)^p)``; defaults 1.0 and 1e-3
            (ImageNet uses p = 1, c = 0.01; CIFAR p = 0.75, c = 1e-3; p = 0 is plain MSE).
        omega, kappa, interval: training-time CFG (``omega=None`` disables it). ``interval = (lo, hi)`` is a
            range of the *start* time ``s`` in fewflow time where guidance is applied (the paper's
            ``[t_start, t_end]`` over noise time maps to ``(1 - t_end, 1 - t_start)``).
        label_dropout: probability of replacing ``y`` with the null class ``num_classes`` (0.1 with CFG).
            Must be > 0 when ``omega`` is set: the guided target needs the unconditional branch
            ``u(x, s, s | null)``, which only dropped rows train (a :class:`FewflowError` otherwise).
        num_classes: number of classes K (null label K).
        tangents: ``"correct"`` or an ablation (``"no_time"``, ``"end_time"``), see :data:`TANGENTS`.
        jvp_mode: ``"auto"`` | ``"fused"`` | ``"split"`` (see :func:`flow_map_jvp`).
        reduction: per-sample reduction over data dims, ``"sum"`` (official code) or ``"mean"`` (plain MSE,
            the scale of fewflow's ``CFMLoss``).
    """

    pass_dropped = True  # the guided target keeps the plain velocity on rows whose label was dropped

    def __init__(
        self,
        path: Any = None,
        source: Any = None,
        time_sampler: TimePairSampler | None = None,
        ratio: float = 0.25,
        adaptive_p: float = 1.0,
        adaptive_c: float = 1e-3,
        omega: float | None = None,
        kappa: float = 0.0,
        interval: tuple[float, float] = (0.0, 1.0),
        label_dropout: float = 0.0,
        num_classes: int | None = None,
        tangents: str = "correct",
        jvp_mode: str = "auto",
        reduction: str = "sum",
    ) -> None:
        check_linear_path(path, "MeanFlowLoss")
        if not 0.0 <= ratio <= 1.0:
            raise FewflowError(f"ratio (fraction with s != t) must lie in [0, 1], got {ratio}")
        if adaptive_p < 0 or adaptive_c <= 0 or not math.isfinite(adaptive_p):
            raise FewflowError(f"adaptive weighting needs p >= 0, c > 0; got p={adaptive_p} c={adaptive_c}")
        if not 0.0 <= label_dropout < 1.0:
            raise FewflowError(f"label_dropout must lie in [0, 1), got {label_dropout}")
        if omega is not None:
            if num_classes is None:
                raise FewflowError("training-time CFG (omega) needs num_classes (null label y = num_classes)")
            if not 0.0 <= interval[0] <= interval[1] <= 1.0:
                raise FewflowError(f"CFG interval must satisfy 0 <= lo <= hi <= 1, got {interval}")
            if kappa >= 1.0:
                raise FewflowError(f"kappa must be < 1 (effective scale omega / (1 - kappa)), got {kappa}")
            if label_dropout <= 0.0:
                raise FewflowError(
                    f"training-time CFG (omega={omega}) with label_dropout={label_dropout} trains no "
                    "unconditional branch: the guided target uses u(x, s, s | null), which only rows with a "
                    "dropped label train; set label_dropout > 0 (0.1 in the paper's code) or omega=None"
                )
        if tangents not in TANGENTS:
            raise unknown_name("tangents", tangents, TANGENTS)
        if jvp_mode not in ("auto", "fused", "split"):
            raise unknown_name("jvp mode", jvp_mode, ("auto", "fused", "split"))
        if reduction not in ("sum", "mean"):
            raise unknown_name("reduction", reduction, ("sum", "mean"))
        self.source = source
        self.time_sampler = time_sampler if time_sampler is not None else TimePairSampler.logit_normal()
        self.ratio = float(ratio)
        self.adaptive_p, self.adaptive_c = float(adaptive_p), float(adaptive_c)
        self.omega, self.kappa, self.interval = omega, float(kappa), (float(interval[0]), float(interval[1]))
        self.label_dropout, self.num_classes = float(label_dropout), num_classes
        self.tangents, self.jvp_mode, self.reduction = tangents, jvp_mode, reduction

    def sample_times(
        self, n: int, like: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(s, t)`` for a batch: the first ``round(ratio * n)`` rows keep ``s < t``, the rest get ``t = s``
        (as the JAX code's deterministic split)."""
        s, t = self.time_sampler.sample(n, device=like.device, dtype=like.dtype, generator=generator)
        n_neq = int(round(self.ratio * n))
        keep = torch.arange(n, device=like.device) < n_neq
        return s, torch.where(keep, t, s)

    def guided_velocity(
        self, model: Any, x: Tensor, s: Tensor, v: Tensor, cond: dict[str, Any], dropped: Tensor | None
    ) -> Tensor:
        """The training-time CFG velocity ``omega v + kappa u(x,s,s|y) + (1-omega-kappa) u(x,s,s|null)``
        (stop-gradient; unchanged outside ``interval`` and on rows whose label was dropped)."""
        if self.omega is None or cond.get("y") is None:
            return v
        y = cond["y"]
        inner = unwrap(model)
        with torch.no_grad():
            both = {k: (torch.cat([c, c]) if torch.is_tensor(c) and c.shape[:1] == y.shape[:1] else c)
                    for k, c in cond.items()}
            both["y"] = torch.cat([y, torch.full_like(y, self.num_classes)])
            if torch.is_tensor(cond.get("c")):  # the null half drops a condition tensor c too
                keep = cond.get("c_mask")
                keep = torch.ones_like(y, dtype=torch.bool) if keep is None else keep.bool()
                both["c_mask"] = torch.cat([keep, torch.zeros_like(keep)])
            ss = torch.cat([s, s])
            u_c, u_u = inner(torch.cat([x, x]), ss, ss, **both).chunk(2)
        lo, hi = self.interval
        inside = (s >= lo) & (s <= hi)
        if dropped is not None:
            inside = inside & ~dropped.to(inside.device)
        w = torch.where(inside, torch.full_like(s, self.omega), torch.ones_like(s))
        k = torch.where(inside, torch.full_like(s, self.kappa), torch.zeros_like(s))
        w, k = expand_like(w, x), expand_like(k, x)
        return (w * v + k * u_c + (1.0 - w - k) * u_u).detach()

    def loss_at(
        self,
        model: Any,
        x0: Tensor,
        x1: Tensor,
        s: Tensor,
        t: Tensor,
        *,
        dropped: Tensor | None = None,
        **cond: Any,
    ) -> LossOutput:
        """The MeanFlow loss on given pairs ``(x0, x1)`` and times ``(s, t)`` (labels already dropped;
        ``dropped`` marks rows whose label is the null class, which get no guidance)."""
        check_flow_map(model, "MeanFlowLoss")
        work = x1.dtype if x1.dtype in (torch.float32, torch.float64) else torch.float32
        x0, x1, s, t = (a.to(work) for a in (x0, x1, s, t))
        se = expand_like(s, x1)
        x_s = se * x1 + (1.0 - se) * x0
        v = self.guided_velocity(model, x_s, s, x1 - x0, cond, dropped)
        u, u_tgt = meanflow_target(model, x_s, s, t, v, tangents=self.tangents, cond=cond, mode=self.jvp_mode)
        sq = per_sample_sq(u.to(work) - u_tgt, self.reduction)
        loss, _ = adaptive_weighted_loss(sq, self.adaptive_p, self.adaptive_c)
        with torch.no_grad():
            neq = s != t
            diag = {
                "mse": float(sq.mean()),
                "mse_boundary": float(sq[~neq].mean()) if bool((~neq).any()) else float("nan"),
                "mse_flow_map": float(sq[neq].mean()) if bool(neq.any()) else float("nan"),
                "target_norm": float(u_tgt.reshape(u_tgt.shape[0], -1).norm(dim=1).mean()),
                "frac_s_ne_t": float(neq.to(s.dtype).mean()),
            }
        return LossOutput(loss=loss, diagnostics=diag)

    def __repr__(self) -> str:
        return (
            f"MeanFlowLoss(ratio={self.ratio:g}, p={self.adaptive_p:g}, c={self.adaptive_c:g}, "
            f"time_sampler={self.time_sampler!r}, tangents={self.tangents!r}, omega={self.omega})"
        )


# --------------------------------------------------------------------------- registration


@dataclass
class MeanFlowConfig:
    """Settings of :class:`MeanFlowLoss` (paper defaults, ImageNet recipe) and its (s, t) sampler."""

    ratio: float = field(default=0.25, metadata={"help": "fraction of rows with s != t"})
    adaptive_p: float = field(default=1.0, metadata={"help": "adaptive loss weight power p (0: plain MSE)"})
    adaptive_c: float = 1e-3
    omega: float | None = field(default=None, metadata={"help": "CFG scale folded into training (null: off)"})
    kappa: float = 0.0
    interval: tuple[float, float] = (0.0, 1.0)
    tangents: str = field(default="correct", metadata={"help": "correct | end_time | no_time (ablations)"})
    jvp_mode: str = "auto"
    reduction: str = "sum"
    time_pairs: str = field(default="logit_normal", metadata={"help": "logit_normal | uniform (s, t) draws"})
    time_mean: float = field(default=0.4, metadata={"help": "logit-normal mean, fewflow time (paper: -0.4)"})
    time_std: float = 1.0


def time_pairs(kind: str, mean: float = 0.4, std: float = 1.0) -> TimePairSampler:
    """The (s, t) sampler by name: ``uniform`` or ``logit_normal`` (``mean``, ``std`` in fewflow time)."""
    if kind == "uniform":
        return TimePairSampler.uniform()
    if kind == "logit_normal":
        return TimePairSampler.logit_normal(mean, std)
    raise unknown_name("time-pair sampler", kind, ("uniform", "logit_normal"))


def _build_meanflow(cfg: MeanFlowConfig, ctx: BuildContext) -> list[Stage]:
    loss = MeanFlowLoss(
        path=ctx.path, source=ctx.source,
        time_sampler=time_pairs(cfg.time_pairs, cfg.time_mean, cfg.time_std),
        ratio=cfg.ratio, adaptive_p=cfg.adaptive_p, adaptive_c=cfg.adaptive_c, omega=cfg.omega,
        kappa=cfg.kappa, interval=tuple(cfg.interval), tangents=cfg.tangents, jvp_mode=cfg.jvp_mode,
        reduction=cfg.reduction, **ctx.conditioning(),
    )
    return [Stage("meanflow", loss)]


MEANFLOW = register(MethodSpec(
    name="meanflow",
    label="MeanFlow",
    paper="Geng et al., Mean Flows for One-step Generative Modeling (2505.13447)",
    summary="average-velocity model u(x, s, t) trained from scratch with the JVP identity; 1-step sampling",
    config=MeanFlowConfig,
    loss=MeanFlowLoss,
    build=_build_meanflow,
    needs=Needs(model="flow_map", ddp_mode="allreduce"),
    sampler=DefaultSampler("flow_map", nfe=1),
    recipe_fields=("time_pairs", "time_mean", "time_std"),
    small_scale={"time_pairs": "uniform", "ratio": 0.75, "adaptive_p": 0.0},
    family="fewstep",
))
register_variant(
    "meanflow_ratio0", MEANFLOW, label="ablation: MeanFlow 0% s!=t", ablation=True, ratio=0.0,
    summary="MeanFlow with no s != t rows: plain flow matching, which collapses at 1 NFE",
)
register_variant(
    "meanflow_wrong_tangents", MEANFLOW, label="ablation: MeanFlow wrong tangents", ablation=True,
    tangents="end_time", summary="MeanFlow with the JVP tangent on the wrong time argument",
)
