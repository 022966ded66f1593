"""W-CFM: Gibbs-kernel weights on independent pairs instead of an OT solve.

From "Weighted Conditional Flow Matching" (Calvo-Ordonez, Meunier, Cartea, Reisinger, Gal,
Hernandez-Lobato; arXiv 2507.22270). The entropic OT plan is
``pi_eps(x, y) ∝ exp((f(x) + g(y) - c(x, y)) / eps) p0(x) p1(y)``; W-CFM drops the potentials f, g and
weights each *independent* pair by the Gibbs kernel

    w_eps(x0, x1) = exp(-c(x0, x1) / eps),      c(x0, x1) = ||x0 - x1||^2,

    L_W-CFM = E_{x0 ~ p0, x1 ~ p1, t} [ w_eps(x0, x1) || v_theta(x_t, t) - u_t(x | x0, x1) ||^2 ],

i.e. CFM under the tilted coupling ``w_eps p0 p1 / Z`` (the EOT plan up to a tilt of the marginals; large
eps -> independent CFM, small eps -> OT-like pairs with biased marginals). It costs no more than CFM.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fewflow._validate import FewflowError, check_finite
from fewflow.couplings.base import Coupling, CouplingResult, pair_cost


def gibbs_weights(cost: Tensor, eps: float) -> Tensor:
    """Self-normalised Gibbs weights ``w_i = exp(-c_i / eps) / mean_j exp(-c_j / eps)`` (mean 1).

    Computed stably as ``exp(-(c_i - min c) / eps)`` (the shift cancels in the normalisation); float64
    internally, returned in ``cost``'s dtype and device, never carrying gradients. ``eps = inf`` gives 1
    (the independent-coupling limit); ``eps <= 0``, NaN, an empty or non-finite ``cost`` raise
    :class:`FewflowError`.
    """
    try:
        eps = float(eps)
    except (TypeError, ValueError):
        raise FewflowError(f"eps must be a positive number (inf allowed), got {eps!r}") from None
    if math.isnan(eps) or eps <= 0:
        raise FewflowError(f"eps must be a positive number (inf allowed), got {eps!r}")
    check_finite("cost", cost)
    if cost.numel() == 0:
        raise FewflowError("cost is empty: Gibbs weights need at least one pair")
    c = cost.detach().to(torch.float64)
    if math.isinf(eps):
        return torch.ones_like(cost).detach()
    logw = -(c - c.min()) / eps
    w = torch.exp(logw)
    return (w / w.mean()).to(cost.dtype)


def effective_sample_size(weights: Tensor) -> float:
    """Kish's effective sample size ``(sum w)^2 / sum w^2`` (B for uniform weights, 1 for a single spike)."""
    check_finite("weights", weights)
    if weights.numel() == 0:
        raise FewflowError("weights are empty: no effective sample size")
    w = weights.detach().to(torch.float64)
    return float(w.sum() ** 2 / (w.pow(2).sum()).clamp_min(1e-300))


class WeightedCoupling(Coupling):
    """W-CFM coupling: keep the independent pairs, return per-pair Gibbs weights (mean 1 over the batch).

    Args:
        eps: the kernel temperature. With ``relative=True`` (default) the temperature actually used is
            ``eps * mean_i c(x0_i, x1_i)`` for the batch at hand, so ``eps`` is dimension-free (a cost
            scale ∝ dimension would otherwise need retuning per data set); with ``relative=False`` it is
            used as is. ``eps = inf`` gives uniform weights (independent CFM).
        relative: see ``eps``.

    Weights: ``w_i ∝ exp(-||x0_i - x1_i||^2 / eps_eff)``, normalised to mean 1 in the batch. The paper's
    loss ``E[w_eps * l]`` and the self-normalised batch loss ``mean_i(w_i l_i)`` differ by the positive
    per-batch factor ``mean_j w_eps(x0_j, x1_j)`` (an estimate of E[w_eps]), so they share minimisers; the
    normalisation keeps the loss and learning-rate scale of plain CFM. The relative-eps convention is a
    fewflow choice (the paper sets eps per data set). Diagnostics: ``ess`` = ``(sum w)^2 / sum w^2``,
    ``ess_fraction`` = ess / B and ``eps_effective``. Monitor ``ess_fraction`` (too small -> few pairs carry
    the gradient and the learned marginals are biased).
    """

    def __init__(self, eps: float, relative: bool = True) -> None:
        if not (isinstance(eps, (int, float)) and eps > 0 and not math.isnan(eps)):
            raise FewflowError(f"eps must be a positive number (inf allowed), got {eps!r}")
        self.eps = float(eps)
        self.relative = relative

    def couple(
        self, x0: Tensor, x1: Tensor, *, y: Tensor | None, generator: torch.Generator | None
    ) -> CouplingResult:
        c = pair_cost(x0.detach(), x1.detach())
        scale = float(c.to(torch.float64).mean()) if self.relative else 1.0
        eps_eff = self.eps * scale if scale > 0 else math.inf
        w = gibbs_weights(c, eps_eff)
        ess = effective_sample_size(w)
        diag = {
            "ess": ess,
            "ess_fraction": ess / float(x1.shape[0]),
            "eps_effective": eps_eff,
            "cost_independent": float(c.mean()),
            "cost_coupled": float((w.to(torch.float64) * c.to(torch.float64)).mean()),
        }
        return CouplingResult(x0=x0, x1=x1, perm=None, weights=w, y=y, diagnostics=diag)

    def __repr__(self) -> str:
        return f"WeightedCoupling(eps={self.eps:g}, relative={self.relative})"
