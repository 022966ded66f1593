"""Directionally-pruned Gaussian source: reject source draws that point along data-sparse directions.

Paper: *Is There a Better Source Distribution than Gaussian? Exploring Source Distributions for Image
Flow Matching* (Lee, Kim, Lee; TMLR 2025; code ``kwanseokk/SourceFM``).

Fitting (once, on training data ``x_1..x_n``):

1. normalise every sample to the unit sphere, ``z_i = x_i / ||x_i||`` (flattened);
2. principal axes ``e_1..e_d`` of the ``z_i`` (PCA: eigenvectors of their covariance); candidates are
   ``+e_k`` and ``-e_k``;
3. a candidate ``a`` is *data-sparse* when no sample points its way:
   ``max_i cos(a, z_i) <= rejection_threshold`` (0.01 in the code).

Sampling (inference only, the model is unchanged): draw ``x0`` from the base source (a Gaussian, or the
norm-aligned Gaussian of the same paper) and accept it only if ``cos(x0, a) <= tau`` for every stored
axis ``a`` (``tau = 0.048`` for CIFAR-10 in the code); rejected draws are replaced by fresh ones. The
accepted draws follow the base density restricted to the accepted cone, renormalised by the acceptance
rate ``Z``; cosine is scale-invariant, so norm alignment and pruning commute.

For one axis and an isotropic base the direction ``x0 / ||x0||`` is uniform on the sphere ``S^{d-1}``,
``c = cos(x0, a)`` has ``c^2 ~ Beta(1/2, (d-1)/2)``, and the acceptance rate is
``P(c <= tau) = 1/2 + sign(tau)/2 * I_{tau^2}(1/2, (d-1)/2)`` (regularised incomplete beta ``I``):
:func:`analytic_acceptance_rate`.

The released axis-fitting script saves the complement of the data-sparse set under a misleading name,
while the README and the 2-D simulation reject noise aligned with data-sparse directions; we follow the
README/simulation (see ``docs/methods/source_pruning.md``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fewflow._validate import FewflowError, check_batch, check_finite
from fewflow.sources import NormAlignedGaussian

__all__ = [
    "DirectionalPruning",
    "PrunedDraw",
    "PrunedNormAlignedGaussian",
    "PrunedSource",
    "analytic_acceptance_rate",
    "fit_pruning_axes",
    "principal_axes",
]


def analytic_acceptance_rate(dim: int, tau: float, two_sided: bool = False) -> float:
    """Probability that a uniformly random direction in ``R^dim`` has ``cos(x, a) <= tau`` for one fixed
    unit axis ``a`` (``two_sided=True``: for both ``a`` and ``-a``, i.e. ``|cos| <= tau``).

    ``cos^2 ~ Beta(1/2, (dim - 1)/2)``; e.g. ``dim = 2``: ``1 - arccos(tau)/pi``; ``dim = 3``: ``(1+tau)/2``.
    """
    from scipy.special import betainc

    if int(dim) < 2:
        raise FewflowError(f"dim must be >= 2 for a cone acceptance rate, got {dim}")
    tau = float(tau)
    if not -1.0 <= tau <= 1.0:
        raise FewflowError(f"tau is a cosine and must lie in [-1, 1], got {tau}")
    inc = float(betainc(0.5, 0.5 * (int(dim) - 1), tau * tau))  # P(cos^2 <= tau^2)
    if two_sided:
        return inc if tau >= 0 else 0.0
    return 0.5 + 0.5 * inc if tau >= 0 else 0.5 - 0.5 * inc


def _unit_rows(x: Tensor, name: str) -> Tensor:
    flat = x.reshape(x.shape[0], -1)
    norm = flat.norm(dim=1, keepdim=True)
    if bool((norm == 0).any()):
        raise FewflowError(f"{name} contains an all-zero sample; its direction is undefined")
    return flat / norm


def principal_axes(data: Tensor) -> tuple[Tensor, Tensor]:
    """PCA of the L2-normalised, flattened ``data``: returns ``(axes (d, d), variances (d,))``, axes as
    rows sorted by decreasing explained variance (eigenvectors of the centred covariance, float64
    internally, returned in ``data``'s dtype and device)."""
    check_finite("data", data)
    check_batch("data", data)
    if data.shape[0] < 2:
        raise FewflowError("principal_axes needs at least 2 samples")
    z = _unit_rows(data, "data").to(torch.float64)
    zc = z - z.mean(0, keepdim=True)
    cov = zc.T @ zc / (z.shape[0] - 1)
    evals, evecs = torch.linalg.eigh(cov)
    order = torch.argsort(evals, descending=True)
    return evecs[:, order].T.to(data.dtype), evals[order].clamp_min(0).to(data.dtype)


def fit_pruning_axes(
    data: Tensor, rejection_threshold: float = 0.01, chunk: int = 4096
) -> Tensor:
    """Data-sparse directions of ``data`` (Lee, Kim, Lee 2025): among the ``2 d`` signed principal axes of
    the normalised data, those whose largest cosine with any sample is ``<= rejection_threshold``.

    Returns ``(m, d)`` unit rows (``m`` may be 0 when the data cover every axis direction, typical in 2-D).
    """
    axes, _ = principal_axes(data)
    cand = torch.cat([axes, -axes], 0)
    z = _unit_rows(data, "data").to(cand.dtype)
    maxsim = torch.full((cand.shape[0],), -math.inf, device=data.device, dtype=cand.dtype)
    for i in range(0, z.shape[0], int(chunk)):
        maxsim = torch.maximum(maxsim, (cand @ z[i : i + int(chunk)].T).max(dim=1).values)
    return cand[maxsim <= float(rejection_threshold)]


class DirectionalPruning:
    """The acceptance test: ``accept(x0)[b]`` is True iff ``cos(x0[b], a) <= tau`` for every axis ``a``.

    ``axes``: ``(m, d)`` directions (normalised here), ``d`` = the flattened sample size. ``accept`` is the
    hook a source calls on its raw draws.
    """

    def __init__(self, axes: Tensor, tau: float = 0.048) -> None:
        if not torch.is_tensor(axes) or axes.dim() != 2:
            raise FewflowError(f"axes must be a 2-D tensor (m, d), got {getattr(axes, 'shape', type(axes))}")
        check_finite("axes", axes)
        if not -1.0 <= float(tau) <= 1.0:
            raise FewflowError(f"tau is a cosine threshold and must lie in [-1, 1], got {tau}")
        self.axes = _unit_rows(axes, "axes") if axes.shape[0] > 0 else axes
        self.tau = float(tau)

    @property
    def dim(self) -> int:
        return int(self.axes.shape[1])

    def cosine(self, x0: Tensor) -> Tensor:
        """``(B, m)`` cosine similarities between the draws and the axes."""
        check_batch("x0", x0)
        flat = x0.reshape(x0.shape[0], -1)
        if flat.shape[1] != self.dim:
            raise FewflowError(f"x0 has {flat.shape[1]} features per sample but the axes have {self.dim}")
        unit = flat / flat.norm(dim=1, keepdim=True).clamp_min(torch.finfo(flat.dtype).tiny)
        return unit @ self.axes.to(device=x0.device, dtype=x0.dtype).T

    def accept(self, x0: Tensor) -> Tensor:
        """``(B,)`` bool: True where the draw is not aligned with any data-sparse axis."""
        if self.axes.shape[0] == 0:
            check_batch("x0", x0)
            return torch.ones(x0.shape[0], dtype=torch.bool, device=x0.device)
        return (self.cosine(x0) <= self.tau).all(dim=1)

    __call__ = accept


@dataclass
class PrunedDraw:
    """``x``: exactly ``n`` accepted draws; ``acceptance_rate`` = accepted / drawn over the whole call;
    ``n_drawn``: base draws consumed."""

    x: Tensor
    acceptance_rate: float
    n_drawn: int


class PrunedSource:
    """A source whose draws come from ``base`` (any ``fewflow.sources`` source, e.g. ``GaussianSource`` or
    ``NormAlignedGaussian.fit(data)``) filtered by ``pruning.accept`` with resampling until ``n`` are
    accepted. Implements the ``Source`` protocol (``sample``, ``sample_like``, ``log_prob``).

    ``max_draws_per_sample`` bounds the work (the code allows 1e5 trials): if the acceptance rate
    collapses (too many axes, too small ``tau``) a :class:`FewflowError` reports it.
    """

    def __init__(self, base: Any, pruning: DirectionalPruning, max_draws_per_sample: int = 100_000) -> None:
        if not hasattr(base, "sample"):
            raise FewflowError(f"base must be a source with .sample(n, ...), got {type(base).__name__}")
        if not isinstance(pruning, DirectionalPruning):
            raise FewflowError(f"pruning must be a DirectionalPruning, got {type(pruning).__name__}")
        self.base = base
        self.pruning = pruning
        self.max_draws_per_sample = int(max_draws_per_sample)
        self.shape = getattr(base, "shape", None)
        self._log_z: float | None = None

    @classmethod
    def fit(
        cls,
        data: Tensor,
        tau: float = 0.048,
        rejection_threshold: float = 0.01,
        base: Any | None = None,
    ) -> PrunedSource:
        """Fit the data-sparse axes on ``data`` and prune ``base`` (default:
        ``fewflow.sources.NormAlignedGaussian.fit(data)``, the paper's NormAlign + Pruned combination)."""
        if base is None:
            base = NormAlignedGaussian.fit(data)
        return cls(base, DirectionalPruning(fit_pruning_axes(data, rejection_threshold), tau))

    def sample_with_rate(
        self,
        n: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        generator: torch.Generator | None = None,
    ) -> PrunedDraw:
        """``n`` accepted draws plus the empirical acceptance rate of this call."""
        if int(n) < 0:
            raise FewflowError(f"n must be >= 0, got {n}")
        n = int(n)
        kept: list[Tensor] = []
        n_kept = n_drawn = 0
        rate_guess = 0.5
        while n_kept < n:
            if n_drawn >= max(n, 1) * self.max_draws_per_sample:
                raise FewflowError(
                    f"pruned source accepted only {n_kept} of {n_drawn} draws (rate {n_kept / n_drawn:.2e}); "
                    "use fewer axes or a larger tau"
                )
            pool = max(64, math.ceil(1.2 * (n - n_kept) / max(rate_guess, 1e-3)))
            pool = min(pool, 1 << 20)
            cand = self.base.sample(pool, device=device, dtype=dtype, generator=generator)
            ok = self.pruning.accept(cand)
            kept.append(cand[ok])
            n_kept += int(ok.sum())
            n_drawn += pool
            rate_guess = max(n_kept / n_drawn, 1e-3)
        if kept:
            x = torch.cat(kept, 0)[:n]
        else:
            x = self.base.sample(0, device=device, dtype=dtype, generator=generator)
        return PrunedDraw(x=x, acceptance_rate=(n_kept / n_drawn) if n_drawn else 1.0, n_drawn=n_drawn)

    def sample(
        self,
        n: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """``n`` accepted draws ``(n, *shape)``."""
        return self.sample_with_rate(n, device=device, dtype=dtype, generator=generator).x

    def sample_like(self, x1: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """As many accepted draws as ``x1`` has rows, on its device and dtype."""
        return self.sample(x1.shape[0], device=x1.device, dtype=x1.dtype, generator=generator)

    def log_z(self, n_mc: int = 1 << 17) -> float:
        """``log`` of the acceptance probability under the base (Monte Carlo with a fixed seed, cached)."""
        if self._log_z is None:
            g = torch.Generator().manual_seed(0)
            draw = self.base.sample(int(n_mc), generator=g, dtype=torch.float64)
            rate = float(self.pruning.accept(draw).double().mean())
            if rate <= 0:
                raise FewflowError("no Monte Carlo draw was accepted; the pruned density is not normalisable")
            self._log_z = math.log(rate)
        return self._log_z

    def log_prob(self, x: Tensor) -> Tensor:
        """``log p_base(x) - log Z`` on the accepted cone and ``-inf`` outside it."""
        if not hasattr(self.base, "log_prob"):
            raise FewflowError(f"base source {type(self.base).__name__} has no log_prob")
        lp = self.base.log_prob(x) - self.log_z()
        return torch.where(self.pruning.accept(x), lp, torch.full_like(lp, -math.inf))


class PrunedNormAlignedGaussian(NormAlignedGaussian):
    """``fewflow.sources.NormAlignedGaussian`` with its ``accept(x0)`` hook set to a
    :class:`DirectionalPruning` (the paper's NormAlign + Pruned source), usable wherever a source is.

    ``PrunedNormAlignedGaussian.fit(data, pruning=DirectionalPruning(fit_pruning_axes(data), tau))``.
    Its ``sample`` is the base class's rejection loop (no rate reported: use :class:`PrunedSource`
    for the acceptance rate); ``log_prob`` is renormalised to the accepted cone.
    """

    def __init__(self, shape: Any = None, scale: float = 1.0, max_tries: int = 100,
                 pruning: DirectionalPruning | None = None) -> None:
        super().__init__(shape=shape, scale=scale, max_tries=max_tries)
        if pruning is not None and not isinstance(pruning, DirectionalPruning):
            raise FewflowError(f"pruning must be a DirectionalPruning, got {type(pruning).__name__}")
        self.pruning = pruning

    def accept(self, x0: Tensor) -> Tensor:
        if self.pruning is None:
            return super().accept(x0)
        return self.pruning.accept(x0)

    def log_prob(self, x: Tensor) -> Tensor:
        lp = super().log_prob(x)
        if self.pruning is None:
            return lp
        g = torch.Generator().manual_seed(0)
        z = torch.randn(1 << 17, self.dim, generator=g, dtype=torch.float64)
        rate = float(self.pruning.accept(z).double().mean())  # cosine is scale-free: N(0, I) suffices
        if rate <= 0:
            raise FewflowError("no Monte Carlo draw was accepted; the pruned density is not normalisable")
        return torch.where(self.pruning.accept(x), lp - math.log(rate), torch.full_like(lp, -math.inf))
