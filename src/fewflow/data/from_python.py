"""Data returned by a Python function (``--data module:function``).

The function is called with no arguments and may return

* samples: a tensor, a numpy array or a list of rows;
* a tuple ``(x,)``, ``(x, y)`` or ``(x, y, c)`` (labels ``y`` and conditioning ``c`` may be ``None``);
* a dict with ``x`` and optionally ``y`` / ``c``;
* a :class:`fewflow.data.Dataset`;
* a map-style ``torch.utils.data.Dataset`` (``len`` + indexing) whose items are samples or
  ``(sample, label)`` pairs, e.g. a ``TensorDataset``.

:func:`unpack` returns the raw ``(x, y, c)``; they are checked by :mod:`fewflow.data.arrays`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fewflow._validate import FewflowError
from fewflow.data.arrays import NPZ_KEYS
from fewflow.data.imports import import_object

__all__ = ["call_data_function", "unpack"]

_WANT = "return samples (tensor or array), (x, y), a dict with x/y/c, or a torch Dataset"


def _stack(items: list[Any], what: str, label: bool) -> Any:
    try:
        rows = [it.detach().cpu().numpy() if torch.is_tensor(it) else np.asarray(it) for it in items]
    except (TypeError, ValueError) as e:
        raise FewflowError(f"{what}: cannot turn items into arrays: {e}") from None
    shapes = {r.shape for r in rows}
    if len(shapes) > 1:
        a, b = sorted(shapes, key=str)[:2]
        raise FewflowError(f"{what}: items have different shapes ({a} and {b})")
    if label and rows[0].shape != ():
        raise FewflowError(f"{what}: a label must be one integer per item, got shape {rows[0].shape}")
    return np.stack(rows)


def _from_torch_dataset(ds: Any, what: str) -> tuple[Any, Any, Any]:
    n = len(ds)
    if n == 0:
        raise FewflowError(f"{what} is an empty torch Dataset")
    items = [ds[i] for i in range(n)]
    if all(isinstance(it, (tuple, list)) for it in items):
        sizes = {len(it) for it in items}
        if sizes != {2}:
            raise FewflowError(f"{what}: torch Dataset items must be a sample or (sample, label), "
                               f"got tuples of {sorted(sizes)} items")
        xs = _stack([it[0] for it in items], what, label=False)
        labels = [it[1] for it in items]
        y = None if all(v is None for v in labels) else _stack(labels, what, label=True)
        return xs, y, None
    return _stack(items, what, label=False), None, None


def unpack(out: Any, what: str) -> tuple[Any, Any, Any]:
    """``(x, y, c)`` from a data function's return value (module docstring); ``y`` / ``c`` may be None."""
    if hasattr(out, "x") and torch.is_tensor(getattr(out, "x", None)):  # a fewflow Dataset
        return out.x, getattr(out, "y", None), getattr(out, "c", None)
    if isinstance(out, dict):
        unknown = sorted(str(k) for k in out if k not in NPZ_KEYS)
        if unknown or "x" not in out:
            raise FewflowError(f"{what} returned a dict with keys {sorted(map(str, out))}; it needs 'x' "
                               "(and optionally 'y', 'c')")
        return out["x"], out.get("y"), out.get("c")
    if isinstance(out, tuple):
        if not 1 <= len(out) <= 3:
            raise FewflowError(f"{what} returned a tuple of {len(out)} items; {_WANT}")
        return (*out, *([None] * (3 - len(out))))  # type: ignore[return-value]
    if torch.is_tensor(out) or isinstance(out, (np.ndarray, list)):
        return out, None, None
    if hasattr(out, "__len__") and hasattr(out, "__getitem__"):
        return _from_torch_dataset(out, what)
    raise FewflowError(f"{what} returned a {type(out).__name__}; {_WANT}")


def call_data_function(path: str) -> tuple[Any, Any, Any]:
    """Import ``module:function``, call it with no arguments and :func:`unpack` the result."""
    fn = import_object(path, "data function")
    what = f"data function {path!r}"
    if not callable(fn):
        raise FewflowError(f"{what} is a {type(fn).__name__}, not a function")
    try:
        out = fn()
    except FewflowError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's function failed
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise FewflowError(f"{what} raised {type(e).__name__}{': ' + msg if msg else ''}") from e
    return unpack(out, what)
