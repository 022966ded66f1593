"""MDT-dist: Velocity Matching and Velocity Distillation for few-step flow distillation.

From "Few-step Flow for 3D Generation via Marginal-Data Transport Distillation" (Zhou, Yi, Fang et al.,
2025; arXiv 2509.04406; code ``Zanue/MDT-dist``), written in **fewflow time** (t = 0 noise, t = 1 data; the
paper/TRELLIS put noise at t = 1). The student learns the *marginal-data transport*: the average velocity
from time ``s`` to the data end, i.e. a flow-map model queried as ``u(x, s, 1)``::

    x_1 = x_s + (1 - s) u(x_s, s, 1)          (paper: x_0 = x_t - t F(x_t, t); its r = 0 is our t = 1).

**Velocity Matching (VM)** -- the MeanFlow identity with the end fixed at the data and the teacher's
velocity ``v_T = v_phi(x_s, s)``, classifier-free guided with its own scale when labels are given
(``v_T = v_u + w_VM (v_c - v_u)``, see *Teacher guidance* below)::

    d = [u(x_s + Delta v_T, s + Delta, 1) - u(x_s, s, 1)] / Delta         (discrete, Delta = 0.01, no-grad)
    d <- d / (||d|| + c)                                                   (d_norm, per sample, c = 0.1)
    u_tgt = sg( v_T + (1 - s) d ),     L_VM = mean || u(x_s, s, 1) - u_tgt ||^2.

(The code's backward difference ``[F(x_t, t) - F(x_t - Delta v_T, t - Delta)] / Delta`` in noise-at-1
time is this forward difference toward the data.) Without ``d_norm`` the target of the exact flow map
equals the flow map up to ``O(Delta)``; ``d_norm`` bounds the derivative term (and changes the target).

**Velocity Distillation (VD)** -- a distribution-level loss on the student's own one-step samples::

    v_fake = u(z, 0, 1),  x_fake = z + v_fake                               (gradient flows here only)
    x_s = s x_fake + (1 - s) eps;   diff = sg( u(x_s, s, 1) - u_tgt(x_s) )  (VM target at the fakes,
                                                                             teacher guided with w_VD)
    L_VD = mean || diff + v_fake - sg(v_fake) ||^2     =>  grad = 2 diff . d v_fake / d theta / N.

The generator input ``z`` is its own fresh noise. The re-noising noise ``eps`` and time ``s`` are, as in
the code (``get_v_pred_tgt(x_fake, noise, t, ...)``), the *same* ``x0`` and ``s`` that the VM term of the
batch uses (``vd_noise="shared"``, default); ``vd_noise="independent"`` draws fresh ones. Both give the
same expected loss; sharing pairs each real row with a fake row noised identically.

**Teacher guidance.** The code guides the teacher separately for the two terms, in TRELLIS' form
``(1 + w) v_c - w v_u`` with ``w = 40`` for VM and ``w = 100`` for VD (``cfg_teacher_vm``,
``cfg_teacher_vd``; both released configs). In fewflow's CFG convention ``v_u + w (v_c - v_u)``
(:class:`fewflow.guidance.CFG`, ``w = 1`` = the plain conditional teacher) those are ``guidance_vm = 41``
and ``guidance_vd = 101``, the defaults here. They apply when labels ``y`` are passed (null label
``num_classes``, one batched teacher forward per target); without labels the teacher is called as is.

The student itself is the "fake" velocity estimator (the code keeps no auxiliary fake-score network):
where the student's transport at re-noised fakes disagrees with the teacher-implied one, its one-step
output is moved against the disagreement. Total ``L = lambda_VM L_VM + lambda_VD L_VD`` (1 and 1).

Sampling (code): one step ``x = z + u(z, 0, 1)``; ``k`` steps = Euler on a uniform grid with ``u(x, s, 1)``
as the velocity (= DDIM with the data prediction ``x_s + (1 - s) u``): ``solve(DataEndVelocity(model),
z, steps=k)``.

Longer than fewflow's ~400-line guide on purpose: the loss, its derivative helpers and the data-end
sampler view belong to one method.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fewflow._validate import FewflowError, check_batch, check_finite, expand_like, unknown_name
from fewflow.guidance.cfg import CFG
from fewflow.methods.registry import (
    BuildContext,
    DefaultSampler,
    MethodSpec,
    Needs,
    SamplingPlan,
    Stage,
    register,
    register_variant,
)
from fewflow.objectives.base import LossOutput
from fewflow.objectives.common import (
    check_flow_map,
    check_linear_path,
    drop_labels,
    sample_source,
    unwrap,
)
from fewflow.objectives.time_samplers import LogitNormalTime, TimeSampler

__all__ = ["MDTDistLoss", "DataEndVelocity", "mdt_time_derivative", "velocity_matching_target"]


class DataEndVelocity:
    """Velocity-model view ``v(x, s) = u(x, s, 1)`` of a flow-map student, for MDT-dist's k-step sampler:
    ``fewflow.solvers.solve(DataEndVelocity(student), z, steps=k)`` is Euler with the transport to the
    data as the velocity (one step: ``z + u(z, 0, 1)``)."""

    is_flow_map = False

    def __init__(self, model: Any) -> None:
        self.model = model

    def __call__(self, x: Tensor, s: Tensor | float, **cond: Any) -> Tensor:
        from fewflow._validate import as_batch_time

        sb = as_batch_time(s, x)
        return self.model(x, sb, torch.ones_like(sb), **cond)


@torch.no_grad()
def mdt_time_derivative(
    model: Any,
    x: Tensor,
    s: Tensor,
    v: Tensor,
    delta: float = 0.01,
    *,
    d_norm: bool = True,
    c: float = 0.1,
    u: Tensor | None = None,
    cond: dict[str, Any] | None = None,
) -> Tensor:
    """MDT-dist's "discrete" derivative of ``u(x_s, s, 1)`` along the teacher trajectory (no-grad)::

        d = [u(x + Delta v, s + Delta, 1) - u(x, s, 1)] / Delta,     d <- d / (||d|| + c) if d_norm.

    ``u`` (the detached ``u(x, s, 1)``) may be passed to save a forward. ``s + Delta`` must stay <= 1.
    """
    if not (math.isfinite(delta) and 0 < delta < 1):
        raise FewflowError(f"delta must lie in (0, 1), got {delta}")
    if bool((s + delta > 1 + 1e-6).any()):
        raise FewflowError(
            f"MDT needs s + delta <= 1 (s in [0, 1 - delta]); got max s = {float(s.max()):.4g}"
        )
    cond = cond or {}
    inner = unwrap(model)
    ones = torch.ones_like(s)
    if u is None:
        u = inner(x, s, ones, **cond)
    u_next = inner(x + delta * v, s + delta, ones, **cond)
    d = (u_next.to(x.dtype) - u.detach().to(x.dtype)) / delta
    if d_norm:
        norm = d.reshape(d.shape[0], -1).norm(dim=1)
        d = d / expand_like(norm + c, d)
    return d


@torch.no_grad()
def velocity_matching_target(
    model: Any,
    teacher: Any,
    x: Tensor,
    s: Tensor,
    delta: float = 0.01,
    *,
    d_norm: bool = True,
    c: float = 0.1,
    u: Tensor | None = None,
    cond: dict[str, Any] | None = None,
) -> Tensor:
    """``u_tgt = v_T + (1 - s) d`` with ``v_T = teacher(x, s)`` and ``d`` from :func:`mdt_time_derivative`
    (MDT-dist's ``get_v_pred_tgt``, in fewflow time). Detached."""
    cond = cond or {}
    v_t = teacher(x, s, **cond).to(x.dtype)
    d = mdt_time_derivative(model, x, s, v_t, delta, d_norm=d_norm, c=c, u=u, cond=cond)
    return v_t + expand_like(1.0 - s, x) * d


class MDTDistLoss:
    """MDT-dist objective ``objective(model, x1, *, generator=None, **cond) -> LossOutput``: Velocity
    Matching, Velocity Distillation, or both (``lambda_vm``, ``lambda_vd``; set one to 0 for the other alone).

    From "Few-step Flow for 3D Generation via Marginal-Data Transport Distillation" (Zhou et al. 2025);
    see the module docstring. Initialise the student from the teacher
    (:func:`fewflow.objectives.mfrae.init_from_teacher`) as the paper does.

    Args:
        teacher: frozen velocity model ``v(x, t, **cond)``; with labels, ``v(x, t, y=...)`` with null label
            ``num_classes`` (do not pass an already guided ``CFG`` wrapper: guidance is applied here).
        lambda_vm, lambda_vd: loss weights (1, 1).
        guidance_vm, guidance_vd: CFG scales ``w`` of the teacher in the VM and VD targets,
            ``v_u + w (v_c - v_u)`` (41 and 101 = the code's 40 and 100 in TRELLIS' ``(1 + w)`` form).
            Used when labels ``y`` are passed (needs ``num_classes``); ``None`` or 1 = the plain
            conditional teacher.
        vd_noise: ``"shared"`` (code): VD re-noises the fakes with the VM term's ``x0`` and time ``s``;
            ``"independent"``: fresh noise and time for VD.
        delta: finite-difference step ``Delta`` (0.01).
        d_norm, d_norm_c: normalise the derivative ``d / (||d|| + c)`` (True, 0.1).
        time_sampler: a ``TimeSampler`` on ``[0, 1]`` rescaled to ``[0, 1 - delta]``; default the code's
            logit-normal(1, 1) over noise time (``LogitNormalTime.from_noise_time(1.0, 1.0)``).
        source: noise source for ``x0`` and the VD generator input; default standard normal.
        label_dropout, num_classes: null-label dropout.
    """

    def __init__(
        self,
        teacher: Any,
        lambda_vm: float = 1.0,
        lambda_vd: float = 1.0,
        delta: float = 0.01,
        d_norm: bool = True,
        d_norm_c: float = 0.1,
        time_sampler: TimeSampler | None = None,
        path: Any = None,
        source: Any = None,
        label_dropout: float = 0.0,
        num_classes: int | None = None,
        guidance_vm: float | None = 41.0,
        guidance_vd: float | None = 101.0,
        vd_noise: str = "shared",
    ) -> None:
        check_linear_path(path, "MDTDistLoss")
        if not callable(teacher):
            raise FewflowError(
                f"teacher must be a velocity model v(x, t, **cond), got {type(teacher).__name__}"
            )
        if lambda_vm < 0 or lambda_vd < 0 or lambda_vm + lambda_vd == 0:
            raise FewflowError(f"need lambda_vm, lambda_vd >= 0 and not both 0, got {lambda_vm}, {lambda_vd}")
        if not (math.isfinite(delta) and 0 < delta < 0.5):
            raise FewflowError(f"delta must lie in (0, 1/2), got {delta}")
        if d_norm_c <= 0:
            raise FewflowError(f"d_norm_c must be positive, got {d_norm_c}")
        if not 0.0 <= label_dropout < 1.0:
            raise FewflowError(f"label_dropout must lie in [0, 1), got {label_dropout}")
        for name, w in (("guidance_vm", guidance_vm), ("guidance_vd", guidance_vd)):
            if w is not None and not (math.isfinite(float(w)) and float(w) >= 0):
                raise FewflowError(f"{name} must be None or a finite number >= 0, got {w}")
        if vd_noise not in ("shared", "independent"):
            raise unknown_name("vd_noise", vd_noise, ("shared", "independent"))
        self.teacher = teacher
        self.lambda_vm, self.lambda_vd = float(lambda_vm), float(lambda_vd)
        self.delta, self.d_norm, self.d_norm_c = float(delta), bool(d_norm), float(d_norm_c)
        self.time_sampler = (
            time_sampler if time_sampler is not None else LogitNormalTime.from_noise_time(1.0, 1.0)
        )
        self.source = source
        self.label_dropout, self.num_classes = float(label_dropout), num_classes
        self.guidance_vm = None if guidance_vm is None else float(guidance_vm)
        self.guidance_vd = None if guidance_vd is None else float(guidance_vd)
        self.vd_noise = vd_noise

    def teacher_for(self, term: str, cond: dict[str, Any]) -> Any:
        """The teacher of the ``"vm"`` or ``"vd"`` target: ``CFG(teacher, guidance_<term>, num_classes)``
        when labels ``y`` are passed and the scale is not None/1, else the teacher itself."""
        w = self.guidance_vm if term == "vm" else self.guidance_vd
        if w is None or w == 1.0 or cond.get("y") is None:
            return self.teacher
        if self.num_classes is None:
            raise FewflowError(
                f"MDTDistLoss got labels y and guidance_{term}={w:g} (teacher CFG) but no num_classes for "
                "the null label; pass num_classes, or guidance_vm=guidance_vd=None for the plain "
                "conditional teacher"
            )
        return CFG(self.teacher, w, self.num_classes)

    def sample_times(self, n: int, like: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Start times ``s`` in ``[0, 1 - delta]``."""
        s = self.time_sampler.sample(n, device=like.device, dtype=like.dtype, generator=generator)
        return s * (1.0 - self.delta)

    def vm_loss(self, model: Any, x0: Tensor, x1: Tensor, s: Tensor, **cond: Any) -> tuple[Tensor, Tensor]:
        """Per-sample VM losses (mean over dims) ``||u(x_s, s, 1) - u_tgt||^2`` and the prediction."""
        se = expand_like(s, x1)
        x_s = se * x1 + (1.0 - se) * x0
        u = model(x_s, s, torch.ones_like(s), **cond)
        tgt = velocity_matching_target(
            model,
            self.teacher_for("vm", cond),
            x_s,
            s,
            self.delta,
            d_norm=self.d_norm,
            c=self.d_norm_c,
            u=u.detach(),
            cond=cond,
        )
        per = (u - tgt).pow(2).reshape(u.shape[0], -1).mean(1)
        return per, u

    def vd_loss(
        self, model: Any, z: Tensor, s: Tensor, eps: Tensor, **cond: Any
    ) -> tuple[Tensor, Tensor, Tensor]:
        """VD on one-step fakes from ``z`` re-noised at ``s`` with ``eps``: returns ``(loss, diff, v_fake)``
        with ``loss = mean (diff + v_fake - sg v_fake)^2``; only ``v_fake = u(z, 0, 1)`` carries gradient."""
        zeros = torch.zeros_like(s)
        v_fake = model(z, zeros, torch.ones_like(s), **cond)
        with torch.no_grad():
            x_fake = z + v_fake.detach()
            se = expand_like(s, z)
            x_s = se * x_fake + (1.0 - se) * eps
            u_pred = unwrap(model)(x_s, s, torch.ones_like(s), **cond)
            tgt = velocity_matching_target(
                model,
                self.teacher_for("vd", cond),
                x_s,
                s,
                self.delta,
                d_norm=self.d_norm,
                c=self.d_norm_c,
                u=u_pred,
                cond=cond,
            )
            diff = (u_pred.to(z.dtype) - tgt).detach()
        loss = (diff + v_fake - v_fake.detach()).pow(2).mean()
        return loss, diff, v_fake

    def __call__(
        self, model: Any, x1: Tensor, *, generator: torch.Generator | None = None, **cond: Any
    ) -> LossOutput:
        check_finite("x1", x1)
        check_batch("x1", x1)
        check_flow_map(model, "MDTDistLoss")
        cond, _ = drop_labels(cond, self.label_dropout, self.num_classes, x1, generator)
        n = x1.shape[0]
        loss = x1.new_zeros(())
        diag: dict[str, float] = {}
        # the batch's noise and times (the code draws them once and uses them for VM and VD)
        x0 = sample_source(self.source, x1, generator)
        s = self.sample_times(n, x1, generator)
        if self.lambda_vm > 0:
            per, _ = self.vm_loss(model, x0, x1, s, **cond)
            loss = loss + self.lambda_vm * per.mean()
            diag["vm"] = float(per.detach().mean())
        if self.lambda_vd > 0:
            z = sample_source(self.source, x1, generator)  # the generator's own input noise
            if self.vd_noise == "shared":
                eps, s2 = x0, s
            else:
                eps = sample_source(self.source, x1, generator)
                s2 = self.sample_times(n, x1, generator)
            vd, diff, _ = self.vd_loss(model, z, s2, eps, **cond)
            loss = loss + self.lambda_vd * vd
            diag["vd"] = float(vd.detach())
            diag["vd_diff_norm"] = float(diff.reshape(n, -1).norm(dim=1).mean())
        diag["loss"] = float(loss.detach())
        return LossOutput(loss=loss, diagnostics=diag)

    def __repr__(self) -> str:
        return (
            f"MDTDistLoss(lambda_vm={self.lambda_vm:g}, lambda_vd={self.lambda_vd:g}, delta={self.delta:g}, "
            f"d_norm={self.d_norm}, guidance_vm={self.guidance_vm}, guidance_vd={self.guidance_vd}, "
            f"vd_noise={self.vd_noise!r})"
        )


# --------------------------------------------------------------------------- registration


@dataclass
class MDTConfig:
    """Settings of :class:`MDTDistLoss` (the authors' defaults) and, for VM + VD, the VM warm-up."""

    lambda_vm: float = 1.0
    lambda_vd: float = 1.0
    delta: float = field(default=0.01, metadata={"help": "finite-difference step of the derivative"})
    d_norm: bool | str = field(default=True, metadata={"help": "normalise d; auto: on for images only"})
    d_norm_c: float = 0.1
    guidance_vm: float | None = field(default=41.0, metadata={"help": "teacher CFG scale in VM (null: off)"})
    guidance_vd: float | None = field(default=101.0, metadata={"help": "teacher CFG scale in VD (null: off)"})
    vd_noise: str = field(default="shared", metadata={"help": "shared (the authors' code) | independent"})
    warmup_share: float = field(default=0.0, metadata={"help": "share of the budget trained with VM alone"})
    vd_lr_scale: float = field(default=1.0, metadata={"help": "learning-rate factor once VD is on"})


def _mdt_loss(cfg: MDTConfig, ctx: BuildContext, lambda_vd: float) -> MDTDistLoss:
    d_norm = ctx.image_like if cfg.d_norm == "auto" else cfg.d_norm
    if not isinstance(d_norm, bool):
        raise FewflowError(f"d_norm must be true, false or 'auto', got {cfg.d_norm!r}")
    return MDTDistLoss(
        ctx.need_teacher("mdt"), lambda_vm=cfg.lambda_vm, lambda_vd=lambda_vd, delta=cfg.delta, d_norm=d_norm,
        d_norm_c=cfg.d_norm_c, path=ctx.path, source=ctx.source, guidance_vm=cfg.guidance_vm,
        guidance_vd=cfg.guidance_vd, vd_noise=cfg.vd_noise, time_sampler=ctx.time_sampler,
        **ctx.conditioning(),
    )


def _build_mdt(cfg: MDTConfig, ctx: BuildContext) -> list[Stage]:
    if not 0.0 <= cfg.warmup_share < 1.0:
        raise FewflowError(f"warmup_share must lie in [0, 1), got {cfg.warmup_share}")
    if cfg.lambda_vd == 0 or cfg.warmup_share == 0:
        lr_scale = cfg.vd_lr_scale if cfg.lambda_vd else 1.0
        return [Stage("mdt", _mdt_loss(cfg, ctx, cfg.lambda_vd), lr_scale=lr_scale)]
    return [
        Stage("vm", _mdt_loss(cfg, ctx, 0.0), share=cfg.warmup_share),
        Stage("vm+vd", _mdt_loss(cfg, ctx, cfg.lambda_vd), share=1.0 - cfg.warmup_share,
              lr_scale=cfg.vd_lr_scale),
    ]


def _sampling_mdt(model: Any, cfg: MDTConfig, **_: Any) -> SamplingPlan:
    return SamplingPlan(DataEndVelocity(model))


MDT_VD = register(MethodSpec(
    name="mdt_vd",
    label="MDT-dist VM+VD",
    paper="Zhou et al., Few-step Flow for 3D Generation via Marginal-Data Transport Distillation "
    "(MDT-dist, 2509.04406)",
    summary="distil the marginal-data transport u(x, s, 1): velocity matching plus velocity distillation",
    config=MDTConfig,
    loss=MDTDistLoss,
    build=_build_mdt,
    needs=Needs(teacher="required", model="flow_map", init_from_teacher=True),
    sampler=DefaultSampler("euler", nfe=1),
    sampling=_sampling_mdt,
    recipe_fields=("warmup_share", "vd_lr_scale"),
    small_scale={"d_norm": "auto", "guidance_vm": None, "guidance_vd": None, "lambda_vd": 0.1,
                 "warmup_share": 0.5, "vd_lr_scale": 0.3},
    docs="mdt",
    version=7,
    family="fewstep",
))
register_variant(
    "mdt_vm", MDT_VD, label="MDT-dist VM", lambda_vd=0.0, warmup_share=0.0, vd_lr_scale=1.0,
    summary="MDT-dist's velocity matching alone (the VM ablation)",
)
