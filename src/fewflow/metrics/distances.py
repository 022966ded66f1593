"""Distances between two sample sets ``a (n, ...)`` and ``b (m, ...)`` (flattened to ``(n, D)``).

All return Python floats and compute in float64 on the inputs' device (float32 on MPS).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from fewflow._validate import FewflowError, check_finite

W2_MAX_POINTS = 6000
#: more random directions than this in sliced_wasserstein is a typo (memory is n_proj x D)
MAX_PROJECTIONS = 1_000_000


def _pair(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Validate and flatten two sample sets to ``(n, D)``, ``(m, D)`` in float64 on ``a``'s device."""
    for name, z in (("a", a), ("b", b)):
        check_finite(name, z)
        if z.dim() < 1 or z.shape[0] < 1:
            raise FewflowError(f"{name} must be a non-empty batch (n, ...), got shape {tuple(z.shape)}")
    dtype = torch.float32 if a.device.type == "mps" else torch.float64
    a2 = a.reshape(a.shape[0], -1).to(dtype)
    b2 = b.reshape(b.shape[0], -1).to(device=a.device, dtype=dtype)
    if a2.shape[1] != b2.shape[1]:
        raise FewflowError(
            f"sample sets differ in dimension: a has {a2.shape[1]} features per sample, b has {b2.shape[1]}"
        )
    return a2, b2


def wasserstein_1d(u: Tensor, v: Tensor, p: float = 2.0) -> Tensor:
    """Exact ``W_p^p`` between the empirical measures of the columns of ``u (n, k)`` and ``v (m, k)``.

    ``W_p^p = int_0^1 |F_u^{-1}(q) - F_v^{-1}(q)|^p dq``: both quantile functions are step functions, so the
    integral is an exact sum over the merged breakpoints ``{i/n} U {j/m}``; for ``n = m`` it is
    ``mean |sort(u) - sort(v)|^p``. Returns ``(k,)``.
    """
    n, m = u.shape[0], v.shape[0]
    us, vs = torch.sort(u, dim=0).values, torch.sort(v, dim=0).values
    if n == m:
        return (us - vs).abs().pow(p).mean(0)
    levels = torch.cat([
        torch.arange(1, n + 1, device=u.device, dtype=u.dtype) / n,
        torch.arange(1, m + 1, device=u.device, dtype=u.dtype) / m,
    ]).sort().values
    widths = torch.diff(levels, prepend=levels.new_zeros(1))
    mids = levels - widths / 2
    iu = torch.clamp((mids * n).floor().long(), max=n - 1)
    iv = torch.clamp((mids * m).floor().long(), max=m - 1)
    return (widths[:, None] * (us[iu] - vs[iv]).abs().pow(p)).sum(0)


def sliced_wasserstein(
    a: Tensor, b: Tensor, n_proj: int = 256, p: float = 2.0, generator: torch.Generator | None = None
) -> float:
    """Sliced Wasserstein distance ``SW_p = (E_theta W_p^p(theta#a, theta#b))^(1/p)``.

    Bonneel et al., "Sliced and Radon Wasserstein Barycenters of Measures": ``theta`` uniform on the unit
    sphere (``n_proj`` Monte Carlo directions from ``generator``), each 1-D distance exact
    (:func:`wasserstein_1d`, which handles ``n != m`` by quantile interpolation). In 1-D the projection is
    ``+-1`` and ``SW_p = W_p`` exactly.
    """
    a2, b2 = _pair(a, b)
    if not (n_proj >= 1 and p >= 1 and math.isfinite(p)) or n_proj > MAX_PROJECTIONS:
        raise FewflowError(
            f"need 1 <= n_proj <= {MAX_PROJECTIONS} and a finite p >= 1, got n_proj={n_proj}, p={p}"
        )
    d = a2.shape[1]
    gdev = generator.device if generator is not None else torch.device("cpu")
    theta = torch.randn(d, n_proj, generator=generator, device=gdev, dtype=torch.float64)
    theta = (theta / theta.norm(dim=0, keepdim=True)).to(device=a2.device, dtype=a2.dtype)
    out = float(wasserstein_1d(a2 @ theta, b2 @ theta, p).mean() ** (1.0 / p))
    if not math.isfinite(out):  # |difference|^p overflowed float64 (a huge p or huge values)
        raise FewflowError(f"sliced_wasserstein overflowed with p={p}: use a smaller p or rescale the data")
    return out


def wasserstein2(a: Tensor, b: Tensor, max_points: int = W2_MAX_POINTS) -> float:
    """Exact 2-Wasserstein distance between the empirical measures (uniform weights), via POT ``ot.emd2``.

    ``W_2 = (min_{P in U(1/n, 1/m)} sum_ij P_ij ||a_i - b_j||^2)^(1/2)`` solved as a linear program
    (network simplex; Flamary et al., "POT: Python Optimal Transport"). Costs ``O(n m)`` memory and
    roughly cubic time, so sets above ``max_points`` are refused.
    """
    import ot

    a2, b2 = _pair(a, b)
    if max(a2.shape[0], b2.shape[0]) > max_points:
        raise FewflowError(
            f"wasserstein2 is exact and cubic: sets of {a2.shape[0]} and {b2.shape[0]} points exceed "
            f"max_points={max_points}; subsample or use sliced_wasserstein"
        )
    an, bn = a2.cpu().numpy(), b2.cpu().numpy()
    cost = ot.dist(an, bn, metric="sqeuclidean")
    wa = np.full(an.shape[0], 1.0 / an.shape[0])
    wb = np.full(bn.shape[0], 1.0 / bn.shape[0])
    return float(np.sqrt(max(float(ot.emd2(wa, wb, cost, numItermax=10_000_000)), 0.0)))


