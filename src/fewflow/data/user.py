"""Data from the user: a folder of images, an ``.npy`` / ``.npz`` / ``.csv`` file, or ``module:function``.

:func:`load_user_data` reads the source, checks it, normalises it (recorded in ``Dataset.normalization``)
and records where it came from in ``Dataset.meta["source"] = {"kind", "path", "sha256"}``:

* ``kind``: ``folder | npy | npz | csv | function``; ``path``: the absolute path (or ``module:function``);
* ``sha256``: the file's digest (a folder's: over its images, see :mod:`fewflow.data.folder`); ``None``
  for a function. Passing ``sha256=`` back refuses a file that changed since.

Normalisation: images from a folder map pixels ``0..255`` to ``[-1, 1]``; arrays (files and functions)
are standardised per feature (per column of ``(N, D)``, per channel of ``(N, C, H, W)``) with the mean and
std of all the samples, unless ``normalize=False``. ``n`` draws a seeded subset after normalising, so the
statistics do not depend on ``n``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fewflow._io import sha256_file
from fewflow._validate import FewflowError
from fewflow.data.arrays import as_conditioning, as_labels, as_samples, read_csv, read_npy, read_npz
from fewflow.data.base import Dataset
from fewflow.data.imports import is_import_path, parse_import_path
from fewflow.data.normalize import apply_normalization, fit_standardize, pixel_normalization, raw_range

__all__ = [
    "USER_DATA_HINT", "USER_DATA_KWARGS", "USER_KINDS", "DataSource", "load_user_data",
    "looks_like_user_data", "resolve_source", "user_data_meta",
]

FILE_KINDS = {".npy": "npy", ".npz": "npz", ".csv": "csv"}
USER_KINDS = ("folder", "npy", "npz", "csv", "function")
USER_DATA_KWARGS = ("image_size", "normalize", "kind", "sha256")
USER_DATA_HINT = "or give a folder of images, a .npy / .npz / .csv file, or module:function"


@dataclass(frozen=True)
class DataSource:
    """Where user data lives: ``kind`` (one of ``USER_KINDS``) and ``path`` (absolute, or module:function)."""

    kind: str
    path: str


def looks_like_user_data(text: Any) -> bool:
    """Whether a ``--data`` value names user data rather than a (possibly misspelt) built-in data set:
    ``module:function``, a known file suffix, a path with a separator, or an existing folder."""
    if not isinstance(text, str) or not text.strip():
        return False
    if is_import_path(text) or Path(text).suffix.lower() in FILE_KINDS:
        return True
    return "/" in text or os.sep in text or text.startswith((".", "~")) or Path(text).expanduser().is_dir()


def resolve_source(text: str, kind: str | None = None) -> DataSource:
    """The :class:`DataSource` of a ``--data`` value (``kind`` forces the kind, as recorded in a run)."""
    if kind is not None and kind not in USER_KINDS:
        raise FewflowError(f"unknown data kind {kind!r}; choose one of: {', '.join(USER_KINDS)}")
    text = str(text).strip()
    if kind == "function" or (kind is None and is_import_path(text) and not Path(text).exists()):
        parse_import_path(text, "a data function")
        return DataSource("function", text)
    p = Path(text).expanduser()
    if kind is None:
        if p.is_dir():
            kind = "folder"
        elif p.suffix.lower() in FILE_KINDS:
            kind = FILE_KINDS[p.suffix.lower()]
        elif p.exists():
            raise FewflowError(f"cannot read {p}: fewflow reads a folder of images, .npy, .npz or .csv files")
        else:
            raise FewflowError(f"data not found: {p} is not a built-in data set, a folder or a file")
    if kind == "folder" and not p.is_dir():
        raise FewflowError(f"image folder not found: {p}")
    if kind != "folder" and not p.is_file():
        raise FewflowError(f"data file not found: {p}")
    return DataSource(kind, str(p.resolve()))


def _read(src: DataSource, image_size: int | None) -> tuple[Any, Any, Any, str | None, dict[str, Any]]:
    """``(x, y, c, sha256, extra meta)`` of a source; ``x`` is uint8 for a folder."""
    path = Path(src.path)
    if src.kind == "folder":
        from fewflow.data.folder import read_image_folder

        f = read_image_folder(path, image_size)
        return f.x, f.y, None, f.sha256, {"classes": f.classes}
    if src.kind == "function":
        from fewflow.data.from_python import call_data_function

        x, y, c = call_data_function(src.path)
        return x, y, c, None, {}
    digest = sha256_file(path)
    if src.kind == "npy":
        return read_npy(path), None, None, digest, {}
    if src.kind == "csv":
        return read_csv(path), None, None, digest, {}
    arrays = read_npz(path)
    return arrays["x"], arrays.get("y"), arrays.get("c"), digest, {}


def _describe(name: str, src: DataSource, x: torch.Tensor, k: int | None, extra: dict[str, Any]) -> str:
    shape = "x".join(str(s) for s in x.shape[1:])
    labels = f", {k} classes" if k else ""
    if src.kind == "folder":
        chans = {1: "grayscale", 3: "RGB"}.get(int(x.shape[1]), f"{x.shape[1]}-channel")
        return f"{name}: {x.shape[0]} {chans} images {shape}{labels}, pixels 0..255 mapped to [-1, 1]"
    return f"{name}: {x.shape[0]} samples of shape ({shape}){labels} from a {src.kind}"


def load_user_data(
    name: str,
    n: int | None = None,
    seed: int = 0,
    *,
    kind: str | None = None,
    sha256: str | None = None,
    image_size: int | None = None,
    normalize: bool = True,
) -> Dataset:
    """Load user data (module docstring). ``name`` is the ``--data`` value (a path or module:function)."""
    if not isinstance(normalize, bool):
        raise FewflowError(f"normalize must be true or false, got {normalize!r}")
    src = resolve_source(name, kind)
    if image_size is not None and src.kind != "folder":
        raise FewflowError(f"image_size (--image-size) applies to image folders, not to a {src.kind}")
    if src.kind == "folder" and not normalize:
        raise FewflowError("normalize=false applies to arrays; images are always mapped to [-1, 1]")
    x_raw, y_raw, c_raw, digest, extra = _read(src, image_size)
    if sha256 is not None and digest is not None and digest != sha256:
        raise FewflowError(
            f"{src.path} changed since the run was trained (sha256 {digest[:12]}... != recorded "
            f"{sha256[:12]}...); restore it or train again"
        )
    if src.kind == "folder":
        rec: dict[str, Any] | None = pixel_normalization(255.0)
        lo_hi = (0.0, 255.0)
        x64 = x_raw.to(torch.float64)
    else:
        x64 = as_samples(x_raw, f"x of {name}")
        rec = fit_standardize(x64) if normalize else None
        lo_hi = raw_range(x64)
    count = int(x64.shape[0])
    y = as_labels(y_raw, count, f"y of {name}") if y_raw is not None else None
    c = as_conditioning(c_raw, count, f"c of {name}") if c_raw is not None else None
    x = (apply_normalization(x64, rec) if rec is not None else x64).to(torch.float32).contiguous()
    if n is not None:
        if n > count:
            raise FewflowError(f"n={n} exceeds the {count} samples in {name!r}")
        idx = torch.randperm(count, generator=torch.Generator().manual_seed(int(seed)))[:n]
        x, y, c = x[idx], (y[idx] if y is not None else None), (c[idx] if c is not None else None)
    k = int(y.max()) + 1 if y is not None else None
    classes = extra.get("classes")
    if classes is not None:
        k = len(classes)
    meta = {"source": {"kind": src.kind, "path": src.path, "sha256": digest}, "raw_range": list(lo_hi)}
    if classes is not None:
        meta["classes"] = list(classes)
    vr = (-1.0, 1.0) if src.kind == "folder" else (float(x.min()), float(x.max()))
    return Dataset(x, y, str(name), k, vr, _describe(str(name), src, x, k, extra), meta, c, rec)


def user_data_meta(data: Any) -> dict[str, Any]:
    """What a run records in its ``meta`` about data from the user: ``normalization`` (undone by
    ``generate``), ``value_range`` in the user's units (the units samples come out in) and the class names
    of an image folder; ``{}`` for other data."""
    rec = getattr(data, "normalization", None)
    info = getattr(data, "meta", None) or {}
    out: dict[str, Any] = {}
    if rec is not None:
        out["normalization"] = rec
        if info.get("raw_range") is not None:
            out["value_range"] = [float(v) for v in info["raw_range"]]
    if info.get("classes"):
        out["class_names"] = list(info["classes"])
    return out
