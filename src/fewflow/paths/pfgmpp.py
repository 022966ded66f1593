"""The PFGM++ perturbation kernel: data in ``N`` dimensions augmented with ``D`` extra dimensions.

From "PFGM++: Unlocking the Potential of Physics-Inspired Generative Models" (Xu, Liu, Tian, Tong,
Tegmark, Jaakkola; arXiv 2302.04265). A data point ``y`` in ``R^N`` is perturbed in ``N + D`` dimensions by
the electric field of a charge; only the norm ``r`` of the ``D`` augmented coordinates matters, and the
marginal kernel on ``R^N`` is

    p_r(x | y)  proportional to  (||x - y||^2 + r^2)^(-(N + D) / 2).

Its radius ``R = ||x - y||`` has the law ``R^2 / r^2 ~ BetaPrime(N/2, D/2)``, i.e. ``R = r sqrt(B / (1 - B))``
with ``B ~ Beta(N/2, D/2)``, and the direction ``(x - y) / R`` is uniform on the sphere ``S^(N-1)``.
With the alignment ``r = sigma sqrt(D)`` the kernel is a multivariate Student-t with ``D`` degrees of
freedom and scale ``sigma``: ``x = y + sigma z / sqrt(W / D)`` with ``z ~ N(0, I_N)``, ``W ~ chi^2_D``; its
per-coordinate variance is ``sigma^2 D / (D - 2)`` (``D > 2``), and as ``D -> infinity`` it becomes EDM's
Gaussian ``N(y, sigma^2 I)`` (``D = math.inf`` here is exactly that case). ``D = 1`` is the original PFGM.

Beta-prime draws use the ratio of two Gamma variables, ``B / (1 - B) = G_N / G_D`` with
``G_N ~ Gamma(N/2)`` and ``G_D ~ Gamma(D/2)`` (the same law as the official code's ``Beta`` draw, without
its clamping), so every draw takes a ``torch.Generator``.

Time. PFGM++ follows EDM: ``sigma`` runs from ``sigma_max`` (noise) down to ``sigma_min`` (data). fewflow's
time runs the other way, ``t = 0`` noise, ``t = 1`` data; :func:`sigma_of_t` / :func:`t_of_sigma` are the one
map between them, Karras et al.'s rho-schedule ("Elucidating the Design Space of Diffusion-Based Generative
Models", arXiv 2206.00364, Eq. 5):

    sigma(t) = (sigma_max^(1/rho) + t (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,   t in [0, 1],

so ``sigma(0) = sigma_max``, ``sigma(1) = sigma_min``, and a uniform grid in ``t`` is EDM's sampling grid.

All functions are pure: inputs are never modified, outputs follow the input's device and dtype (the Gamma
draws run in float64 and are cast).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fewflow._validate import FewflowError

__all__ = [
    "as_aug_dim",
    "perturb",
    "prior_from_gaussian",
    "radius_logpdf",
    "sample_beta_prime",
    "sample_direction",
    "sample_prior",
    "sample_radius",
    "sigma_of_t",
    "t_of_sigma",
]

_INF_NAMES = ("inf", "infinity", "+inf")


def as_aug_dim(D: float | int | str) -> float:
    """The number of augmented dimensions as a float: a number ``> 0`` or ``math.inf`` (also given as the
    string ``"inf"``: EDM's Gaussian case). ``D <= 0``, NaN or another string raise :class:`FewflowError`."""
    if isinstance(D, str):
        if D.strip().lower() in _INF_NAMES:
            return math.inf
        try:
            D = float(D)
        except ValueError:
            raise FewflowError(f"D (augmented dimensions) must be a number > 0 or 'inf', got {D!r}") from None
    if isinstance(D, bool) or not isinstance(D, (int, float)) or math.isnan(D) or D <= 0:
        raise FewflowError(f"D (augmented dimensions) must be a number > 0 or 'inf', got {D!r}")
    return float(D)


def _check_sigma_range(sigma_min: float, sigma_max: float, rho: float) -> None:
    if not (0.0 < sigma_min < sigma_max < math.inf):
        raise FewflowError(f"need 0 < sigma_min < sigma_max < inf, got {sigma_min}, {sigma_max}")
    if not (rho > 0 and math.isfinite(rho)):
        raise FewflowError(f"rho must be a finite number > 0, got {rho}")


def sigma_of_t(t: Tensor, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> Tensor:
    """EDM noise level of fewflow time ``t`` (module docstring): ``sigma(0) = sigma_max``,
    ``sigma(1) = sigma_min``, decreasing, Karras's rho-schedule."""
    _check_sigma_range(sigma_min, sigma_max, rho)
    a, b = sigma_max ** (1.0 / rho), sigma_min ** (1.0 / rho)
    return (a + t * (b - a)).clamp_min(0.0) ** rho


def t_of_sigma(sigma: Tensor, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> Tensor:
    """The inverse of :func:`sigma_of_t`: ``t = (sigma_max^(1/rho) - sigma^(1/rho)) / (sigma_max^(1/rho) -
    sigma_min^(1/rho))`` (``t = 0`` at ``sigma_max``, ``t = 1`` at ``sigma_min``)."""
    _check_sigma_range(sigma_min, sigma_max, rho)
    a, b = sigma_max ** (1.0 / rho), sigma_min ** (1.0 / rho)
    return (a - sigma.clamp_min(0.0) ** (1.0 / rho)) / (a - b)


def _gamma(alpha: float, n: int, device: torch.device, generator: torch.Generator | None) -> Tensor:
    """``n`` Gamma(alpha, 1) draws in float64 on ``device`` (drawn on the generator's device)."""
    gdev = generator.device if generator is not None else device
    conc = torch.full((n,), float(alpha), dtype=torch.float64, device=gdev)
    return torch._standard_gamma(conc, generator=generator).to(device)


def _numel_per_row(shape: tuple[int, ...] | torch.Size) -> int:
    return int(math.prod(shape[1:]))


def sample_beta_prime(
    n: int, a: float, b: float, *, device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> Tensor:
    """``n`` draws of ``BetaPrime(a, b)`` (float64): ``G_a / G_b``, the odds ``B / (1 - B)`` of
    ``B ~ Beta(a, b)``."""
    if not (a > 0 and b > 0):
        raise FewflowError(f"Beta-prime parameters must be > 0, got a={a}, b={b}")
    device = torch.device(device)
    return _gamma(a, n, device, generator) / _gamma(b, n, device, generator)


def sample_radius(
    sigma: Tensor, N: int, D: float | int | str, *, generator: torch.Generator | None = None
) -> Tensor:
    """Radii ``R = ||x - y||`` of the PFGM++ kernel for noise levels ``sigma`` (shape ``(B,)``) in ``N`` data
    dimensions: ``R = sigma sqrt(D) sqrt(B / (1 - B))``, ``B ~ Beta(N/2, D/2)``; for ``D = inf`` the Gaussian
    radius ``sigma sqrt(chi^2_N)``. Shape ``(B,)``, ``sigma``'s device and dtype."""
    D = as_aug_dim(D)
    if N < 1:
        raise FewflowError(f"N (data dimensions) must be >= 1, got {N}")
    n = sigma.shape[0]
    s64 = sigma.to(torch.float64)
    if math.isinf(D):
        r = s64 * (2.0 * _gamma(N / 2.0, n, sigma.device, generator)).sqrt()
    else:
        odds = sample_beta_prime(n, N / 2.0, D / 2.0, device=sigma.device, generator=generator)
        r = s64 * math.sqrt(D) * odds.sqrt()
    return r.to(sigma.dtype)


def sample_direction(
    shape: tuple[int, ...] | torch.Size, *, device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32, generator: torch.Generator | None = None,
) -> Tensor:
    """Directions uniform on the unit sphere of ``R^N`` (``N`` = the product of ``shape[1:]``), one per
    row."""
    gdev = generator.device if generator is not None else torch.device(device)
    z = torch.randn(tuple(shape), generator=generator, device=gdev, dtype=torch.float64).to(device)
    norm = z.flatten(1).norm(dim=1).clamp_min(1e-300)
    return (z / norm.view(-1, *([1] * (len(shape) - 1)))).to(dtype)


def perturb(
    y: Tensor, sigma: Tensor, D: float | int | str, *, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """``(x, noise)`` with ``x = y + noise``, ``noise = R u``: a draw of the PFGM++ kernel around each row
    of ``y`` (shape ``(B, ...)``) at noise level ``sigma`` (``(B,)``), with ``r = sigma sqrt(D)``.
    ``D = inf`` draws ``noise ~ N(0, sigma^2 I)`` exactly (EDM)."""
    if y.dim() < 2:
        raise FewflowError(f"y must be a batch (B, ...), got shape {tuple(y.shape)}")
    sigma = torch.as_tensor(sigma, device=y.device, dtype=y.dtype).expand(y.shape[0])
    D = as_aug_dim(D)
    view = (-1, *([1] * (y.dim() - 1)))
    if math.isinf(D):
        gdev = generator.device if generator is not None else y.device
        noise = torch.randn(y.shape, generator=generator, device=gdev, dtype=y.dtype).to(y.device)
        noise = noise * sigma.view(view)
    else:
        R = sample_radius(sigma, _numel_per_row(y.shape), D, generator=generator)
        u = sample_direction(y.shape, device=y.device, dtype=y.dtype, generator=generator)
        noise = u * R.view(view)
    return y + noise, noise


def sample_prior(
    n: int, shape: tuple[int, ...], sigma_max: float, D: float | int | str, *,
    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``n`` draws of the PFGM++ prior: the kernel at ``sigma_max`` around ``0`` (heavy-tailed for small
    ``D``; ``sigma_max N(0, I)`` for ``D = inf``), shaped ``(n, *shape)``."""
    zeros = torch.zeros((n, *shape), device=device, dtype=dtype)
    sig = torch.full((n,), float(sigma_max), device=device, dtype=dtype)
    return perturb(zeros, sig, D, generator=generator)[1]


def prior_from_gaussian(
    z: Tensor, sigma_max: float, D: float | int | str, *, generator: torch.Generator | None = None
) -> Tensor:
    """The prior from a standard Gaussian draw ``z`` (``(B, ...)``): ``sigma_max z / sqrt(W / D)`` with
    ``W ~ chi^2_D`` per row. Its radius is ``sigma_max sqrt(D) sqrt(G_N / G_D)`` (``||z||^2 / 2 = G_N``), the
    Beta-prime law of :func:`sample_radius`, and its direction is ``z``'s; ``D = inf`` gives
    ``sigma_max z``, EDM's prior, exactly. Samplers use it to turn the run's Gaussian source into the
    prior."""
    D = as_aug_dim(D)
    if math.isinf(D):
        return z * sigma_max
    W = 2.0 * _gamma(D / 2.0, z.shape[0], z.device, generator)
    scale = (float(sigma_max) * (D / W).sqrt()).to(z.dtype)
    return z * scale.view(-1, *([1] * (z.dim() - 1)))


def radius_logpdf(R: Tensor, sigma: float | Tensor, N: int, D: float | int | str) -> Tensor:
    """Log-density of the kernel's radius ``R`` (closed form, float64):
    ``log p(R) = log 2 + (N - 1) log R + (D / 2) log(r^2) - log B(N/2, D/2) - ((N + D) / 2) log(R^2 + r^2)``
    with ``r = sigma sqrt(D)``; for ``D = inf`` the chi density of ``R / sigma`` with ``N`` degrees."""
    D = as_aug_dim(D)
    R = torch.as_tensor(R, dtype=torch.float64)
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    a = N / 2.0
    if math.isinf(D):
        u = R / sigma
        log_chi = (1.0 - a) * math.log(2.0) - math.lgamma(a) + (N - 1) * u.log() - u**2 / 2
        return log_chi - sigma.log()
    r2 = sigma**2 * D
    b = D / 2.0
    log_beta = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    return (math.log(2.0) + (N - 1) * R.log() + b * r2.log() - log_beta - (a + b) * (R**2 + r2).log())

