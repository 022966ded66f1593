"""Data from the user: a folder of images, an ``.npy`` / ``.npz`` / ``.csv`` file, a FASTA file of
sequences (``.fasta`` / ``.fa`` / ``.fna`` / ``.faa``, optionally gzipped), or ``module:function``.

:func:`load_user_data` reads the source, checks it, normalises it (recorded in ``Dataset.normalization``)
and records where it came from in ``Dataset.meta["source"] = {"kind", "path", "sha256"}``:

* ``kind``: ``folder | npy | npz | csv | fasta | function``; ``path``: the absolute path (or
  ``module:function``);
* ``sha256``: the file's digest (a folder's: over its images, see :mod:`fewflow.data.folder`); ``None``
  for a function. Passing ``sha256=`` back refuses a file that changed since.

Normalisation: images from a folder map pixels ``0..255`` to ``[-1, 1]``; arrays (files and functions)
are standardised per feature (per column of ``(N, D)``, per channel of ``(N, C, H, W)``) with the mean and
std of all the samples, unless ``normalize=False``. ``n`` draws a seeded subset after normalising, so the
statistics do not depend on ``n``. FASTA files become one-hot sequence data sets ``(N, L, K)`` (see
:func:`fewflow.data.sequences.read_fasta`: ``alphabet`` ``"dna"`` / ``"protein"`` / letters, inferred
when not given; ``length`` and ``policy`` for records of different lengths; ``unknown="drop"`` to leave
out records with unknown letters, counted in ``meta["dropped"]``).
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
FASTA_SUFFIXES = (".fasta", ".fa", ".fna", ".faa")
USER_KINDS = ("folder", "npy", "npz", "csv", "fasta", "function")
FASTA_KWARGS = ("alphabet", "length", "policy", "unknown")
USER_DATA_KWARGS = ("image_size", "normalize", "kind", "sha256", *FASTA_KWARGS)
USER_DATA_HINT = "or give a folder of images, a .npy / .npz / .csv / .fasta file, or module:function"


def is_fasta_path(p: Path) -> bool:
    """Whether a path names a FASTA file (``.fasta`` / ``.fa`` / ``.fna`` / ``.faa``, optionally ``.gz``)."""
    name = p.name.lower().removesuffix(".gz")
    return name.endswith(FASTA_SUFFIXES)


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
    if is_import_path(text) or Path(text).suffix.lower() in FILE_KINDS or is_fasta_path(Path(text)):
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
        elif is_fasta_path(p):
            kind = "fasta"
        elif p.exists():
            raise FewflowError(
                f"cannot read {p}: fewflow reads a folder of images, .npy, .npz, .csv or .fasta files"
            )
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
    **fasta: Any,
) -> Dataset:
    """Load user data (module docstring). ``name`` is the ``--data`` value (a path or module:function)."""
    src = resolve_source(name, kind)
    given = {k: v for k, v in fasta.items() if v is not None}
    if src.kind == "fasta":
        if image_size is not None:
            raise FewflowError("image_size (--image-size) applies to image folders, not to a FASTA file")
        return _load_fasta(name, src, n, seed, sha256, **given)
    if given:
        raise FewflowError(f"{', '.join(sorted(given))} appl{'ies' if len(given) == 1 else 'y'} to FASTA "
                           f"files, not to a {src.kind}")
    if not isinstance(normalize, bool):
        raise FewflowError(f"normalize must be true or false, got {normalize!r}")
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


def _load_fasta(name: str, src: DataSource, n: int | None, seed: int, sha256: str | None,
                alphabet: str | None = None, length: int | None = None, policy: str = "error",
                unknown: str = "error") -> Dataset:
    """A FASTA file as a one-hot sequence data set; the alphabet is DNA when every letter is one of
    ``ACGT`` and protein otherwise, unless given."""
    from fewflow.data.sequences import DNA, PROTEIN, read_fasta, sequence_dataset

    path = Path(src.path)
    digest = sha256_file(path)
    if sha256 is not None and digest != sha256:
        raise FewflowError(
            f"{src.path} changed since the run was trained (sha256 {digest[:12]}... != recorded "
            f"{sha256[:12]}...); restore it or train again"
        )
    if alphabet is None:
        try:
            rec = read_fasta(path, DNA, length=length, policy=policy, unknown="error")
        except FewflowError as e:
            if "unknown letter" not in str(e).lower() and "not in the alphabet" not in str(e).lower():
                raise
            rec = read_fasta(path, PROTEIN, length=length, policy=policy, unknown=unknown)
    else:
        rec = read_fasta(path, alphabet, length=length, policy=policy, unknown=unknown)
    if not bool(rec.mask.all()):
        raise FewflowError(f"{name}: padded records cannot train a one-hot model; use policy 'crop' or "
                           "'window' (or records of one length)")
    tok = rec.tokens
    count = int(tok.shape[0])
    if n is not None:
        if n > count:
            raise FewflowError(f"n={n} exceeds the {count} sequences in {name!r}")
        tok = tok[torch.randperm(count, generator=torch.Generator().manual_seed(int(seed)))[:n]]
    dropped = {k: int(v) for k, v in rec.dropped.items() if v}
    note = f" ({', '.join(f'{v} dropped: {k}' for k, v in dropped.items())})" if dropped else ""
    desc = (f"{name}: {count} sequences of length {tok.shape[1]} over {rec.alphabet.letters!r} from a FASTA "
            f"file{note}")
    meta = {"source": {"kind": "fasta", "path": src.path, "sha256": digest}, "dropped": dropped}
    return sequence_dataset(tok, str(name), rec.alphabet.letters, rec.alphabet.size, desc, meta=meta)


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
