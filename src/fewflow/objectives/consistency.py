"""Consistency baselines in flow-map form: consistency distillation / consistency flow matching, and
shortcut models. Written in **fewflow time** (t = 0 source/noise, t = 1 data) for a flow-map model
``u(x, s, t)`` with ``x_t = x_s + (t - s) u(x_s, s, t)``.

**Consistency distillation / training** ("Consistency Models", Song, Dhariwal, Chen, Sutskever, 2023;
"Consistency Flow Matching: Defining Straight Flows with Velocity Consistency", Yang et al., 2024). A
consistency function maps every point of an ODE trajectory to the same end point. With a flow map the
end point from ``x_s`` is ``X_{s->t}(x_s) = x_s + (t - s) u(x_s, s, t)`` (classically ``t = 1``, the data),
and consistency between the neighbouring points ``x_s`` and ``x_{s'}``, ``s' = min(s + delta, t)``, reads::

    x_s + (t - s) u(x_s, s, t) = x_{s'} + (t - s') u(x_{s'}, s', t)
    =>  u_tgt = sg( [ (x_{s'} - x_s) + (t - s') u(x_{s'}, s', t) ] / (t - s) ).

* distillation (``teacher`` given): ``x_{s'}`` is one step of the teacher ODE from ``x_s`` (Heun by
  default, as in the paper's EDM teacher solver);
* training / Consistency-FM (no teacher): ``x_s`` and ``x_{s'}`` lie on the same straight conditional path,
  ``x_{s'} - x_s = (s' - s)(x1 - x0)``.

When ``s' = t`` (the last interval before the end) the target is the one-step average velocity
``(x_t - x_s)/(t - s)``, and for ``s = t`` it is the velocity itself (teacher or ``x1 - x0``): these rows are
flow matching and anchor the recursion (the consistency models' boundary condition ``f(x, 1) = x`` is
built into the flow-map parameterisation). The stop-gradient branch is the model itself (improved
consistency training, Song & Dhariwal 2023, drops the EMA target) or an optional ``target_model`` (EMA).
Consistency-FM's *velocity consistency* term adds ``alpha || u(x_s, s, t) - sg u(x_{s'}, s', t) ||^2``.

**Shortcut models** ("One Step Diffusion via Shortcut Models", Frans, Hafner, Levine, Abbeel, 2024/ICLR
2025; same time direction as fewflow). The network ``s(x_t, t, d)`` is the flow map ``u(x_t, t, t + d)``.
Self-consistency: two half steps equal one double step::

    u(x_s, s, s + 2d) = sg( [u(x_s, s, s + d) + u(x'_{s+d}, s + d, s + 2d)] / 2 ),
    x'_{s+d} = x_s + d u(x_s, s, s + d),

and the rest of the batch is flow matching at ``d = 0``: ``u(x_s, s, s) ~ x1 - x0``. Following the
official code, a quarter of each batch (``bootstrap_fraction``) is self-consistency with big steps
``2d in {1, 1/2, ..., 2/M}`` split evenly across levels (``M = 1/min_step = 128``), ``s`` on the ``2d``
grid; at the smallest level the half steps are queried at ``d = 0`` (the instantaneous velocity), as the
paper prescribes. Sample with ``fewflow.solvers.solve(model, x0, steps=k)`` (flow-map jumps, ``k`` a power
of two).

Longer than fewflow's ~400-line guide on purpose: consistency and shortcut models share their sampling
and target helpers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fewflow._validate import FewflowError, expand_like, unknown_name
from fewflow.methods.registry import (
    BuildContext,
    DefaultSampler,
    MethodSpec,
    Needs,
    Stage,
    register,
)
from fewflow.objectives.base import LossOutput
from fewflow.objectives.common import (
    SampledTimesObjective,
    check_flow_map,
    check_linear_path,
    per_sample_sq,
    rand,
    select_rows,
)
from fewflow.objectives.meanflow import TimePairSampler
from fewflow.objectives.time_samplers import TimeSampler, UniformTime

__all__ = ["ConsistencyLoss", "consistency_target", "ShortcutLoss", "shortcut_target"]


def _sample_s_t(
    sampler: Any, n: int, like: Tensor, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """``(s, t)`` from a :class:`TimePairSampler`, or ``(s, 1)`` from a plain ``TimeSampler``."""
    out = sampler.sample(n, device=like.device, dtype=like.dtype, generator=generator)
    if isinstance(out, tuple):
        return out
    return out, torch.ones_like(out)


@torch.no_grad()
def consistency_target(
    model: Any,
    x_s: Tensor,
    s: Tensor,
    t: Tensor,
    delta: float,
    *,
    velocity: Tensor | None = None,
    teacher: Any = None,
    stepper: Any = "heun",
    cond: dict[str, Any] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The detached consistency target for ``u(x_s, s, t)``, ``s <= t`` (fewflow time).

    ``s' = min(s + delta, t)``; ``x_{s'} = x_s + (s' - s) velocity`` (consistency training, ``velocity`` =
    ``x1 - x0``) or one ``stepper`` step of ``teacher`` (distillation); then
    ``u_tgt = [(x_{s'} - x_s) + (t - s') u(x_{s'}, s', t)] / (t - s)``, and ``u_tgt = v(x_s, s)`` where
    ``s = t``. Returns ``(u_tgt, x_{s'}, s')``. From "Consistency Models" (Song et al. 2023) in flow-map form.
    """
    from fewflow.solvers import get_stepper  # solvers import nothing from objectives

    cond = cond or {}
    if (velocity is None) == (teacher is None):
        raise FewflowError(
            "consistency_target needs exactly one of velocity= (training) or teacher= (distillation)"
        )
    if not delta > 0:
        raise FewflowError(f"consistency step delta must be positive, got {delta}")
    s2 = torch.minimum(s + delta, t)
    h = expand_like(s2 - s, x_s)
    same = s == t
    if teacher is None:
        x_s2 = x_s + h * velocity
        v_bnd = velocity
    else:
        st = get_stepper(stepper)

        def f(x: Tensor, tt: Tensor, _c: dict = cond) -> Tensor:
            return teacher(x, tt, **_c).to(x.dtype)

        x_s2 = st.step(f, x_s, s, s2)
        v_bnd = None
        if bool(same.any()):
            v_bnd = torch.zeros_like(x_s)
            v_bnd[same] = teacher(x_s[same], s[same], **select_rows(cond, same)).to(x_s.dtype)
    rest = t - s2
    far = rest > 0
    carry = torch.zeros_like(x_s)
    if bool(far.any()):
        carry[far] = model(x_s2[far], s2[far], t[far], **select_rows(cond, far)).to(x_s.dtype)
    gap = torch.where(same, torch.ones_like(t), t - s)
    tgt = ((x_s2 - x_s) + expand_like(rest, x_s) * carry) / expand_like(gap, x_s)
    if v_bnd is not None:
        tgt = torch.where(expand_like(same, x_s), v_bnd, tgt)
    return tgt, x_s2, s2


