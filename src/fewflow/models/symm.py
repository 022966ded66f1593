"""The network and semantic codec of Symmetrical Flow Matching (SymmFlow).

Caetano et al., "Symmetrical Flow Matching: Unified Image Generation, Segmentation, and Classification
with Score-Based Generative Models" (AAAI 2026, arXiv 2506.10634). One velocity network acts on the joint
state ``z = [x, m]``: the data channels ``x`` and the *semantic* channels ``m`` (a class code and,
for images, a foreground mask). :class:`SymmCodec` turns labels and masks into semantic channels and
back; :class:`SymmFlowNet` is a :class:`~fewflow.models.UNet` (images) or :class:`~fewflow.models.MLP`
(vectors) over ``C + S`` channels that carries its codec, so sampling, classification and segmentation
need nothing but the network.

Semantic channels (``beta`` is the code's amplitude, ``K`` the number of classes):

* class, ``encoding="onehot"`` (fewflow's default): ``K`` constant maps, channel ``j`` equal to
  ``(beta / 2)(2 [j = k] - 1)``; ``encoding="scalar"`` (the paper's classification code): one constant
  map ``(beta / 2)(2k / (K - 1) - 1)``. Training adds uniform jitter of width ``(beta / 2) / (K - 1)``
  per pixel (dequantisation), decoding takes the spatial mean and the nearest code.
* mask (images, ``segment=True``): one map ``(beta / 2)(2 M - 1)`` of the binary mask ``M``, with the
  paper's dequantisation jitter of width ``beta / 127.5``; decoded by its sign.

A semantic part can be *absent* (no label for unconditional generation, no mask when generating from a
label alone): its channels are then held at 0 for every t and the network is told which parts are present
by a flag ``y`` in ``{0, 1, 2, 3}`` (bit 0: class absent, bit 1: mask absent) through its class embedding.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from fewflow._validate import FewflowError

__all__ = ["SymmCodec", "SymmFlowNet", "digit_masks"]

CLASS_ABSENT, MASK_ABSENT = 1, 2


def digit_masks(x: Tensor, value_range: tuple[float, float] | list[float] = (-1.0, 1.0)) -> Tensor:
    """Foreground masks of images ``x`` ``(B, C, H, W)``: pixels whose channel mean lies above the middle
    of ``value_range`` (for digits and MNIST in ``[-1, 1]``: ``x > 0``). Returns a bool ``(B, 1, H, W)``."""
    if x.dim() < 3:
        raise FewflowError(f"masks need images (B, C, H, W), got shape {tuple(x.shape)}")
    lo, hi = float(value_range[0]), float(value_range[1])
    return x.mean(1, keepdim=True) > 0.5 * (lo + hi)


class SymmCodec:
    """Labels and masks <-> semantic channels (module docstring).

    Args:
        num_classes: ``K >= 2``.
        encoding: ``"onehot"`` (``K`` channels) or ``"scalar"`` (one channel).
        beta: code amplitude (codes lie in ``[-beta / 2, beta / 2]``).
        segment: add a mask channel (images only).
        value_range: the data's range; the mask is the foreground above its middle.
    """

    def __init__(self, num_classes: int, encoding: str = "onehot", beta: float = 2.0, segment: bool = False,
                 value_range: tuple[float, float] | list[float] = (-1.0, 1.0)) -> None:
        if not isinstance(num_classes, int) or num_classes < 2:
            raise FewflowError(f"SymmFlow needs at least 2 classes, got {num_classes!r}")
        if encoding not in ("onehot", "scalar"):
            raise FewflowError(f"encoding must be 'onehot' or 'scalar', got {encoding!r}")
        if not (math.isfinite(beta) and beta > 0):
            raise FewflowError(f"beta must be a positive number, got {beta}")
        self.num_classes, self.encoding, self.beta, self.segment = num_classes, encoding, float(beta), segment
        self.value_range = (float(value_range[0]), float(value_range[1]))

    @property
    def class_channels(self) -> int:
        return self.num_classes if self.encoding == "onehot" else 1

    @property
    def channels(self) -> int:
        return self.class_channels + int(self.segment)

    @property
    def class_jitter(self) -> float:
        """Width of the class code's dequantisation jitter, ``(beta / 2) / (K - 1)``."""
        return 0.5 * self.beta / (self.num_classes - 1)

    def codes(self, like: Tensor) -> Tensor:
        """The ``K`` class codes ``(K, class_channels)`` on ``like``'s device and dtype."""
        k = torch.arange(self.num_classes, device=like.device)
        h = 0.5 * self.beta
        if self.encoding == "onehot":
            return h * (2.0 * torch.eye(self.num_classes, device=like.device, dtype=like.dtype) - 1.0)
        return (h * (2.0 * k / (self.num_classes - 1) - 1.0)).to(like.dtype)[:, None]

    def encode(self, y: Tensor, x: Tensor, mask: Tensor | None = None, *, jitter: bool = False,
               generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Semantic channels ``(B, S, *spatial)`` for data ``x`` and labels ``y``, and the flags ``(B,)``.

        ``y = K`` (the null class) marks an absent class; ``mask``: bool ``(B, 1, *spatial)`` or None
        (absent). Absent parts are 0."""
        b, spatial = x.shape[0], tuple(x.shape[2:])
        y = y.to(x.device).long().reshape(-1)
        if y.shape != (b,):
            raise FewflowError(f"labels must have shape ({b},), got {tuple(y.shape)}")
        if bool(((y < 0) | (y > self.num_classes)).any()):
            raise FewflowError(f"labels must lie in [0, {self.num_classes}] ({self.num_classes} = no label), "
                               f"got {sorted(set(y.tolist()))[:5]}")
        absent = y == self.num_classes
        codes = self.codes(x)[y.clamp(max=self.num_classes - 1)]  # (B, Sc)
        cls = codes.reshape(b, -1, *([1] * len(spatial))).expand(b, self.class_channels, *spatial)
        if jitter:
            u = torch.rand(cls.shape, generator=generator, device=_gdev(generator, x), dtype=x.dtype)
            u = u.to(x.device)
            cls = cls + self.class_jitter * (u - 0.5)
        cls = torch.where(absent.reshape(b, *([1] * (cls.dim() - 1))), torch.zeros_like(cls), cls)
        flags = absent.long() * CLASS_ABSENT
        parts = [cls]
        if self.segment:
            if mask is None:
                m = torch.zeros((b, 1, *spatial), device=x.device, dtype=x.dtype)
                flags = flags + MASK_ABSENT
            else:
                if tuple(mask.shape) != (b, 1, *spatial):
                    raise FewflowError(f"mask must have shape {(b, 1, *spatial)}, got {tuple(mask.shape)}")
                m = 0.5 * self.beta * (2.0 * mask.to(device=x.device, dtype=x.dtype) - 1.0)
                if jitter:
                    u = torch.rand(m.shape, generator=generator, device=_gdev(generator, x),
                                   dtype=x.dtype).to(x.device)
                    m = m + self.beta / 127.5 * (u - 0.5)
            parts.append(m)
        elif mask is not None:
            raise FewflowError("this SymmFlow model has no mask channel (segment=False)")
        return torch.cat(parts, 1), flags

    def frozen(self, flags: Tensor, like: Tensor) -> Tensor:
        """Bool ``(B, S, *1)``: the semantic channels held at 0 (absent parts) for these flags."""
        b = flags.shape[0]
        cls = ((flags & CLASS_ABSENT) > 0)[:, None].expand(b, self.class_channels)
        parts = [cls]
        if self.segment:
            parts.append(((flags & MASK_ABSENT) > 0)[:, None])
        out = torch.cat(parts, 1).to(like.device)
        return out.reshape(b, self.channels, *([1] * (like.dim() - 2)))

    def class_logits(self, m: Tensor, temperature: float = 0.1) -> Tensor:
        """Logits ``(B, K)`` of the class channels of ``m`` ``(B, S, *spatial)``: the spatial mean ``e`` and
        ``-||e - code_k||^2 / (2 temperature^2)``; ``softmax`` gives class probabilities."""
        e = m[:, : self.class_channels].reshape(m.shape[0], self.class_channels, -1).mean(-1)
        d2 = (e[:, None, :] - self.codes(m)[None]).pow(2).sum(-1)
        return -d2 / (2.0 * temperature**2)

    def mask(self, m: Tensor) -> Tensor:
        """The bool mask ``(B, 1, *spatial)`` read from the mask channel (its sign)."""
        if not self.segment:
            raise FewflowError("this SymmFlow model has no mask channel (segment=False)")
        return m[:, self.class_channels:self.class_channels + 1] > 0

    def to_dict(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "encoding": self.encoding, "beta": self.beta,
                "segment": self.segment, "value_range": list(self.value_range)}


def _gdev(generator: torch.Generator | None, x: Tensor) -> torch.device:
    return generator.device if generator is not None else x.device


class SymmFlowNet(nn.Module):
    """``v(z, t, y=flags)`` on the joint state ``z = [x, m]`` (``(B, C + S, H, W)`` or ``(B, D + S)``).

    Images use a :class:`~fewflow.models.UNet` with ``C + S`` in/out channels, vectors an
    :class:`~fewflow.models.MLP` on ``D + S`` values; ``y`` is the presence flag (module docstring),
    embedded like a class with 4 values. ``codec`` and ``data_channels`` travel with the network."""

    is_flow_map = False

    def __init__(self, shape: tuple[int, ...] | list[int], codec: SymmCodec, *, base: int = 32,
                 mults: tuple[int, ...] | list[int] = (1, 2), hidden: int = 256, depth: int = 4,
                 attention: bool = True) -> None:
        super().__init__()
        from fewflow.models.mlp import MLP
        from fewflow.models.unet import UNet

        shape = tuple(int(v) for v in shape)
        self.codec, self.shape = codec, shape
        if len(shape) == 3:
            if shape[1] != shape[2]:
                raise FewflowError(f"SymmFlow needs square images, got shape {shape}")
            self.data_channels = shape[0]
            self.net: nn.Module = UNet(shape[0] + codec.channels, base=base, mults=tuple(mults),
                                       size=shape[1], num_classes=4, attention=attention)
        elif len(shape) == 1:
            if codec.segment:
                raise FewflowError("masks (segment=True) need image data; vectors have no pixels")
            self.data_channels = shape[0]
            self.net = MLP(shape[0] + codec.channels, hidden=hidden, depth=depth, num_classes=4)
        else:
            raise FewflowError(f"SymmFlow supports images (C, H, W) and vectors (D,), got shape {shape}")

    def forward(self, z: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        if z.shape[1] != self.data_channels + self.codec.channels:
            raise FewflowError(f"SymmFlowNet expects {self.data_channels} data + {self.codec.channels} "
                               f"semantic channels, got {z.shape[1]}")
        if y is None:
            y = torch.zeros(z.shape[0], device=z.device, dtype=torch.long)
        return self.net(z, t, y=y)
