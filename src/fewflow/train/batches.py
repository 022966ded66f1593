"""Where training batches come from: a data set sampled without replacement, or any iterator.

:class:`EpochSampler` turns ``N`` examples into an endless stream of index batches: epoch ``e`` is a random
permutation of ``0..N-1`` drawn from a generator seeded by ``(seed, e)``, and batches are consecutive
chunks of the concatenated epochs (every example appears once per epoch; a batch may straddle two epochs).
Its whole state is ``(epoch, pos)``, so a checkpoint restores the exact batch order. Under DDP every rank
builds the same global batch and keeps its own equal slice (:func:`shard`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fewflow._validate import FewflowError


def epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed for epoch ``epoch`` of a run seeded ``seed`` (numpy SeedSequence mixing)."""
    return int(
        np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1, np.uint64)[0] >> np.uint64(1)
    )


class EpochSampler:
    """Endless index batches of size ``batch_size`` from ``n`` examples, without replacement per epoch."""

    def __init__(self, n: int, batch_size: int, seed: int = 0) -> None:
        if n < 1:
            raise FewflowError(f"the data set is empty (n={n})")
        if batch_size < 1:
            raise FewflowError(f"batch_size must be positive, got {batch_size}")
        self.n, self.batch_size, self.seed = int(n), int(batch_size), int(seed)
        self.epoch, self.pos = 0, 0
        self._perm: Tensor | None = None

    def permutation(self, epoch: int) -> Tensor:
        """The order of epoch ``epoch`` (a pure function of ``seed`` and ``epoch``)."""
        g = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
        return torch.randperm(self.n, generator=g)

    def next_indices(self) -> Tensor:
        """The next global batch of indices (CPU LongTensor of length ``batch_size``)."""
        chunks = []
        need = self.batch_size
        while need > 0:
            if self.pos >= self.n:
                self.epoch, self.pos, self._perm = self.epoch + 1, 0, None
            if self._perm is None:
                self._perm = self.permutation(self.epoch)
            take = min(need, self.n - self.pos)
            chunks.append(self._perm[self.pos : self.pos + take])
            self.pos += take
            need -= take
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks)

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "pos": self.pos,
            "n": self.n,
            "batch_size": self.batch_size,
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        for k in ("n", "batch_size", "seed"):
            if int(state[k]) != getattr(self, k):
                raise FewflowError(
                    f"cannot resume the batch order: checkpoint has {k}={state[k]}, "
                    f"this run has {getattr(self, k)}"
                )
        self.epoch, self.pos, self._perm = int(state["epoch"]), int(state["pos"]), None


def shard(batch: dict[str, Any], rank: int, world_size: int) -> dict[str, Any]:
    """Rank ``rank``'s equal slice of a global batch: every tensor with the batch's leading size is sliced."""
    if world_size == 1:
        return batch
    b = batch["x1"].shape[0]
    if b % world_size != 0:
        raise FewflowError(f"global batch of {b} does not split into {world_size} equal per-rank slices")
    per = b // world_size
    lo, hi = rank * per, (rank + 1) * per
    return {
        k: (v[lo:hi] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == b else v)
        for k, v in batch.items()
    }


def as_batch(item: Any) -> dict[str, Any]:
    """Normalise an iterator item to ``{"x1": Tensor, **cond}``.

    Accepts a tensor (``x1``), a tuple/list ``(x1,)`` or ``(x1, y)``, or a dict with ``"x1"`` (or ``"x"``)
    plus conditioning/extra keys passed to the objective as keyword arguments (e.g. ``y``, ``x0``).
    """
    if torch.is_tensor(item):
        return {"x1": item}
    if isinstance(item, dict):
        d = dict(item)
        if "x1" not in d:
            if "x" not in d:
                raise FewflowError(f"a batch dict needs an 'x1' (or 'x') tensor, got keys {sorted(d)}")
            d["x1"] = d.pop("x")
        return d
    if isinstance(item, (tuple, list)):
        if len(item) == 1:
            return {"x1": item[0]}
        if len(item) == 2:
            return {"x1": item[0], "y": item[1]} if item[1] is not None else {"x1": item[0]}
        raise FewflowError(f"a batch tuple must be (x1,) or (x1, y), got {len(item)} items")
    raise FewflowError(f"cannot use a {type(item).__name__} as a batch (need a tensor, (x1, y) or a dict)")


