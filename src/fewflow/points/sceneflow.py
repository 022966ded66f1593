"""Synthetic scene-flow pairs with known per-point flow, the scene-flow metrics and a nearest-neighbour
baseline.

**Scene flow.** Given a source cloud ``P = {p_i}`` (``N`` points) and a target cloud ``Q = {q_j}`` (``M``
points) of the same surface after it moved, the scene flow is the displacement ``f_i = phi(p_i) - p_i`` of
every source point under the motion ``phi``. The target is an *independent* sample of the moved surface,
so no ``q_j`` equals any ``phi(p_i)``: correspondence is only up to the sampling density.

**Motion** (:func:`random_motion`). A rigid motion about the shape's centroid ``m`` plus a smooth
non-rigid displacement given by Gaussian radial basis functions::

    phi(x) = R (x - m) + m + t + sum_k a_k exp(-|x - c_k|^2 / (2 s^2))

with ``R`` a rotation by an angle ``~ U(-max_angle, max_angle)`` about a uniform random axis, ``t`` of
length ``~ U(0, max_translation)`` in a uniform direction, ``K`` centres ``c_k`` drawn on the surface and
amplitudes ``a_k ~ N(0, nonrigid^2 I)``.

**Occlusion.** With ``occlusion = rho > 0`` the part of the moved surface beyond a random plane (the
fraction ``rho`` of the target's points with the largest projection on a random direction) is removed
from the target, and source points whose moved position falls there are marked ``visible = False``.

**Metrics** (:func:`scene_flow_metrics`), as in the scene-flow literature (FlowNet3D, HPLFlowNet, and
"SCOOP: Self-Supervised Correspondence and Optimization-Based Scene Flow", Lang et al., arXiv
2211.14020): the end-point error ``EPE_i = |f_hat_i - f_i|``, its relative size
``r_i = EPE_i / (|f_i| + 1e-4)``, and per scene

* ``epe3d``: mean ``EPE_i``;
* ``acc_strict``: fraction with ``EPE_i < 0.05`` or ``r_i < 0.05``;
* ``acc_relax``: fraction with ``EPE_i < 0.1`` or ``r_i < 0.1``;
* ``outliers``: fraction with ``EPE_i > 0.3`` or ``r_i > 0.1``;

averaged over scenes. The thresholds are absolute lengths (metres in the driving data sets); the shapes
here are scaled to a bounding radius of about 1, so they read as metres on a 2 m object.

**Baseline** (:func:`nn_flow`): ``f_i = q_{nn(p_i)} - p_i``, the flow to the nearest target point.

There is no time variable here (scene flow is a displacement, not a generative flow).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fewflow._validate import FewflowError
from fewflow.points.knn import _check_cloud as check_cloud

__all__ = [
    "ACC_RELAX",
    "ACC_STRICT",
    "OUTLIER",
    "Motion",
    "SceneFlowPairs",
    "ShapeSampler",
    "SHAPE_NAMES",
    "end_point_error",
    "make_pair",
    "nearest_index",
    "make_pairs",
    "mesh_sampler",
    "nn_flow",
    "random_motion",
    "scene_flow_metrics",
    "shape_sampler",
]

#: Acc-strict: EPE < 0.05 or relative error < 5 %
ACC_STRICT = (0.05, 0.05)
#: Acc-relax: EPE < 0.1 or relative error < 10 %
ACC_RELAX = (0.1, 0.1)
#: outlier: EPE > 0.3 or relative error > 10 %
OUTLIER = (0.3, 0.1)

#: ``sampler(n, generator) -> (n, 3)`` points on a surface
ShapeSampler = Callable[[int, torch.Generator], Tensor]

SHAPE_NAMES = ("sphere", "torus", "superquadric")


# ------------------------------------------------------------------------------------------ geometry


def _check_cloud(name: str, x: Tensor, batched: bool = True) -> None:
    """A 3-D point cloud, batched ``(B, N, 3)`` unless ``batched`` is False (:func:`fewflow.points.knn.
    _check_cloud`)."""
    check_cloud(name, x, batched=batched, dim=3)


def nearest_index(a: Tensor, b: Tensor) -> Tensor:
    """Index into ``b (B, M, 3)`` of the nearest point of every point of ``a (B, N, 3)``: ``(B, N)``
    (no gradient; :func:`fewflow.points.nearest_neighbors`)."""
    from fewflow.points.metrics import nearest_neighbors

    with torch.no_grad():
        return nearest_neighbors(a.detach(), b.detach().to(a.dtype), 1)[1][..., 0]


def _rotation(axis: Tensor, angle: Tensor) -> Tensor:
    """Rodrigues' rotation matrix about a unit ``axis (3,)`` by ``angle`` (radians)."""
    x, y, z = axis.unbind()
    zero = torch.zeros((), dtype=axis.dtype, device=axis.device)
    k = torch.stack([torch.stack([zero, -z, y]), torch.stack([z, zero, -x]), torch.stack([-y, x, zero])])
    eye = torch.eye(3, dtype=axis.dtype, device=axis.device)
    return eye + torch.sin(angle) * k + (1.0 - torch.cos(angle)) * (k @ k)


