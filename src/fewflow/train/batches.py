"""Where training batches come from: a data set sampled without replacement, or any iterator.

Data sets: a ``fewflow.data.Dataset`` (anything with ``.x`` and optional ``.y`` / ``.c``), a tensor or
numpy array of samples, a tuple ``(x, y)`` / ``(x, y, c)`` or a dict with ``x`` / ``y`` / ``c`` of tensors
or numpy arrays, or a map-style ``torch.utils.data.Dataset`` whose items are samples, ``(sample, label)``
or ``(sample, label, condition)`` (indexed lazily, one global batch at a time). Numpy samples become
float32 tensors (float64 included), numpy labels int64; floating samples and conditions are then cast to
the model's dtype. Iterators and re-iterables (a ``DataLoader``) yield batches (:func:`as_batch`).

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

from fewflow._validate import FewflowError, check_finite


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


_ARRAY_HINT = "a tensor or numpy array"


def _is_array(v: Any) -> bool:
    return torch.is_tensor(v) or isinstance(v, np.ndarray)


def as_samples(a: Any, what: str = "x", dtype: torch.dtype | None = None) -> Tensor:
    """Samples ``(N, ...)`` as a floating tensor: numpy arrays become float32 (float64 included), then a
    floating tensor is cast to ``dtype`` (the model's) when given. Integers, booleans, complex numbers and
    Python objects are refused (scale integer pixels to floats yourself, e.g. ``p / 127.5 - 1``)."""
    if isinstance(a, np.ndarray):
        if a.dtype.kind != "f":
            raise FewflowError(
                f"{what} must hold floating-point samples, got a numpy array of dtype {a.dtype}; convert "
                "it, e.g. x.astype(np.float32) (integer pixels: p / 127.5 - 1)"
            )
        a = torch.tensor(a, dtype=torch.float32)  # a copy: the array may be read-only
    elif not torch.is_tensor(a):
        raise FewflowError(f"{what} must be {_ARRAY_HINT}, got {type(a).__name__}")
    if not a.is_floating_point():
        raise FewflowError(
            f"{what} must hold floating-point samples, got a tensor of dtype {a.dtype}; convert it, e.g. "
            "x.float() (integer pixels: p / 127.5 - 1)"
        )
    return a.to(dtype) if dtype is not None and a.dtype != dtype else a


def as_labels(a: Any, n: int, what: str = "y") -> Tensor:
    """Integer class labels ``(n,)`` as int64 (a numpy array, a tensor or a list of ints)."""
    if isinstance(a, (list, tuple)):
        a = np.asarray(a)
    if isinstance(a, np.ndarray):
        if a.dtype.kind not in "iu":
            kind = "floats" if a.dtype.kind == "f" else f"dtype {a.dtype}"
            raise FewflowError(
                f"{what} must hold integer class labels, got {kind}; pass continuous conditioning as c"
            )
        a = torch.tensor(a, dtype=torch.int64)
    elif not torch.is_tensor(a):
        raise FewflowError(f"{what} must be {_ARRAY_HINT} of class labels, got {type(a).__name__}")
    if a.is_floating_point() or a.is_complex() or a.dtype == torch.bool:
        raise FewflowError(
            f"{what} must hold integer class labels, got dtype {a.dtype}; pass continuous conditioning as c"
        )
    if a.dim() != 1 or a.shape[0] != n:
        raise FewflowError(f"{what} must have shape ({n},), one label per sample, got {tuple(a.shape)}")
    if a.numel() and int(a.min()) < 0:
        raise FewflowError(f"{what} must hold labels 0..K-1, got a negative label {int(a.min())}")
    return a.long()


def as_condition(a: Any, n: int, what: str = "c", dtype: torch.dtype | None = None) -> Tensor:
    """A condition tensor with ``n`` rows ``(n, ...)``, floating (numpy: float32), cast to ``dtype``."""
    if isinstance(a, np.ndarray):
        if a.dtype.kind not in "iuf":
            raise FewflowError(f"{what} must hold numbers, got a numpy array of dtype {a.dtype}")
        a = torch.tensor(a, dtype=torch.float32)
    elif not torch.is_tensor(a):
        raise FewflowError(f"{what} must be {_ARRAY_HINT} with one row per sample, got {type(a).__name__}")
    if a.dim() < 1 or a.shape[0] != n:
        raise FewflowError(f"{what} must be a tensor with {n} rows, got {tuple(a.shape)}")
    if a.dtype == torch.bool or a.is_complex():
        raise FewflowError(f"{what} must hold real numbers, got dtype {a.dtype}")
    if not a.is_floating_point():
        a = a.to(torch.float32)
    return a.to(dtype) if dtype is not None and a.dtype != dtype else a


def _unpack(data: Any) -> tuple[Any, Any, Any] | None:
    """``(x, y, c)`` of in-memory data (a Dataset-like object, a tensor or array, a tuple or a dict), or
    ``None`` for anything else."""
    if _is_array(data):
        return data, None, None
    if isinstance(data, tuple) and 1 <= len(data) <= 3 and _is_array(data[0]):
        return (*data, *([None] * (3 - len(data))))  # type: ignore[return-value]
    if isinstance(data, tuple):
        raise FewflowError(
            f"a data tuple must be (x,), (x, y) or (x, y, c) of tensors or numpy arrays, got {len(data)} "
            f"items starting with a {type(data[0]).__name__ if data else 'nothing'} (a list is read as "
            "batches)"
        )
    if isinstance(data, dict):
        unknown = sorted(str(k) for k in data if k not in ("x", "y", "c"))
        if unknown or "x" not in data:
            raise FewflowError(
                f"a data dict needs 'x' (and optionally 'y', 'c'), got keys {sorted(map(str, data))}"
            )
        return data["x"], data.get("y"), data.get("c")
    if _is_array(getattr(data, "x", None)):  # a fewflow.data.Dataset or anything like it
        return data.x, getattr(data, "y", None), getattr(data, "c", None)
    return None


def _is_map_dataset(data: Any) -> bool:
    from torch.utils.data import Dataset as TorchDataset
    from torch.utils.data import IterableDataset

    return (
        isinstance(data, TorchDataset)
        and not isinstance(data, IterableDataset)
        and hasattr(data, "__len__")
        and hasattr(data, "__getitem__")
    )


def _split_item(item: Any, i: int) -> tuple[Any, Any, Any]:
    """``(sample, label, condition)`` of item ``i`` of a map-style torch Dataset."""
    if isinstance(item, dict):
        if "x" not in item or set(item) - {"x", "y", "c"}:
            raise FewflowError(f"torch Dataset item {i} is a dict with keys {sorted(map(str, item))}; it "
                               "needs 'x' (and optionally 'y', 'c')")
        return item["x"], item.get("y"), item.get("c")
    if isinstance(item, (tuple, list)):
        if not 1 <= len(item) <= 3:
            raise FewflowError(f"torch Dataset item {i} has {len(item)} parts; items must be a sample, "
                               "(sample, label) or (sample, label, condition)")
        return (*item, *([None] * (3 - len(item))))  # type: ignore[return-value]
    return item, None, None


def _as_tensor(v: Any) -> Tensor:
    """A tensor for one item's part; numpy (and Python) floats become float32."""
    if torch.is_tensor(v):
        return v
    try:
        arr = np.asarray(v)
    except (TypeError, ValueError) as e:
        raise FewflowError(f"cannot turn a torch Dataset item's {type(v).__name__} into an array: {e}") \
            from None
    if arr.dtype.kind not in "biuf":
        raise FewflowError(f"torch Dataset items must hold numbers, got dtype {arr.dtype}")
    t = torch.tensor(arr)
    return t.to(torch.float32) if t.is_floating_point() else t


def _label(v: Any, i: int) -> int:
    """Item ``i``'s class label as an int (a Python / numpy integer or a one-element integer tensor)."""
    if isinstance(v, np.ndarray) and v.size == 1 and v.dtype.kind in "iu":
        v = v.reshape(()).item()
    elif torch.is_tensor(v) and v.numel() == 1 and not (v.is_floating_point() or v.is_complex()) \
            and v.dtype != torch.bool:
        v = int(v.item())
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise FewflowError(
            f"torch Dataset item {i}'s label must be one integer class, got {v!r}; pass continuous "
            "conditioning as the item's third part (sample, label, condition)"
        )
    return int(v)


def _stack(parts: list[Any], what: str) -> Tensor:
    rows = [_as_tensor(p) for p in parts]
    shapes = {tuple(r.shape) for r in rows}
    if len(shapes) > 1:
        a, b = sorted(shapes)[:2]
        raise FewflowError(f"torch Dataset items have {what} of different shapes ({a} and {b})")
    return torch.stack(rows)


def as_batch(item: Any, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Normalise an iterator item to ``{"x1": Tensor, **cond}``.

    Accepts a tensor or numpy array (``x1``), a tuple/list ``(x1,)`` or ``(x1, y)``, or a dict with ``"x1"``
    (or ``"x"``) plus conditioning/extra keys passed to the objective as keyword arguments (e.g. ``y``,
    ``c``, ``x0``). Numpy arrays become tensors (floats as float32); floating tensors are cast to ``dtype``.
    """
    if _is_array(item):
        d: dict[str, Any] = {"x1": item}
    elif isinstance(item, dict):
        d = dict(item)
        if "x1" not in d:
            if "x" not in d:
                raise FewflowError(f"a batch dict needs an 'x1' (or 'x') tensor, got keys {sorted(d)}")
            d["x1"] = d.pop("x")
    elif isinstance(item, (tuple, list)):
        if len(item) == 1:
            d = {"x1": item[0]}
        elif len(item) == 2:
            d = {"x1": item[0], "y": item[1]} if item[1] is not None else {"x1": item[0]}
        else:
            raise FewflowError(f"a batch tuple must be (x1,) or (x1, y), got {len(item)} items")
    else:
        raise FewflowError(
            f"cannot use a {type(item).__name__} as a batch (need a tensor, (x1, y) or a dict)"
        )
    if isinstance(d["x1"], np.ndarray) or torch.is_tensor(d["x1"]):
        d["x1"] = as_samples(d["x1"], "batch x1", dtype)
    for k, v in d.items():
        if isinstance(v, np.ndarray):
            v = torch.tensor(v)
            d[k] = v.to(torch.float32) if v.is_floating_point() else (v.long() if k == "y" else v)
        if k != "x1" and torch.is_tensor(d[k]) and d[k].is_floating_point() and dtype is not None:
            d[k] = d[k].to(dtype)
    return d


class BatchSource:
    """The trainer's view of ``data``: ``next()`` -> global batch dict on ``device``, plus a state for resume.

    ``data`` may be a ``fewflow.data.Dataset`` (anything with ``.x`` and optional ``.y`` / ``.c``), a tensor
    or numpy array of examples, a tuple ``(x, y)`` / ``(x, y, c)`` or dict ``{"x", "y", "c"}`` of tensors
    or arrays, a map-style ``torch.utils.data.Dataset`` (items: a sample, ``(sample, label)`` or
    ``(sample, label, condition)``), an iterator (consumed once; its end stops training) or a re-iterable
    (e.g. a ``DataLoader``, restarted at its end). Items of iterators are normalised by :func:`as_batch`.
    For data sets the batch order is restored exactly on resume; an iterator or iterable is restored only if
    it has ``state_dict()`` / ``load_state_dict()``. A data set's optional condition ``c`` is batched as
    ``c=``. ``dtype``: the model's floating dtype, to which floating samples and conditions are cast.
    """

    def __init__(
        self, data: Any, batch_size: int, seed: int, device: torch.device, dtype: torch.dtype | None = None
    ) -> None:
        self.device = device
        self.dtype = dtype
        self.sampler: EpochSampler | None = None
        self._iterable: Iterable | None = None
        self._iterator: Iterator | None = None
        self._dataset: Any = None  # a map-style torch Dataset, indexed one global batch at a time
        self._item_y = self._item_c = False  # its items carry labels / conditions
        self.x: Tensor | None = None
        self.y: Tensor | None = None
        self.c: Tensor | None = None  # an optional condition tensor (N, ...), batched like y as c=
        self.last_shape: tuple[int, ...] | None = None  # one sample's shape in the last batch
        parts = None if isinstance(data, (str, bytes)) else _unpack(data)
        if parts is not None:
            x, y, c = parts
            self.x = as_samples(x, "training data x", dtype)
            if self.x.dim() < 1 or self.x.shape[0] == 0:
                raise FewflowError(
                    f"training data x must be a non-empty batch, got shape {tuple(self.x.shape)}"
                )
            n = self.x.shape[0]
            if isinstance(x, np.ndarray):  # a tensor is the caller's; an array is checked once here
                check_finite("training data x", self.x)
            self.y = as_labels(y, n, "dataset labels y") if y is not None else None
            self.c = as_condition(c, n, "dataset condition c", dtype) if c is not None else None
        elif _is_map_dataset(data):
            n = len(data)
            if n == 0:
                raise FewflowError("the torch Dataset is empty (len 0)")
            x, y, c = _split_item(data[0], 0)
            as_samples(_stack([x], "samples")[0], "torch Dataset item 0's sample")
            self._dataset, self._item_y, self._item_c = data, y is not None, c is not None
        elif isinstance(data, Iterator):
            self._iterator = data
        elif isinstance(data, Iterable) and not isinstance(data, (str, bytes, dict, set, frozenset)):
            self._iterable = data  # iterated from the first batch on (a DataLoader starts no workers before)
        else:
            raise FewflowError(
                "data must be a fewflow.data.Dataset, a tensor or numpy array of samples, a tuple (x, y) "
                "or (x, y, c), a dict with x / y / c, a map-style torch.utils.data.Dataset, a DataLoader, "
                f"or an iterator / iterable of batches; got {type(data).__name__}"
            )
        self.data = data
        if self.x is not None:
            self.x = self.x.to(device)
            self.y = self.y.to(device) if self.y is not None else None
            self.c = self.c.to(device) if self.c is not None else None
            self.sampler = EpochSampler(self.x.shape[0], batch_size, seed)
            self.last_shape = tuple(self.x.shape[1:])
        elif self._dataset is not None:
            self.sampler = EpochSampler(len(self._dataset), batch_size, seed)

    @property
    def has_labels(self) -> bool:
        """Whether batches carry labels ``y``."""
        return self.y is not None or self._item_y

    @property
    def has_condition(self) -> bool:
        """Whether batches carry a condition ``c``."""
        return self.c is not None or self._item_c

    def drop_labels(self) -> None:
        """Leave the labels out of every batch (an unconditional model on labelled data)."""
        self.y, self._item_y = None, False

    def describe(self) -> dict[str, Any]:
        """What the batches hold, for a run's record: ``shape`` (one sample's; ``None`` before the first
        batch of an iterator), ``cond_shape`` (``None`` without ``c``), ``labels`` and ``num_classes``
        (the data set's ``num_classes``, else the largest label + 1, else ``None``)."""
        out: dict[str, Any] = {
            "shape": list(self.last_shape) if self.last_shape is not None else None,
            "cond_shape": None,
            "labels": self.has_labels,
            "num_classes": None,
        }
        k = getattr(self.data, "num_classes", None)
        if isinstance(k, int) and not isinstance(k, bool) and k > 0:
            out["num_classes"] = k
        elif self.y is not None and self.y.numel():
            out["num_classes"] = int(self.y.max()) + 1
        if self.c is not None:
            out["cond_shape"] = [int(v) for v in self.c.shape[1:]]
        elif self._dataset is not None:
            x, _, c = _split_item(self._dataset[0], 0)
            out["shape"] = list(_stack([x], "samples").shape[1:])
            if c is not None:
                out["cond_shape"] = list(_stack([c], "conditions").shape[1:])
        return out

    def _fetch(self, idx: Tensor) -> dict[str, Any]:
        """A global batch of a map-style torch Dataset: its items ``idx`` stacked."""
        items = [_split_item(self._dataset[int(i)], int(i)) for i in idx.tolist()]
        batch: dict[str, Any] = {"x1": as_samples(_stack([it[0] for it in items], "samples"), "samples",
                                                 self.dtype)}
        if self._item_y:
            batch["y"] = torch.tensor([_label(it[1], int(i)) for it, i in zip(items, idx)], dtype=torch.long)
        if self._item_c:
            batch["c"] = as_condition(_stack([it[2] for it in items], "conditions"), len(items), "c",
                                      self.dtype)
        return {k: v.to(self.device) for k, v in batch.items()}

    def next(self) -> dict[str, Any] | None:
        """The next global batch, or ``None`` when a one-shot iterator is exhausted."""
        if self.sampler is not None and self._dataset is not None:
            return self._fetch(self.sampler.next_indices())
        if self.sampler is not None:
            idx = self.sampler.next_indices().to(self.device)
            batch: dict[str, Any] = {"x1": self.x[idx]}
            if self.y is not None:
                batch["y"] = self.y[idx]
            if self.c is not None:
                batch["c"] = self.c[idx]
            return batch
        if self._iterator is None:
            self._iterator = iter(self._iterable)
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
        batch = as_batch(item, self.dtype)
        if not torch.is_tensor(batch["x1"]):
            raise FewflowError(f"batch x1 must be a tensor, got {type(batch['x1']).__name__}")
        self.last_shape = tuple(batch["x1"].shape[1:])
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