class ConsistencyLoss(SampledTimesObjective):
    """Consistency distillation (``teacher`` given) or consistency training / Consistency-FM (no teacher)
    for a flow-map model; ``objective(model, x1, *, generator=None, **cond) -> LossOutput``.

    From "Consistency Models" (Song et al. 2023) and "Consistency Flow Matching" (Yang et al. 2024), in
    flow-map form (module docstring). Sample with ``fewflow.solvers.solve(model, x0, steps=1)`` (one jump
    ``x0 + u(x0, 0, 1)``) or more steps (then train with a :class:`TimePairSampler` so that ``u(x, s, t)``
    is learned for ``t < 1``).

    Args:
        teacher: a velocity model ``v(x, t, **cond)`` (frozen; called under no-grad) for distillation, or
            ``None`` for consistency training on the straight conditional path.
        delta: the consistency step ``s' = s + delta`` (the paper discretises into N = 18 steps on
            CIFAR-10; at toy scale ``1/16``-``1/32`` works). Bias ``O(delta^k)`` for an order-``k``
            teacher step.
        teacher_stepper: the teacher's one-step solver (name or ``fewflow.solvers.Stepper``), default Heun.
        time_sampler: a ``TimeSampler`` for ``s`` with the end fixed at ``t = 1`` (classic consistency
            models; default ``UniformTime()``), or a :class:`TimePairSampler` for ``(s, t)`` (a full
            flow map).
        boundary_fraction: fraction of rows with ``s = t`` (plain flow matching on the velocity).
        velocity_weight: Consistency-FM's velocity-consistency weight ``alpha`` (default 0).
        target_model: stop-gradient network for ``u(x_{s'}, s', t)`` (e.g. an EMA copy); default the
            model itself under no-grad.
        path: ``None``/``"linear"`` (the straight path ``x_s = s x1 + (1 - s) x0``).
        source, label_dropout, num_classes: as in :class:`~fewflow.objectives.meanflow.MeanFlowLoss`.
        reduction: ``"mean"`` or ``"sum"`` over data dimensions of the per-sample squared error.
    """

    def __init__(
        self,
        teacher: Any = None,
        delta: float = 1.0 / 16,
        teacher_stepper: Any = "heun",
        time_sampler: TimeSampler | TimePairSampler | None = None,
        boundary_fraction: float = 0.0,
        velocity_weight: float = 0.0,
        target_model: Any = None,
        path: Any = None,
        source: Any = None,
        label_dropout: float = 0.0,
        num_classes: int | None = None,
        reduction: str = "mean",
    ) -> None:
        from fewflow.solvers import get_stepper

        check_linear_path(path, "ConsistencyLoss")
        if teacher is not None and not callable(teacher):
            raise FewflowError(
                f"teacher must be a velocity model v(x, t, **cond), got {type(teacher).__name__}"
            )
        if not (math.isfinite(delta) and 0 < delta <= 1):
            raise FewflowError(f"delta must lie in (0, 1], got {delta}")
        if getattr(get_stepper(teacher_stepper), "is_flow_map", False):
            raise FewflowError("teacher_stepper must be a velocity stepper (euler, heun, midpoint, rk4)")
        if not 0.0 <= boundary_fraction <= 1.0:
            raise FewflowError(f"boundary_fraction must lie in [0, 1], got {boundary_fraction}")
        if velocity_weight < 0:
            raise FewflowError(f"velocity_weight must be >= 0, got {velocity_weight}")
        if not 0.0 <= label_dropout < 1.0:
            raise FewflowError(f"label_dropout must lie in [0, 1), got {label_dropout}")
        if reduction not in ("sum", "mean"):
            raise unknown_name("reduction", reduction, ("sum", "mean"))
        self.teacher, self.delta, self.teacher_stepper = teacher, float(delta), teacher_stepper
        self.time_sampler = time_sampler if time_sampler is not None else UniformTime()
        if not hasattr(self.time_sampler, "sample"):
            raise FewflowError(f"time_sampler needs .sample(n, ...), got {type(self.time_sampler).__name__}")
        self.boundary_fraction, self.velocity_weight = float(boundary_fraction), float(velocity_weight)
        self.target_model, self.source = target_model, source
        self.label_dropout, self.num_classes, self.reduction = float(label_dropout), num_classes, reduction

    def sample_times(
        self, n: int, like: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(s, t)``; the last ``round(boundary_fraction * n)`` rows get ``s = t``."""
        s, t = _sample_s_t(self.time_sampler, n, like, generator)
        n_b = int(round(self.boundary_fraction * n))
        bnd = torch.arange(n, device=like.device) >= n - n_b
        return torch.where(bnd, t, s), t

    def loss_at(self, model: Any, x0: Tensor, x1: Tensor, s: Tensor, t: Tensor, **cond: Any) -> LossOutput:
        """The loss on given pairs and times (labels already dropped)."""
        check_flow_map(model, "ConsistencyLoss")
        if bool((s > t).any()):
            raise FewflowError("ConsistencyLoss needs s <= t (start before end in fewflow time)")
        se = expand_like(s, x1)
        x_s = se * x1 + (1.0 - se) * x0
        tgt_net = self.target_model if self.target_model is not None else model
        if self.teacher is None:
            tgt, x_s2, s2 = consistency_target(tgt_net, x_s, s, t, self.delta, velocity=x1 - x0, cond=cond)
        else:
            tgt, x_s2, s2 = consistency_target(
                tgt_net, x_s, s, t, self.delta, teacher=self.teacher, stepper=self.teacher_stepper, cond=cond
            )
        u = model(x_s, s, t, **cond)
        sq = per_sample_sq(u - tgt, self.reduction)
        loss = sq.mean()
        diag: dict[str, float] = {"mse": float(sq.detach().mean())}
        if self.velocity_weight > 0:
            with torch.no_grad():
                u_next = tgt_net(x_s2, s2, t, **cond)
            vc = per_sample_sq(u - u_next, self.reduction)
            loss = loss + self.velocity_weight * vc.mean()
            diag["velocity_consistency"] = float(vc.detach().mean())
        diag["frac_boundary"] = float((s == t).to(s.dtype).mean())
        return LossOutput(loss=loss, diagnostics=diag)

    def __repr__(self) -> str:
        kind = "distillation" if self.teacher is not None else "training"
        return f"ConsistencyLoss({kind}, delta={self.delta:g}, time_sampler={self.time_sampler!r})"


# --------------------------------------------------------------------------------------------- shortcut


@torch.no_grad()
def shortcut_target(
    model: Any,
    x: Tensor,
    s: Tensor,
    d: Tensor,
    *,
    min_step: float = 1.0 / 128,
    cond: dict[str, Any] | None = None,
) -> Tensor:
    """Detached self-consistency target for ``u(x, s, s + 2d)``: the mean of two ``d``-jumps,
    ``[u(x, s, s + d) + u(x', s + d, s + 2d)] / 2`` with ``x' = x + d u(x, s, s + d)``. Half steps ``d`` at
    (or below) ``min_step`` query the model at ``d = 0`` (instantaneous velocity), as in "One Step
    Diffusion via Shortcut Models" (Frans et al.). Exact for the exact flow map when ``d > min_step``.
    """
    cond = cond or {}
    dq = torch.where(d <= min_step * (1 + 1e-6), torch.zeros_like(d), d)
    u1 = model(x, s, s + dq, **cond)
    x_mid = x + expand_like(d, x) * u1
    u2 = model(x_mid, s + d, s + d + dq, **cond)
    return 0.5 * (u1 + u2)


class ShortcutLoss(SampledTimesObjective):
    """Shortcut-model objective ("One Step Diffusion via Shortcut Models", Frans et al.) for a flow-map
    model: ``objective(model, x1, *, generator=None, **cond) -> LossOutput``.

    Rows ``i < round(bootstrap_fraction * B)`` are self-consistency rows (:func:`shortcut_target`), the rest
    flow matching at ``d = 0`` (``u(x_s, s, s) ~ x1 - x0``, ``s ~ time_sampler``). Official defaults:
    ``min_step = 1/128``, ``bootstrap_fraction = 1/4``; classifier-free guidance inside the bootstrap
    targets (the official code's option) is not implemented.

    Args:
        path: ``None``/``"linear"``.
        source: a ``Source``; default standard normal noise.
        min_step: the smallest half step ``1/M`` (a power of two).
        bootstrap_fraction: fraction of each batch with self-consistency targets.
        time_sampler: times of the flow-matching rows (default uniform).
        label_dropout, num_classes: null-label dropout.
        reduction: ``"mean"`` or ``"sum"`` over data dims.
    """

    def __init__(
        self,
        path: Any = None,
        source: Any = None,
        min_step: float = 1.0 / 128,
        bootstrap_fraction: float = 0.25,
        time_sampler: TimeSampler | None = None,
        label_dropout: float = 0.0,
        num_classes: int | None = None,
        reduction: str = "mean",
    ) -> None:
        check_linear_path(path, "ShortcutLoss")
        if not 0 < min_step <= 0.5:
            raise FewflowError(f"min_step must lie in (0, 1/2], got {min_step}")
        levels = math.log2(1.0 / min_step)
        if abs(levels - round(levels)) > 1e-9:
            raise FewflowError(f"min_step must be 1 / 2^k (e.g. 1/128), got {min_step}")
        if not 0.0 <= bootstrap_fraction < 1.0:
            raise FewflowError(
                f"bootstrap_fraction must lie in [0, 1) (flow-matching rows anchor it), got "
                f"{bootstrap_fraction}"
            )
        if not 0.0 <= label_dropout < 1.0:
            raise FewflowError(f"label_dropout must lie in [0, 1), got {label_dropout}")
        if reduction not in ("sum", "mean"):
            raise unknown_name("reduction", reduction, ("sum", "mean"))
        self.source, self.min_step, self.levels = source, float(min_step), int(round(levels))
        self.bootstrap_fraction = float(bootstrap_fraction)
        self.time_sampler = time_sampler if time_sampler is not None else UniformTime()
        self.label_dropout, self.num_classes, self.reduction = float(label_dropout), num_classes, reduction

    def sample_times(
        self, n: int, like: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(s, d)``: half step ``d`` (``0`` on flow-matching rows) and start ``s``. Bootstrap rows cycle
        through the levels ``2d = 2^-k``, ``k = 0 .. log2(M) - 1``, with ``s`` uniform on the ``2d`` grid."""
        s = self.time_sampler.sample(n, device=like.device, dtype=like.dtype, generator=generator)
        n_b = int(round(self.bootstrap_fraction * n))
        d = torch.zeros_like(s)
        if n_b > 0:
            k = torch.arange(n_b, device=like.device) % self.levels
            sections = (2.0**k).to(like.dtype)
            j = torch.floor(rand(n_b, like, generator) * sections).clamp_max(sections - 1)
            s = torch.cat([j / sections, s[n_b:]])
            d = torch.cat([0.5 / sections, d[n_b:]])
        return s, d

    def loss_at(self, model: Any, x0: Tensor, x1: Tensor, s: Tensor, d: Tensor, **cond: Any) -> LossOutput:
        """Loss on given pairs: rows with ``d = 0`` are flow matching, others self-consistency on
        ``u(x_s, s, s + 2d)``."""
        check_flow_map(model, "ShortcutLoss")
        if bool((d < 0).any()) or bool((s + 2 * d > 1 + 1e-6).any()):
            raise FewflowError("ShortcutLoss needs d >= 0 and s + 2d <= 1")
        se = expand_like(s, x1)
        x_s = se * x1 + (1.0 - se) * x0
        boot = d > 0
        target = (x1 - x0).detach().clone()
        if bool(boot.any()):
            target[boot] = shortcut_target(
                model, x_s[boot], s[boot], d[boot], min_step=self.min_step, cond=select_rows(cond, boot)
            )
        u = model(x_s, s, s + 2 * d, **cond)
        sq = per_sample_sq(u - target, self.reduction)
        with torch.no_grad():
            diag = {
                "mse": float(sq.mean()),
                "mse_flow": float(sq[~boot].mean()) if bool((~boot).any()) else float("nan"),
                "mse_bootstrap": float(sq[boot].mean()) if bool(boot.any()) else float("nan"),
            }
        return LossOutput(loss=sq.mean(), diagnostics=diag)

    def __repr__(self) -> str:
        m, frac = round(1 / self.min_step), self.bootstrap_fraction
        return f"ShortcutLoss(min_step=1/{m}, bootstrap_fraction={frac:g})"


# --------------------------------------------------------------------------- registration


@dataclass
class ConsistencyConfig:
    """Settings of :class:`ConsistencyLoss` (consistency distillation of a teacher as a flow map)."""

    delta: float = field(default=1.0 / 16, metadata={"help": "teacher step between the two times"})
    teacher_stepper: str = "heun"
    boundary_fraction: float = 0.0
    velocity_weight: float = 0.0
    reduction: str = "mean"
    time_pairs: str = field(default="uniform", metadata={"help": "uniform | logit_normal (s, t) draws"})


def _build_consistency(cfg: ConsistencyConfig, ctx: BuildContext) -> list[Stage]:
    from fewflow.objectives.meanflow import time_pairs

    loss = ConsistencyLoss(
        ctx.need_teacher("consistency"), delta=cfg.delta, teacher_stepper=cfg.teacher_stepper,
        time_sampler=time_pairs(cfg.time_pairs), boundary_fraction=cfg.boundary_fraction,
        velocity_weight=cfg.velocity_weight, path=ctx.path, source=ctx.source, reduction=cfg.reduction,
        **ctx.conditioning(),
    )
    return [Stage("consistency", loss)]


register(MethodSpec(
    name="consistency",
    label="Consistency distillation",
    paper="Song et al., Consistency Models (2303.01469)",
    summary="consistency distillation of a velocity teacher into a flow map (one teacher ODE step per row)",
    config=ConsistencyConfig,
    loss=ConsistencyLoss,
    build=_build_consistency,
    needs=Needs(teacher="required", model="flow_map", init_from_teacher=True),
    sampler=DefaultSampler("flow_map", nfe=1),
    recipe_fields=("time_pairs",),
    family="fewstep",
))


@dataclass
class ShortcutConfig:
    """Settings of :class:`ShortcutLoss` (paper defaults)."""

    min_step: float = field(default=1.0 / 128, metadata={"help": "smallest step size d"})
    bootstrap_fraction: float = field(default=0.25, metadata={"help": "fraction of self-consistency rows"})
    reduction: str = "mean"


def _build_shortcut(cfg: ShortcutConfig, ctx: BuildContext) -> list[Stage]:
    loss = ShortcutLoss(
        path=ctx.path, source=ctx.source, min_step=cfg.min_step, bootstrap_fraction=cfg.bootstrap_fraction,
        reduction=cfg.reduction, **ctx.conditioning(),
    )
    return [Stage("shortcut", loss)]


register(MethodSpec(
    name="shortcut",
    label="Shortcut",
    paper="Frans et al., One Step Diffusion via Shortcut Models (2410.12557)",
    summary="a flow map trained from scratch: flow matching at d = 0 plus self-consistency of two half steps",
    docs="consistency",
    config=ShortcutConfig,
    loss=ShortcutLoss,
    build=_build_shortcut,
    needs=Needs(model="flow_map"),
    sampler=DefaultSampler("flow_map", nfe=1),
    family="fewstep",
))
