"""Point-cloud data sets: dense clouds sampled on random analytic surfaces and on meshes.

``random_surfaces(n, seed)`` draws ``n`` shapes: spheres, tori (``R`` in [0.55, 0.8], ``r`` in
[0.15, 0.35]) and superquadrics (exponents in [0.5, 2], axes in [0.5, 1]) with random rotations, in equal
turns. :func:`surface_clouds` samples ``points`` points on each and returns a
:class:`fewflow.data.Dataset` of shape ``(n, points, 3)``. By default the points are Poisson-disk-like
(:func:`spread_points`: ``spread * points`` area-uniform samples thinned by farthest point sampling), the
kind of dense cloud point-cloud upsampling trains on (PU-GAN and PU1K store Poisson-disk patches,
"PU-GAN: a Point Cloud Upsampling Adversarial Network", arXiv:1907.10844); ``spread=1`` keeps
independent area-uniform samples; ``fewflow train --data
fewflow.points.datasets:surface_clouds --method pufm`` trains on its default (256 clouds of 512 points).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fewflow._validate import FewflowError
from fewflow.data.base import Dataset
from fewflow.points.surfaces import Sphere, Superquadric, Torus
from fewflow.points.upsample import farthest_point_sample, gather_points


def random_rotation(generator: torch.Generator | None = None) -> Tensor:
    """A uniformly random rotation matrix ``(3, 3)`` (float64), from a normalised Gaussian quaternion."""
    q = torch.randn(4, generator=generator, dtype=torch.float64)
    w, x, y, z = (q / q.norm()).tolist()
    return torch.tensor([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ], dtype=torch.float64)


@dataclass(frozen=True)
class PosedSurface:
    """A surface rotated by ``rot``: samples ``rot @ p``, distance of ``x`` = surface distance of
    ``rot^T x``."""

    surface: Any
    rot: Tensor

    def sample(self, n: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32
               ) -> Tensor:
        return (self.surface.sample(n, generator, torch.float64) @ self.rot.T).to(dtype)

    def distance(self, x: Tensor) -> Tensor:
        return self.surface.distance((x.double() @ self.rot.to(x.device)).to(x.dtype))


def spread_points(x: Tensor, n: int) -> Tensor:
    """``n`` of the points ``x (N, 3)`` or ``(B, N, 3)`` kept by farthest point sampling from the first:
    thinning ``N >> n`` area-uniform samples this way gives an even, Poisson-disk-like cloud (no two
    points closer than about the sampling radius). Does not modify ``x``."""
    batched = x.dim() == 3
    xb = x if batched else x.unsqueeze(0)
    out = gather_points(xb, farthest_point_sample(xb, n))
    return out if batched else out[0]


def random_surfaces(n: int, seed: int = 0, kinds: tuple[str, ...] = ("sphere", "torus", "superquadric")
                    ) -> list[PosedSurface]:
    """``n`` random posed surfaces (module docstring), cycling through ``kinds``."""
    if not isinstance(n, int) or n < 1:
        raise FewflowError(f"the number of shapes must be a positive integer, got {n!r}")
    g = torch.Generator().manual_seed(int(seed))

    def u(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand(1, generator=g, dtype=torch.float64))

    out = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        if kind == "sphere":
            s: Any = Sphere(1.0)
        elif kind == "torus":
            s = Torus(u(0.55, 0.8), u(0.15, 0.35))
        elif kind == "superquadric":
            s = Superquadric(u(0.5, 2.0), u(0.5, 2.0), (u(0.5, 1.0), u(0.5, 1.0), u(0.5, 1.0)), grid=128)
        else:
            raise FewflowError(f"unknown surface kind {kind!r}; choose from sphere, torus, superquadric")
        out.append(PosedSurface(s, random_rotation(g)))
    return out


def surface_clouds(n: int = 256, points: int = 512, seed: int = 0,
                   kinds: tuple[str, ...] = ("sphere", "torus", "superquadric"), spread: int = 4) -> Dataset:
    """Dense clouds ``(n, points, 3)`` on :func:`random_surfaces` (each centred, in the unit ball):
    ``spread * points`` area-uniform samples per shape thinned to ``points`` by :func:`spread_points`
    (``spread=1``: independent samples)."""
    if not isinstance(spread, int) or spread < 1:
        raise FewflowError(f"spread must be a positive integer, got {spread!r}")
    g = torch.Generator().manual_seed(int(seed) + 1)
    shapes = random_surfaces(n, seed, kinds)
    xs = torch.stack([s.sample(points * spread, g, torch.float64) for s in shapes])
    if spread > 1:
        xs = spread_points(xs, points)
    xs = xs - xs.mean(1, keepdim=True)
    xs = xs / xs.norm(dim=-1).amax(1)[:, None, None]
    return Dataset(x=xs.float(), y=None, name="surface_clouds", value_range=(-1.0, 1.0),
                   description=f"{n} dense clouds of {points} points on random spheres, tori and "
                               "superquadrics", meta={"kind": "points"})


def mesh_clouds(names: list[str], points: int = 512, per_mesh: int = 1, seed: int = 0,
                cache_dir: Any = None, spread: int = 4) -> Tensor:
    """Dense clouds ``(len(names) * per_mesh, points, 3)`` sampled on fetched meshes (each centred and
    scaled into the unit ball; Poisson-disk-like with ``spread > 1``, as :func:`surface_clouds`); raises
    if a mesh is not cached (:func:`fewflow.points.fetch_meshes`)."""
    from fewflow.points.meshes import load_mesh, normalize_cloud, sample_mesh

    out = []
    for i, name in enumerate(names):
        v, f = load_mesh(name, cache_dir)
        for j in range(per_mesh):
            x = sample_mesh(v, f, points * spread, seed=seed * 1000 + 17 * i + j, dtype=torch.float64)
            x = spread_points(x, points) if spread > 1 else x
            out.append(normalize_cloud(x)[0])
    return torch.stack(out).float()


__all__ = ["PosedSurface", "mesh_clouds", "random_rotation", "random_surfaces", "spread_points",
           "surface_clouds"]
