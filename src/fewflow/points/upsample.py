"""Point-cloud resampling used by upsampling methods: farthest point sampling and midpoint interpolation.

Midpoint interpolation follows PUFM ("Efficient Point Clouds Upsampling via Flow Matching", Liu, He, Li;
arXiv:2501.15286) and PUFM++ ("PUFM++: Point Cloud Upsampling via Enhanced Flow Matching", Liu, He,
Maier, Rupp; arXiv:2512.20988): each of the ``n`` sparse points is averaged with each of its ``2r``
nearest points (itself included, so the sparse points are kept), giving ``2 r n`` candidates, and
farthest point sampling keeps ``r n`` of them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fewflow._validate import FewflowError
from fewflow.points.knn import _check_cloud, pairwise_distances


def farthest_point_sample(x: Tensor, m: int, start: int | Tensor | None = 0) -> Tensor:
    """Indices ``(B, m)`` of ``m`` points of ``x (B, N, D)`` chosen greedily, each the farthest from those
    already chosen (the first is point ``start``, index 0 by default; pass a ``(B,)`` tensor for one start
    per cloud)."""
    _check_cloud("x", x, batched=True)
    b, n, _ = x.shape
    if not isinstance(m, int) or not 1 <= m <= n:
        raise FewflowError(f"farthest point sampling needs 1 <= m <= N = {n}, got m={m}")
    xd = x.detach()
    idx = torch.empty(b, m, dtype=torch.long, device=x.device)
    cur = (torch.as_tensor(start if start is not None else 0, device=x.device).long()
           .expand(b).clone())
    dist = torch.full((b, n), float("inf"), device=x.device, dtype=x.dtype)
    rows = torch.arange(b, device=x.device)
    cols = [xd[..., j] for j in range(xd.shape[-1])]  # per-coordinate planes: no reduction over a short axis
    for i in range(m):
        idx[:, i] = cur
        c = xd[rows, cur]
        d = (cols[0] - c[:, :1]).square_()
        for j in range(1, len(cols)):
            d.add_((cols[j] - c[:, j:j + 1]).square_())
        torch.minimum(dist, d, out=dist)
        cur = dist.argmax(1)
    return idx


def gather_points(x: Tensor, idx: Tensor) -> Tensor:
    """``x (B, N, D)``, ``idx (B, M)`` -> ``(B, M, D)``."""
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def midpoint_upsample(sparse: Tensor, ratio: int = 4) -> Tensor:
    """Upsample ``sparse (B, n, D)`` (or ``(n, D)``) to ``ratio * n`` points by midpoint interpolation
    (module docstring); differentiable in ``sparse``; does not modify it."""
    batched = sparse.dim() == 3
    x = sparse if batched else sparse.unsqueeze(0)
    _check_cloud("sparse", x, batched=True)
    if not isinstance(ratio, int) or ratio < 1:
        raise FewflowError(f"the upsampling ratio must be a positive integer, got {ratio!r}")
    n = x.shape[1]
    if ratio == 1:
        return sparse.clone()
    k = 2 * ratio
    if n < k:
        raise FewflowError(f"midpoint interpolation at ratio {ratio} needs at least {k} input points, "
                           f"got {n}")
    with torch.no_grad():
        nb = pairwise_distances(x.detach(), x.detach()).topk(k, dim=-1, largest=False).indices  # self first
    nbp = torch.gather(x.unsqueeze(1).expand(-1, n, -1, -1), 2,
                       nb.unsqueeze(-1).expand(-1, -1, -1, x.shape[-1]))
    mids = ((x.unsqueeze(2) + nbp) / 2).reshape(x.shape[0], n * k, x.shape[-1])
    keep = farthest_point_sample(mids, ratio * n)
    out = gather_points(mids, keep)
    return out if batched else out[0]
