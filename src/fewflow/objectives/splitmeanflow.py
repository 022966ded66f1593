"""SplitMeanFlow: flow-map training by interval-splitting consistency, without a JVP.

From "SplitMeanFlow: Interval Splitting Consistency in Few-Step Generative Modeling" (Guo et al., ByteDance
Seed, 2025; arXiv 2507.16884), written in **fewflow time** (t = 0 source/noise, t = 1 data).

A flow-map model ``u(x, s, t)`` is the average velocity on ``[s, t]`` evaluated at the start point, so
``x_t = x_s + (t - s) u(x_s, s, t)``. Additivity of the integral ``(t - s) u = int_s^t v`` gives, for
``s <= r <= t``, the **interval splitting consistency**::

    (t - s) u(x_s, s, t) = (r - s) u(x_s, s, r) + (t - r) u(x_r, r, t),   x_r = x_s + (r - s) u(x_s, s, r).

With ``r = s + lam (t - s)``, ``lam in [0, 1]``, this reads
``u(x_s, s, t) = lam u(x_s, s, r) + (1 - lam) u(x_r, r, t)``.
(Letting ``r -> s`` recovers the MeanFlow identity; the paper's Theorem.) Training regresses
``u_theta(x_s, s, t)`` on the stop-gradient right-hand side (both legs and ``x_r`` detached: two no-grad
forwards, one differentiated forward). On its own the identity has trivial solutions (``u = 0``); the
**boundary condition** ``u(x, t, t) = v(x, t)`` anchors it: rows with ``s = t`` are flow matching on the
linear path, with the conditional velocity ``x1 - x0`` (from scratch) or a teacher velocity model's
prediction ``teacher(x_t, t, **cond)`` (distillation, as the paper does for its speech models).
"""

from __future__ import annotations

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
from fewflow.objectives.meanflow import TimePairSampler, adaptive_weighted_loss

__all__ = ["SplitMeanFlowLoss", "splitmeanflow_target"]


@torch.no_grad()
def splitmeanflow_target(
    model: Any, x: Tensor, s: Tensor, t: Tensor, lam: Tensor, *, cond: dict[str, Any] | None = None
) -> Tensor:
    """The detached interval-splitting target for ``u(x, s, t)`` with split point ``r = s + lam (t - s)``::

        u1 = u(x, s, r),   x_r = x + (r - s) u1,   u2 = u(x_r, r, t),   target = lam u1 + (1 - lam) u2.

    For the exact flow map the target equals ``u(x, s, t)`` ("SplitMeanFlow", Guo et al. 2025, Eq. for
    interval splitting consistency, in fewflow time).
    """
    cond = cond or {}
    r = s + lam * (t - s)
    u1 = model(x, s, r, **cond)
    x_r = x + expand_like(r - s, x) * u1
    u2 = model(x_r, r, t, **cond)
    lam_e = expand_like(lam, x)
    return lam_e * u1 + (1.0 - lam_e) * u2


