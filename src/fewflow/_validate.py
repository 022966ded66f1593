"""Input checks shared by every layer: one clear error naming the problem, not a deep traceback."""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor


class FewflowError(ValueError):
    """A problem with the caller's input or configuration (bad shape, NaN, unknown name...)."""


def check_finite(name: str, x: Tensor) -> Tensor:
    """Raise :class:`FewflowError` if ``x`` holds NaN or inf."""
    if not torch.is_tensor(x):
        raise FewflowError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(torch.isinf(x).sum())
        raise FewflowError(f"{name} contains non-finite values ({n_nan} NaN, {n_inf} inf)")
    return x


def check_same_shape(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    """Raise if two tensors that must be paired element-wise differ in shape."""
    if a.shape != b.shape:
        raise FewflowError(
            f"shape mismatch: {name_a} has shape {tuple(a.shape)} but {name_b} has shape {tuple(b.shape)}"
        )


def check_batch(name: str, x: Tensor, min_dim: int = 2) -> None:
    """Require a batched tensor ``(B, ...)`` with at least ``min_dim`` dimensions."""
    if x.dim() < min_dim:
        raise FewflowError(
            f"{name} must be batched with at least {min_dim} dims (B, ...), got shape {tuple(x.shape)}"
        )


def check_time(t: Tensor | float, name: str = "t", lo: float = 0.0, hi: float = 1.0) -> None:
    """Raise if a time (scalar or tensor) lies outside ``[lo, hi]`` or is not finite."""
    if torch.is_tensor(t):
        if t.numel() == 0:
            return
        check_finite(name, t)
        tmin, tmax = float(t.min()), float(t.max())
    else:
        tmin = tmax = float(t)
        if not math.isfinite(tmin):
            raise FewflowError(f"{name} must be finite, got {t}")
    if tmin < lo - 1e-6 or tmax > hi + 1e-6:
        raise FewflowError(f"{name} must lie in [{lo}, {hi}], got values in [{tmin:.4g}, {tmax:.4g}]")


def as_batch_time(t: Tensor | float, x: Tensor) -> Tensor:
    """Return ``t`` as a ``(B,)`` tensor on ``x``'s device and dtype (a scalar is broadcast)."""
    b = x.shape[0]
    if not torch.is_tensor(t):
        return torch.full((b,), float(t), device=x.device, dtype=x.dtype)
    t = t.to(device=x.device, dtype=x.dtype)
    if t.dim() == 0:
        return t.expand(b)
    t = t.reshape(-1) if t.numel() == b else t
    if t.shape != (b,):
        raise FewflowError(
            f"time must be a scalar or have shape ({b},) to match the batch, got {tuple(t.shape)}"
        )
    return t


def expand_like(t: Tensor, x: Tensor) -> Tensor:
    """Reshape a ``(B,)`` time to ``(B, 1, ..., 1)`` so it broadcasts against ``x``."""
    return t.reshape(t.shape[0], *([1] * (x.dim() - 1)))


def unknown_name(kind: str, name: str, choices) -> FewflowError:
    """The error for an unknown registry name, listing the valid choices."""
    return FewflowError(f"unknown {kind} {name!r}; choose one of: {', '.join(sorted(choices))}")


_FLOAT_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)$")


def parse_value(text: Any) -> Any:
    """A ``--set`` / YAML value: numbers (``3e-4`` included), booleans, null, lists, else the string."""
    if not isinstance(text, str):
        return text
    s = text.strip()
    if _FLOAT_RE.match(s):
        return float(s)
    import yaml

    try:
        v = yaml.safe_load(s)
    except yaml.YAMLError:
        return s
    return numbers_in(v)


def numbers_in(v: Any) -> Any:
    """Scientific-notation strings inside parsed YAML become floats (YAML 1.1 leaves ``3e-4`` a string)."""
    if isinstance(v, str) and _FLOAT_RE.match(v.strip()):
        return float(v)
    if isinstance(v, list):
        return [numbers_in(u) for u in v]
    if isinstance(v, dict):
        return {k: numbers_in(u) for k, u in v.items()}
    return v


def closest(name: str, choices: Iterable[str]) -> str | None:
    """The valid name closest to a misspelt one (``difflib``), or ``None``."""
    hits = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.5)
    return hits[0] if hits else None


def unknown_key(key: str, section: str, valid: Iterable[str]) -> FewflowError:
    """The error for an unknown config key: names the closest valid key and lists them all."""
    valid = sorted(valid)
    hint = closest(key, valid)
    where = f" in section {section!r}" if section else ""
    did = f"; did you mean {hint!r}?" if hint else ""
    return FewflowError(f"unknown key {key!r}{where}{did} (valid: {', '.join(valid)})")
