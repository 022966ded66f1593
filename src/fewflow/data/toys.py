"""Exact samplers for the 2-D toy distributions used throughout the flow-matching literature.

Every sampler is pure torch driven by one ``torch.Generator`` and returns ``(x, y)``: ``x`` is
``(n, 2)`` float32 and ``y`` the mode / component id (``None`` where no label is natural).

Conventions (documented because papers differ):

* ``8gaussians``: 8 isotropic Gaussians with centres on a circle of radius ``radius=2`` at angles
  ``2 pi k / 8`` and standard deviation ``std=0.1`` (torchcfm's ``sample_8gaussians`` uses radius 5 and a
  much wider spread; FFJORD uses radius 4/sqrt 2 with std 0.5/sqrt 2 -- pass ``radius``/``std`` for those).
* ``moons``: scikit-learn ``make_moons`` geometry (upper arc ``(cos a, sin a)``, lower arc
  ``(1 - cos a, 0.5 - sin a)``, ``a ~ U[0, pi]``) centred at the origin, scaled by ``scale=2`` and perturbed
  by Gaussian noise ``noise=0.05`` (applied after scaling). Label: which moon.
* ``checkerboard``: FFJORD's 4x4 board on ``[-2, 2]^2`` (8 occupied unit squares), uniform in each
  square. No label.
* ``spirals``: FFJORD's two interleaved spirals (``r = sqrt(u) * 3 pi``), divided by 3, plus
  ``noise=0.05`` Gaussian noise. Label: which arm.
* ``rings``: ``num_rings=4`` concentric circles of radii ``1/num_rings .. 1`` times ``radius=2``, points
  split evenly across rings, radial-free Gaussian noise ``noise=0.02``. Label: ring id.
* ``gmm``: ``num_classes=8`` equally weighted isotropic Gaussians (std ``std=0.15``) in ``dim=2`` dims with
  means drawn from ``N(0, spread^2 I)`` (``spread=2``) by their own generator seeded with ``mixture_seed``
  (so every ``n``/``seed`` shares one mixture; means are returned in ``Dataset.meta``). Label: component.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from fewflow._validate import FewflowError

ToyResult = tuple[Tensor, "Tensor | None", dict]


def _randn(gen: torch.Generator, *shape: int) -> Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def _rand(gen: torch.Generator, *shape: int) -> Tensor:
    return torch.rand(*shape, generator=gen, dtype=torch.float64)


def _check_positive(name: str, value: float, allow_zero: bool = False) -> None:
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise FewflowError(f"{name} must be {'non-negative' if allow_zero else 'positive'}, got {value}")


def eight_gaussians(n: int, gen: torch.Generator, radius: float = 2.0, std: float = 0.1) -> ToyResult:
    """8 Gaussians on a circle: ``x = radius (cos 2 pi k/8, sin 2 pi k/8) + std * eps``, ``k ~ U{0..7}``."""
    _check_positive("radius", radius)
    _check_positive("std", std, allow_zero=True)
    k = torch.randint(0, 8, (n,), generator=gen)
    ang = 2 * math.pi * k.double() / 8
    centres = radius * torch.stack([torch.cos(ang), torch.sin(ang)], dim=1)
    return centres + std * _randn(gen, n, 2), k, {"radius": radius, "std": std}


def moons(n: int, gen: torch.Generator, noise: float = 0.05, scale: float = 2.0) -> ToyResult:
    """Two interleaving half circles (scikit-learn ``make_moons`` geometry), centred and scaled."""
    _check_positive("noise", noise, allow_zero=True)
    _check_positive("scale", scale)
    lab = torch.randint(0, 2, (n,), generator=gen)
    a = math.pi * _rand(gen, n)
    upper = torch.stack([torch.cos(a), torch.sin(a)], dim=1)
    lower = torch.stack([1 - torch.cos(a), 0.5 - torch.sin(a)], dim=1)
    pts = torch.where(lab[:, None] == 0, upper, lower)
    pts = (pts - torch.tensor([0.5, 0.25], dtype=torch.float64)) * scale
    return pts + noise * _randn(gen, n, 2), lab, {"noise": noise, "scale": scale}


def checkerboard(n: int, gen: torch.Generator) -> ToyResult:
    """FFJORD checkerboard on ``[-2, 2]^2``: ``x1 ~ U[-2, 2]``, ``x2`` in the squares of opposite parity."""
    x1 = _rand(gen, n) * 4 - 2
    x2_ = _rand(gen, n) - torch.randint(0, 2, (n,), generator=gen).double() * 2
    x2 = x2_ + torch.floor(x1) % 2
    return torch.stack([x1, x2], dim=1), None, {}


def spirals(n: int, gen: torch.Generator, noise: float = 0.05) -> ToyResult:
    """Two interleaved spirals (FFJORD ``2spirals``): ``r = sqrt(u) 3 pi``, arm 2 is arm 1 rotated by pi."""
    _check_positive("noise", noise, allow_zero=True)
    lab = torch.randint(0, 2, (n,), generator=gen)
    r = torch.sqrt(_rand(gen, n)) * 540 * (2 * math.pi) / 360
    pts = torch.stack([-torch.cos(r) * r, torch.sin(r) * r], dim=1)
    pts = pts + 0.5 * _rand(gen, n, 2)  # FFJORD's uniform jitter
    sign = torch.where(lab == 0, 1.0, -1.0).double()[:, None]
    return sign * pts / 3 + noise * _randn(gen, n, 2), lab, {"noise": noise}


def rings(
    n: int, gen: torch.Generator, num_rings: int = 4, radius: float = 2.0, noise: float = 0.02
) -> ToyResult:
    """Concentric circles of radii ``radius * (j + 1) / num_rings``; angle uniform, isotropic noise."""
    if not isinstance(num_rings, int) or num_rings < 1:
        raise FewflowError(f"num_rings must be a positive int, got {num_rings!r}")
    _check_positive("radius", radius)
    _check_positive("noise", noise, allow_zero=True)
    lab = torch.arange(n) % num_rings
    lab = lab[torch.randperm(n, generator=gen)]
    r = radius * (lab.double() + 1) / num_rings
    a = 2 * math.pi * _rand(gen, n)
    pts = torch.stack([r * torch.cos(a), r * torch.sin(a)], dim=1)
    return pts + noise * _randn(gen, n, 2), lab, {"num_rings": num_rings, "radius": radius, "noise": noise}


def gmm_means(num_classes: int = 8, dim: int = 2, spread: float = 2.0, mixture_seed: int = 0) -> Tensor:
    """Means (float64) of the ``gmm`` toy: ``N(0, spread^2 I)`` draws, generator seeded ``mixture_seed``."""
    if not isinstance(num_classes, int) or num_classes < 1:
        raise FewflowError(f"num_classes must be a positive int, got {num_classes!r}")
    if not isinstance(dim, int) or dim < 1:
        raise FewflowError(f"dim must be a positive int, got {dim!r}")
    g = torch.Generator().manual_seed(int(mixture_seed))
    return spread * torch.randn(num_classes, dim, generator=g, dtype=torch.float64)


def gmm(
    n: int,
    gen: torch.Generator,
    num_classes: int = 8,
    dim: int = 2,
    std: float = 0.15,
    spread: float = 2.0,
    mixture_seed: int = 0,
) -> ToyResult:
    """Equal-weight isotropic Gaussian mixture ``sum_k (1/K) N(mu_k, std^2 I)``; label = component."""
    _check_positive("std", std, allow_zero=True)
    means = gmm_means(num_classes, dim, spread, mixture_seed)
    lab = torch.randint(0, num_classes, (n,), generator=gen)
    x = means[lab] + std * _randn(gen, n, dim)
    return x, lab, {"means": means.float(), "std": std, "num_classes": num_classes}


# name -> (sampler, num_classes function of kwargs, description)
TOYS: dict[str, tuple[Callable[..., ToyResult], Callable[[dict], int | None], str]] = {
    "8gaussians": (eight_gaussians, lambda kw: 8, "8 Gaussians on a circle (label: mode)"),
    "moons": (moons, lambda kw: 2, "two moons, sklearn make_moons geometry, centred (label: moon)"),
    "checkerboard": (checkerboard, lambda kw: None, "4x4 checkerboard on [-2, 2]^2 (FFJORD)"),
    "spirals": (spirals, lambda kw: 2, "two interleaved spirals (FFJORD 2spirals; label: arm)"),
    "rings": (rings, lambda kw: int(kw.get("num_rings", 4)), "concentric circles (label: ring)"),
    "gmm": (gmm, lambda kw: int(kw.get("num_classes", 8)), "isotropic Gaussian mixture (label: component)"),
}
