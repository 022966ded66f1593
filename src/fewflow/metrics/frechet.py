"""Fréchet distance between Gaussian fits of two feature sets (the statistic behind FID).

Heusel et al., "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium" (FID);
Dowson & Landau, "The Fréchet distance between multivariate normal distributions":
``FD = ||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a^{1/2} S_b S_a^{1/2})^{1/2})``.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import torch
from torch import Tensor

from fewflow._validate import FewflowError, check_finite


def _psd_sqrt(m: np.ndarray) -> np.ndarray:
    """Symmetric square root of a PSD matrix; tiny negative eigenvalues (round-off) are clipped to 0."""
    w, v = scipy.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def gaussian_stats(feat: Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(D,)`` and unbiased covariance ``(D, D)`` of ``(n, D)`` features, in float64."""
    f = feat.detach().cpu().double().numpy() if torch.is_tensor(feat) else np.asarray(feat, dtype=np.float64)
    f = f.reshape(f.shape[0], -1)
    if f.shape[0] < 2:
        raise FewflowError(f"need at least 2 feature vectors for a covariance, got {f.shape[0]}")
    if not np.isfinite(f).all():
        raise FewflowError("features contain non-finite values")
    return f.mean(0), np.atleast_2d(np.cov(f, rowvar=False))


def frechet_from_stats(mu_a: np.ndarray, cov_a: np.ndarray, mu_b: np.ndarray, cov_b: np.ndarray) -> float:
    """``||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^{1/2} S_b S_a^{1/2})^{1/2})`` (float64).

    The symmetric form equals ``tr((S_a S_b)^{1/2})`` (same eigenvalues) but stays real and PSD, so no
    complex round-off from ``sqrtm`` of a non-symmetric product has to be discarded.
    """
    mu_a, mu_b = np.asarray(mu_a, np.float64), np.asarray(mu_b, np.float64)
    cov_a, cov_b = np.atleast_2d(cov_a).astype(np.float64), np.atleast_2d(cov_b).astype(np.float64)
    if mu_a.shape != mu_b.shape or cov_a.shape != cov_b.shape or cov_a.shape != (mu_a.size, mu_a.size):
        raise FewflowError(
            f"incompatible Gaussian statistics: means {mu_a.shape} / {mu_b.shape}, "
            f"covs {cov_a.shape} / {cov_b.shape}"
        )
    ra = _psd_sqrt(cov_a)
    inner = ra @ cov_b @ ra
    tr_sqrt = float(np.sqrt(np.clip(scipy.linalg.eigvalsh((inner + inner.T) / 2), 0.0, None)).sum())
    diff = mu_a - mu_b
    fd = float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * tr_sqrt)
    return max(fd, 0.0)


def frechet_distance(feat_a: Tensor | np.ndarray, feat_b: Tensor | np.ndarray) -> float:
    """Fréchet distance between Gaussian fits of two ``(n, D)`` feature sets (float64)."""
    if torch.is_tensor(feat_a):
        check_finite("feat_a", feat_a)
    if torch.is_tensor(feat_b):
        check_finite("feat_b", feat_b)
    return frechet_from_stats(*gaussian_stats(feat_a), *gaussian_stats(feat_b))