def _unit(g: torch.Generator, dtype: torch.dtype) -> Tensor:
    v = torch.randn(3, generator=g, dtype=torch.float64)
    return (v / v.norm().clamp_min(1e-12)).to(dtype)


@dataclass
class Motion:
    """A rigid + Gaussian-RBF motion ``phi(x) = R (x - m) + m + t + sum_k a_k exp(-|x - c_k|^2 / (2 s^2))``.

    ``rotation (3, 3)``, ``center (3,)`` (``m``), ``translation (3,)``, ``rbf_centers (K, 3)``,
    ``rbf_amplitudes (K, 3)``, ``rbf_width`` (``s``). Call it on ``(..., 3)`` points.
    """

    rotation: Tensor
    center: Tensor
    translation: Tensor
    rbf_centers: Tensor
    rbf_amplitudes: Tensor
    rbf_width: float

    def __call__(self, x: Tensor) -> Tensor:
        p = {k: v.to(device=x.device, dtype=x.dtype) for k, v in self._tensors().items()}
        out = (x - p["center"]) @ p["rotation"].T + p["center"] + p["translation"]
        if p["rbf_centers"].shape[0]:
            d2 = (x.unsqueeze(-2) - p["rbf_centers"]).pow(2).sum(-1)  # (..., K)
            out = out + torch.exp(-d2 / (2.0 * self.rbf_width**2)) @ p["rbf_amplitudes"]
        return out

    def flow(self, x: Tensor) -> Tensor:
        """``phi(x) - x``."""
        return self(x) - x

    def _tensors(self) -> dict[str, Tensor]:
        return {"rotation": self.rotation, "center": self.center, "translation": self.translation,
                "rbf_centers": self.rbf_centers, "rbf_amplitudes": self.rbf_amplitudes}


def random_motion(
    points: Tensor,
    *,
    max_angle: float = 0.2,
    max_translation: float = 0.4,
    nonrigid: float = 0.08,
    rbf_centers: int = 4,
    rbf_width: float = 0.5,
    generator: torch.Generator | None = None,
) -> Motion:
    """A random :class:`Motion` for the cloud ``points (N, 3)`` (module docstring).

    ``max_angle`` in radians; ``nonrigid`` is the standard deviation of each RBF amplitude; RBF centres are
    drawn among ``points``; the rotation is about the cloud's centroid.
    """
    _check_cloud("points", points, batched=False)
    for name, v in (("max_angle", max_angle), ("max_translation", max_translation), ("nonrigid", nonrigid),
                    ("rbf_width", rbf_width)):
        if not (math.isfinite(v) and v >= 0):
            raise FewflowError(f"{name} must be a finite number >= 0, got {v!r}")
    if rbf_width <= 0:
        raise FewflowError(f"rbf_width must be > 0, got {rbf_width!r}")
    if rbf_centers < 0:
        raise FewflowError(f"rbf_centers must be >= 0, got {rbf_centers!r}")
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    dt = points.dtype
    angle = (torch.rand((), generator=g, dtype=torch.float64) * 2 - 1) * max_angle
    rot = _rotation(_unit(g, torch.float64), angle).to(dt)
    trans = _unit(g, dt) * float(torch.rand((), generator=g)) * max_translation
    idx = torch.randint(points.shape[0], (rbf_centers,), generator=g)
    centers = points.detach().cpu()[idx].clone()
    amps = (torch.randn(rbf_centers, 3, generator=g, dtype=torch.float64) * nonrigid).to(dt)
    center = points.detach().cpu().mean(0)
    return Motion(rot, center, trans, centers, amps, float(rbf_width))


# ------------------------------------------------------------------------------------------ shapes


