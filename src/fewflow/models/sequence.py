"""A small transformer denoiser for categorical sequences on the simplex.

``SequenceDenoiser(x, t, y=None) -> logits``: ``x`` is a batch of simplex points ``(B, L, K)`` (one
probability vector over ``K`` states per position), ``t`` the ``(B,)`` time, ``y`` optional class labels;
the output is ``(B, L, K)`` logits of the clean tokens ``p(e_k | x_t)`` per position. It is the network of
fewflow's simplex flow-matching methods (GSFM, linear simplex FM), sized for a CPU.

Architecture: a linear embedding of each position's probability vector plus a learned position embedding
plus the time (and class) embedding of :class:`fewflow.models.embeddings.Conditioning`, then ``depth``
pre-norm transformer blocks (multi-head self-attention and a GELU MLP; Vaswani et al., "Attention Is All
You Need", arXiv 1706.03762), each adding the conditioning embedding to its input, and a final layer norm
and linear read-out to ``K`` logits. The read-out starts at zero, so the initial prediction is uniform.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from fewflow._validate import FewflowError
from fewflow.models.embeddings import Conditioning, default_time_scale

__all__ = ["SequenceDenoiser"]


class _Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(),
                                 nn.Linear(mlp_ratio * width, width))

    def forward(self, h: Tensor) -> Tensor:
        a = self.norm1(h)
        h = h + self.attn(a, a, a, need_weights=False)[0]
        return h + self.mlp(self.norm2(h))


class SequenceDenoiser(nn.Module):
    """Clean-token logits of a sequence of simplex points (module docstring).

    Args:
        length: sequence length ``L``.
        states: number of states ``K`` per position.
        width: transformer width (64 - 128 fits a CPU).
        depth: number of transformer blocks.
        heads: attention heads (must divide ``width``).
        mlp_ratio: hidden size of each block's MLP in units of ``width``.
        num_classes: class labels ``y`` in ``[0, num_classes)`` (``num_classes`` is the null class); None:
            unconditional.
        time_features: ``"sinusoidal"`` or ``"fourier"`` (see :mod:`fewflow.models.embeddings`).
    """

    is_flow_map = False

    def __init__(
        self, length: int, states: int, width: int = 64, depth: int = 2, heads: int = 4, mlp_ratio: int = 2,
        num_classes: int | None = None, time_features: str = "sinusoidal",
    ) -> None:
        super().__init__()
        for name, v, lo in (("length", length, 1), ("states", states, 2), ("width", width, 1),
                            ("depth", depth, 1), ("heads", heads, 1), ("mlp_ratio", mlp_ratio, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise FewflowError(f"SequenceDenoiser: {name} must be an integer >= {lo}, got {v!r}")
        if width % heads:
            raise FewflowError(f"SequenceDenoiser: heads ({heads}) must divide width ({width})")
        self.length, self.states = length, states
        self.config: dict[str, Any] = {
            "type": "SequenceDenoiser", "length": length, "states": states, "width": width,
            "depth": depth, "heads": heads, "mlp_ratio": mlp_ratio, "num_classes": num_classes,
            "time_features": time_features,
        }
        self.embed = nn.Linear(states, width)
        self.pos = nn.Parameter(torch.randn(length, width) * 0.02)
        self.cond = Conditioning(width, time_features, default_time_scale(time_features, False), num_classes,
                                 flow_map=False)
        self.blocks = nn.ModuleList(_Block(width, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, states)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None, **cond: Any) -> Tensor:
        """``(B, L, K)`` simplex points and ``(B,)`` times -> ``(B, L, K)`` clean-token logits."""
        if cond:
            raise FewflowError(f"SequenceDenoiser takes class labels y only, got {sorted(cond)}")
        if x.dim() != 3 or x.shape[1:] != (self.length, self.states):
            raise FewflowError(f"SequenceDenoiser expects x of shape (B, {self.length}, {self.states}), got "
                               f"{tuple(x.shape)}")
        b = x.shape[0]
        t = torch.as_tensor(t, device=x.device, dtype=x.dtype)
        t = t.expand(b) if t.dim() == 0 else t.reshape(-1)
        if t.shape != (b,):
            raise FewflowError(f"t must be a scalar or have shape ({b},), got {tuple(t.shape)}")
        emb = self.cond(t, y=y)[:, None, :]
        h = self.embed(x) + self.pos.to(x.dtype)[None]
        for blk in self.blocks:
            h = blk(h + emb)
        return self.out(self.norm(h))
