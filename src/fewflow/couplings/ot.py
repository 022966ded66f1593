"""Minibatch optimal-transport couplings.

From "Improving and generalizing flow-based generative models with minibatch optimal transport"
(Tong, Fatras, Malkin, Huguet, Zhang, Rector-Brooks, Wolf, Bengio; TMLR 2024): within each batch, pair the
source samples ``x0`` with the data ``x1`` by an OT plan for the cost ``c(x0, x1) = ||x0 - x1||^2``
instead of independently (OT-CFM); with an entropic plan of regulariser ``2 sigma^2`` and Brownian-bridge
path noise this is the Schroedinger-bridge CFM (SB-CFM). Straighter conditional paths give straighter
marginal flows, which integrate well in few steps (see also "Flow Straight and Fast", Liu et al. 2023).

For two uniform batches of equal size B the exact OT problem

    min_P  sum_ij P_ij C_ij   s.t.  P 1 = 1/B,  P^T 1 = 1/B,  P >= 0

has a permutation matrix among its optimal vertices (Birkhoff-von Neumann), so the exact plan is a
linear assignment, solved here by ``scipy.optimize.linear_sum_assignment`` (no pair is duplicated).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from fewflow._validate import FewflowError, check_finite, check_time
from fewflow.couplings.base import Coupling, CouplingResult, pairwise_cost


def _number(v: object) -> float:
    """``float(v)`` for a parameter check; NaN (which fails every comparison) when ``v`` is not a number."""
    try:
        return float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


def _assignment(cost: Tensor) -> Tensor:
    """``perm`` with ``perm[j]`` = the row (x0 index) assigned to column j (x1), for a (B, B) CPU cost."""
    rows, cols = linear_sum_assignment(cost.T.numpy())  # rows index x1 (sorted), cols index x0
    perm = np.empty_like(cols)
    perm[rows] = cols
    return torch.from_numpy(perm).long()


def _emd_assignment(cost: Tensor) -> Tensor:
    """The same optimal permutation via POT's network simplex (``ot.emd``), whose vertex solution for two
    uniform batches of equal size is a permutation matrix; falls back to the assignment solver otherwise."""
    import ot

    b = cost.shape[0]
    w = np.full(b, 1.0 / b)
    plan = torch.from_numpy(np.asarray(ot.emd(w, w, cost.numpy())))
    perm = plan.argmax(0)  # column j (x1_j) -> row (x0 index)
    if not bool((torch.sort(perm).values == torch.arange(b)).all()) or not torch.allclose(
        plan[perm, torch.arange(b)], torch.full((b,), 1.0 / b, dtype=plan.dtype)
    ):
        return _assignment(cost)
    return perm.long()


def _ot_diagnostics(cost: Tensor, perm: Tensor) -> dict[str, float]:
    idx = torch.arange(cost.shape[0])
    return {
        "cost_independent": float(cost.diagonal().mean()),
        "cost_coupled": float(cost[perm, idx].mean()),
    }


class ExactOTCoupling(Coupling):
    """Exact minibatch OT (OT-CFM): a permutation of ``x0`` minimising ``sum_j c(x0_perm[j], x1_j)``.

    The cost (default squared Euclidean, on flattened samples so images work) is computed in float64 on
    the CPU and solved by the Hungarian-type ``linear_sum_assignment``; for equal-size uniform batches this
    is an exact OT solution. The result lives on the input's device and dtype. ``diagnostics`` report the
    mean pair cost before (``cost_independent``) and after (``cost_coupled``) the assignment.

    Paper: "Improving and generalizing flow-based generative models with minibatch optimal transport"
    (Tong et al., 2024).

    ``solver="lsa"`` (default): ``scipy.optimize.linear_sum_assignment``, which releases the GIL, so
    :class:`PrefetchCoupler` can run it in a background thread while the network trains. ``solver="emd"``:
    POT's network simplex (``ot.emd``, the solver torchcfm uses); same optimal cost, sometimes faster on
    low-dimensional structured data (measured at B = 512: 2-D moons 39 ms vs 131 ms; 64-D Gaussians 55 ms
    vs 26 ms) but it holds the GIL, so it does not overlap with training in a thread (use
    ``PrefetchCoupler(..., backend="process")``).

    ``solver="auto"``: ``emd`` for samples of dimension <= 8, else ``lsa``.
    """

    def __init__(self, cost: str = "sqeuclidean", solver: str = "lsa") -> None:
        if cost not in ("sqeuclidean", "euclidean"):
            raise FewflowError(f"unknown cost {cost!r}; choose one of: euclidean, sqeuclidean")
        if solver not in ("lsa", "emd", "auto"):
            raise FewflowError(f"unknown exact OT solver {solver!r}; choose one of: auto, emd, lsa")
        self.cost = cost
        self.solver = solver

    def couple(
        self, x0: Tensor, x1: Tensor, *, y: Tensor | None, generator: torch.Generator | None
    ) -> CouplingResult:
        c = pairwise_cost(x0, x1, self.cost)
        solver = self.solver
        if solver == "auto":
            solver = "emd" if x0[0].numel() <= 8 else "lsa"
        perm_cpu = _assignment(c) if solver == "lsa" else _emd_assignment(c)
        perm = perm_cpu.to(x0.device)
        return CouplingResult(x0=x0[perm], x1=x1, perm=perm, y=y, diagnostics=_ot_diagnostics(c, perm_cpu))

    def __repr__(self) -> str:
        return f"ExactOTCoupling(cost={self.cost!r}, solver={self.solver!r})"


class ClassConditionalOT(Coupling):
    """Exact OT within each class of ``y``: ``x1`` of class k is paired only with x0 from class k's slots.

    Since ``x0`` is an i.i.d. source sample independent of the label, the source samples in the batch slots
    ``J_k = {j : y_j = k}`` are a valid source sample for class k; we solve the exact assignment between
    ``x0[J_k]`` and ``x1[J_k]`` for every class. The result is a permutation that maps each class's slots
    onto themselves (``y[perm] == y``) and is optimal for every class block. Used for class-conditional
    OT-CFM, where mixing classes in the OT plan would pair a noise sample with data of a label the model is
    not told about.
    """

    def __init__(self, cost: str = "sqeuclidean") -> None:
        if cost not in ("sqeuclidean", "euclidean"):
            raise FewflowError(f"unknown cost {cost!r}; choose one of: euclidean, sqeuclidean")
        self.cost = cost

    def couple(
        self, x0: Tensor, x1: Tensor, *, y: Tensor | None, generator: torch.Generator | None
    ) -> CouplingResult:
        if y is None:
            raise FewflowError("ClassConditionalOT needs class labels y (got y=None)")
        if y.dim() != 1:
            raise FewflowError(f"ClassConditionalOT needs labels y of shape (B,), got {tuple(y.shape)}")
        y_cpu = y.detach().cpu()
        perm_cpu = torch.arange(x1.shape[0])
        before = after = 0.0
        for k in torch.unique(y_cpu):
            slots = torch.nonzero(y_cpu == k).flatten()
            sl_dev = slots.to(x0.device)
            c = pairwise_cost(x0[sl_dev], x1[sl_dev], self.cost)
            local = _assignment(c)
            perm_cpu[slots] = slots[local]
            d = _ot_diagnostics(c, local)
            before += d["cost_independent"] * len(slots)
            after += d["cost_coupled"] * len(slots)
        perm = perm_cpu.to(x0.device)
        n = float(x1.shape[0])
        diag = {"cost_independent": before / n, "cost_coupled": after / n}
        return CouplingResult(x0=x0[perm], x1=x1, perm=perm, y=y, diagnostics=diag)

    def __repr__(self) -> str:
        return f"ClassConditionalOT(cost={self.cost!r})"


def entropic_plan(cost: Tensor, reg: float, method: str = "auto", max_iter: int = 1000) -> Tensor:
    """The entropic OT plan between two uniform batches, ``argmin <P, C> - reg H(P)``, via POT.

    ``method="auto"`` uses POT's log-domain Sinkhorn (``sinkhorn_log``) when ``max(C) / reg > 50`` (where the
    Gibbs kernel ``exp(-C / reg)`` would underflow in the plain scaling iterations), else ``sinkhorn``.
    Input and output are float64 CPU tensors of shape (B0, B1). Paper: "Sinkhorn Distances: Lightspeed
    Computation of Optimal Transport" (Cuturi, 2013).
    """
    import ot  # POT; imported lazily because it is slow to import

    check_finite("cost", cost)
    if cost.dim() != 2 or cost.numel() == 0:
        raise FewflowError(f"cost must be a non-empty (B0, B1) matrix, got shape {tuple(cost.shape)}")
    if not (_number(reg) > 0 and math.isfinite(_number(reg))):
        raise FewflowError(f"reg must be a finite number > 0, got {reg!r}")
    m = cost.detach().to("cpu", torch.float64).numpy()
    if method == "auto":
        method = "sinkhorn_log" if float(m.max()) / reg > 50.0 else "sinkhorn"
    if method not in ("sinkhorn", "sinkhorn_log"):
        raise FewflowError(f"unknown Sinkhorn method {method!r}; choose one of: auto, sinkhorn, sinkhorn_log")
    a = np.full(m.shape[0], 1.0 / m.shape[0])
    b = np.full(m.shape[1], 1.0 / m.shape[1])
    plan = ot.sinkhorn(a, b, m, reg, method=method, numItermax=max_iter)
    plan = torch.from_numpy(np.asarray(plan, dtype=np.float64))
    if not bool(torch.isfinite(plan).all()) or float(plan.sum()) <= 0.0:
        raise FewflowError(
            f"Sinkhorn plan is not finite for reg={reg:g} (cost scale {float(m.max()):.3g}); "
            "increase reg or use method='sinkhorn_log'"
        )
    return plan


class SinkhornCoupling(Coupling):
    """Entropic OT coupling: pairs **sampled** from the Sinkhorn plan (may repeat x0 samples).

    The plan ``P = argmin <P, C> - reg H(P)`` (uniform marginals, squared Euclidean cost, divided by its
    maximum when ``normalize_cost`` so ``reg`` is relative) is computed by POT. For every data point
    ``x1_j`` one source index is drawn from the column ``P[:, j] / sum_i P[i, j]``: ``x1`` is kept and
    ``x0`` is reordered by a *sampled* index map, so the same ``x0_i`` may serve several ``x1_j``
    (unlike :class:`ExactOTCoupling`). As ``reg -> 0`` this tends to exact OT, as ``reg -> inf`` to the
    independent coupling. Paper: Tong et al. 2024 (see module docstring).
    """

    def __init__(self, reg: float, normalize_cost: bool = True, method: str = "auto") -> None:
        if not (isinstance(reg, (int, float)) and math.isfinite(reg) and reg > 0):
            raise FewflowError(f"reg must be a positive finite number, got {reg!r}")
        self.reg = float(reg)
        self.normalize_cost = normalize_cost
        self.method = method

    def couple(
        self, x0: Tensor, x1: Tensor, *, y: Tensor | None, generator: torch.Generator | None
    ) -> CouplingResult:
        c = pairwise_cost(x0, x1, "sqeuclidean")
        m = c / c.max().clamp_min(1e-300) if self.normalize_cost else c
        plan = entropic_plan(m, self.reg, self.method)
        cols = plan.T  # row j: unnormalised distribution over x0 indices for x1_j
        cols = cols / cols.sum(1, keepdim=True).clamp_min(1e-300)
        dev = generator.device if generator is not None else torch.device("cpu")
        perm_cpu = torch.multinomial(cols.to(dev), 1, generator=generator).flatten().cpu()
        perm = perm_cpu.to(x0.device)
        diag = _ot_diagnostics(c, perm_cpu)
        diag["unique_x0_fraction"] = float(torch.unique(perm_cpu).numel()) / float(x0.shape[0])
        return CouplingResult(x0=x0[perm], x1=x1, perm=perm, y=y, diagnostics=diag)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(reg={self.reg:g}, normalize_cost={self.normalize_cost})"


def brownian_bridge_noise(t: Tensor, sigma: float, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Brownian-bridge path noise ``s(t) = sigma sqrt(t (1 - t))`` and its derivative.

    ``s'(t) = sigma (1 - 2t) / (2 sqrt(t (1 - t)))`` (``t (1 - t)`` clamped at ``eps`` to stay finite at the
    ends). With ``x_t = mu_t + s(t) z`` the conditional target becomes ``dmu_t + s'(t) z``, which for the
    linear path equals SB-CFM's ``(1 - 2t) / (2 t (1 - t)) (x_t - mu_t) + (x1 - x0)`` (Tong et al. 2024).
    """
    if not torch.is_tensor(t):
        raise FewflowError(f"t must be a tensor of times, got {type(t).__name__}")
    check_time(t, "t")
    if not (_number(sigma) >= 0 and math.isfinite(_number(sigma))):
        raise FewflowError(f"sigma must be a finite number >= 0, got {sigma!r}")
    v = (t * (1 - t)).clamp_min(eps)
    root = v.sqrt()
    return sigma * root, sigma * (1 - 2 * t) / (2 * root)


