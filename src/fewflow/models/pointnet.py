"""A small point network of kNN edge convolutions, used as a velocity field over a point cloud.

EdgeConv ("Dynamic Graph CNN for Learning on Point Clouds", Wang, Sun, Liu, Sarma, Bronstein, Solomon;
arXiv:1801.07829): for point features ``f_i`` and the ``k`` nearest neighbours ``j`` of point ``i``,

    f_i' = max_j  h([f_i, f_j - f_i])

with ``h`` a shared two-layer MLP. :class:`PointVelocity` maps a cloud ``x_t (B, N, 3)`` and a time
``t (B,)`` to a velocity ``(B, N, 3)``: the kNN graph is built once on the input coordinates (static;
DGCNN's later layers rebuild it in feature space, here ``dynamic=True`` does that), each EdgeConv
block adds a learned embedding of ``t``, and a head reads every point's multi-scale features together
with a max-pooled global feature. The network is permutation-equivariant over points. The last layer
starts at zero, so an untrained model is the zero field.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from fewflow._validate import FewflowError, as_batch_time, check_finite
from fewflow.models.embeddings import TimeEmbedding


def knn_indices(x: Tensor, k: int) -> Tensor:
    """Indices ``(B, N, k)`` of the ``k`` nearest other points (Euclidean on the last dim of ``x``)."""
    d = torch.cdist(x, x)
    d.diagonal(dim1=1, dim2=2).fill_(float("inf"))
    return d.topk(k, dim=-1, largest=False).indices


def _gather(f: Tensor, idx: Tensor) -> Tensor:
    """``f (B, N, C)``, ``idx (B, N, k)`` -> neighbour features ``(B, N, k, C)``."""
    b, n, k = idx.shape
    flat = idx.reshape(b, n * k, 1).expand(-1, -1, f.shape[-1])
    return torch.gather(f, 1, flat).reshape(b, n, k, f.shape[-1])


class EdgeConv(nn.Module):
    """``f_i' = max_j MLP([f_i, f_j - f_i])`` over the neighbours ``idx`` of each point."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2 * cin, cout), nn.SiLU(), nn.Linear(cout, cout))

    def forward(self, f: Tensor, idx: Tensor) -> Tensor:
        nb = _gather(f, idx)
        ctr = f.unsqueeze(2).expand_as(nb)
        return self.mlp(torch.cat([ctr, nb - ctr], dim=-1)).amax(dim=2)


class PointVelocity(nn.Module):
    """Velocity ``v(x_t, t) -> (B, N, dim)`` over clouds ``(B, N, dim)`` (module docstring).

    Args:
        dim: point dimension (3). k: neighbours per point. widths: EdgeConv output widths.
        hidden: head width. time_dim: time-embedding width. dynamic: rebuild the kNN graph in feature
        space before every EdgeConv after the first (DGCNN); static (the input cloud's graph) by default.
    """

    is_flow_map = False

    def __init__(self, dim: int = 3, k: int = 16, widths: tuple[int, ...] = (64, 64, 128), hidden: int = 128,
                 time_dim: int = 64, dynamic: bool = False) -> None:
        super().__init__()
        if k < 1 or not widths:
            raise FewflowError(f"PointVelocity needs k >= 1 and at least one EdgeConv width, got k={k}, "
                               f"widths={widths}")
        self.dim, self.k, self.dynamic = dim, int(k), bool(dynamic)
        self.config: dict[str, Any] = {"dim": dim, "k": k, "widths": list(widths), "hidden": hidden,
                                       "time_dim": time_dim, "dynamic": dynamic}
        self.time = TimeEmbedding(time_dim, "sinusoidal", 1000.0)
        convs, temb = [], []
        cin = dim
        for w in widths:
            convs.append(EdgeConv(cin, w))
            temb.append(nn.Linear(time_dim, w))
            cin = w
        self.convs, self.temb = nn.ModuleList(convs), nn.ModuleList(temb)
        total = sum(widths)
        self.glob = nn.Linear(total, hidden)
        self.head = nn.Sequential(nn.Linear(total + hidden + time_dim, hidden), nn.SiLU(),
                                  nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, dim))
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def forward(self, x: Tensor, t: Tensor | float, y: Tensor | None = None, c: Tensor | None = None,
                c_mask: Tensor | None = None) -> Tensor:
        if y is not None or c is not None:
            raise FewflowError("PointVelocity takes no labels or condition tensor")
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise FewflowError(f"PointVelocity needs clouds (B, N, {self.dim}), got shape {tuple(x.shape)}")
        n = x.shape[1]
        if n <= 1:
            raise FewflowError(f"PointVelocity needs clouds of at least 2 points, got {n}")
        check_finite("x", x)
        k = min(self.k, n - 1)
        tb = as_batch_time(t, x)
        te = self.time(tb)  # (B, time_dim)
        with torch.no_grad():
            idx = knn_indices(x.detach(), k)
        f, feats = x, []
        for i, (conv, lin) in enumerate(zip(self.convs, self.temb)):
            if self.dynamic and i > 0:
                with torch.no_grad():
                    idx = knn_indices(f.detach(), k)
            f = torch.nn.functional.silu(conv(f, idx) + lin(te).unsqueeze(1))
            feats.append(f)
        f = torch.cat(feats, dim=-1)
        g = self.glob(f).amax(dim=1, keepdim=True).expand(-1, n, -1)
        return self.head(torch.cat([f, g, te.unsqueeze(1).expand(-1, n, -1)], dim=-1))