def shape_sampler(name: str | ShapeSampler, **params: float) -> ShapeSampler:
    """A :data:`ShapeSampler` for an analytic surface of :mod:`fewflow.points.surfaces` or ``name`` itself
    when it is a callable ``(n, generator) -> (n, 3)`` (e.g. samples of a fetched mesh).

    ``"mesh:NAME"`` samples a fetched mesh (:func:`fewflow.points.load_mesh`; fetch it once with
    :func:`fewflow.points.fetch_meshes`). ``"sphere"``; ``"torus"`` (tube radius ``r ~ U(0.2, 0.4)``,
    ``R = 1 - r``); ``"superquadric"`` (exponents ``e1, e2 ~ U(0.3, 1.7)``, axes ``~ U(0.6, 1)``). Random
    parameters are drawn from the generator unless fixed in ``params`` (the surface class's constructor
    arguments).
    """
    if callable(name):
        return name
    if isinstance(name, str) and name.startswith("mesh:"):
        from fewflow.points.meshes import load_mesh

        return mesh_sampler(*load_mesh(name[len("mesh:"):]))
    from fewflow.points import surfaces

    if name not in SHAPE_NAMES:
        from fewflow._validate import unknown_name

        raise unknown_name("shape", str(name), SHAPE_NAMES)

    def sample(n: int, g: torch.Generator) -> Tensor:
        kw = dict(params)
        u = torch.rand(5, generator=g, dtype=torch.float64).tolist()
        if name == "sphere":
            surf = surfaces.Sphere(**kw)
        elif name == "torus":
            r = kw.pop("r", 0.2 + 0.2 * u[0])
            surf = surfaces.Torus(R=kw.pop("R", 1.0 - r), r=r)
        else:
            axes = (0.6 + 0.4 * u[2], 0.6 + 0.4 * u[3], 0.6 + 0.4 * u[4])
            surf = surfaces.Superquadric(e1=kw.pop("e1", 0.3 + 1.4 * u[0]), e2=kw.pop("e2", 0.3 + 1.4 * u[1]),
                                         a=kw.pop("a", axes),
                                         **kw)
        return surf.sample(n, generator=g, dtype=torch.float64)

    return sample


def mesh_sampler(vertices: Tensor, faces: Tensor) -> ShapeSampler:
    """A :data:`ShapeSampler` drawing points uniform in area on a triangle mesh
    (:func:`fewflow.points.sample_mesh`); the seed of each draw comes from the generator."""
    from fewflow.points.meshes import check_mesh, sample_mesh

    v, f = torch.as_tensor(vertices), torch.as_tensor(faces)
    check_mesh(v, f)

    def sample(n: int, g: torch.Generator) -> Tensor:
        return sample_mesh(v, f, n, seed=int(torch.randint(2**62, (), generator=g)), dtype=torch.float64)

    return sample


def _normalise(x: Tensor) -> Tensor:
    x = x - x.mean(0)
    return x / x.norm(dim=-1).max().clamp_min(1e-12)


# ------------------------------------------------------------------------------------------ pairs


@dataclass
class SceneFlowPairs:
    """A batch of scene-flow pairs: ``source (B, N, 3)``, ``target (B, M, 3)``, true ``flow (B, N, 3)`` of
    the source points, ``visible (B, N)`` (``False`` for source points whose moved position was occluded in
    the target), and the ``shapes`` names. ``len()`` is ``B``; indexing/slicing gives a sub-batch."""

    source: Tensor
    target: Tensor
    flow: Tensor
    visible: Tensor
    shapes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        _check_cloud("source", self.source)
        _check_cloud("target", self.target)
        _check_cloud("flow", self.flow)
        if self.flow.shape != self.source.shape:
            raise FewflowError(f"flow must match source's shape {tuple(self.source.shape)}, got "
                               f"{tuple(self.flow.shape)}")
        if self.target.shape[0] != self.source.shape[0]:
            raise FewflowError(f"source and target hold different numbers of pairs: {self.source.shape[0]} "
                               f"vs {self.target.shape[0]}")
        if self.visible.shape != self.source.shape[:2]:
            raise FewflowError(f"visible must have shape {tuple(self.source.shape[:2])}, got "
                               f"{tuple(self.visible.shape)}")

    def __len__(self) -> int:
        return int(self.source.shape[0])

    def __getitem__(self, i: int | slice | Tensor) -> SceneFlowPairs:
        if isinstance(i, int):
            i = slice(i, i + 1) if i != -1 else slice(-1, None)
        sel = range(len(self))[i] if isinstance(i, slice) else [int(k) for k in torch.as_tensor(i).flatten()]
        names = [self.shapes[k] for k in sel] if self.shapes else []
        return SceneFlowPairs(self.source[i], self.target[i], self.flow[i], self.visible[i], names)

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> SceneFlowPairs:
        """A copy on ``device`` / in ``dtype`` (``visible`` stays boolean)."""
        return SceneFlowPairs(self.source.to(device=device, dtype=dtype),
                              self.target.to(device=device, dtype=dtype),
                              self.flow.to(device=device, dtype=dtype), self.visible.to(device),
                              list(self.shapes))

    @staticmethod
    def cat(items: Sequence[SceneFlowPairs]) -> SceneFlowPairs:
        """Concatenate batches with equal point counts."""
        if not items:
            raise FewflowError("nothing to concatenate: the list of scene-flow batches is empty")
        return SceneFlowPairs(torch.cat([p.source for p in items]), torch.cat([p.target for p in items]),
                              torch.cat([p.flow for p in items]), torch.cat([p.visible for p in items]),
                              [s for p in items for s in p.shapes])


