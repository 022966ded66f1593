"""Arrays from the user: read ``.npy`` / ``.npz`` / ``.csv`` files and check samples, labels and conditioning.

Shapes of samples ``x`` (first axis = samples): ``(N,)`` becomes ``(N, 1)``; ``(N, D)`` are vectors;
``(N, H, W)`` become one-channel images ``(N, 1, H, W)``; ``(N, C, H, W)`` are images. Samples must be
numbers (integers or floats; not booleans, complex numbers, strings or Python objects) and finite.
Labels ``y`` are non-negative integers, one per sample; conditioning vectors ``c`` are finite numbers,
one row per sample.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fewflow._validate import FewflowError, closest

__all__ = ["NPZ_KEYS", "as_conditioning", "as_labels", "as_samples", "read_csv", "read_npy", "read_npz"]

NPZ_KEYS = ("x", "y", "c")
_NUMERIC_KINDS = "iuf"  # numpy dtype kinds: signed, unsigned, float


def _to_numpy(a: Any, what: str) -> np.ndarray:
    if torch.is_tensor(a):
        if a.dtype == torch.bool or a.is_complex():
            raise FewflowError(f"{what} must hold numbers, got a torch tensor of dtype {a.dtype}")
        return a.detach().cpu().numpy()
    try:
        arr = np.asarray(a)
    except (TypeError, ValueError) as e:
        raise FewflowError(f"{what} is not an array of numbers: {e}") from None
    return arr


def _check_dtype(arr: np.ndarray, what: str, kinds: str = _NUMERIC_KINDS) -> None:
    if arr.dtype.kind not in kinds:
        names = {"b": "booleans", "c": "complex numbers", "O": "Python objects", "U": "strings", "S": "bytes"}
        got = names.get(arr.dtype.kind, f"dtype {arr.dtype}")
        want = "integers" if kinds == "iu" else "numbers (integer or float)"
        raise FewflowError(f"{what} must hold {want}, got {got} (dtype {arr.dtype})")


def _check_finite(arr: np.ndarray, what: str) -> None:
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        bad = ~np.isfinite(arr)
        row = int(np.argwhere(bad)[0][0])
        raise FewflowError(
            f"{what} contains non-finite values ({int(np.isnan(arr).sum())} NaN, "
            f"{int(np.isinf(arr).sum())} inf; first in sample {row})"
        )


def as_samples(a: Any, what: str = "x") -> Tensor:
    """Checked samples as a float64 tensor ``(N, D)`` or ``(N, C, H, W)`` (module docstring)."""
    arr = _to_numpy(a, what)
    _check_dtype(arr, what)
    if arr.ndim == 0 or arr.shape[0] == 0:
        raise FewflowError(f"{what} holds no samples (shape {arr.shape})")
    if arr.ndim > 4:
        raise FewflowError(f"{what} must be (N, D) vectors or (N, C, H, W) images, got shape {arr.shape}")
    if 0 in arr.shape:
        raise FewflowError(f"{what} has an empty axis (shape {arr.shape})")
    _check_finite(arr, what)
    x = torch.from_numpy(np.ascontiguousarray(arr)).to(torch.float64)
    if x.dim() == 1:
        x = x[:, None]
    elif x.dim() == 3:
        x = x[:, None]
    if not bool(torch.isfinite(x).all()):  # e.g. float128 values beyond float64
        raise FewflowError(f"{what} holds values too large for float64")
    return x


def as_labels(a: Any, n: int, what: str = "y") -> Tensor:
    """Checked class labels: ``n`` non-negative integers as an int64 tensor ``(n,)``."""
    arr = _to_numpy(a, what)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.dtype.kind == "f":
        raise FewflowError(
            f"{what} must hold integer class labels, got floats (dtype {arr.dtype}); "
            "save continuous conditioning vectors as 'c' instead"
        )
    _check_dtype(arr, what, "iu")
    if arr.ndim != 1 or arr.shape[0] != n:
        raise FewflowError(f"{what} must have shape ({n},), one label per sample, got {arr.shape}")
    if arr.size and int(arr.min()) < 0:
        raise FewflowError(f"{what} must hold labels 0..K-1, got a negative label {int(arr.min())}")
    return torch.from_numpy(arr.astype(np.int64))


def as_conditioning(a: Any, n: int, what: str = "c") -> Tensor:
    """Checked conditioning vectors: ``n`` rows of finite numbers as float32; ``(n,)`` becomes ``(n, 1)``."""
    arr = _to_numpy(a, what)
    _check_dtype(arr, what)
    if arr.ndim == 0 or arr.shape[0] != n:
        raise FewflowError(f"{what} must have one row per sample ({n} rows), got shape {arr.shape}")
    _check_finite(arr, what)
    c = torch.from_numpy(np.ascontiguousarray(arr)).to(torch.float32)
    return c[:, None] if c.dim() == 1 else c


# --------------------------------------------------------------------------- files


def read_npy(path: Path) -> np.ndarray:
    """The array in an ``.npy`` file (never unpickles)."""
    try:
        arr = np.load(path, allow_pickle=False)
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise FewflowError(f"{path} holds Python objects, not a numeric array") from None
        raise FewflowError(f"cannot read {path} as .npy: {e}") from None
    except OSError as e:
        raise FewflowError(f"cannot read {path}: {e}") from None
    if not isinstance(arr, np.ndarray):  # an .npz saved under an .npy name
        getattr(arr, "close", lambda: None)()
        raise FewflowError(f"{path} is not a single .npy array (is it an .npz archive?)")
    return arr


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """The arrays ``x`` (required), ``y`` and ``c`` (optional) of an ``.npz`` file; other names fail."""
    try:
        with np.load(path, allow_pickle=False) as f:
            if not hasattr(f, "files"):
                raise FewflowError(f"{path} is not an .npz archive")
            unknown = [k for k in f.files if k not in NPZ_KEYS]
            if unknown:
                hint = closest(unknown[0], NPZ_KEYS)
                did = f" (did you mean {hint!r}?)" if hint else ""
                raise FewflowError(
                    f"{path}: unknown array {unknown[0]!r}{did}; fewflow reads x (samples), "
                    "y (integer labels) and c (conditioning vectors)"
                )
            if "x" not in f.files:
                raise FewflowError(f"{path} has no array 'x' (the samples); it holds {sorted(f.files)}")
            return {k: f[k] for k in f.files}
    except FewflowError:
        raise
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise FewflowError(f"{path} holds Python objects, not numeric arrays") from None
        raise FewflowError(f"cannot read {path} as .npz: {e}") from None
    except (OSError, EOFError) as e:
        raise FewflowError(f"cannot read {path} as .npz: {e}") from None


def _number(cell: str) -> float | None:
    try:
        return float(cell)
    except ValueError:
        return None


def read_csv(path: Path) -> np.ndarray:
    """A comma-separated file of numbers as ``(N, D)`` float64; a first row that is not all numbers is
    taken as a header (column names). Blank lines are skipped; any other non-number fails, naming it."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = [(i + 1, r) for i, r in enumerate(csv.reader(f)) if r and any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise FewflowError(f"cannot read {path} as CSV: {e}") from None
    if not rows:
        raise FewflowError(f"{path} holds no rows")
    header: list[str] | None = None
    if any(_number(c) is None for c in rows[0][1]):
        header = [c.strip() for c in rows[0][1]]
        rows = rows[1:]
    if not rows:
        raise FewflowError(f"{path} holds a header but no data rows")
    width = len(header) if header is not None else len(rows[0][1])
    out = np.empty((len(rows), width), dtype=np.float64)
    for k, (line, row) in enumerate(rows):
        if len(row) != width:
            raise FewflowError(f"{path} line {line}: {len(row)} columns, expected {width}")
        for j, cell in enumerate(row):
            v = _number(cell)
            if v is None:
                col = repr(header[j]) if header is not None else str(j + 1)
                raise FewflowError(f"{path} line {line}, column {col}: {cell.strip()!r} is not a number")
            out[k, j] = v
    if not np.isfinite(out).all():
        k, j = (int(v) for v in np.argwhere(~np.isfinite(out))[0])
        raise FewflowError(f"{path} line {rows[k][0]}: column {j + 1} is {out[k, j]} (NaN/inf not allowed)")
    return out
