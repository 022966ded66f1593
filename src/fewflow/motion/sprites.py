"""Synthetic videos with exactly known optical flow: textured sprites and moving digits.

Every surface is a continuous function of its own coordinates (sums of sinusoids, or a bilinearly
interpolated 8x8 digit), so a frame is rendered by evaluating it at the pixel centres and the flow of
any pixel, integer or sub-pixel, is exact. Flow conventions are those of :mod:`fewflow.motion.warp`:
``flow_fw[t]`` sends a point of frame ``t`` to frame ``t + 1``, ``flow_bw[t]`` sends a point of frame
``t + 1`` back to frame ``t``, and ``warp(frames[t + 1:t + 2], flow_fw[t:t + 1])`` reconstructs
``frames[t]`` where ``visible[t] == 1``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from fewflow._validate import FewflowError

MOTIONS = ("translate", "rotate")
ILLUMINATIONS = ("global", "local")


@dataclass
class SpriteVideo:
    """A video and its true motion.

    Attributes:
        frames: ``(T, C, H, W)`` in ``[0, 1]``.
        flow_fw: ``(T-1, 2, H, W)``, ``(dx, dy)`` in pixels from frame ``t`` to frame ``t + 1``.
        flow_bw: ``(T-1, 2, H, W)`` from frame ``t + 1`` to frame ``t``.
        visible: ``(T-1, 1, H, W)``, 1 where the point of frame ``t`` is still seen in frame ``t + 1``
            (not covered by a sprite in front of it and not outside the image).
    """

    frames: Tensor
    flow_fw: Tensor
    flow_bw: Tensor
    visible: Tensor

    @property
    def n_frames(self) -> int:
        return int(self.frames.shape[0])

    def pair(self, t: int) -> tuple[Tensor, Tensor]:
        """Frames ``t`` and ``t + 1`` as ``(1, C, H, W)`` tensors."""
        return self.frames[t : t + 1], self.frames[t + 1 : t + 2]


# --------------------------------------------------------------------------- rendering

Texture = Callable[[Tensor], Tensor]  # local coordinates (N, 2) -> colours (N, C)


@dataclass
class _Layer:
    centers: Tensor  # (T, 2) position of the layer's origin in each frame (x, y)
    angles: Tensor  # (T,) rotation of the layer in each frame
    half: float  # half-size (square) or radius (disc); inf for the background
    shape: str  # "disc" | "square" | "plane"
    texture: Texture


def _rot(v: Tensor, a: float) -> Tensor:
    c, s = math.cos(a), math.sin(a)
    return torch.stack([c * v[..., 0] - s * v[..., 1], s * v[..., 0] + c * v[..., 1]], dim=-1)


def _local(layer: _Layer, t: int, pts: Tensor) -> Tensor:
    return _rot(pts - layer.centers[t], -float(layer.angles[t]))


def _inside(layer: _Layer, u: Tensor) -> Tensor:
    if layer.shape == "plane":
        return torch.ones(u.shape[0], dtype=torch.bool)
    if layer.shape == "disc":
        return u.pow(2).sum(-1) <= layer.half**2
    return u.abs().amax(-1) <= layer.half


def _owner(layers: list[_Layer], t: int, pts: Tensor) -> Tensor:
    """Index of the top-most layer covering each point (layer 0 is the background plane)."""
    own = torch.zeros(pts.shape[0], dtype=torch.long)
    for k, layer in enumerate(layers[1:], start=1):
        own[_inside(layer, _local(layer, t, pts))] = k
    return own


def _render(layers: list[_Layer], n_frames: int, size: int, channels: int) -> tuple[Tensor, ...]:
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64),
                            indexing="ij")
    pts = torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=-1)  # (N, 2) as (x, y)
    n = pts.shape[0]
    frames = torch.zeros(n_frames, n, channels, dtype=torch.float64)
    owners = []
    for t in range(n_frames):
        own = _owner(layers, t, pts)
        owners.append(own)
        for k, layer in enumerate(layers):
            sel = own == k
            if sel.any():
                frames[t, sel] = layer.texture(_local(layer, t, pts[sel]))
    flow_fw = torch.zeros(n_frames - 1, n, 2, dtype=torch.float64)
    flow_bw = torch.zeros_like(flow_fw)
    visible = torch.zeros(n_frames - 1, n, dtype=torch.float64)
    for t in range(n_frames - 1):
        for k, layer in enumerate(layers):
            sel = owners[t] == k
            if sel.any():  # p in frame t -> same material point in frame t+1
                u = _local(layer, t, pts[sel])
                target = layer.centers[t + 1] + _rot(u, float(layer.angles[t + 1]))
                flow_fw[t, sel] = target - pts[sel]
            sel = owners[t + 1] == k
            if sel.any():
                u = _local(layer, t + 1, pts[sel])
                flow_bw[t, sel] = layer.centers[t] + _rot(u, float(layer.angles[t])) - pts[sel]
        target = pts + flow_fw[t]
        inside = ((target >= 0) & (target <= size - 1)).all(-1)
        visible[t] = (inside & (_owner(layers, t + 1, target) == owners[t])).double()

    def img(x: Tensor, c: int) -> Tensor:
        return x.reshape(x.shape[0], size, size, c).permute(0, 3, 1, 2).contiguous()

    return img(frames, channels), img(flow_fw, 2), img(flow_bw, 2), img(visible[..., None], 1)


def _sinusoid_texture(rng: np.random.Generator, channels: int, mean: np.ndarray, amp: float,
                      periods: tuple[float, float], n_waves: int = 3) -> Texture:
    freq = []
    for _ in range(channels * n_waves):
        ang = rng.uniform(0, 2 * math.pi)
        period = rng.uniform(*periods)
        freq.append([2 * math.pi / period * math.cos(ang), 2 * math.pi / period * math.sin(ang)])
    w = torch.tensor(freq, dtype=torch.float64).reshape(channels, n_waves, 2)
    phase = torch.tensor(rng.uniform(0, 2 * math.pi, (channels, n_waves)), dtype=torch.float64)
    mu = torch.tensor(mean, dtype=torch.float64)

    def texture(u: Tensor) -> Tensor:
        waves = torch.sin(torch.einsum("nd,cwd->ncw", u, w) + phase).mean(-1)
        return (mu + amp * waves).clamp(0.1, 0.9)

    return texture


def _check_common(n_frames: int, size: int, seed: int) -> None:
    if int(n_frames) != n_frames or n_frames < 2:
        raise FewflowError(f"n_frames must be an integer >= 2, got {n_frames}")
    if int(size) != size or size < 8:
        raise FewflowError(f"size must be an integer >= 8, got {size}")
    if int(seed) != seed:
        raise FewflowError(f"seed must be an integer, got {seed}")


def _fit_velocity(v: np.ndarray, margin: float, size: int, n_frames: int, rng: np.random.Generator) -> tuple:
    """A start point keeping ``c0 + v t`` inside ``[margin, size - 1 - margin]``; shrinks ``v`` if needed."""
    lo, hi = margin, size - 1 - margin
    travel = v * (n_frames - 1)
    span = hi - lo
    if span <= 0:
        raise FewflowError(f"size {size} is too small for sprites of this size")
    scale = min(1.0, span / max(float(np.abs(travel).max()), 1e-12))
    v = v * scale
    travel = v * (n_frames - 1)
    # rounding can leave the interval of a full-span travel a few ulps negative: it is then one point
    bounds = [(max(lo, lo - d), min(hi, hi - d)) for d in travel]
    c0 = np.array([rng.uniform(a, max(a, b)) for a, b in bounds])
    return c0, v


def _gain(n_frames: int, size: int, brightness_change: float, illumination: str,
          rng: np.random.Generator) -> Tensor:
    """Per-frame illumination ``g_t(p)``: ``(1 + b)^t`` (global) or ``(1 + b)^(t r(p))`` with a ramp ``r``."""
    t = torch.arange(n_frames, dtype=torch.float64)[:, None, None, None]
    base = 1.0 + brightness_change
    if illumination == "global":
        return base**t * torch.ones(1, 1, size, size, dtype=torch.float64)
    ang = rng.uniform(0, 2 * math.pi)
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64),
                            indexing="ij")
    proj = math.cos(ang) * xs + math.sin(ang) * ys
    ramp = (proj - proj.min()) / (proj.max() - proj.min())
    return base ** (t * ramp[None, None])


def sprite_video(n_frames: int = 8, size: int = 24, n_sprites: int = 2, channels: int = 3,
                 motion: str = "translate", brightness_change: float = 0.0, seed: int = 0, *,
                 illumination: str = "global", max_speed: float = 1.5,
                 background_speed: float = 0.0) -> SpriteVideo:
    """Textured discs and squares moving over a textured background, with exact flow.

    Args:
        n_frames: number of frames ``T >= 2``.
        size: frame height = width in pixels.
        n_sprites: number of sprites (drawn back to front).
        channels: colour channels ``C``.
        motion: ``"translate"`` (constant velocity) or ``"rotate"`` (constant velocity plus a constant
            spin of 0.05-0.15 rad per frame about the sprite's centre).
        brightness_change: illumination gain per frame ``b``: frame ``t`` is multiplied by
            ``(1 + b)^t`` (``illumination="global"``) or by ``(1 + b)^(t r(p))`` with ``r`` a linear ramp
            from 0 to 1 across the image in a random direction (``"local"``). The video is rescaled by
            the largest gain so that nothing clips. The flow does not depend on ``b``.
        seed: the random seed (textures, shapes, positions, velocities).
        illumination: ``"global"`` or ``"local"``.
        max_speed: speeds are drawn in ``[-max_speed, max_speed]`` per axis; sprites with an even index
            get integer velocities (rounded), the others sub-pixel ones.
        background_speed: the background pans at this speed (pixels per frame, random direction).

    Returns:
        a :class:`SpriteVideo` in float32 on the CPU.
    """
    _check_common(n_frames, size, seed)
    if motion not in MOTIONS:
        raise FewflowError(f"unknown motion {motion!r}; choose one of {', '.join(MOTIONS)}")
    if illumination not in ILLUMINATIONS:
        raise FewflowError(f"unknown illumination {illumination!r}; choose one of {', '.join(ILLUMINATIONS)}")
    if int(n_sprites) != n_sprites or n_sprites < 0:
        raise FewflowError(f"n_sprites must be an integer >= 0, got {n_sprites}")
    if int(channels) != channels or channels < 1:
        raise FewflowError(f"channels must be an integer >= 1, got {channels}")
    for name, val in (("brightness_change", brightness_change), ("max_speed", max_speed),
                      ("background_speed", background_speed)):
        if not math.isfinite(float(val)):
            raise FewflowError(f"{name} must be finite, got {val}")
    if brightness_change <= -1:
        raise FewflowError(f"brightness_change must be > -1, got {brightness_change}")
    if max_speed < 0 or background_speed < 0:
        raise FewflowError("max_speed and background_speed must be >= 0")
    rng = np.random.default_rng(int(seed))
    T = int(n_frames)
    ang = rng.uniform(0, 2 * math.pi)
    vbg = background_speed * np.array([math.cos(ang), math.sin(ang)])
    bg_centers = torch.tensor(np.arange(T)[:, None] * vbg[None], dtype=torch.float64)
    layers = [_Layer(bg_centers, torch.zeros(T, dtype=torch.float64), math.inf, "plane",
                     _sinusoid_texture(rng, channels, rng.uniform(0.25, 0.4, channels), 0.12, (6.0, 14.0)))]
    for k in range(int(n_sprites)):
        shape = "disc" if k % 2 == 0 else "square"
        half = rng.uniform(0.14, 0.2) * size
        v = rng.uniform(-max_speed, max_speed, 2)
        if k % 2 == 0:
            v = np.round(v)
            if not v.any() and max_speed >= 1:
                v[rng.integers(2)] = rng.choice([-1.0, 1.0])
        reach = half * (math.sqrt(2) if shape == "square" else 1.0)
        c0, v = _fit_velocity(v, reach + 0.5, size, T, rng)
        if k % 2 == 0:
            v = np.trunc(v)
        spin = 0.0
        if motion == "rotate":
            spin = rng.uniform(0.05, 0.15) * rng.choice([-1.0, 1.0])
        centers = torch.tensor(c0[None] + np.arange(T)[:, None] * v[None], dtype=torch.float64)
        angles = torch.tensor(rng.uniform(0, 2 * math.pi) + spin * np.arange(T), dtype=torch.float64)
        tex = _sinusoid_texture(rng, channels, rng.uniform(0.55, 0.75, channels), 0.15, (4.0, 9.0))
        layers.append(_Layer(centers, angles, half, shape, tex))
    frames, flow_fw, flow_bw, visible = _render(layers, T, int(size), int(channels))
    if brightness_change != 0.0:
        g = _gain(T, int(size), float(brightness_change), illumination, rng)
        frames = (frames * g / max(1.0, float(g.max()))).clamp(0.0, 1.0)
    return SpriteVideo(frames.float(), flow_fw.float(), flow_bw.float(), visible.float())


def _digit_texture(img: np.ndarray, half: float) -> Texture:
    """Bilinear interpolation of an 8x8 digit stretched over ``[-half, half]^2`` (zero outside)."""
    grid = torch.tensor(img, dtype=torch.float64)
    n = grid.shape[0]

    def texture(u: Tensor) -> Tensor:
        g = (u + half) / (2 * half) * n - 0.5  # digit pixel centres at 0..n-1
        g0 = torch.floor(g)
        f = g - g0
        out = torch.zeros(u.shape[0], dtype=torch.float64)
        for dx in (0, 1):
            for dy in (0, 1):
                ix = g0[:, 0].long() + dx
                iy = g0[:, 1].long() + dy
                wgt = (f[:, 0] if dx else 1 - f[:, 0]) * (f[:, 1] if dy else 1 - f[:, 1])
                ok = (ix >= 0) & (ix < n) & (iy >= 0) & (iy < n)
                out[ok] += wgt[ok] * grid[iy[ok], ix[ok]]
        return out[:, None]

    return texture


def moving_digits_video(n_frames: int = 8, size: int = 28, n_digits: int = 1, seed: int = 0, *,
                        max_speed: float = 1.0) -> SpriteVideo:
    """Handwritten digits (scikit-learn's bundled 8x8 digits, upscaled 2x bilinearly) gliding over black.

    Each digit is a 16x16 square layer translating at a constant velocity (one integer, the next
    sub-pixel, alternating), intensity in ``[0, 0.9]``, one channel. The flow of the black square around
    a digit is its velocity; the flow of the black background is 0.
    """
    _check_common(n_frames, size, seed)
    if int(n_digits) != n_digits or n_digits < 0:
        raise FewflowError(f"n_digits must be an integer >= 0, got {n_digits}")
    if size < 18:
        raise FewflowError(f"size must be >= 18 to hold a 16x16 digit, got {size}")
    from sklearn.datasets import load_digits

    digits = load_digits().images / 16.0 * 0.9
    rng = np.random.default_rng(int(seed))
    T = int(n_frames)
    layers = [_Layer(torch.zeros(T, 2, dtype=torch.float64), torch.zeros(T, dtype=torch.float64), math.inf,
                     "plane", lambda u: torch.zeros(u.shape[0], 1, dtype=torch.float64))]
    half = 8.0
    for k in range(int(n_digits)):
        v = rng.uniform(-max_speed, max_speed, 2)
        if k % 2 == 0:
            v = np.round(v)
            if not v.any() and max_speed >= 1:
                v[rng.integers(2)] = rng.choice([-1.0, 1.0])
        c0, v = _fit_velocity(v, half, size, T, rng)
        if k % 2 == 0:
            v = np.trunc(v)
        centers = torch.tensor(c0[None] + np.arange(T)[:, None] * v[None], dtype=torch.float64)
        img = digits[int(rng.integers(len(digits)))]
        layers.append(_Layer(centers, torch.zeros(T, dtype=torch.float64), half - 1e-9, "square",
                             _digit_texture(img, half)))
    frames, flow_fw, flow_bw, visible = _render(layers, T, int(size), 1)
    return SpriteVideo(frames.float(), flow_fw.float(), flow_bw.float(), visible.float())