def make_pair(
    shape: str | ShapeSampler = "sphere",
    n_points: int = 512,
    n_target: int | None = None,
    *,
    occlusion: float = 0.0,
    noise: float = 0.0,
    max_angle: float = 0.2,
    max_translation: float = 0.4,
    nonrigid: float = 0.08,
    rbf_centers: int = 4,
    rbf_width: float = 0.5,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    name: str | None = None,
) -> SceneFlowPairs:
    """One pair (a batch of one) on ``shape`` under a :func:`random_motion` (module docstring).

    The surface is normalised to centroid 0 and bounding radius 1, sampled twice independently (``n_points``
    source points, ``n_target`` target points, default ``n_points``); the second sample is moved, its
    occluded part removed (``occlusion``: the fraction dropped) and Gaussian ``noise`` added.
    """
    if n_points < 1:
        raise FewflowError(f"n_points must be >= 1, got {n_points}")
    m = n_points if n_target is None else int(n_target)
    if m < 1:
        raise FewflowError(f"n_target must be >= 1, got {n_target}")
    if not (0.0 <= occlusion < 1.0):
        raise FewflowError(f"occlusion must lie in [0, 1), got {occlusion!r}")
    if not (math.isfinite(noise) and noise >= 0):
        raise FewflowError(f"noise must be a finite number >= 0, got {noise!r}")
    g = torch.Generator().manual_seed(int(seed))
    sampler = shape_sampler(shape)
    # one sample fixes the normalisation (the shape's random parameters come from a cloned generator)
    g_shape = torch.Generator().manual_seed(int(torch.randint(2**31 - 1, (), generator=g)))
    m_draw = int(math.ceil(m / (1.0 - occlusion))) + (1 if occlusion > 0 else 0)
    both = sampler(n_points + m_draw, g_shape).to(torch.float64)
    _check_cloud(f"samples of shape {shape!r}", both, batched=False)
    if both.shape[0] != n_points + m_draw:
        raise FewflowError(f"shape sampler returned {both.shape[0]} points, expected {n_points + m_draw}")
    both = _normalise(both)
    perm = torch.randperm(both.shape[0], generator=g)
    src, tgt0 = both[perm[:n_points]], both[perm[n_points:]]
    motion = random_motion(src, max_angle=max_angle, max_translation=max_translation, nonrigid=nonrigid,
                           rbf_centers=rbf_centers, rbf_width=rbf_width, generator=g)
    moved_src, tgt = motion(src), motion(tgt0)
    visible = torch.ones(n_points, dtype=torch.bool)
    if occlusion > 0:
        u = _unit(g, torch.float64)
        proj = tgt @ u
        keep = proj.argsort()[:m]
        cut = proj[keep].max()
        tgt = tgt[keep]
        visible = (moved_src @ u) <= cut
    else:
        tgt = tgt[:m]
    if noise > 0:
        tgt = tgt + noise * torch.randn(tgt.shape, generator=g, dtype=torch.float64)
    tgt = tgt[torch.randperm(tgt.shape[0], generator=g)]
    label = name if name is not None else (shape if isinstance(shape, str) else "custom")
    return SceneFlowPairs(src[None].to(dtype), tgt[None].to(dtype), (moved_src - src)[None].to(dtype),
                          visible[None], [label])


