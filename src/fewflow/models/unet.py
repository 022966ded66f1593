"""A small U-Net for 8x8 digits and 28x28 MNIST (GroupNorm + SiLU, FiLM time conditioning, plain attention).

After Ronneberger et al., "U-Net: Convolutional Networks for Biomedical Image Segmentation", in the
form used by Ho et al., "Denoising Diffusion Probabilistic Models": residual blocks
``GN -> SiLU -> conv -> FiLM(c) -> GN -> SiLU -> conv`` with a skip, one block per resolution,
self-attention at the lowest resolution. Attention is written out as ``softmax(Q K^T / sqrt(d)) V`` so
``torch.func.jvp`` (forward-mode AD, MeanFlow's training target) works through the whole network.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewflow._validate import FewflowError, check_batch
from fewflow.models._dtype import param_dtype_inputs
from fewflow.models.embeddings import Conditioning, default_time_scale, parse_times


def _groups(ch: int, max_groups: int = 8) -> int:
    return math.gcd(ch, max_groups)


def plain_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """``softmax(q k^T / sqrt(d)) v`` over the last two dims, written with matmuls (forward-mode AD safe)."""
    w = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
    return w @ v


class _ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.film = nn.Linear(emb, 2 * cout)
        self.norm2 = nn.GroupNorm(_groups(cout), cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        a, b = self.film(F.silu(c))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + a) + b
        h = self.conv2(F.silu(h))
        return self.skip(x) + h


class _Attention(nn.Module):
    def __init__(self, ch: int, heads: int) -> None:
        super().__init__()
        if ch % heads:
            raise FewflowError(f"attention channels {ch} must be divisible by heads {heads}")
        self.heads = heads
        self.norm = nn.GroupNorm(_groups(ch), ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, hh, ww = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, hh * ww).unbind(1)
        out = plain_attention(q.transpose(-2, -1), k.transpose(-2, -1), v.transpose(-2, -1))
        return x + self.proj(out.transpose(-2, -1).reshape(b, c, hh, ww))


class UNet(nn.Module):
    """Small U-Net ``v(x, t, y=None, c=None)`` / flow map ``u(x, s, t, y=None, c=None)`` on
    ``(B, in_channels, size, size)``.

    ``mults`` gives the channel multiplier of each resolution (``base * m``); the image is halved between
    levels, so ``size`` must be divisible by ``2^(len(mults) - 1)``. No BatchNorm; GroupNorm throughout.
    A condition tensor ``c`` is either a vector (``cond_dim`` values per row, embedded into the time/class
    embedding) or an image ``(B, cond_channels, size, size)`` concatenated to the input channels; null
    rows (``c_mask = False`` or ``c=None``) use the learned null condition
    (:class:`fewflow.models.embeddings.Conditioning`).
    """

    is_flow_map: bool = False

    def __init__(
        self,
        in_channels: int = 1,
        base: int = 32,
        mults: tuple[int, ...] | list[int] = (1, 2),
        size: int = 8,
        num_classes: int | None = None,
        flow_map: bool = False,
        attention: bool = True,
        heads: int = 1,
        time_features: str = "sinusoidal",
        time_scale: float | None = None,
        cond_dim: int | None = None,
        cond_channels: int | None = None,
    ) -> None:
        super().__init__()
        mults = tuple(int(m) for m in mults)
        if not mults or min(mults) < 1:
            raise FewflowError(f"mults must be a non-empty sequence of positive ints, got {mults}")
        if size % (2 ** (len(mults) - 1)):
            raise FewflowError(f"size {size} must be divisible by 2^(len(mults)-1) = {2 ** (len(mults) - 1)}")
        if time_scale is None:
            time_scale = default_time_scale(time_features, flow_map)
        self.config: dict[str, Any] = {
            "type": "UNet", "in_channels": in_channels, "base": base, "mults": list(mults), "size": size,
            "num_classes": num_classes, "flow_map": flow_map, "attention": attention, "heads": heads,
            "time_features": time_features, "time_scale": float(time_scale), "cond_dim": cond_dim,
            "cond_channels": cond_channels,
        }
        self.in_channels, self.size, self.num_classes = in_channels, size, num_classes
        self.is_flow_map = bool(flow_map)
        emb = 4 * base
        self.cond = Conditioning(emb, time_features, time_scale, num_classes, flow_map, cond_dim=cond_dim,
                                 cond_channels=cond_channels)
        self.conv_in = nn.Conv2d(in_channels + (cond_channels or 0), base, 3, padding=1)
        chans = [base * m for m in mults]
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        ch = base
        for i, co in enumerate(chans):
            self.down.append(_ResBlock(ch, co, emb))
            ch = co
            if i < len(chans) - 1:
                self.downsample.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
        self.mid1 = _ResBlock(ch, ch, emb)
        self.attn = _Attention(ch, heads) if attention else None
        self.mid2 = _ResBlock(ch, ch, emb)
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i in reversed(range(len(chans))):
            self.up.append(_ResBlock(ch + chans[i], chans[i], emb))
            ch = chans[i]
            if i > 0:
                self.upsample.append(nn.Conv2d(ch, ch, 3, padding=1))
        self.norm_out = nn.GroupNorm(_groups(ch), ch)
        self.conv_out = nn.Conv2d(ch, in_channels, 3, padding=1)

    def forward(self, x: Tensor, *times: Tensor | float, y: Tensor | None = None, c: Tensor | None = None,
                c_mask: Tensor | None = None) -> Tensor:
        """``forward(x, t, y=None, c=None)`` or, for flow maps, ``forward(x, s, t, y=None, c=None)``;
        ``c_mask`` (bool ``(B,)``, False = null condition) marks rows whose ``c`` is dropped."""
        x, c = param_dtype_inputs(self, x, c)  # float16 / float64 inputs: cast to the weights' dtype
        check_batch("x", x, 4)
        if x.shape[1:] != (self.in_channels, self.size, self.size):
            raise FewflowError(
                f"UNet expects x of shape (B, {self.in_channels}, {self.size}, {self.size}), "
                f"got {tuple(x.shape)}"
            )
        s, t = parse_times(x, times, self.is_flow_map)
        emb = self.cond(t, s, y, c, c_mask)
        h = self.conv_in(self.cond.concat_channels(x, c, c_mask))
        skips = []
        for i, blk in enumerate(self.down):
            h = blk(h, emb)
            skips.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
        h = self.mid1(h, emb)
        if self.attn is not None:
            h = self.attn(h)
        h = self.mid2(h, emb)
        for j, blk in enumerate(self.up):
            h = blk(torch.cat([h, skips.pop()], dim=1), emb)
            if j < len(self.upsample):
                h = self.upsample[j](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(h)))