class SplitMeanFlowLoss(SampledTimesObjective):
    """SplitMeanFlow objective ``objective(model, x1, *, generator=None, **cond) -> LossOutput``.

    From "SplitMeanFlow: Interval Splitting Consistency in Few-Step Generative Modeling" (Guo et al. 2025).
    No official code: defaults follow the paper's description and an unofficial re-implementation (boundary
    fraction 0.5, uniform times, ``lam ~ U(0, 1)``). Sample like MeanFlow with the flow map (1-2 steps).

    Args:
        path: ``None``/``"linear"`` or an affine path with the linear schedule.
        source: a ``Source``; default standard Gaussian noise.
        time_sampler: a :class:`~fewflow.objectives.meanflow.TimePairSampler`; default uniform sorted pairs.
        boundary_fraction: fraction of each batch with ``s = t`` (the flow-matching boundary term).
        teacher: optional velocity model ``v(x, t, **cond)`` giving the boundary velocity instead of
            ``x1 - x0`` (wrap it in ``fewflow.guidance.CFG`` to bake guidance into the student).
        adaptive_p, adaptive_c: MeanFlow-style adaptive weighting (default ``p = 0``: plain MSE).
        label_dropout, num_classes: label dropout to the null class ``num_classes``.
        reduction: ``"sum"`` or ``"mean"`` over data dims of the per-sample squared error.
    """

    def __init__(
        self,
        path: Any = None,
        source: Any = None,
        time_sampler: TimePairSampler | None = None,
        boundary_fraction: float = 0.5,
        teacher: Any = None,
        adaptive_p: float = 0.0,
        adaptive_c: float = 1e-3,
        label_dropout: float = 0.0,
        num_classes: int | None = None,
        reduction: str = "sum",
    ) -> None:
        check_linear_path(path, "SplitMeanFlowLoss")
        if not 0.0 <= boundary_fraction <= 1.0:
            raise FewflowError(f"boundary_fraction must lie in [0, 1], got {boundary_fraction}")
        if boundary_fraction == 0.0:
            raise FewflowError(
                "boundary_fraction = 0 leaves the consistency loss without its anchor (u = 0 solves it); "
                "use a positive fraction"
            )
        if adaptive_p < 0 or adaptive_c <= 0:
            raise FewflowError(f"adaptive weighting needs p >= 0, c > 0; got p={adaptive_p} c={adaptive_c}")
        if not 0.0 <= label_dropout < 1.0:
            raise FewflowError(f"label_dropout must lie in [0, 1), got {label_dropout}")
        if teacher is not None and not callable(teacher):
            raise FewflowError(f"teacher must be a velocity v(x, t, **cond), not {type(teacher).__name__}")
        if reduction not in ("sum", "mean"):
            raise unknown_name("reduction", reduction, ("sum", "mean"))
        self.source, self.teacher = source, teacher
        self.time_sampler = time_sampler if time_sampler is not None else TimePairSampler.uniform()
        self.boundary_fraction = float(boundary_fraction)
        self.adaptive_p, self.adaptive_c = float(adaptive_p), float(adaptive_c)
        self.label_dropout, self.num_classes = float(label_dropout), num_classes
        self.reduction = reduction

    def sample_times(
        self, n: int, like: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(s, t, lam)``: the last ``round(boundary_fraction * n)`` rows get ``t = s`` (boundary rows)."""
        s, t = self.time_sampler.sample(n, device=like.device, dtype=like.dtype, generator=generator)
        n_b = int(round(self.boundary_fraction * n))
        boundary = torch.arange(n, device=like.device) >= n - n_b
        lam = rand(n, like, generator)
        return s, torch.where(boundary, s, t), lam

    def loss_at(
        self, model: Any, x0: Tensor, x1: Tensor, s: Tensor, t: Tensor, lam: Tensor, **cond: Any
    ) -> LossOutput:
        """The loss on given pairs and times. Rows with ``s == t`` are boundary (flow-matching) rows; the
        others regress ``u(x_s, s, t)`` on :func:`splitmeanflow_target` with split ``lam``."""
        check_flow_map(model, "SplitMeanFlowLoss")
        if bool((s > t).any()):
            raise FewflowError("SplitMeanFlow needs s <= t (start before end in fewflow time)")
        se = expand_like(s, x1)
        x_s = se * x1 + (1.0 - se) * x0
        bnd = s == t
        target = torch.empty_like(x_s)
        with torch.no_grad():
            if bool(bnd.any()):
                cb = select_rows(cond, bnd)
                if self.teacher is None:
                    target[bnd] = (x1 - x0)[bnd]
                else:
                    target[bnd] = self.teacher(x_s[bnd], s[bnd], **cb).to(x_s.dtype)
            if bool((~bnd).any()):
                m = ~bnd
                target[m] = splitmeanflow_target(model, x_s[m], s[m], t[m], lam[m], cond=select_rows(cond, m))
        u = model(x_s, s, t, **cond)
        sq = per_sample_sq(u - target, self.reduction)
        loss, _ = adaptive_weighted_loss(sq, self.adaptive_p, self.adaptive_c)
        with torch.no_grad():
            diag = {
                "mse": float(sq.mean()),
                "mse_boundary": float(sq[bnd].mean()) if bool(bnd.any()) else float("nan"),
                "mse_consistency": float(sq[~bnd].mean()) if bool((~bnd).any()) else float("nan"),
                "frac_boundary": float(bnd.to(s.dtype).mean()),
            }
        return LossOutput(loss=loss, diagnostics=diag)

    def __repr__(self) -> str:
        return (
            f"SplitMeanFlowLoss(boundary_fraction={self.boundary_fraction:g}, "
            f"time_sampler={self.time_sampler!r}, teacher={'yes' if self.teacher is not None else 'no'})"
        )


# --------------------------------------------------------------------------- registration


@dataclass
class SplitMeanFlowConfig:
    """Settings of :class:`SplitMeanFlowLoss` (paper defaults)."""

    boundary_fraction: float = field(default=0.5, metadata={"help": "fraction of rows with s = t"})
    adaptive_p: float = 0.0
    adaptive_c: float = 1e-3
    reduction: str = "sum"


def _build_split(cfg: SplitMeanFlowConfig, ctx: BuildContext) -> list[Stage]:
    loss = SplitMeanFlowLoss(
        path=ctx.path, source=ctx.source, teacher=ctx.teacher, boundary_fraction=cfg.boundary_fraction,
        adaptive_p=cfg.adaptive_p, adaptive_c=cfg.adaptive_c, reduction=cfg.reduction, **ctx.conditioning(),
    )
    return [Stage("splitmeanflow", loss)]


register(MethodSpec(
    name="splitmeanflow",
    label="SplitMeanFlow",
    paper="Guo et al., SplitMeanFlow: Interval Splitting Consistency in Few-Step Generative Modeling "
    "(2507.16884)",
    summary="interval-splitting consistency of u(s, t); with --teacher the boundary is distilled",
    config=SplitMeanFlowConfig,
    loss=SplitMeanFlowLoss,
    build=_build_split,
    needs=Needs(teacher="optional", model="flow_map", init_from_teacher=True),
    sampler=DefaultSampler("flow_map", nfe=1),
    family="fewstep",
))
