"""k-nearest-neighbour graphs over point clouds (exact, brute force, chunked to bound memory)."""

from __future__ import annotations

import torch
from torch import Tensor

from fewflow._validate import FewflowError, check_finite

_CHUNK = 2048


def _check_cloud(name: str, x: Tensor, batched: bool | None = None, dim: int | None = None) -> None:
    """One clear error for anything but a finite floating-point point cloud: ``(N, D)`` or ``(B, N, D)``
    (``batched`` True / False forces one of them), with ``D == dim`` when ``dim`` is given."""
    if not torch.is_tensor(x):
        raise FewflowError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    bad_dim = dim is not None and (x.dim() < 1 or x.shape[-1] != dim)
    if x.dim() not in (2, 3) or (batched is True and x.dim() != 3) or (batched is False and x.dim() != 2) \
            or bad_dim:
        d = "D" if dim is None else str(dim)
        want = {True: f"(B, N, {d})", False: f"(N, {d})", None: f"(N, {d}) or (B, N, {d})"}[batched]
        raise FewflowError(f"{name} must be a point cloud of shape {want}, got {tuple(x.shape)}")
    if x.shape[-2] == 0:
        raise FewflowError(f"{name} is an empty point cloud (shape {tuple(x.shape)})")
    if not x.is_floating_point():
        raise FewflowError(f"{name} must be a floating-point tensor, got {x.dtype}")
    check_finite(name, x)


def pairwise_distances(a: Tensor, b: Tensor) -> Tensor:
    """Exact Euclidean distances ``(B, N, M)`` between ``a (B, N, D)`` and ``b (B, M, D)``.

    Uses the difference-based kernel (not ``|a|^2 + |b|^2 - 2ab``), so identical points give exactly 0.
    """
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


def knn_graph(x: Tensor, k: int) -> Tensor:
    """Indices ``(B, N, k)`` of the ``k`` nearest other points of every point of ``x (B, N, D)``.

    Row ``[b, i]`` lists the neighbours of point ``i`` in cloud ``b`` by increasing Euclidean distance;
    the point itself is excluded (a duplicate of it at distance 0 is still a neighbour).
    """
    _check_cloud("x", x, batched=True)
    n = x.shape[1]
    if not isinstance(k, int) or k < 1 or k >= n:
        raise FewflowError(f"knn_graph needs 1 <= k < N = {n}, got k={k}")
    out = []
    for s in range(0, n, _CHUNK):
        q = x[:, s : s + _CHUNK]
        d = pairwise_distances(q, x)
        rows = torch.arange(q.shape[1], device=x.device)
        d[:, rows, rows + s] = float("inf")
        out.append(d.topk(k, dim=-1, largest=False).indices)
    return torch.cat(out, dim=1)