class BatchSource:
    """The trainer's view of ``data``: ``next()`` -> global batch dict on ``device``, plus a state for resume.

    ``data`` may be a ``fewflow.data.Dataset`` (anything with tensor ``.x`` and optional ``.y``), a tensor of
    examples, an iterator (consumed once; its end stops training) or a re-iterable (e.g. a ``DataLoader``,
    restarted at its end). Items of iterators are normalised by :func:`as_batch`. For data sets the batch
    order is restored exactly on resume; an iterator or iterable is restored only if it has
    ``state_dict()`` / ``load_state_dict()``. A data set's optional condition ``.c`` is batched as ``c=``.
    """

    def __init__(self, data: Any, batch_size: int, seed: int, device: torch.device) -> None:
        self.device = device
        self.sampler: EpochSampler | None = None
        self._iterable: Iterable | None = None
        self._iterator: Iterator | None = None
        self.x: Tensor | None = None
        self.y: Tensor | None = None
        self.c: Tensor | None = None  # an optional condition tensor (N, ...), batched like y as c=
        if torch.is_tensor(data):
            self.x = data
        elif hasattr(data, "x") and torch.is_tensor(getattr(data, "x", None)):
            self.x = data.x
            y = getattr(data, "y", None)
            if y is not None:
                if not torch.is_tensor(y) or y.shape[0] != self.x.shape[0]:
                    raise FewflowError(
                        f"dataset labels y must be a tensor with {self.x.shape[0]} rows, got "
                        f"{tuple(y.shape) if torch.is_tensor(y) else type(y).__name__}"
                    )
                self.y = y
            c = getattr(data, "c", None)
            if c is not None:
                if not torch.is_tensor(c) or c.dim() < 1 or c.shape[0] != self.x.shape[0]:
                    raise FewflowError(
                        f"dataset condition c must be a tensor with {self.x.shape[0]} rows, got "
                        f"{tuple(c.shape) if torch.is_tensor(c) else type(c).__name__}"
                    )
                self.c = c
        elif isinstance(data, Iterator):
            self._iterator = data
        elif isinstance(data, Iterable) and not isinstance(data, (str, bytes, dict)):
            self._iterable = data
            self._iterator = iter(data)
        else:
            raise FewflowError(
                f"data must be a fewflow.data.Dataset, a tensor, an iterator or an iterable of batches; "
                f"got {type(data).__name__}"
            )
        self.data = data
        if self.x is not None:
            if self.x.dim() < 1 or self.x.shape[0] == 0:
                raise FewflowError(
                    f"training data x must be a non-empty batch, got shape {tuple(self.x.shape)}"
                )
            self.x = self.x.to(device)
            self.y = self.y.to(device) if self.y is not None else None
            self.c = self.c.to(device) if self.c is not None else None
            self.sampler = EpochSampler(self.x.shape[0], batch_size, seed)

    def next(self) -> dict[str, Any] | None:
        """The next global batch, or ``None`` when a one-shot iterator is exhausted."""
        if self.sampler is not None:
            idx = self.sampler.next_indices().to(self.device)
            batch: dict[str, Any] = {"x1": self.x[idx]}
            if self.y is not None:
                batch["y"] = self.y[idx]
            if self.c is not None:
                batch["c"] = self.c[idx]
            return batch
        try:
            item = next(self._iterator)
        except StopIteration:
            if self._iterable is None:
                return None
            self._iterator = iter(self._iterable)
            try:
                item = next(self._iterator)
            except StopIteration:
                return None
        batch = as_batch(item)
        if not torch.is_tensor(batch["x1"]):
            raise FewflowError(f"batch x1 must be a tensor, got {type(batch['x1']).__name__}")
        return {
            k: (v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()
        }

    def state_dict(self) -> dict[str, Any] | None:
        if self.sampler is not None:
            return {"sampler": self.sampler.state_dict()}
        if hasattr(self.data, "state_dict"):
            return {"iterator": self.data.state_dict()}
        return None

    def load_state_dict(self, state: dict[str, Any] | None) -> bool:
        """Restore the position; returns False when it cannot be restored (an iterator without state)."""
        if not state:
            return False
        if self.sampler is not None and "sampler" in state:
            self.sampler.load_state_dict(state["sampler"])
            return True
        if "iterator" in state and hasattr(self.data, "load_state_dict"):
            self.data.load_state_dict(state["iterator"])
            return True
        return False
