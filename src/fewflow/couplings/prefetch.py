"""Compute couplings for upcoming batches in a background thread, overlapping them with the network step.

Exact minibatch OT costs an O(B^3) assignment per batch (about 10 ms for B = 512 on one CPU core), which
would otherwise sit on the training critical path. ``scipy.optimize.linear_sum_assignment`` and the torch
kernels that build the cost matrix release the GIL (measured: a pure-Python loop in the main thread is not
slowed while the assignment runs in a thread), so threads suffice: no worker process, no pickling of
batches. A producer thread reads batches and draws ``x0``; ``num_workers`` threads solve the couplings of
successive batches in parallel, and results come out in batch order. Throughput is bounded by
``num_workers * (network step time) / (coupling time)``: when one assignment takes longer than one training
step (e.g. B = 512 two-dimensional data, where the Hungarian solve is slow), use more workers on a machine
with spare cores.
"""

from __future__ import annotations

import multiprocessing
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any

import torch
from torch import Tensor

from fewflow._validate import FewflowError
from fewflow.couplings.base import Coupling, CouplingResult, randn_like

_END = object()


def _init_process_worker() -> None:
    """Each coupling process uses one thread: it shares the machine with the training process."""
    torch.set_num_threads(1)


def _couple_in_process(
    coupling: Coupling, x0: Tensor, x1: Tensor, y: Tensor | None, seed: int | None
) -> CouplingResult:
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return coupling(x0, x1, y=y, generator=gen)


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class PrefetchCoupler:
    """An iterator of :class:`CouplingResult`s whose couplings were computed ahead in a background thread.

    Usage (what the trainer does)::

        coupler = PrefetchCoupler(loader, ExactOTCoupling(), depth=2, seed=0)
        with coupler:                                  # or call coupler.close() when done
            for batch in coupler:                      # batch: CouplingResult (x0 already paired to x1)
                out = cfm_loss.result_loss(model, batch)   # = cfm_loss.pair_loss(model, batch.x0, batch.x1,
                out.loss.backward()                        #        weights=batch.weights, y=batch.y)

    Args:
        loader_or_sampler: either an iterable of batches (e.g. a ``DataLoader``; one pass over it per
            ``iter()``), or a zero-argument callable returning a batch (called forever, or ``max_batches``
            times). A batch is a tensor ``x1``, or a tuple/list ``(x1, y, ...)`` (second item: labels).
        coupling: any :class:`~fewflow.couplings.Coupling`.
        depth: how many batches may be in flight or waiting (>= 1; raised to ``num_workers`` if smaller).
        num_workers: threads solving couplings in parallel (>= 1).
        source: what ``x0`` is; an object with ``sample_like(x1, generator=...)`` (a ``fewflow.sources``
            source). ``None``: standard normal noise shaped like ``x1``.
        seed: seeds the producer's own ``torch.Generator`` for ``x0`` (batch n's random coupling, e.g.
            Sinkhorn sampling, gets a generator seeded from ``(seed, n)``), so a run is reproducible given a
            deterministic loader, whatever ``num_workers``. ``None``: unseeded.
        device: if given, results are moved there (non-blocking) in the background thread.
        max_batches: stop after this many batches (useful with a callable sampler).
        backend: ``"thread"`` (default) solves in threads of this process -- enough for solvers that
            release the GIL (scipy's ``linear_sum_assignment``); ``"process"`` solves in spawned worker
            processes (one thread each), needed for solvers that hold the GIL (POT's ``ot.emd``, the fastest
            exact solver on low-dimensional data). Batches are on the CPU in that case (``device`` moves the
            results afterwards) and the coupling object must be picklable.

    Errors raised in the background (bad batch, failed coupling) are re-raised by ``next()``. The thread
    stops at the end of the data, on :meth:`close`, or when the object is garbage collected.
    """

    def __init__(
        self,
        loader_or_sampler: Iterable[Any] | Callable[[], Any],
        coupling: Coupling,
        depth: int = 2,
        *,
        source: Any = None,
        seed: int | None = None,
        device: torch.device | str | None = None,
        max_batches: int | None = None,
        num_workers: int = 1,
        backend: str = "thread",
    ) -> None:
        if not isinstance(depth, int) or depth < 1:
            raise FewflowError(f"depth must be a positive integer, got {depth!r}")
        if not isinstance(num_workers, int) or num_workers < 1:
            raise FewflowError(f"num_workers must be a positive integer, got {num_workers!r}")
        if backend not in ("thread", "process"):
            raise FewflowError(f"unknown backend {backend!r}; choose one of: process, thread")
        if not callable(coupling):
            raise FewflowError(f"coupling must be a Coupling, got {type(coupling).__name__}")
        is_iter = hasattr(loader_or_sampler, "__iter__")
        if not is_iter and not callable(loader_or_sampler):
            raise FewflowError(
                "loader_or_sampler must be an iterable of batches or a callable returning a batch, "
                f"got {type(loader_or_sampler).__name__}"
            )
        if max_batches is not None and max_batches < 0:
            raise FewflowError(f"max_batches must be >= 0, got {max_batches}")
        self.loader = loader_or_sampler
        self.coupling = coupling
        self.depth = depth
        self.source = source
        self.seed = seed
        self.device = torch.device(device) if device is not None else None
        self.max_batches = max_batches
        self.num_workers = num_workers
        self.backend = backend
        self._pool: Executor | None = None
        self._queue: queue.Queue[Any] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- producer -------------------------------------------------------------------------------------
    def _batches(self) -> Iterator[Any]:
        if hasattr(self.loader, "__iter__"):
            yield from iter(self.loader)  # type: ignore[arg-type]
        else:
            while True:
                yield self.loader()  # type: ignore[operator]

    @staticmethod
    def _split(batch: Any) -> tuple[Tensor, Tensor | None]:
        if torch.is_tensor(batch):
            return batch, None
        if isinstance(batch, (tuple, list)) and len(batch) >= 1 and torch.is_tensor(batch[0]):
            y = batch[1] if len(batch) >= 2 and torch.is_tensor(batch[1]) else None
            return batch[0], y
        raise FewflowError(
            f"a batch must be a tensor x1 or a tuple (x1, y, ...), got {type(batch).__name__}"
        )

    def _put(self, q: queue.Queue[Any], item: Any) -> bool:
        while not self._stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _couple(self, x0: Tensor, x1: Tensor, y: Tensor | None, seed: int | None) -> CouplingResult:
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        return self.coupling(x0, x1, y=y, generator=gen)

    def _work(self, q: queue.Queue[Any], pool: Executor) -> None:
        gen = torch.Generator().manual_seed(self.seed) if self.seed is not None else None
        try:
            for n, batch in enumerate(self._batches()):
                if self._stop.is_set() or (self.max_batches is not None and n >= self.max_batches):
                    break
                x1, y = self._split(batch)
                if self.device is not None and self.backend == "thread":
                    x1 = x1.to(self.device, non_blocking=True)
                    y = y.to(self.device, non_blocking=True) if y is not None else None
                if self.source is None:
                    x0 = randn_like(x1, gen)
                else:
                    x0 = self.source.sample_like(x1, generator=gen)
                seed = None if self.seed is None else (self.seed * 1_000_003 + n + 1) % (2**63)
                if self.backend == "process":
                    fut = pool.submit(_couple_in_process, self.coupling, x0, x1, y, seed)
                else:
                    fut = pool.submit(self._couple, x0, x1, y, seed)
                if not self._put(q, fut):
                    return
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer thread
            self._put(q, _Failure(exc))
            return
        self._put(q, _END)

    # -- consumer -------------------------------------------------------------------------------------
    def start(self) -> PrefetchCoupler:
        """Start (or restart, after the data ran out) the background thread; returns ``self``."""
        if self._thread is not None and self._thread.is_alive():
            return self
        self._stop.clear()
        self._queue = queue.Queue(maxsize=max(self.depth, self.num_workers))
        if self._pool is None:
            if self.backend == "process":
                self._pool = ProcessPoolExecutor(
                    self.num_workers,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=_init_process_worker,
                )
            else:
                self._pool = ThreadPoolExecutor(self.num_workers, thread_name_prefix="fewflow-coupling")
        self._thread = threading.Thread(
            target=self._work, args=(self._queue, self._pool), name="fewflow-prefetch-coupler", daemon=True
        )
        self._thread.start()
        return self

    def __iter__(self) -> PrefetchCoupler:
        return self.start()

    def __next__(self) -> CouplingResult:
        if self._queue is None:
            self.start()
        assert self._queue is not None
        while True:
            try:
                item = self._queue.get(timeout=0.1)
                break
            except queue.Empty:
                if self._thread is None or not self._thread.is_alive():
                    if self._queue.empty():
                        self._queue = None
                        raise StopIteration from None
        if item is _END:
            self._thread = None
            self._queue = None
            raise StopIteration
        if isinstance(item, _Failure):
            self.close()
            raise item.exc
        try:
            res = item.result()
        except BaseException:
            self.close()
            raise
        if self.device is not None and self.backend == "process":
            res = _to_device(res, self.device)
        return res

    def close(self) -> None:
        """Stop the background thread and drop queued batches."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        self._thread = None
        self._queue = None
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> PrefetchCoupler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()

    def __repr__(self) -> str:
        return (
            f"PrefetchCoupler(coupling={self.coupling!r}, depth={self.depth}, "
            f"num_workers={self.num_workers}, backend={self.backend!r})"
        )


def _to_device(res: CouplingResult, device: torch.device) -> CouplingResult:
    import dataclasses

    moved = {
        f.name: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v)
        for f in dataclasses.fields(res)
        for v in [getattr(res, f.name)]
    }
    return CouplingResult(**moved)