def make_pairs(
    n_pairs: int,
    shapes: Sequence[str | ShapeSampler] = SHAPE_NAMES,
    n_points: int = 512,
    n_target: int | None = None,
    *,
    seed: int = 0,
    **kw: float,
) -> SceneFlowPairs:
    """``n_pairs`` pairs of :func:`make_pair`, cycling through ``shapes``; pair ``k`` uses the seed
    ``seed * 1_000_003 + k`` (disjoint seeds give held-out shapes and motions). ``kw`` go to
    :func:`make_pair`."""
    if n_pairs < 1:
        raise FewflowError(f"n_pairs must be >= 1, got {n_pairs}")
    if len(shapes) == 0:
        raise FewflowError("shapes is empty: give at least one shape name or sampler")
    items = [make_pair(shapes[k % len(shapes)], n_points, n_target, seed=seed * 1_000_003 + k, **kw)
             for k in range(n_pairs)]
    return SceneFlowPairs.cat(items)


# ------------------------------------------------------------------------------------------ metrics


def _check_flows(pred: Tensor, gt: Tensor) -> tuple[Tensor, Tensor]:
    if pred.dim() == 2:
        pred = pred[None]
    if gt.dim() == 2:
        gt = gt[None]
    _check_cloud("predicted flow", pred)
    _check_cloud("true flow", gt)
    if pred.shape != gt.shape:
        raise FewflowError(f"shape mismatch: predicted flow has shape {tuple(pred.shape)} but the true flow "
                           f"has shape {tuple(gt.shape)}")
    return pred, gt


def end_point_error(pred: Tensor, gt: Tensor) -> Tensor:
    """Per-point end-point error ``|pred_i - gt_i|``: ``(B, N)`` (``(N, 3)`` inputs give ``(1, N)``)."""
    pred, gt = _check_flows(pred, gt)
    return (pred - gt).norm(dim=-1)


def scene_flow_metrics(pred: Tensor, gt: Tensor, mask: Tensor | None = None) -> dict[str, float]:
    """EPE3D, Acc-strict, Acc-relax and outlier rate (module docstring) of ``pred`` against ``gt``.

    ``pred``, ``gt``: ``(B, N, 3)`` or ``(N, 3)``. ``mask (B, N)`` (bool) restricts every scene to its
    ``True`` points (e.g. :attr:`SceneFlowPairs.visible`). Each metric is computed per scene and averaged
    over scenes (the authors' evaluation); returns plain floats.
    """
    pred, gt = _check_flows(pred, gt)
    epe = (pred - gt).norm(dim=-1).double()
    rel = epe / (gt.norm(dim=-1).double() + 1e-4)
    if mask is None:
        w = torch.ones_like(epe)
    else:
        if mask.dim() == 1:
            mask = mask[None]
        if mask.shape != epe.shape:
            raise FewflowError(f"mask must have shape {tuple(epe.shape)}, got {tuple(mask.shape)}")
        w = mask.to(epe.device).double()
    cnt = w.sum(1)
    if bool((cnt == 0).any()):
        raise FewflowError("mask selects no point in at least one scene")

    def mean(v: Tensor) -> float:
        return float(((v.double() * w).sum(1) / cnt).mean())

    return {
        "epe3d": mean(epe),
        "acc_strict": mean((epe < ACC_STRICT[0]) | (rel < ACC_STRICT[1])),
        "acc_relax": mean((epe < ACC_RELAX[0]) | (rel < ACC_RELAX[1])),
        "outliers": mean((epe > OUTLIER[0]) | (rel > OUTLIER[1])),
    }


def nn_flow(source: Tensor, target: Tensor) -> Tensor:
    """Nearest-neighbour flow ``q_{nn(p_i)} - p_i``: ``(B, N, 3)`` (or ``(N, 3)`` for unbatched input)."""
    unbatched = source.dim() == 2
    s = source[None] if unbatched else source
    t = target[None] if target.dim() == 2 else target
    _check_cloud("source", s)
    _check_cloud("target", t)
    if s.shape[0] != t.shape[0]:
        raise FewflowError(f"source and target hold different numbers of clouds: {s.shape[0]} vs "
                           f"{t.shape[0]}")
    idx = nearest_index(s, t)
    out = torch.gather(t.to(s.dtype), 1, idx.unsqueeze(-1).expand(-1, -1, 3)) - s
    return out[0] if unbatched else out
