"""Atomic file writes, file checksums and clean-up of temp files left by a killed writer.

The lowest layer of fewflow: it imports nothing from fewflow except :mod:`fewflow._validate`. Every writer
goes through :func:`atomic_path`: the content is written under a temporary name in the destination's folder
(``.<name>.tmp-<pid>-<random>``), flushed to disk (fsync), and only then moved onto the destination with
``os.replace``; a reader sees the old file or the new one, never half a file, and a writer that raises
leaves the old file untouched and no temp behind. A writer killed outright (SIGKILL, power loss) leaves its
temp; :func:`clean_stale_temps` removes those.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import secrets
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

__all__ = [
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_save_safetensors",
    "json_default",
    "sha256_file",
    "clean_stale_temps",
]

PathLike = str | os.PathLike

# temps this process is writing right now: clean_stale_temps never removes them, even though their pid is ours
_LIVE: set[str] = set()

# .<name>.tmp-<pid>-<8 hex> (a temp of this module) and .<name>.trash-<pid>-<8 hex> (an old directory moved
# out of the way while atomic_path replaces it)
_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|trash)-(?P<pid>\d+)-[0-9a-f]{8}$")
# names written by older fewflow versions, all without a live-writer check (no pid in the name, or none we
# trust): checkpoint.py (.<name>.tmp-<8 hex> files, .tmp-ckpt-<step>-<8 hex> / .trash-ckpt-<step>-<8 hex>
# folders), reflow.py / boss.py / loggers.py (<name>.tmp files), images.py (<name>.tmp.npz files)
_LEGACY_FILE_RE = re.compile(r"^(\..+\.tmp-[0-9a-f]{8}|.+\.tmp|.+\.tmp\.npz)$")
_LEGACY_DIR_RE = re.compile(r"^\.(tmp|trash)-ckpt-\d+-[0-9a-f]{8}$")
# <name>.tmp<pid>[.ext] files of bench/common.py and metrics/features.py (older versions)
_LEGACY_PID_RE = re.compile(r"^.+\.tmp(?P<pid>\d+)(\.[A-Za-z0-9]+)?$")


def _sibling(path: Path, kind: str) -> Path:
    name = path.name[:200]  # stay under the 255-byte name limit of common file systems
    return path.with_name(f".{name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")


def _fsync(path: Path) -> None:
    """fsync a file, or a folder's entries (best effort: some platforms cannot open folders)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. folders on Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        for root, _dirs, files in os.walk(path):
            for f in files:
                _fsync(Path(root) / f)
            _fsync(Path(root))
    else:
        _fsync(path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


@contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success move what was written there onto ``path``.

    The caller creates a file (or a folder) at the yielded path. When the ``with`` block ends normally it is
    fsynced and renamed onto ``path`` (a folder replaces an existing folder: the old one is moved to a
    ``.<name>.trash-...`` name first and removed afterwards); when the block raises it is removed and
    ``path`` is left as it was. Parent folders are created.

    The temp name does not end in ``path``'s extension, so writers that pick a format from the extension
    need it explicitly: ``fig.savefig(tmp, format="png")``, ``np.save(open(tmp, "wb"), a)``.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(final, "tmp")
    _LIVE.add(str(tmp))
    try:
        yield tmp
        _fsync_tree(tmp)
        if tmp.is_dir() and not tmp.is_symlink() and final.is_dir() and not final.is_symlink():
            trash = _sibling(final, "trash")
            _LIVE.add(str(trash))
            try:
                os.replace(final, trash)
                os.replace(tmp, final)
                shutil.rmtree(trash, ignore_errors=True)
            finally:
                _LIVE.discard(str(trash))
        else:
            os.replace(tmp, final)
        _fsync(final.parent)
    except BaseException:
        _remove(tmp)
        raise
    finally:
        _LIVE.discard(str(tmp))


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`); return the path."""
    final = Path(path)
    with atomic_path(final) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return final


def atomic_write_text(path: PathLike, text: str, *, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically, byte for byte (no newline translation); return the path."""
    return atomic_write_bytes(path, text.encode(encoding))


def _finite(obj: Any) -> Any:
    """``obj`` with each non-finite float in dicts / lists / tuples replaced by ``"nan"``, ``"inf"``..."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def json_default(o: Any) -> Any:
    """``json.dumps(default=...)`` for fewflow results: a ``Path`` becomes its string, a tensor / numpy array
    / numpy scalar its ``tolist()`` (non-finite values as ``"nan"``, ``"inf"``, ``"-inf"``)."""
    if isinstance(o, os.PathLike):
        return os.fspath(o)
    if isinstance(o, Tensor):
        return _finite(o.detach().cpu().tolist())
    if isinstance(o, (np.ndarray, np.generic)):
        return _finite(o.tolist())
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def atomic_write_json(path: PathLike, obj: Any, *, indent: int | None = 1, sort_keys: bool = False) -> Path:
    """Write ``obj`` as JSON atomically; return the path.

    Paths, tensors and numpy values are converted by :func:`json_default`; non-finite floats are written as
    the strings ``"nan"``, ``"inf"``, ``"-inf"`` (the file is strict JSON). ``obj`` is serialised before
    anything is written, so an object that does not serialise raises ``TypeError`` and leaves ``path``
    untouched.
    """
    text = json.dumps(_finite(obj), indent=indent, sort_keys=sort_keys, default=json_default, allow_nan=False)
    return atomic_write_text(path, text)


def atomic_save_safetensors(
    path: PathLike, tensors: Mapping[str, Tensor], *, metadata: dict[str, str] | None = None
) -> Path:
    """Save ``tensors`` (moved to CPU, made contiguous) as a safetensors file atomically; return the path."""
    from safetensors.torch import save_file

    final = Path(path)
    data = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(final) as tmp:
        save_file(data, str(tmp), metadata=metadata)
    return final


def sha256_file(path: PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read ``chunk`` bytes at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not a pid we can reason about: keep the file
    if os.name == "nt":  # pragma: no cover - os.kill(pid, 0) would terminate the process on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it exists, owned by someone else
        return True
    return True


def _stale(path: Path, pid: int) -> bool:
    if pid == os.getpid():
        return str(path) not in _LIVE
    return not _pid_alive(pid)


def clean_stale_temps(folder: PathLike) -> int:
    """Remove the temp files / folders a killed writer left directly in ``folder``; return how many.

    Removed: temps of this module (``.<name>.tmp-<pid>-<random>``) and the names older fewflow versions
    used (``.<name>.tmp-<random>``, ``.tmp-ckpt-*`` / ``.trash-ckpt-*`` folders, ``<name>.tmp``,
    ``<name>.tmp.npz``, ``<name>.tmp<pid>[.ext]``). A temp whose pid is a running process (or one this
    process is writing now) is kept. A ``.<name>.trash-...`` folder of a writer killed between its two
    renames is moved back to ``<name>`` when ``<name>`` is missing (not counted). Nothing else is touched;
    a missing folder gives 0.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    removed = 0
    for p in sorted(folder.iterdir()):
        name = p.name
        is_dir = p.is_dir() and not p.is_symlink()
        m = _TEMP_RE.match(name)
        if m is not None:
            if not _stale(p, int(m["pid"])):
                continue
            target = folder / m["name"]
            if m["kind"] == "trash" and is_dir and not target.exists():
                os.replace(p, target)  # the old folder was moved away but the new one never arrived
                continue
        elif is_dir:
            if not _LEGACY_DIR_RE.match(name):
                continue
        elif (pm := _LEGACY_PID_RE.match(name)) is not None:
            if not _stale(p, int(pm["pid"])):
                continue
        elif not _LEGACY_FILE_RE.match(name):
            continue
        _remove(p)
        removed += 1
    return removed
