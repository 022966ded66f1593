"""A small Diffusion Transformer with adaLN-Zero conditioning and plain (forward-mode-AD safe) attention.

Peebles & Xie, "Scalable Diffusion Models with Transformers": patchify -> fixed 2-D sin-cos positional
embedding -> ``depth`` blocks ``x += g1 * Attn(LN(x)(1 + a1) + b1); x += g2 * MLP(LN(x)(1 + a2) + b2)``
where ``(b1, a1, g1, b2, a2, g2) = Linear(SiLU(c))`` is zero-initialised (adaLN-Zero: every block starts
as the identity) -> final adaLN + linear -> unpatchify. The final linear is zero-initialised as in DiT,
so a fresh model outputs zeros.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewflow._validate import FewflowError, check_batch
from fewflow.models._dtype import param_dtype_inputs
from fewflow.models.embeddings import Conditioning, default_time_scale, parse_times
from fewflow.models.unet import plain_attention


def sincos_pos_embed_2d(width: int, grid: int) -> Tensor:
    """Fixed 2-D sin-cos positional embedding ``(grid^2, width)`` (MAE / DiT): half the channels per axis."""
    if width % 4:
        raise FewflowError(f"DiT hidden size must be divisible by 4 (2-D positional embedding), got {width}")
    quarter = width // 4
    omega = 1.0 / 10_000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    coords = torch.arange(grid, dtype=torch.float64)
    gy, gx = torch.meshgrid(coords, coords, indexing="ij")

    def axis(pos: Tensor) -> Tensor:
        arg = pos.reshape(-1, 1) * omega[None]
        return torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)

    return torch.cat([axis(gy), axis(gx)], dim=1).float()


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class _Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        hid = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hid), nn.GELU(approximate="tanh"), nn.Linear(hid, width))
        self.ada = nn.Linear(width, 6 * width)
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        b1, a1, g1, b2, a2, g2 = self.ada(F.silu(c)).chunk(6, dim=-1)
        bsz, n, w = x.shape
        qkv = self.qkv(_modulate(self.norm1(x), b1, a1)).reshape(bsz, n, 3, self.heads, w // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        att = plain_attention(q, k, v).transpose(1, 2).reshape(bsz, n, w)
        x = x + g1[:, None] * self.proj(att)
        return x + g2[:, None] * self.mlp(_modulate(self.norm2(x), b2, a2))


class DiT(nn.Module):
    """Small DiT ``v(x, t, y=None, c=None)`` / flow map ``u(x, s, t, y=None, c=None)`` on
    ``(B, in_channels, size, size)``.

    A condition tensor ``c`` is a vector (``cond_dim`` values per row, added to the adaLN conditioning) or
    an image ``(B, cond_channels, size, size)`` concatenated to the input before patchifying; null rows
    (``c_mask = False`` or ``c=None``) use the learned null condition
    (:class:`fewflow.models.embeddings.Conditioning`).
    """

    is_flow_map: bool = False

    def __init__(
        self,
        size: int = 8,
        patch: int = 2,
        in_channels: int = 1,
        hidden: int = 128,
        depth: int = 4,
        heads: int = 4,
        num_classes: int | None = None,
        flow_map: bool = False,
        mlp_ratio: float = 4.0,
        time_features: str = "sinusoidal",
        time_scale: float | None = None,
        cond_dim: int | None = None,
        cond_channels: int | None = None,
    ) -> None:
        super().__init__()
        if size % patch:
            raise FewflowError(f"DiT size {size} must be divisible by patch {patch}")
        if hidden % heads:
            raise FewflowError(f"DiT hidden {hidden} must be divisible by heads {heads}")
        if time_scale is None:
            time_scale = default_time_scale(time_features, flow_map)
        self.config: dict[str, Any] = {
            "type": "DiT", "size": size, "patch": patch, "in_channels": in_channels, "hidden": hidden,
            "depth": depth, "heads": heads, "num_classes": num_classes, "flow_map": flow_map,
            "mlp_ratio": mlp_ratio, "time_features": time_features, "time_scale": float(time_scale),
            "cond_dim": cond_dim, "cond_channels": cond_channels,
        }
        self.size, self.patch, self.in_channels, self.num_classes = size, patch, in_channels, num_classes
        self.is_flow_map = bool(flow_map)
        self.grid = size // patch
        self.cond = Conditioning(hidden, time_features, time_scale, num_classes, flow_map, cond_dim=cond_dim,
                                 cond_channels=cond_channels)
        self.embed = nn.Conv2d(in_channels + (cond_channels or 0), hidden, patch, stride=patch)
        self.register_buffer("pos", sincos_pos_embed_2d(hidden, self.grid)[None], persistent=False)
        self.blocks = nn.ModuleList(_Block(hidden, heads, mlp_ratio) for _ in range(depth))
        self.norm_out = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Linear(hidden, 2 * hidden)
        self.out = nn.Linear(hidden, patch * patch * in_channels)
        for layer in (self.ada_out, self.out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor, *times: Tensor | float, y: Tensor | None = None, c: Tensor | None = None,
                c_mask: Tensor | None = None) -> Tensor:
        """``forward(x, t, y=None, c=None)`` or, for flow maps, ``forward(x, s, t, y=None, c=None)``;
        ``c_mask`` (bool ``(B,)``, False = null condition) marks rows whose ``c`` is dropped."""
        x, c = param_dtype_inputs(self, x, c)  # float16 / float64 inputs: cast to the weights' dtype
        check_batch("x", x, 4)
        if x.shape[1:] != (self.in_channels, self.size, self.size):
            raise FewflowError(
                f"DiT expects x of shape (B, {self.in_channels}, {self.size}, {self.size}), "
                f"got {tuple(x.shape)}"
            )
        s, t = parse_times(x, times, self.is_flow_map)
        emb = self.cond(t, s, y, c, c_mask)
        h = self.embed(self.cond.concat_channels(x, c, c_mask))
        h = h.flatten(2).transpose(1, 2) + self.pos.to(x.dtype)
        for blk in self.blocks:
            h = blk(h, emb)
        shift, scale = self.ada_out(F.silu(emb)).chunk(2, dim=-1)
        h = self.out(_modulate(self.norm_out(h), shift, scale))  # (B, grid^2, p*p*C)
        b, g, p, ch = x.shape[0], self.grid, self.patch, self.in_channels
        h = h.reshape(b, g, g, p, p, ch).permute(0, 5, 1, 3, 2, 4)
        return h.reshape(b, ch, g * p, g * p)


