"""Normalisation of data from the user, recorded so that samples can be put back in the user's units.

A normalisation is a plain JSON-ready dict (it lives in ``run_config.meta["normalization"]``)::

    {"kind": "standardize", "shift": [...], "scale": [...]}   # arrays: per feature / per channel
    {"kind": "pixels", "shift": 127.5, "scale": 127.5}         # image files: 0..255 -> [-1, 1]

The model sees ``(x - shift) / scale``; :func:`denormalize` maps back with ``x * scale + shift``.
``shift`` and ``scale`` are numbers or nested lists shaped to broadcast against one sample (``(D,)`` for
vectors ``(N, D)``, ``(C, 1, 1)`` for images ``(N, C, H, W)``), so the same record also undoes a trajectory
``(T, N, ...)``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from fewflow._validate import FewflowError

__all__ = [
    "apply_normalization", "check_normalization", "denormalize", "fit_standardize", "pixel_normalization",
    "raw_range",
]

KINDS = ("standardize", "pixels")
MIN_STD = 1e-8  # a constant feature keeps scale 1 (no division by ~0)


def fit_standardize(x: Tensor) -> dict[str, Any]:
    """Per-feature mean / std of ``x`` (float64): per column for ``(N, D)``, per channel for ``(N, C, ...)``.

    A feature whose std is below ``1e-8`` (a constant column) gets scale 1."""
    x64 = x.detach().to("cpu", torch.float64)
    dims = [0, *range(2, x64.dim())]
    mean = x64.mean(dim=dims)
    std = x64.std(dim=dims, unbiased=False) if x64.shape[0] > 1 else torch.ones_like(mean)
    std = torch.where(std < MIN_STD, torch.ones_like(std), std)
    tail = [1] * (x64.dim() - 2)  # (C,) -> (C, 1, 1) for images
    return {
        "kind": "standardize",
        "shift": mean.reshape(-1, *tail).tolist(),
        "scale": std.reshape(-1, *tail).tolist(),
    }


def pixel_normalization(max_value: float = 255.0) -> dict[str, Any]:
    """Pixels ``0..max_value`` to ``[-1, 1]``: ``shift = scale = max_value / 2``."""
    half = float(max_value) / 2.0
    return {"kind": "pixels", "shift": half, "scale": half}


def check_normalization(rec: Any) -> dict[str, Any]:
    """Validate a normalisation record (see the module docstring); returns it."""
    if not isinstance(rec, dict) or rec.get("kind") not in KINDS or "shift" not in rec or "scale" not in rec:
        raise FewflowError(
            f"a normalization must be {{'kind': one of {KINDS}, 'shift': ..., 'scale': ...}}, got {rec!r}"
        )
    for key in ("shift", "scale"):
        try:
            vals = torch.as_tensor(rec[key], dtype=torch.float64)
        except (TypeError, ValueError) as e:
            raise FewflowError(f"normalization {key} must be a number or a list of numbers: {e}") from None
        if not bool(torch.isfinite(vals).all()) or (key == "scale" and bool((vals <= 0).any())):
            extra = " and positive" if key == "scale" else ""
            raise FewflowError(f"normalization {key} must be finite{extra}")
    return rec


def _params(rec: dict[str, Any], like: Tensor) -> tuple[Tensor, Tensor]:
    check_normalization(rec)
    shift = torch.as_tensor(rec["shift"], dtype=torch.float64)
    scale = torch.as_tensor(rec["scale"], dtype=torch.float64)
    for t in (shift, scale):
        try:
            ok = t.dim() < like.dim() and torch.broadcast_shapes(t.shape, like.shape) == like.shape
        except RuntimeError:
            ok = False
        if not ok:
            raise FewflowError(
                f"the normalization (shape {tuple(t.shape)}) does not fit samples of shape "
                f"{tuple(like.shape[1:])}"
            )
    return shift.to(like.device, like.dtype), scale.to(like.device, like.dtype)


def apply_normalization(x: Tensor, rec: dict[str, Any]) -> Tensor:
    """``(x - shift) / scale`` (the model's units), in ``x``'s dtype (float32 for integer input)."""
    xf = x if x.is_floating_point() else x.to(torch.float32)
    shift, scale = _params(rec, xf)
    return (xf - shift) / scale


def denormalize(x: Tensor, rec: dict[str, Any] | None) -> Tensor:
    """``x * scale + shift``: samples (or a trajectory) back in the user's units; ``None`` is the identity."""
    if rec is None:
        return x
    shift, scale = _params(rec, x)
    return x * scale + shift


def raw_range(x: Tensor) -> tuple[float, float]:
    """``(min, max)`` of ``x`` as floats (for ``meta.value_range``)."""
    lo, hi = float(x.min()), float(x.max())
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise FewflowError("the data contains non-finite values")
    return lo, hi
