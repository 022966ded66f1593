"""PUFM++: two-stage flow matching for point-cloud upsampling, with an adaptive time schedule and an
on-manifold step at sampling.

"PUFM++: Point Cloud Upsampling via Enhanced Flow Matching" (Liu, He, Maier, Rupp; arXiv:2512.20988),
building on "Efficient Point Clouds Upsampling via Flow Matching" (PUFM; Liu, He, Li; arXiv:2501.15286).
The paper's time already runs from the interpolated sparse cloud (t = 0) to the dense cloud (t = 1), as
fewflow's does.

Training pairs. A dense cloud ``Y (N, 3)`` gives a sparse input ``P``: ``N / r`` of its points drawn at
random. Both are centred and scaled by the sparse cloud's centroid and radius (all that is known at
test time). ``x0 = mid(P) + sigma z`` with ``mid`` the midpoint interpolation
(:func:`fewflow.points.upsample.midpoint_upsample`, ``r N / r = N`` points), ``sigma = 0.02``; ``x1`` is
``Y`` re-ordered by the exact Earth Mover's assignment to ``x0``
(``x1_i = Y_{pi(i)}``, ``pi = argmin sum_i |x0_i - Y_pi(i)|``, scipy's ``linear_sum_assignment``).

Stage 1 (alignment-aligned flow matching), with the authors' cosine time warp ``t = 1 - cos(pi u / 2)``,
``u ~ U(0, 1)``::

    x_t = (1 - t) x0 + t x1,      L1 = E || v(x_t, t) - (x1 - x0) ||^2  (per point, summed over xyz)

Stage 2 (refinement toward the terminal marginal): one step from ``t = 0`` matched to the *unordered*
dense cloud by the Chamfer distance (squared, averaged over both directions, as the authors' code)::

    L2 = CD^2( x0 + v(x0, 0), Y ) / 2

started from stage 1's weights at a fifth of its learning rate (authors: 1e-4 then 2e-5).

Adaptive time schedule: with the trained field, the stage-1 loss ``l(t)`` on 51 equally spaced times is
integrated (trapezoid) into a normalised CDF ``F``, and the sampling times are ``t_k = F^{-1}(k / K)``,
``k = 0..K`` (more steps where the loss is high); ``K = 6`` by default.

Sampling (:func:`pufm_upsample`): normalise the sparse input, ``x = mid(P)``, then for each interval of
the schedule one Euler step ``x <- x + (t_{k+1} - t_k) v(x, t_k)``, clamp to ``[-1, 1]``, merge with the
input points and keep ``r n`` of them by farthest point sampling, and take the on-manifold step: one
step of size ``eta = 0.01`` against the gradient of ``mean |x - NN_mid(x)|_1`` (``NN_mid`` the nearest
point of the interpolated cloud ``mid(P)``), normalised over the cloud's points per coordinate as in the
authors' code (:func:`manifold_step`): ``x <- x - eta sign(x - NN) / |sign(x - NN)|_points``. Un-normalise
at the end.

Patches (``patch > 0``): training crops one random kNN patch of ``patch`` dense points per cloud
(:func:`crop_patches`) and sampling steps ``floor(r n / patch * 3)`` kNN patches of the current cloud
around farthest-point seeds, each normalised by its own centroid and radius, then farthest-point-samples
their union (with the input points) back to ``r n``, as the authors do with 1024-point patches.

Inferred or changed at small scale: whole clouds are processed by default (``patch = 0``; on 256-point
clouds, 64-point patches lost to whole clouds in the benchmark); the backbone is a small EdgeConv network
(:class:`fewflow.models.pointnet.PointVelocity`) instead of the RIN transformer with self-conditioning;
the loss is averaged (the authors sum it over points and batch: only the learning rate changes); the
schedule is fitted right after stage 1 (on the field the flow-matching loss trained). Train on dense clouds
that are Poisson-disk-like, as the authors' PU1K / PU-GAN patches are
(:func:`fewflow.points.datasets.surface_clouds` does by default): with independent random samples most of
the regression target ``x1 - x0`` is tangential jitter no field can predict.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fewflow._validate import FewflowError, check_finite
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
from fewflow.points.metrics import _assignment, chamfer, nearest_neighbors
from fewflow.points.upsample import farthest_point_sample, gather_points, midpoint_upsample

TIME_WARPS = ("cosine", "uniform")


def _clouds(x1: Tensor) -> Tensor:
    """Dense clouds ``(B, N, 3)``; a singleton channel axis ``(B, 1, N, 3)`` (how fewflow's user-data
    loader stores arrays of 2-D samples) is dropped."""
    return x1[:, 0] if x1.dim() == 4 and x1.shape[1] == 1 else x1


def _check_dense(x1: Tensor, ratio: int) -> None:
    if x1.dim() != 3 or x1.shape[-1] != 3:
        raise FewflowError(f"PUFM++ trains on dense point clouds (B, N, 3), got shape {tuple(x1.shape)}")
    if x1.shape[1] % ratio or x1.shape[1] // ratio < 2 * ratio:
        raise FewflowError(f"PUFM++ needs N divisible by ratio={ratio} with N / ratio >= {2 * ratio}, got "
                           f"N={x1.shape[1]}")
    check_finite("x1", x1)


def _check_patch(patch: int, ratio: int) -> None:
    if not isinstance(patch, int) or patch < 0 or (patch and (patch % ratio or patch // ratio < 2 * ratio)):
        raise FewflowError(f"PUFM++ patch must be 0 (whole clouds) or a multiple of ratio={ratio} with "
                           f"patch / ratio >= {2 * ratio}, got {patch!r}")


def normalize_by(x: Tensor, ref: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(x - c) / s`` with ``c`` the centroid and ``s`` the largest centred norm of ``ref`` (both
    ``(B, n, 3)``); returns ``(x_n, c, s)``."""
    c = ref.mean(dim=1, keepdim=True)
    s = (ref - c).norm(dim=-1).amax(dim=1).clamp_min(1e-12)[:, None, None]
    return (x - c) / s, c, s