def _sqdist(x: Tensor, y: Tensor) -> Tensor:
    return (x.pow(2).sum(1)[:, None] + y.pow(2).sum(1)[None, :] - 2 * x @ y.T).clamp_min(0)


def median_bandwidth(a: Tensor, b: Tensor) -> float:
    """Median heuristic (Gretton et al.): ``sigma = sqrt(median ||z_i - z_j||^2)`` over pooled pairs."""
    a2, b2 = _pair(a, b)
    z = torch.cat([a2, b2])
    if z.shape[0] > 4000:  # the median of a deterministic, evenly spread subset is plenty
        z = z[torch.linspace(0, z.shape[0] - 1, 4000, device=z.device).long()]
    d = _sqdist(z, z)
    iu = torch.triu_indices(z.shape[0], z.shape[0], 1, device=z.device)
    med = float(d[iu[0], iu[1]].median())
    return max(med, 1e-12) ** 0.5


def mmd_rbf(a: Tensor, b: Tensor, bandwidth: float | None = None) -> float:
    """Unbiased squared MMD with the Gaussian kernel ``k(x, y) = exp(-||x - y||^2 / (2 sigma^2))``.

    Gretton et al., "A Kernel Two-Sample Test":
    ``MMD_u^2 = 1/(n(n-1)) sum_{i!=j} k(a_i, a_j) + 1/(m(m-1)) sum_{i!=j} k(b_i, b_j)
    - 2/(nm) sum_{i,j} k(a_i, b_j)``.
    Unbiased, so it fluctuates around 0 (and may be slightly negative) when both sets share a law.
    ``bandwidth=None`` uses the median heuristic (:func:`median_bandwidth`).
    """
    a2, b2 = _pair(a, b)
    n, m = a2.shape[0], b2.shape[0]
    if n < 2 or m < 2:
        raise FewflowError(f"mmd_rbf needs at least 2 samples per set, got {n} and {m}")
    sigma = median_bandwidth(a2, b2) if bandwidth is None else float(bandwidth)
    if not sigma > 0:
        raise FewflowError(f"bandwidth must be positive, got {bandwidth}")
    g = -0.5 / sigma**2
    kaa, kbb, kab = (_sqdist(a2, a2) * g).exp(), (_sqdist(b2, b2) * g).exp(), (_sqdist(a2, b2) * g).exp()
    xx = (kaa.sum() - kaa.diagonal().sum()) / (n * (n - 1))
    yy = (kbb.sum() - kbb.diagonal().sum()) / (m * (m - 1))
    return float(xx + yy - 2 * kab.mean())


def energy_distance(a: Tensor, b: Tensor) -> float:
    """Energy distance ``2 E||X - Y|| - E||X - X'|| - E||Y - Y'||`` between the empirical measures.

    Székely & Rizzo, "Energy statistics: A class of statistics based on distances". The V-statistic form
    (all pairs, diagonal included) is the exact energy distance of the two empirical laws: it is ``>= 0``
    and ``0`` iff the two sets coincide as multisets.
    """
    a2, b2 = _pair(a, b)
    dab = _sqdist(a2, b2).sqrt().mean()
    daa = _sqdist(a2, a2).sqrt().mean()
    dbb = _sqdist(b2, b2).sqrt().mean()
    return float((2 * dab - daa - dbb).clamp_min(0))


def two_sample_floor(
    sampler_or_data: Tensor | Callable[..., Tensor],
    metric: Callable[[Tensor, Tensor], float],
    n: int,
    *,
    generator: torch.Generator | None = None,
    repeats: int = 1,
) -> float:
    """The metric between two *disjoint* real sets of size ``n``: the best score a perfect model can get.

    ``sampler_or_data`` is either a tensor of real samples (two disjoint random subsets of size ``n`` are
    drawn without replacement, so it needs ``>= 2 n`` rows) or a callable ``sampler(n, generator=...)``
    called twice. Averaged over ``repeats`` draws.
    """
    if not isinstance(n, int) or n < 1 or repeats < 1:
        raise FewflowError(f"n and repeats must be positive ints, got n={n!r}, repeats={repeats!r}")
    vals = []
    for _ in range(repeats):
        if torch.is_tensor(sampler_or_data):
            data = sampler_or_data
            if data.shape[0] < 2 * n:
                raise FewflowError(f"two_sample_floor needs >= 2n = {2 * n} samples, got {data.shape[0]}")
            gdev = generator.device if generator is not None else torch.device("cpu")
            perm = torch.randperm(data.shape[0], generator=generator, device=gdev).to(data.device)
            x, y = data[perm[:n]], data[perm[n : 2 * n]]
        elif callable(sampler_or_data):
            x, y = sampler_or_data(n, generator=generator), sampler_or_data(n, generator=generator)
        else:
            raise FewflowError(
                f"sampler_or_data must be a Tensor or a callable, got {type(sampler_or_data).__name__}"
            )
        vals.append(float(metric(x, y)))
    return float(np.mean(vals))
