"""The MF-RAE recipe: consistency mid-training, MeanFlow distillation, MeanFlow bootstrapping.

From "MeanFlow Transformers with Representation Autoencoders" (Hu, Lai, Wu, Mitsufuji, Ermon, 2025;
arXiv 2511.13019; code ``sony/mf-rae``), written in **fewflow time** (t = 0 noise, t = 1 data; the paper and
code put noise at t = 1). The student is a flow-map model ``u(x, s, t)``,
``x_t = x_s + (t - s) u(x_s, s, t)``.

1. **Consistency mid-training (CMT)**, :class:`ConsistencyMidTrainingLoss`: run the frozen teacher's ODE from
   noise (``steps = 16`` Euler steps by default, ``fewflow.solvers.solve(..., trajectory=True)``), pick
   grid index pairs ``i < j`` and regress the student on the discrete flow map of the trajectory::

       L_CMT = mean || u(x_{t_i}, t_i, t_j) - (x_{t_j} - x_{t_i}) / (t_j - t_i) ||^2   (mean over dims)

   No JVP; the student starts from the teacher's weights (:func:`init_from_teacher`).
2. **MeanFlow distillation (MFD)**, :class:`MeanFlowDistillationLoss`: the MeanFlow identity (see
   :mod:`fewflow.objectives.meanflow`) with the teacher's velocity ``v = v_phi(x_s, s)`` and the time
   derivative by a central finite difference along the trajectory (``delta = 5e-3``)::

       du/ds ~ [u(x_s + delta v, s + delta, t) - u(x_s - delta v, s - delta, t)] / (2 delta)
       u_tgt = sg( v + (t - s) du/ds ),    L_i = || u(x_s, s, t) - u_tgt ||^2  (sum over dims)
       loss  = mean_i  L_i^2 / sg(L_i^2 + c)^p,   c = 1e-3, p = 1   (the code squares L_i)

   (The code's ``[u(z + delta v, r, t + delta) - u(z - delta v, r, t - delta)] / (2 delta)`` with noise at
   t = 1 becomes this under ``s = 1 - t_paper``, ``u = -u_paper``, ``v = -v_paper``.) Near ``s = 0`` or
   ``s = 1`` the stencil is clipped to ``[0, 1]`` (one-sided, first order) instead of leaving the domain.
3. **MeanFlow bootstrapping (MFT)**, :class:`MeanFlowBootstrapLoss`: the same with the one-point
   (conditional) velocity ``v = x1 - x0`` instead of the teacher, to remove the teacher's bias.

Defaults from the official code: (s, t) from two uniform draws shifted by ``sqrt(D/4096)`` (``shift``
here; 1 = unshifted at toy scale), sorted, 1/4 of rows with ``s != t``; the other 3/4 are boundary rows
``s = t`` at the *start* draw ``s`` (the code sets ``r = t`` at its noise-side time, our ``s``); label
dropout 0.1 when labels are given, no CFG. Sample in 1-2 steps with
``fewflow.solvers.solve(student, x0, steps=k)`` (flow-map jumps).

Longer than fewflow's ~400-line guide on purpose: the three losses of one recipe (CMT, MFD, MFT) share
their time sampling.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from fewflow._validate import FewflowError, check_batch, check_finite, expand_like, unknown_name
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
    drop_labels,
    per_sample_sq,
    rand,
    sample_source,
    unwrap,
)
from fewflow.objectives.meanflow import TimePairSampler, adaptive_weighted_loss
from fewflow.objectives.time_samplers import ShiftedTime, UniformTime

__all__ = [
    "ConsistencyMidTrainingLoss",
    "MeanFlowDistillationLoss",
    "MeanFlowBootstrapLoss",
    "finite_difference_du_ds",
    "init_from_teacher",
]


def _batch_cond(cond: dict[str, Any], n: int, reps: int) -> dict[str, Any]:
    """Repeat every batch-shaped conditioning tensor ``reps`` times along the batch."""
    return {
        k: (torch.cat([v] * reps) if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == n else v)
        for k, v in cond.items()
    }


@torch.no_grad()
def finite_difference_du_ds(
    model: Any,
    x: Tensor,
    s: Tensor,
    t: Tensor,
    v: Tensor,
    delta: float = 5e-3,
    *,
    cond: dict[str, Any] | None = None,
) -> Tensor:
    """Central finite-difference ``du/ds = v . d_x u + d_s u`` of a flow map along the trajectory.

    ``s_pm = clip(s +- delta, 0, 1)``; ``du/ds ~ [u(x + (s_+ - s) v, s_+, t) - u(x - (s - s_-) v, s_-, t)]
    / (s_+ - s_-)`` -- the central difference of "MeanFlow Transformers with Representation Autoencoders"
    (MF-RAE code, ``delta = 5e-3``) in fewflow time, one-sided at the ends of ``[0, 1]``. Both
    evaluations run in one batched no-grad forward. Error ``O(delta^2)`` inside, ``O(delta)`` at the ends.
    """
    if not (math.isfinite(delta) and 0 < delta < 0.5):
        raise FewflowError(f"finite-difference delta must lie in (0, 1/2), got {delta}")
    cond = cond or {}
    sp, sm = (s + delta).clamp(0.0, 1.0), (s - delta).clamp(0.0, 1.0)
    xp = x + expand_like(sp - s, x) * v
    xm = x + expand_like(sm - s, x) * v
    n = x.shape[0]
    out = unwrap(model)(
        torch.cat([xp, xm]), torch.cat([sp, sm]), torch.cat([t, t]), **_batch_cond(cond, n, 2)
    )
    up, um = out.to(x.dtype).chunk(2)
    return (up - um) / expand_like(sp - sm, x)


def init_from_teacher(
    student: nn.Module, teacher: nn.Module, zero: Sequence[str] = ()
) -> dict[str, list[str]]:
    """Initialise a flow-map student from a velocity teacher: copy every parameter/buffer whose name and
    shape match (``load_state_dict(strict=False)`` as in MF-RAE's ``train_cmt.py``), then zero the student
    parameters whose names start with a prefix in ``zero`` (e.g. ``("cond.h_embed.mlp.2",)`` for
    ``fewflow.models.MLP``, making the interval embedding vanish so that ``u(x, s, t) = v(x, t)`` at init).

    Returns ``{"copied": [...], "new": [...], "zeroed": [...]}``. Note that fewflow's reference networks
    embed the *end* time ``t`` (MF-RAE's DiT embeds the noise-side time, i.e. the start ``s``): at init the
    student predicts the teacher velocity at the end time; CMT corrects that.
    """
    t_state = teacher.state_dict()
    s_state = student.state_dict()
    copied, new = [], []
    with torch.no_grad():
        for name, val in s_state.items():
            src = t_state.get(name)
            if src is not None and src.shape == val.shape:
                val.copy_(src.to(val.dtype))
                copied.append(name)
            else:
                new.append(name)
        zeroed = []
        for name, p in student.named_parameters():
            if any(name.startswith(z) for z in zero):
                p.zero_()
                zeroed.append(name)
    if not copied:
        raise FewflowError(
            "init_from_teacher copied nothing: student and teacher share no parameter names/shapes"
        )
    return {"copied": copied, "new": new, "zeroed": zeroed}


# ------------------------------------------------------------------------------------------------ CMT


class ConsistencyMidTrainingLoss:
    """Consistency mid-training (CMT) on teacher ODE trajectories, ``objective(model, x1, ...)``.

    From "MeanFlow Transformers with Representation Autoencoders" (Hu et al. 2025), ``training_losses_cmt_v2``
    in fewflow time. ``x1`` only sets the batch size, shape and labels: the data are the teacher's own
    trajectories from fresh noise.

    Args:
        teacher: frozen velocity model ``v(x, t, **cond)``.
        steps: teacher ODE steps on a uniform grid (16 in the 256px config).
        stepper: the teacher's solver (``fewflow.solvers`` name or Stepper; the code uses Euler).
        pairs_per_trajectory: random grid pairs ``i < j`` drawn per trajectory (the code draws 64 pairs
            from a batch of 8 trajectories: 8 per trajectory).
        source: a ``Source`` for the noise; default standard normal.
        label_dropout, num_classes: null-label dropout (0.1 in the code, when labels are given).
    """

    def __init__(
        self,
        teacher: Any,
        steps: int = 16,
        stepper: Any = "euler",
        pairs_per_trajectory: int = 8,
        source: Any = None,
        label_dropout: float = 0.0,
        num_classes: int | None = None,
    ) -> None:
        if not callable(teacher):
            raise FewflowError(
                f"teacher must be a velocity model v(x, t, **cond), got {type(teacher).__name__}"
            )
        if isinstance(steps, bool) or int(steps) != steps or steps < 1:
            raise FewflowError(f"steps must be a positive integer, got {steps!r}")
        if isinstance(pairs_per_trajectory, bool) or int(pairs_per_trajectory) < 1:
            raise FewflowError(
                f"pairs_per_trajectory must be a positive integer, got {pairs_per_trajectory!r}"
            )
        if not 0.0 <= label_dropout < 1.0:
            raise FewflowError(f"label_dropout must lie in [0, 1), got {label_dropout}")
        self.teacher, self.steps, self.stepper = teacher, int(steps), stepper
        self.pairs_per_trajectory, self.source = int(pairs_per_trajectory), source
        self.label_dropout, self.num_classes = float(label_dropout), num_classes

    def trajectories(self, x0: Tensor, **cond: Any) -> tuple[Tensor, Tensor]:
        """``(traj, times)``: the teacher's ODE states ``(steps + 1, B, ...)`` at the grid ``times``."""
        from fewflow.solvers import solve

        res = solve(self.teacher, x0, steps=self.steps, stepper=self.stepper, cond=cond, trajectory=True)
        return res.trajectory.detach(), res.times.to(device=x0.device, dtype=x0.dtype)

    def loss_on_trajectory(
        self,
        model: Any,
        traj: Tensor,
        times: Tensor,
        *,
        generator: torch.Generator | None = None,
        pairs: tuple[Tensor, Tensor, Tensor] | None = None,
        **cond: Any,
    ) -> LossOutput:
        """CMT loss on given trajectories ``traj`` ``(S, B, ...)`` at increasing ``times`` ``(S,)``.

        ``pairs = (b, i, j)`` picks rows ``b`` and grid indices ``i < j`` explicitly; by default
        ``pairs_per_trajectory`` random pairs per trajectory are drawn.
        """
        check_flow_map(model, "ConsistencyMidTrainingLoss")
        n_s, b = traj.shape[0], traj.shape[1]
        if n_s < 2 or times.shape != (n_s,):
            raise FewflowError(
                f"need >= 2 trajectory points and times of shape ({n_s},), got {tuple(times.shape)}"
            )
        if bool((times[1:] <= times[:-1]).any()):
            raise FewflowError("trajectory times must increase strictly (t = 0 noise to t = 1 data)")
        if pairs is None:
            k = self.pairs_per_trajectory
            rows = torch.arange(b, device=traj.device).repeat(k)
            a = torch.floor(rand(b * k, times, generator) * n_s).long().clamp_max(n_s - 1).to(traj.device)
            c = (
                torch.floor(rand(b * k, times, generator) * (n_s - 1))
                .long()
                .clamp_max(n_s - 2)
                .to(traj.device)
            )
            c = c + (c >= a).long()  # c uniform over the other indices
            i, j = torch.minimum(a, c), torch.maximum(a, c)
        else:
            rows, i, j = (p.to(traj.device).long() for p in pairs)
            if bool((i >= j).any()):
                raise FewflowError("CMT pairs need i < j (the target divides by t_j - t_i)")
        x_i, x_j = traj[i, rows], traj[j, rows]
        t_i, t_j = times[i], times[j]
        target = (x_j - x_i) / expand_like(t_j - t_i, x_i)
        cond_r = {
            key: (v[rows] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == b else v)
            for key, v in cond.items()
        }
        u = model(x_i, t_i, t_j, **cond_r)
        sq = per_sample_sq(u - target, "mean")
        diag = {
            "mse": float(sq.detach().mean()),
            "pairs": float(rows.numel()),
            "mean_gap": float((t_j - t_i).mean()),
        }
        return LossOutput(loss=sq.mean(), diagnostics=diag)

    def __call__(
        self, model: Any, x1: Tensor, *, generator: torch.Generator | None = None, **cond: Any
    ) -> LossOutput:
        check_finite("x1", x1)
        check_batch("x1", x1)
        cond, _ = drop_labels(cond, self.label_dropout, self.num_classes, x1, generator)
        x0 = sample_source(self.source, x1, generator)
        traj, times = self.trajectories(x0, **cond)
        return self.loss_on_trajectory(model, traj, times, generator=generator, **cond)

    def __repr__(self) -> str:
        k = self.pairs_per_trajectory
        return f"ConsistencyMidTrainingLoss(steps={self.steps}, pairs_per_trajectory={k})"


# ------------------------------------------------------------------------------------------ MFD / MFT


class MeanFlowDistillationLoss(SampledTimesObjective):
    """MeanFlow distillation (MFD) with the finite-difference time derivative, ``objective(model, x1, ...)``.

    From "MeanFlow Transformers with Representation Autoencoders" (Hu et al. 2025), ``training_losses_mfd``
    in fewflow time (module docstring). :class:`MeanFlowBootstrapLoss` is the MFT variant.

    Args:
        teacher: frozen velocity model ``v(x, t, **cond)`` giving ``v`` (no-grad).
        delta: finite-difference step (5e-3).
        ratio: fraction of rows with ``s != t`` (1/4).
        shift: time shift of the uniform draws (``sqrt(D / 4096)`` in the code; 1 = none), used when
            ``time_sampler`` is None.
        time_sampler: a :class:`~fewflow.objectives.meanflow.TimePairSampler` overriding ``shift``.
        adaptive_p, adaptive_c: ``loss = mean L^2 / sg(L^2 + c)^p`` (p = 1, c = 1e-3; p = 0 gives mean L^2,
            use ``square=False`` for MeanFlow's ``L / sg(L + c)^p``).
        square: square the per-sample loss before weighting, as the code does (default True).
        reduction: per-sample ``"sum"`` (code) or ``"mean"`` over dims.
        path, source, label_dropout, num_classes: as in MeanFlowLoss (linear path only).
    """

    uses_teacher = True

    def __init__(
        self,
        teacher: Any,
        delta: float = 5e-3,
        ratio: float = 0.25,
        shift: float = 1.0,
        time_sampler: TimePairSampler | None = None,
        adaptive_p: float = 1.0,
        adaptive_c: float = 1e-3,
        square: bool = True,
        reduction: str = "sum",
        path: Any = None,
        source: Any = None,
        label_dropout: float = 0.0,
        num_classes: int | None = None,
    ) -> None:
        check_linear_path(path, type(self).__name__)
        if self.uses_teacher and not callable(teacher):
            raise FewflowError(
                f"teacher must be a velocity model v(x, t, **cond), got {type(teacher).__name__}"
            )
        if not (math.isfinite(delta) and 0 < delta < 0.5):
            raise FewflowError(f"delta must lie in (0, 1/2), got {delta}")
        if not 0.0 <= ratio <= 1.0:
            raise FewflowError(f"ratio (fraction of s != t) must lie in [0, 1], got {ratio}")
        if adaptive_p < 0 or adaptive_c <= 0:
            raise FewflowError(
                f"adaptive weighting needs p >= 0 and c > 0, got p={adaptive_p}, c={adaptive_c}"
            )
        if not 0.0 <= label_dropout < 1.0:
            raise FewflowError(f"label_dropout must lie in [0, 1), got {label_dropout}")
        if reduction not in ("sum", "mean"):
            raise unknown_name("reduction", reduction, ("sum", "mean"))
        self.teacher, self.delta, self.ratio = teacher, float(delta), float(ratio)
        if time_sampler is None:
            # the code shifts noise-level time by s t / (1 + (s - 1) t): fewflow's shift_time
            time_sampler = TimePairSampler(
                ShiftedTime(UniformTime(), shift) if shift != 1.0 else UniformTime()
            )
        self.time_sampler = time_sampler
        self.adaptive_p, self.adaptive_c, self.square = float(adaptive_p), float(adaptive_c), bool(square)
        self.reduction, self.source = reduction, source
        self.label_dropout, self.num_classes = float(label_dropout), num_classes

    def sample_times(
        self, n: int, like: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(s, t)``: the first ``round(ratio * n)`` rows keep ``s < t``; the others are boundary rows
        ``t = s`` at the sampled *start* time.

        The code (noise at t = 1) sorts ``r < t`` and sets ``r = t``: the boundary time is its larger,
        noise-side draw ``t_paper``, which is fewflow's *smaller* draw ``s = 1 - t_paper``. So boundary rows
        sit at ``min`` of the two draws (mean 1/3 for unshifted uniforms), as in :class:`MeanFlowLoss`.
        """
        s, t = self.time_sampler.sample(n, device=like.device, dtype=like.dtype, generator=generator)
        keep = torch.arange(n, device=like.device) < int(round(self.ratio * n))
        return s, torch.where(keep, t, s)

    def velocity(self, x_s: Tensor, s: Tensor, x0: Tensor, x1: Tensor, cond: dict[str, Any]) -> Tensor:
        """The velocity ``v`` at ``x_s`` fed to the identity: the teacher's (MFD)."""
        with torch.no_grad():
            return self.teacher(x_s, s, **cond).to(x_s.dtype)

    def target(
        self, model: Any, x_s: Tensor, s: Tensor, t: Tensor, v: Tensor, cond: dict[str, Any]
    ) -> Tensor:
        """``u_tgt = sg(v + (t - s) du/ds)`` with :func:`finite_difference_du_ds`."""
        du = finite_difference_du_ds(model, x_s, s, t, v, self.delta, cond=cond)
        return (v + expand_like(t - s, x_s) * du).detach()

    def loss_at(self, model: Any, x0: Tensor, x1: Tensor, s: Tensor, t: Tensor, **cond: Any) -> LossOutput:
        """The loss on given pairs and times (labels already dropped)."""
        check_flow_map(model, type(self).__name__)
        if bool((s > t).any()):
            raise FewflowError(f"{type(self).__name__} needs s <= t (start before end in fewflow time)")
        se = expand_like(s, x1)
        x_s = se * x1 + (1.0 - se) * x0
        v = self.velocity(x_s, s, x0, x1, cond)
        u_tgt = self.target(model, x_s, s, t, v, cond)
        u = model(x_s, s, t, **cond)
        per = per_sample_sq(u - u_tgt, self.reduction)
        loss, _ = adaptive_weighted_loss(per.pow(2) if self.square else per, self.adaptive_p, self.adaptive_c)
        with torch.no_grad():
            neq = s != t
            diag = {
                "mse": float(per.mean()),
                "mse_boundary": float(per[~neq].mean()) if bool((~neq).any()) else float("nan"),
                "mse_flow_map": float(per[neq].mean()) if bool(neq.any()) else float("nan"),
            }
        return LossOutput(loss=loss, diagnostics=diag)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(delta={self.delta:g}, ratio={self.ratio:g}, p={self.adaptive_p:g}, "
            f"time_sampler={self.time_sampler!r})"
        )


class MeanFlowBootstrapLoss(MeanFlowDistillationLoss):
    """MeanFlow bootstrapping (MFT): :class:`MeanFlowDistillationLoss` with the one-point velocity
    ``v = x1 - x0`` instead of a teacher (MF-RAE ``training_losses_mft``), run after MFD to reduce the
    deviation inherited from the teacher. Same arguments, without ``teacher``."""

    uses_teacher = False

    def __init__(self, **kwargs: Any) -> None:
        if "teacher" in kwargs:
            raise FewflowError(
                "MeanFlowBootstrapLoss uses the one-point velocity x1 - x0; it takes no teacher"
            )
        super().__init__(None, **kwargs)

    def velocity(self, x_s: Tensor, s: Tensor, x0: Tensor, x1: Tensor, cond: dict[str, Any]) -> Tensor:
        """The conditional (one-point) velocity ``x1 - x0``."""
        return (x1 - x0).detach()


# --------------------------------------------------------------------------- registration


@dataclass
class MFRAEConfig:
    """The MF-RAE recipe: consistency mid-training (CMT) on teacher trajectories, then MeanFlow
    distillation (MFD) with the finite-difference target. Loss settings are the authors' defaults."""

    cmt_share: float = field(default=0.5, metadata={"help": "fraction of the budget spent in CMT"})
    cmt_steps: int = field(default=16, metadata={"help": "teacher ODE steps of a CMT trajectory"})
    cmt_stepper: str = "euler"
    pairs_per_trajectory: int = 8
    delta: float = field(default=0.005, metadata={"help": "MFD finite-difference step"})
    ratio: float = 0.25
    shift: float = 1.0
    adaptive_p: float = 1.0
    adaptive_c: float = 1e-3
    square: bool = True
    reduction: str = "sum"


def _build_mfrae(cfg: MFRAEConfig, ctx: BuildContext) -> list[Stage]:
    teacher = ctx.need_teacher("mfrae")
    if not 0.0 <= cfg.cmt_share < 1.0:
        raise FewflowError(f"cmt_share must lie in [0, 1), got {cfg.cmt_share}")
    cmt = ConsistencyMidTrainingLoss(
        teacher, steps=cfg.cmt_steps, stepper=cfg.cmt_stepper, pairs_per_trajectory=cfg.pairs_per_trajectory,
        source=ctx.source, **ctx.conditioning(),
    )
    mfd = MeanFlowDistillationLoss(
        teacher, delta=cfg.delta, ratio=cfg.ratio, shift=cfg.shift, adaptive_p=cfg.adaptive_p,
        adaptive_c=cfg.adaptive_c, square=cfg.square, reduction=cfg.reduction, path=ctx.path,
        source=ctx.source,
        **ctx.conditioning(),
    )
    stages = [Stage("cmt", cmt, share=cfg.cmt_share, batch_divisor=cfg.pairs_per_trajectory)]
    stages = stages if cfg.cmt_share else []
    return [*stages, Stage("mfd", mfd, share=1.0 - cfg.cmt_share)]


register(MethodSpec(
    name="mfrae",
    label="MF-RAE (CMT->MFD)",
    paper="Hu et al., MeanFlow Transformers with Representation Autoencoders (MF-RAE, 2511.13019)",
    summary="consistency mid-training on teacher trajectories, then MeanFlow distillation",
    config=MFRAEConfig,
    loss=MeanFlowDistillationLoss,
    build=_build_mfrae,
    needs=Needs(teacher="required", model="flow_map", init_from_teacher=True, ddp_mode="allreduce"),
    sampler=DefaultSampler("flow_map", nfe=1),
    recipe_fields=("cmt_share", "cmt_steps", "cmt_stepper", "pairs_per_trajectory"),
    family="fewstep",
))
