"""Permutation-invariant population encoders (Meta Flow Matching's ``phi(p0)``).

"Meta Flow Matching: Integrating Vector Fields on the Wasserstein Manifold" (Atanackovic et al., arXiv
2408.14608) embeds the source population ``X = {x_1, ..., x_n}`` with a graph network on its k-nearest-
neighbour graph and conditions the flow on the embedding. :class:`SetEncoder` implements

* ``kind="gcn"`` (the paper's): ``A`` = the symmetrised kNN adjacency with self-loops,
  ``A_hat = D^{-1/2} A D^{-1/2}``, layers ``H_{l+1} = A_hat H_l W_l`` (ReLU between layers, none after
  the last), then ``e = mean_i H_L[i]``;
* ``kind="deepsets"`` ("Deep Sets", Zaheer et al., arXiv 1703.06114): ``e = rho(mean_i phi(x_i))``;

and returns ``e / ||e||`` (the paper's L2 normalisation; ``normalize=False`` skips it). Both are
permutation invariant: relabelling the points permutes the rows of ``A_hat`` and ``H`` together and the
mean does not see the order (up to floating-point summation order; the kNN graph is well defined when no
two distances tie).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fewflow._validate import FewflowError, check_finite

__all__ = ["SetEncoder", "knn_adjacency"]


def knn_adjacency(x: Tensor, k: int) -> Tensor:
    """The GCN-normalised kNN adjacency ``D^{-1/2} (A + I) D^{-1/2}`` of point sets ``x`` ``(P, n, d)``.

    ``A_ij = 1`` when ``j`` is among the ``k`` nearest other points of ``i`` or ``i`` among those of ``j``
    (symmetrised); ``k`` is capped at ``n - 1``. Returns ``(P, n, n)`` on ``x``'s device and dtype (no
    gradient flows through the choice of neighbours).
    """
    p, n, _ = x.shape
    kk = min(int(k), n - 1)
    eye = torch.eye(n, device=x.device, dtype=x.dtype).expand(p, n, n)
    if kk < 1:
        return eye.clone()
    with torch.no_grad():
        d = torch.cdist(x, x)
        d = d + torch.diag_embed(torch.full((p, n), float("inf"), device=x.device, dtype=x.dtype))
        idx = d.topk(kk, dim=-1, largest=False).indices
        a = torch.zeros(p, n, n, device=x.device, dtype=x.dtype).scatter_(-1, idx, 1.0)
        a = torch.maximum(a, a.transpose(1, 2)) + eye
        dinv = a.sum(-1).rsqrt()
        return dinv[:, :, None] * a * dinv[:, None, :]


class SetEncoder(nn.Module):
    """``encoder(X) -> e``: a permutation-invariant embedding of a point set (module docstring).

    Args:
        dim: features per point ``d``.
        embed_dim: size of the embedding ``e``.
        hidden: width of the hidden layers.
        layers: number of GCN layers (``kind="gcn"``) or of the per-point MLP ``phi`` (``"deepsets"``).
        k: neighbours of the kNN graph (the paper: 50 for letters, 100 for organoids).
        kind: ``"gcn"`` or ``"deepsets"``.
        normalize: return ``e / ||e||``.

    ``forward(x)`` takes one set ``(n, d)`` -> ``(embed_dim,)`` or a batch of equally sized sets
    ``(P, n, d)`` -> ``(P, embed_dim)``.
    """

    def __init__(self, dim: int, embed_dim: int = 64, hidden: int = 64, layers: int = 3, k: int = 50,
                 kind: str = "gcn", normalize: bool = True) -> None:
        super().__init__()
        for name, v in (("dim", dim), ("embed_dim", embed_dim), ("hidden", hidden), ("layers", layers),
                        ("k", k)):
            if not isinstance(v, int) or v < 1:
                raise FewflowError(f"SetEncoder {name} must be a positive int, got {v!r}")
        if kind not in ("gcn", "deepsets"):
            raise FewflowError(f"SetEncoder kind must be 'gcn' or 'deepsets', got {kind!r}")
        self.dim, self.embed_dim, self.k, self.kind, self.normalize = dim, embed_dim, k, kind, normalize
        if kind == "gcn":
            sizes = [dim] + [hidden] * (layers - 1) + [embed_dim]
            self.gcn = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        else:
            sizes = [dim] + [hidden] * layers
            phi: list[nn.Module] = []
            for a, b in zip(sizes[:-1], sizes[1:]):
                phi += [nn.Linear(a, b), nn.ReLU()]
            self.phi = nn.Sequential(*phi)
            self.rho = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, embed_dim))

    def forward(self, x: Tensor) -> Tensor:
        single = x.dim() == 2
        if single:
            x = x[None]
        if x.dim() != 3 or x.shape[-1] != self.dim or x.shape[1] < 1:
            raise FewflowError(f"SetEncoder expects a set (n, {self.dim}) or sets (P, n, {self.dim}), got "
                               f"shape {tuple(x.shape)}")
        check_finite("population", x)
        w = next(self.parameters())
        x = x.to(dtype=w.dtype)
        if self.kind == "gcn":
            a = knn_adjacency(x, self.k)
            h = x
            for i, lin in enumerate(self.gcn):
                h = a @ lin(h)
                if i < len(self.gcn) - 1:
                    h = torch.relu(h)
            e = h.mean(1)
        else:
            e = self.rho(self.phi(x).mean(1))
        if self.normalize:
            e = e / e.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return e[0] if single else e