def crop_patches(x: Tensor, patch: int, generator: torch.Generator | None = None) -> Tensor:
    """One local patch per cloud of ``x (B, N, 3)``: the ``patch`` points nearest to a random point of the
    cloud (the authors train on such kNN patches of larger clouds). ``patch >= N`` returns ``x``."""
    b, n, _ = x.shape
    if patch >= n:
        return x
    seed = torch.randint(0, n, (b,), generator=generator,
                         device=x.device if generator is None else generator.device).to(x.device)
    ctr = x[torch.arange(b, device=x.device), seed].unsqueeze(1)
    _, idx = nearest_neighbors(ctr, x, patch)
    return gather_points(x, idx[:, 0])


def make_pairs(x1: Tensor, ratio: int, noise: float, generator: torch.Generator | None = None,
               align: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """``(x0, x1_aligned, y)`` for dense clouds ``x1 (B, N, 3)``: the noisy interpolated sparse cloud, the
    dense cloud re-ordered by the exact EMD assignment (``align``), and the dense cloud itself, all in the
    sparse cloud's normalised frame (module docstring)."""
    b, n, _ = x1.shape
    m = n // ratio
    keys = torch.rand(b, n, generator=generator, device=x1.device if generator is None else
                      generator.device).to(x1.device)
    sub = keys.argsort(dim=1)[:, :m]
    sparse = gather_points(x1, sub)
    y, c, s = normalize_by(x1, sparse)
    sp = (sparse - c) / s
    x0 = midpoint_upsample(sp, ratio)
    z = torch.randn(x0.shape, generator=generator, dtype=x0.dtype,
                    device=x0.device if generator is None else generator.device).to(x0.device)
    x0 = x0 + noise * z
    if align:
        perm = _assignment(x0, y, squared=False)
        x1a = gather_points(y, perm)
    else:
        x1a = y
    return x0, x1a, y


class PUFMLoss:
    """Stage 1 of PUFM++ (module docstring): ``loss(model, x1, generator=None) -> LossOutput`` for dense
    clouds ``x1 (B, N, 3)``.

    Args:
        ratio: upsampling ratio ``r`` (the sparse cloud has ``N / r`` points); 4 in the paper.
        noise: ``sigma`` of the Gaussian added to the interpolated cloud (0.02, authors' code).
        time_warp: ``"cosine"`` (``t = 1 - cos(pi u / 2)``, the authors') or ``"uniform"``.
        align: re-order the dense cloud by the exact EMD assignment (the paper's pre-alignment); ``False``
            pairs points by index (an ablation).
        patch: train on one random kNN patch of ``patch`` dense points per cloud (the authors: 1024-point
            patches); ``0`` uses whole clouds.
        label_dropout, num_classes: accepted for the registry's contract; PUFM++ is unconditional.
    """

    def __init__(self, ratio: int = 4, noise: float = 0.02, time_warp: str = "cosine", align: bool = True,
                 patch: int = 0, label_dropout: float = 0.0, num_classes: int | None = None) -> None:
        if not isinstance(ratio, int) or ratio < 2:
            raise FewflowError(f"PUFM++ ratio must be an integer >= 2, got {ratio!r}")
        if noise < 0:
            raise FewflowError(f"PUFM++ noise must be >= 0, got {noise}")
        if time_warp not in TIME_WARPS:
            raise FewflowError(f"unknown time_warp {time_warp!r}; choose one of: {', '.join(TIME_WARPS)}")
        _check_patch(patch, ratio)
        self.ratio, self.noise, self.time_warp, self.align = ratio, float(noise), time_warp, bool(align)
        self.patch = int(patch)

    def times(self, b: int, like: Tensor, generator: torch.Generator | None = None) -> Tensor:
        u = torch.rand(b, generator=generator, dtype=like.dtype,
                       device=like.device if generator is None else generator.device).to(like.device)
        return 1 - torch.cos(u * math.pi / 2) if self.time_warp == "cosine" else u

    def __call__(self, model: Any, x1: Tensor, *, generator: torch.Generator | None = None,
                 **cond: Any) -> LossOutput:
        x1 = _clouds(x1)
        _check_dense(x1, self.ratio)
        x1 = crop_patches(x1, self.patch, generator) if self.patch else x1
        x0, x1a, _ = make_pairs(x1, self.ratio, self.noise, generator, self.align)
        t = self.times(x1.shape[0], x1, generator)
        tt = t[:, None, None]
        xt = (1 - tt) * x0 + tt * x1a
        err = (model(xt, t) - (x1a - x0)).square().sum(-1).mean(1)
        loss = err.mean()
        return LossOutput(loss, {"loss": float(loss.detach()), "t_mean": float(t.mean())})

    @torch.no_grad()
    def loss_at(self, model: Any, x1: Tensor, times: Tensor, generator: torch.Generator | None = None
                ) -> Tensor:
        """The stage-1 loss at each of ``times`` (``(T,)``), on the same pairs for every time."""
        _check_dense(x1, self.ratio)
        x1 = crop_patches(x1, self.patch, generator) if self.patch else x1
        x0, x1a, _ = make_pairs(x1, self.ratio, self.noise, generator, self.align)
        out = []
        for t in times.tolist():
            tb = torch.full((x1.shape[0],), t, device=x1.device, dtype=x1.dtype)
            xt = (1 - t) * x0 + t * x1a
            out.append(float((model(xt, tb) - (x1a - x0)).square().sum(-1).mean()))
        return torch.tensor(out, dtype=torch.float64)


class PUFMRefineLoss:
    """Stage 2 of PUFM++: ``CD^2(x0 + v(x0, 0), Y) / 2`` (module docstring)."""

    def __init__(self, ratio: int = 4, noise: float = 0.02, patch: int = 0) -> None:
        _check_patch(patch, ratio)
        self.ratio, self.noise, self.patch = ratio, float(noise), int(patch)

    def __call__(self, model: Any, x1: Tensor, *, generator: torch.Generator | None = None,
                 **cond: Any) -> LossOutput:
        x1 = _clouds(x1)
        _check_dense(x1, self.ratio)
        x1 = crop_patches(x1, self.patch, generator) if self.patch else x1
        x0, _, y = make_pairs(x1, self.ratio, self.noise, generator, align=False)
        t = torch.zeros(x1.shape[0], device=x1.device, dtype=x1.dtype)
        pred = x0 + model(x0, t)
        loss = chamfer(pred, y, squared=True).mean() / 2
        return LossOutput(loss, {"loss": float(loss.detach())})


def adaptive_schedule(loss_on_grid: Tensor | np.ndarray, grid: Tensor | np.ndarray, steps: int
                      ) -> list[float]:
    """Times ``t_0 = 0 < ... < t_K = 1`` inverting the normalised CDF of a loss over ``grid`` (trapezoid
    rule): ``t_k = F^{-1}(k / K)``. A constant loss gives the uniform grid."""
    lv = np.asarray(loss_on_grid, dtype=np.float64)
    g = np.asarray(grid, dtype=np.float64)
    if lv.shape != g.shape or lv.ndim != 1 or len(g) < 2:
        raise FewflowError(f"adaptive_schedule needs a 1-D loss and grid of equal length >= 2, got "
                           f"{lv.shape} and {g.shape}")
    if not np.isfinite(lv).all() or (lv < 0).any():
        raise FewflowError("adaptive_schedule needs finite, non-negative losses")
    if not isinstance(steps, int) or steps < 1:
        raise FewflowError(f"steps must be a positive integer, got {steps!r}")
    area = 0.5 * (lv[1:] + lv[:-1]) * np.diff(g)
    cdf = np.concatenate([[0.0], np.cumsum(area)])
    if cdf[-1] <= 0:
        return [float(v) for v in np.linspace(g[0], g[-1], steps + 1)]
    cdf /= cdf[-1]
    ts = np.interp(np.linspace(0, 1, steps + 1), cdf, g)
    ts[0], ts[-1] = g[0], g[-1]
    return [float(v) for v in ts]


def fit_schedule(model: Any, clouds: Tensor, ratio: int = 4, steps: int = 6, points: int = 51,
                 noise: float = 0.02, generator: torch.Generator | None = None, patch: int = 0
                 ) -> list[float]:
    """PUFM++'s adaptive schedule for a trained field: the stage-1 loss on ``points`` equally spaced
    times over dense ``clouds (B, N, 3)``, turned into ``steps + 1`` times by :func:`adaptive_schedule`."""
    grid = torch.linspace(0, 1, points, dtype=torch.float64)
    lv = PUFMLoss(ratio, noise, patch=patch).loss_at(model, clouds, grid, generator)
    return adaptive_schedule(lv, grid, steps)


def manifold_step(x: Tensor, ref: Tensor, eta: float = 0.01) -> Tensor:
    """One normalised gradient step of length ``eta`` on ``L(x) = mean |x - NN_ref(x)|_1`` for clouds
    ``x (B, M, 3)`` and references ``ref (B, R, 3)`` (``NN_ref`` held fixed).

    ``grad L`` is proportional to ``g = sign(x - NN_ref(x))``; as in the authors' code the gradient is
    normalised over the points of each cloud, separately per coordinate,
    ``x_{i,d} <- x_{i,d} - eta g_{i,d} / sqrt(sum_j g_{j,d}^2)``, so the whole cloud moves by at most
    ``eta`` per coordinate (``eta / sqrt(#moving points)`` per point). Points on ``ref`` do not move."""
    _, idx = nearest_neighbors(x, ref, 1)
    nn = gather_points(ref, idx[..., 0])
    g = torch.sign(x - nn)
    norm = g.norm(dim=1, keepdim=True)
    return x - eta * g / (norm + 1e-8)


def _euler_step(model: Any, x: Tensor, a: float, b: float, patch: int, patch_rate: float) -> Tensor:
    """``x + (b - a) v(x, a)`` clamped to the unit ball's box, over the whole cloud, or (``patch``) over
    ``floor(M / patch * patch_rate)`` kNN patches around farthest-point seeds, each normalised by its own
    centroid and radius, stepped, clamped and un-normalised; returns all patch points ``(B, s patch, 3)``."""
    b_, m, _ = x.shape
    if not patch or patch >= m:
        t = torch.full((b_,), a, device=x.device, dtype=x.dtype)
        return (x + (b - a) * model(x, t)).clamp(-1, 1)
    s = max(1, int(m / patch * patch_rate))
    seeds = gather_points(x, farthest_point_sample(x, s))
    _, idx = nearest_neighbors(seeds, x, patch)
    pts = gather_points(x, idx.reshape(b_, s * patch)).reshape(b_ * s, patch, 3)
    pn, c, sc = normalize_by(pts, pts)
    t = torch.full((b_ * s,), a, device=x.device, dtype=x.dtype)
    pn = (pn + (b - a) * model(pn, t)).clamp(-1, 1)
    return (pn * sc + c).reshape(b_, s * patch, 3)


@torch.no_grad()
def pufm_upsample(model: Any, sparse: Tensor, ratio: int = 4, schedule: list[float] | int = 6,
                  manifold: float = 0.01, merge_input: bool = True, trajectory: bool = False,
                  patch: int | None = None, patch_rate: float = 3.0) -> Tensor | tuple[Tensor, list[Tensor]]:
    """Upsample ``sparse (B, n, 3)`` or ``(n, 3)`` to ``ratio * n`` points with a trained PUFM++ field.

    ``schedule``: the sampling times (e.g. a run's fitted ``meta["pufm_schedule"]``) or a number of
    uniform steps; ``manifold``: the on-manifold step length ``eta`` (``0`` disables it);
    ``merge_input``: merge the input points and farthest-point-sample back after each step (authors).
    ``patch``: step kNN patches of this many points around ``floor(r n / patch * patch_rate)``
    farthest-point seeds, each in its own normalised frame, then farthest-point-sample the union back to
    ``r n`` points (the authors' patch-wise update, ``patch_rate`` 3); ``None`` takes the network's
    ``pufm_patch`` buffer (set when it was trained on patches), else whole clouds (``0``).
    Runs on ``sparse``'s device and dtype; returns the cloud in the input's units (and the per-step
    clouds, normalised, with ``trajectory=True``).
    """
    batched = sparse.dim() == 3
    p = sparse if batched else sparse.unsqueeze(0)
    if p.dim() != 3 or p.shape[-1] != 3 or p.shape[1] == 0:
        raise FewflowError(f"the sparse input must be a point cloud (n, 3) or (B, n, 3), got "
                           f"{tuple(sparse.shape)}")
    check_finite("sparse", p)
    ts = ([i / schedule for i in range(schedule + 1)] if isinstance(schedule, int) else
          [float(v) for v in schedule])
    if len(ts) < 2 or any(b <= a for a, b in zip(ts, ts[1:])) or ts[0] < 0 or ts[-1] > 1 + 1e-9:
        raise FewflowError(f"the PUFM++ schedule must increase within [0, 1] with >= 2 times, got {ts}")
    if patch is None:
        buf = getattr(model, "pufm_patch", None)
        patch = int(buf) if torch.is_tensor(buf) else 0
    if not isinstance(patch, int) or patch < 0 or patch_rate <= 0:
        raise FewflowError(f"patch must be an integer >= 0 and patch_rate > 0, got {patch!r}, {patch_rate!r}")
    pn, c, s = normalize_by(p, p)
    mid = midpoint_upsample(pn, ratio)
    x, m = mid, mid.shape[1]
    traj = [x]
    for a, b in zip(ts[:-1], ts[1:]):
        x = _euler_step(model, x, a, b, patch, patch_rate)
        if merge_input or x.shape[1] != m:
            allp = torch.cat([x, pn], dim=1) if merge_input else x
            x = gather_points(allp, farthest_point_sample(allp, m))
        if manifold > 0:
            x = manifold_step(x, mid, manifold)
        traj.append(x)
    out = x * s + c
    out = out if batched else out[0]
    return (out, traj) if trajectory else out


# -- registration ----------------------------------------------------------------------------------


@dataclass
class PUFMConfig:
    """PUFM++ settings (loss constructor + recipe), defaults from the paper and the authors' code."""

    ratio: int = field(default=4, metadata={"help": "upsampling ratio r (sparse cloud = N / r points)"})
    noise: float = field(default=0.02, metadata={"help": "noise added to the interpolated cloud"})
    time_warp: str = field(default="cosine", metadata={"help": "training times: cosine (1 - cos(pi u/2)) "
                                                                 "or uniform"})
    align: bool = field(default=True, metadata={"help": "EMD pre-alignment of the dense cloud"})
    refine_share: float = field(default=0.2, metadata={"help": "share of the budget for stage 2 (0: none)"})
    refine_lr_scale: float = field(default=0.2, metadata={"help": "stage-2 lr / stage-1 lr (2e-5 / 1e-4)"})
    steps: int = field(default=6, metadata={"help": "sampling steps of the adaptive schedule"})
    adaptive: bool = field(default=True, metadata={"help": "fit the adaptive schedule (else uniform)"})
    manifold: float = field(default=0.01, metadata={"help": "on-manifold step length (0: off)"})
    patch: int = field(default=0, metadata={"help": "dense points per training / sampling kNN patch "
                                                       "(0: whole clouds)"})
    k: int = field(default=16, metadata={"help": "neighbours of the EdgeConv network"})
    width: int = field(default=64, metadata={"help": "EdgeConv width (the blocks are w, w, 2w)"})


def make_pufm_model(cfg: PUFMConfig, meta: dict[str, Any]) -> Any:
    """The PUFM++ velocity network (:class:`fewflow.models.pointnet.PointVelocity`)."""
    from fewflow.models.pointnet import PointVelocity

    shape = tuple(int(v) for v in meta.get("shape", (0, 3)))
    shape = shape[1:] if len(shape) == 3 and shape[0] == 1 else shape
    if len(shape) != 2 or shape[1] != 3:
        raise FewflowError(f"pufm trains on point clouds (N, 3) per sample, got data of shape {shape}")
    w = int(cfg.width)
    net = PointVelocity(dim=3, k=cfg.k, widths=(w, w, 2 * w), hidden=2 * w)
    # the fitted sampling times travel with the weights (set when stage 2 starts; uniform until then)
    net.register_buffer("pufm_schedule", torch.linspace(0, 1, int(cfg.steps) + 1))
    if cfg.patch:  # sampling then works patch-wise by default
        net.register_buffer("pufm_patch", torch.tensor(int(cfg.patch)))
    return net


def run_schedule(model: Any, default: list[float] | int = 6) -> list[float] | int:
    """The sampling times stored in a PUFM++ network (``pufm_schedule`` buffer), else ``default``."""
    buf = getattr(model, "pufm_schedule", None)
    return [float(v) for v in buf.tolist()] if torch.is_tensor(buf) else default


def _build(cfg: PUFMConfig, ctx: BuildContext) -> list[Stage]:
    if ctx.data is not None:
        _check_dense(_clouds(ctx.data.x[:1]), cfg.ratio)
    loss = PUFMLoss(cfg.ratio, cfg.noise, cfg.time_warp, cfg.align, cfg.patch)
    stages = [Stage("pufm_fm", loss, share=1.0 - cfg.refine_share)]

    def _schedule(model: Any, batch: int) -> Any:
        if cfg.adaptive and ctx.data is not None:
            g = torch.Generator().manual_seed(ctx.seed + 7)
            x = _clouds(ctx.data.x[: min(len(ctx.data.x), 8)])
            p = next(model.parameters())
            was = model.training
            model.eval()
            sched = fit_schedule(model, x.to(p.device, p.dtype), cfg.ratio, cfg.steps, noise=cfg.noise,
                                 generator=g, patch=cfg.patch)
            model.train(was)
        else:
            sched = [i / cfg.steps for i in range(cfg.steps + 1)]
        ctx.record("pufm_schedule", sched)
        buf = getattr(model, "pufm_schedule", None)
        if torch.is_tensor(buf) and buf.numel() == len(sched):
            buf.copy_(torch.tensor(sched, dtype=buf.dtype))
        return ctx.data

    if cfg.refine_share > 0:
        stages.append(Stage("pufm_refine", PUFMRefineLoss(cfg.ratio, cfg.noise, cfg.patch), data=_schedule,
                            share=cfg.refine_share, lr_scale=cfg.refine_lr_scale))
    else:
        ctx.record("pufm_schedule", [i / cfg.steps for i in range(cfg.steps + 1)])
    return stages


def _sampling(model: Any, cfg: PUFMConfig, **kw: Any) -> SamplingPlan:
    raise FewflowError("pufm upsamples a given sparse cloud: use `fewflow upsample RUN --input cloud.ply` "
                       "or fewflow.objectives.pufm.pufm_upsample")


register(MethodSpec(
    name="pufm",
    label="PUFM++",
    paper="Liu, He, Maier, Rupp, PUFM++: Point Cloud Upsampling via Enhanced Flow Matching (2512.20988)",
    summary="point-cloud upsampling: EMD-aligned flow matching from the interpolated sparse cloud, "
            "a one-step Chamfer refinement, adaptive schedule and on-manifold step",
    config=PUFMConfig,
    loss=PUFMLoss,
    build=_build,
    needs=Needs(model="custom", labels="none", coupling="fixed", data="points"),
    sampler=DefaultSampler("euler", nfe=6),
    sampling=_sampling,
    make_model=make_pufm_model,
    recipe_fields=("refine_share", "refine_lr_scale", "steps", "adaptive", "manifold", "k", "width"),
))
