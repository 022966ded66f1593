"""Distances between point clouds: Chamfer, Hausdorff, exact EMD, nearest neighbours.

Every function takes one cloud ``(N, D)`` or a batch ``(B, N, D)`` (the second cloud may have another
number of points ``M`` except for :func:`emd`); batched inputs return one value per cloud, shape ``(B,)``.
Distances are Euclidean and computed exactly (no ``|a|^2 + |b|^2 - 2ab`` cancellation), on the inputs'
device and dtype, and differentiable with respect to the coordinates.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from fewflow._validate import FewflowError
from fewflow.points.knn import _CHUNK, _check_cloud, pairwise_distances

_REDUCTIONS = ("mean", "sum", "none")


def _pair(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, bool]:
    _check_cloud("a", a)
    _check_cloud("b", b)
    if a.dim() != b.dim():
        raise FewflowError(f"a and b must both be (N, D) or both (B, N, D), got {tuple(a.shape)} and "
                           f"{tuple(b.shape)}")
    batched = a.dim() == 3
    if not batched:
        a, b = a.unsqueeze(0), b.unsqueeze(0)
    if a.shape[0] != b.shape[0] or a.shape[-1] != b.shape[-1]:
        raise FewflowError(f"a and b must share batch size and point dimension, got {tuple(a.shape)} and "
                           f"{tuple(b.shape)}")
    if a.dtype != b.dtype or a.device != b.device:
        raise FewflowError(f"a and b must share dtype and device, got {a.dtype}/{a.device} and "
                           f"{b.dtype}/{b.device}")
    return a, b, batched


def _nn(q: Tensor, r: Tensor, k: int) -> tuple[Tensor, Tensor]:
    dists, idx = [], []
    for s in range(0, q.shape[1], _CHUNK):
        d = pairwise_distances(q[:, s : s + _CHUNK], r)
        v, i = d.topk(k, dim=-1, largest=False)
        dists.append(v)
        idx.append(i)
    return torch.cat(dists, 1), torch.cat(idx, 1)


def nearest_neighbors(query: Tensor, ref: Tensor, k: int = 1) -> tuple[Tensor, Tensor]:
    """The ``k`` nearest points of ``ref`` to each point of ``query``: ``(dist, idx)``.

    Shapes ``(N, k)`` for ``query (N, D)``, ``ref (M, D)``, or ``(B, N, k)`` for batches; ``dist`` is the
    Euclidean distance, sorted increasing; ``idx`` indexes ``ref``'s points (a LongTensor).
    """
    q, r, batched = _pair(query, ref)
    if not isinstance(k, int) or k < 1 or k > r.shape[1]:
        raise FewflowError(f"nearest_neighbors needs 1 <= k <= M = {r.shape[1]}, got k={k}")
    d, i = _nn(q, r, k)
    return (d, i) if batched else (d[0], i[0])


def chamfer(a: Tensor, b: Tensor, squared: bool = False, reduction: str = "mean") -> Tensor:
    """Chamfer distance ``CD(A, B) = mean_a min_b d(a, b) + mean_b min_a d(a, b)`` (a in A, b in B).

    ``d`` is the Euclidean distance, or its square with ``squared=True`` (the form most point-cloud
    upsampling papers report, e.g. PU-GAN, arXiv:1907.10844, and PUFM++, arXiv:2512.20988).
    ``reduction="mean"`` is the formula above, ``"sum"`` sums instead of averaging each direction, and
    ``"none"`` returns the per-point terms ``(..., N + M)`` (A's nearest distances, then B's).
    """
    if reduction not in _REDUCTIONS:
        raise FewflowError(f"unknown reduction {reduction!r}; choose one of: {', '.join(_REDUCTIONS)}")
    a, b, batched = _pair(a, b)
    dab = _nn(a, b, 1)[0][..., 0]
    dba = _nn(b, a, 1)[0][..., 0]
    if squared:
        dab, dba = dab.square(), dba.square()
    if reduction == "none":
        out = torch.cat([dab, dba], dim=1)
    elif reduction == "sum":
        out = dab.sum(1) + dba.sum(1)
    else:
        out = dab.mean(1) + dba.mean(1)
    return out if batched else out[0]


def hausdorff(a: Tensor, b: Tensor) -> Tensor:
    """Symmetric Hausdorff distance ``max(max_a min_b |a - b|, max_b min_a |a - b|)`` (Euclidean)."""
    a, b, batched = _pair(a, b)
    dab = _nn(a, b, 1)[0][..., 0].amax(1)
    dba = _nn(b, a, 1)[0][..., 0].amax(1)
    out = torch.maximum(dab, dba)
    return out if batched else out[0]


def emd_assignment(a: Tensor, b: Tensor) -> Tensor:
    """The optimal one-to-one matching of two equal-size clouds: ``perm`` with ``b[perm[i]]`` matched to
    ``a[i]`` minimising ``sum_i |a_i - b_perm(i)|`` (``scipy.optimize.linear_sum_assignment``, exact).

    Shapes ``(N,)`` or ``(B, N)`` (LongTensor on ``a``'s device). ``squared`` costs are not used: this is
    the Earth Mover's distance matching with Euclidean ground cost.
    """
    return _assignment(a, b, squared=False)


def _assignment(a: Tensor, b: Tensor, squared: bool) -> Tensor:
    a3, b3, batched = _pair(a, b)
    if a3.shape[1] != b3.shape[1]:
        raise FewflowError(f"EMD needs clouds of equal size, got {a3.shape[1]} and {b3.shape[1]} points")
    with torch.no_grad():
        cost = pairwise_distances(a3, b3).double().cpu().numpy()
    if squared:
        cost = cost**2
    perms = np.empty(cost.shape[:2], dtype=np.int64)
    for i in range(cost.shape[0]):
        rows, cols = linear_sum_assignment(cost[i])
        perms[i, rows] = cols
    out = torch.from_numpy(perms).to(a.device)
    return out if batched else out[0]


def emd(a: Tensor, b: Tensor) -> Tensor:
    """Earth Mover's distance of two equal-size clouds: ``min_perm mean_i |a_i - b_perm(i)|``.

    Solved exactly by ``scipy.optimize.linear_sum_assignment`` on the CPU (O(N^3): fine for a few thousand
    points); the value is recomputed in torch from the matching, so it carries gradients to both clouds.
    """
    a3, b3, batched = _pair(a, b)
    perm = _assignment(a3, b3, squared=False)
    matched = torch.gather(b3, 1, perm.unsqueeze(-1).expand(-1, -1, b3.shape[-1]))
    out = (a3 - matched).norm(dim=-1).mean(1)
    return out if batched else out[0]
