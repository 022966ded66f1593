"""Analytic surfaces with uniform-area sampling and point-to-surface distances.

* :class:`Sphere` (radius ``r``): samples are normalised Gaussians (exactly uniform in area); the
  distance ``| |x| - r |`` is exact.
* :class:`Torus` (tube centre radius ``R``, tube radius ``r``, axis z): the tube angle is drawn by
  rejection with density proportional to the area element ``r (R + r cos v)`` (exactly uniform); the
  distance ``| sqrt((sqrt(x^2 + y^2) - R)^2 + z^2) - r |`` is exact.
* :class:`Superquadric` (exponents ``e1`` (latitude), ``e2`` (longitude), axes ``a``):
  ``p(eta, omega) = (a1 C(eta)^e1 C(omega)^e2, a2 C(eta)^e1 S(omega)^e2, a3 S(eta)^e1)`` with signed powers
  ``C(u)^e = sign(cos u) |cos u|^e``. Sampling draws a cell of a fine parameter grid with probability
  proportional to its area (two triangles of its corners), then a uniform parameter in the cell: every
  sample lies exactly on the surface and the density is uniform up to the variation of the area element
  inside a cell. The distance is numerically exact: the parameters of the 3 nearest of 10,000 area-uniform
  surface samples seed 18 rounds of 7 x 7 grid searches in (eta, omega) that halve their window each
  round (tested: below 3e-5 on the surface's own samples for exponents in [0.5, 2], agreeing with the
  sphere's closed form to 1e-11; sharper or flatter shapes, exponents near 0.3 or 2.5, reach ~3e-3).

Every class exposes ``sample(n, generator=None, dtype=torch.float32) -> (n, 3)`` and
``distance(x) -> (...,)`` for points ``(..., 3)`` (on ``x``'s device and dtype).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from fewflow._validate import FewflowError, check_finite


def _check_points(x: Tensor) -> None:
    if not torch.is_tensor(x) or x.shape[-1:] != (3,):
        raise FewflowError(f"points must be a tensor (..., 3), got {getattr(x, 'shape', type(x).__name__)}")
    check_finite("points", x)


def _check_n(n: int) -> None:
    if not isinstance(n, int) or n < 1:
        raise FewflowError(f"the number of points must be a positive integer, got {n!r}")


@dataclass(frozen=True)
class Sphere:
    """The sphere of radius ``r`` centred at the origin."""

    r: float = 1.0

    def sample(self, n: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32
               ) -> Tensor:
        _check_n(n)
        z = torch.randn(n, 3, generator=generator, dtype=torch.float64)
        return (self.r * z / z.norm(dim=1, keepdim=True)).to(dtype)

    def distance(self, x: Tensor) -> Tensor:
        _check_points(x)
        return (x.norm(dim=-1) - self.r).abs()


@dataclass(frozen=True)
class Torus:
    """The torus around the z axis with centre-line radius ``R`` and tube radius ``r`` (``R > r > 0``)."""

    R: float = 0.7
    r: float = 0.3

    def __post_init__(self) -> None:
        if not (self.R > self.r > 0):
            raise FewflowError(f"a torus needs R > r > 0, got R={self.R}, r={self.r}")

    def sample(self, n: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32
               ) -> Tensor:
        _check_n(n)
        vs = []
        got = 0
        while got < n:  # rejection on the area element (R + r cos v) / (R + r)
            v = 2 * math.pi * torch.rand(2 * n, generator=generator, dtype=torch.float64)
            keep = torch.rand(2 * n, generator=generator, dtype=torch.float64) < (
                (self.R + self.r * v.cos()) / (self.R + self.r))
            vs.append(v[keep])
            got += int(keep.sum())
        v = torch.cat(vs)[:n]
        u = 2 * math.pi * torch.rand(n, generator=generator, dtype=torch.float64)
        rho = self.R + self.r * v.cos()
        return torch.stack([rho * u.cos(), rho * u.sin(), self.r * v.sin()], 1).to(dtype)

    def distance(self, x: Tensor) -> Tensor:
        _check_points(x)
        q = torch.sqrt(x[..., 0] ** 2 + x[..., 1] ** 2) - self.R
        return (torch.sqrt(q**2 + x[..., 2] ** 2) - self.r).abs()


def _spow(c: np.ndarray, e: float) -> np.ndarray:
    return np.sign(c) * np.abs(c) ** e


@dataclass(frozen=True)
class Superquadric:
    """A superquadric (superellipsoid) with exponents ``e1``, ``e2`` in ``[0.2, 3]`` and axes ``a``."""

    e1: float = 1.0
    e2: float = 1.0
    a: tuple[float, float, float] = (1.0, 1.0, 1.0)
    grid: int = 256

    def __post_init__(self) -> None:
        if not (0.2 <= self.e1 <= 3 and 0.2 <= self.e2 <= 3):
            raise FewflowError(f"superquadric exponents must lie in [0.2, 3], got e1={self.e1}, e2={self.e2}")
        if len(self.a) != 3 or min(self.a) <= 0:
            raise FewflowError(f"superquadric axes must be three positive numbers, got {self.a}")

    def param(self, eta: np.ndarray, omega: np.ndarray) -> np.ndarray:
        """Surface points ``(..., 3)`` at latitude ``eta`` in [-pi/2, pi/2], longitude ``omega``."""
        ce, se = _spow(np.cos(eta), self.e1), _spow(np.sin(eta), self.e1)
        return np.stack([self.a[0] * ce * _spow(np.cos(omega), self.e2),
                         self.a[1] * ce * _spow(np.sin(omega), self.e2),
                         self.a[2] * se * np.ones_like(omega)], -1)

    def _cells(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        g = self.grid
        eta = np.linspace(-np.pi / 2, np.pi / 2, g + 1)
        om = np.linspace(-np.pi, np.pi, 2 * g + 1)
        p = self.param(eta[:, None], om[None, :])
        a, b, c, d = p[:-1, :-1], p[1:, :-1], p[1:, 1:], p[:-1, 1:]
        area = 0.5 * (np.linalg.norm(np.cross(b - a, c - a), axis=-1)
                      + np.linalg.norm(np.cross(c - a, d - a), axis=-1))
        return eta, om, area

    def _sample_params(self, n: int, generator: torch.Generator | None) -> tuple[np.ndarray, np.ndarray]:
        eta, om, area = self._cells()
        w = torch.from_numpy(area.reshape(-1))
        cell = torch.multinomial(w, n, replacement=True, generator=generator).numpy()
        i, j = np.divmod(cell, area.shape[1])
        uv = torch.rand(n, 2, generator=generator, dtype=torch.float64).numpy()
        return eta[i] + uv[:, 0] * (eta[1] - eta[0]), om[j] + uv[:, 1] * (om[1] - om[0])

    def sample(self, n: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32
               ) -> Tensor:
        _check_n(n)
        e, o = self._sample_params(n, generator)
        return torch.from_numpy(self.param(e, o)).to(dtype)

    def _seeds(self) -> tuple[Tensor, np.ndarray, np.ndarray]:
        key = (self.e1, self.e2, tuple(self.a), self.grid)
        if key not in _SEEDS:
            e, o = self._sample_params(10000, torch.Generator().manual_seed(0))
            _SEEDS.clear()
            _SEEDS[key] = (torch.from_numpy(self.param(e, o)), e, o)
        return _SEEDS[key]

    def distance(self, x: Tensor) -> Tensor:
        _check_points(x)
        q = x.detach().reshape(-1, 3).cpu().double()
        pts, seta, som = self._seeds()
        k = 3
        idx = torch.empty(q.shape[0], k, dtype=torch.long)
        for s in range(0, q.shape[0], 1024):
            idx[s : s + 1024] = torch.cdist(q[s : s + 1024], pts).topk(k, largest=False).indices
        idx = idx.numpy().reshape(-1)
        ce, co = seta[idx], som[idx]
        # windows: 4 sampling cells in eta; in omega, 4 cells divided by the parallel's radius factor
        # |cos eta|^e1 (near a pole every longitude is close, so the window opens up to the full circle)
        he = np.full(len(idx), 8 * np.pi / self.grid)
        ho = np.minimum(np.pi, he / np.maximum(np.abs(np.cos(ce)) ** self.e1, 1e-9))
        f = np.linspace(-1, 1, 7)
        qn = np.repeat(q.numpy(), k, axis=0)[:, None, None, :]
        rows = np.arange(len(idx))
        for _ in range(18):  # shrinking grid searches around each seed's best parameters so far
            e = np.clip(ce[:, None, None] + he[:, None, None] * f[None, :, None], -np.pi / 2, np.pi / 2)
            o = co[:, None, None] + ho[:, None, None] * f[None, None, :]
            e, o = np.broadcast_arrays(e, o)
            dist = np.linalg.norm(self.param(e, o) - qn, axis=-1).reshape(len(idx), -1)
            best = dist.argmin(1)
            ce, co = e.reshape(len(idx), -1)[rows, best], o.reshape(len(idx), -1)[rows, best]
            d = dist[rows, best]
            he, ho = he / 2, ho / 2
        d = d.reshape(q.shape[0], k).min(1)
        return torch.from_numpy(d).to(device=x.device, dtype=x.dtype).reshape(x.shape[:-1])


_SEEDS: dict = {}
SURFACES = {"sphere": Sphere, "torus": Torus, "superquadric": Superquadric}


def sphere(r: float = 1.0) -> Sphere:
    """:class:`Sphere` of radius ``r``."""
    return Sphere(r)


def torus(R: float = 0.7, r: float = 0.3) -> Torus:
    """:class:`Torus` with centre-line radius ``R`` and tube radius ``r``."""
    return Torus(R, r)


def superquadric(e1: float = 1.0, e2: float = 1.0, a: tuple[float, float, float] = (1.0, 1.0, 1.0)
                 ) -> Superquadric:
    """:class:`Superquadric` with exponents ``e1``, ``e2`` and axes ``a``."""
    return Superquadric(e1, e2, tuple(float(v) for v in a))
