"""The :class:`Dataset` record, the cache folder, and a shuffling batch iterator."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fewflow._validate import FewflowError, check_finite


@dataclass
class Dataset:
    """An in-memory data set: samples ``x`` (float32, ``(N, *shape)``) and optional labels ``y``.

    Attributes:
        x: samples, float32, shape ``(N, *shape)``: ``(N, 2)`` for 2-D toys, ``(N, 1, 8, 8)`` for digits.
        y: class labels ``(N,)`` (int64) or ``None``.
        name: registry name, e.g. ``"moons"``.
        num_classes: number of classes of ``y`` (``None`` when unlabelled).
        value_range: ``(lo, hi)``; images are scaled to ``(-1, 1)``; for toys it is the range of the
            returned sample.
        description: one line saying what the data is and where it comes from.
        meta: extra facts about the generator (e.g. mixture means), plain values or tensors; data from the
            user records ``meta["source"] = {"kind", "path", "sha256"}``.
        c: optional per-sample condition tensor ``(N, ...)`` (float32), one row per sample, passed to
            models as ``c=``.
        normalization: how ``x`` was normalised from the user's units (see :mod:`fewflow.data.normalize`),
            or ``None`` for the built-in data sets.
    """

    x: Tensor
    y: Tensor | None
    name: str
    num_classes: int | None = None
    value_range: tuple[float, float] = (-1.0, 1.0)
    description: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    c: Tensor | None = None  # optional per-sample condition tensor (N, ...), passed to models as c=
    normalization: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if not torch.is_tensor(self.x) or self.x.dim() < 2:
            raise FewflowError(f"Dataset.x must be a batched tensor (N, ...), got {type(self.x).__name__}")
        check_finite("Dataset.x", self.x)
        if self.y is not None and (self.y.dim() != 1 or self.y.shape[0] != self.x.shape[0]):
            raise FewflowError(
                f"Dataset.y must have shape ({self.x.shape[0]},) to match x, got {tuple(self.y.shape)}"
            )
        if self.c is not None:
            if not torch.is_tensor(self.c) or self.c.dim() < 1 or self.c.shape[0] != self.x.shape[0]:
                got = tuple(self.c.shape) if torch.is_tensor(self.c) else type(self.c).__name__
                raise FewflowError(f"Dataset.c must have one row per sample ({self.x.shape[0]}), got {got}")
            check_finite("Dataset.c", self.c)

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one sample (``x.shape[1:]``)."""
        return tuple(self.x.shape[1:])

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Dataset:
        """A copy with ``x`` (and ``y``, ``c``) moved; ``dtype`` applies to ``x`` only."""
        y = self.y.to(device) if (self.y is not None and device is not None) else self.y
        c = self.c.to(device) if (self.c is not None and device is not None) else self.c
        return Dataset(
            self.x.to(device=device, dtype=dtype), y, self.name, self.num_classes, self.value_range,
            self.description, dict(self.meta), c, self.normalization,
        )


def default_cache_dir() -> Path:
    """Folder for downloaded data and cached feature networks: ``$FEWFLOW_CACHE`` or ``~/.cache/fewflow``."""
    env = os.environ.get("FEWFLOW_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fewflow"


def infinite_batches(
    dataset: Dataset | Tensor,
    batch_size: int,
    generator: torch.Generator | None = None,
    *,
    drop_last: bool = True,
) -> Iterator[tuple[Tensor, Tensor | None]]:
    """Yield ``(x, y)`` batches forever: each epoch is a fresh random permutation (no replacement).

    With ``drop_last=True`` every batch has exactly ``batch_size`` rows (the tail of an epoch that does
    not fill a batch is skipped); ``y`` is ``None`` for unlabelled data. Randomness comes only from
    ``generator`` (the permutation is drawn on the generator's device and moved to the data's).
    """
    if isinstance(dataset, Dataset):
        x, y = dataset.x, dataset.y
    elif torch.is_tensor(dataset):
        x, y = dataset, None
    else:
        raise FewflowError(f"dataset must be a Dataset or a Tensor, got {type(dataset).__name__}")
    n = int(x.shape[0])
    if not isinstance(batch_size, int) or batch_size < 1:
        raise FewflowError(f"batch_size must be a positive int, got {batch_size!r}")
    if drop_last and batch_size > n:
        raise FewflowError(f"batch_size {batch_size} exceeds the data set size {n} (drop_last=True)")
    gen_device = generator.device if generator is not None else torch.device("cpu")
    while True:
        perm = torch.randperm(n, generator=generator, device=gen_device).to(x.device)
        stop = n - batch_size + 1 if drop_last else n
        for i in range(0, stop, batch_size):
            idx = perm[i : i + batch_size]
            yield x[idx], (y[idx] if y is not None else None)