class SchrodingerBridgeCoupling(SinkhornCoupling):
    """SB-CFM coupling: entropic OT with ``reg = 2 sigma^2`` on the raw squared Euclidean cost.

    The Schroedinger bridge between p0 and p1 with Brownian reference of variance sigma^2 has the static
    coupling ``pi_{2 sigma^2}`` (entropic OT with regulariser 2 sigma^2), and given the endpoints it follows a
    Brownian bridge ``x_t = (1 - t) x0 + t x1 + sigma sqrt(t (1 - t)) z``. The coupling samples pairs from the
    plan (see :class:`SinkhornCoupling`); the path noise is exposed as :meth:`path_noise`, which
    :class:`fewflow.objectives.CFMLoss` picks up automatically (unless ``sigma_path_noise`` is given).

    Paper: "Improving and generalizing flow-based generative models with minibatch optimal transport"
    (Tong et al., 2024), SB-CFM.
    """

    def __init__(self, sigma: float, method: str = "auto") -> None:
        if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
            raise FewflowError(f"sigma must be a positive finite number, got {sigma!r}")
        self.sigma = float(sigma)
        super().__init__(reg=2.0 * self.sigma**2, normalize_cost=False, method=method)

    def path_noise(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(s(t), s'(t))`` of the bridge noise ``sigma sqrt(t (1 - t))`` (:func:`brownian_bridge_noise`)."""
        return brownian_bridge_noise(t, self.sigma)

    def __repr__(self) -> str:
        return f"SchrodingerBridgeCoupling(sigma={self.sigma:g})"
