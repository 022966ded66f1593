"""Wall-time and NFE bookkeeping: the solver counts NFEs; this module only times and reports them."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from fewflow._validate import FewflowError


def nfe_of(result: Any) -> int:
    """The number of function evaluations recorded by a solver result (``SolveResult.nfe``)."""
    nfe = getattr(result, "nfe", None)
    if nfe is None:
        raise FewflowError(f"{type(result).__name__} has no 'nfe' attribute (expected a SolveResult)")
    return int(nfe)


@dataclass
class CostMeter:
    """Context manager timing a block (synchronising ``device`` if it is a CUDA device) and summing NFEs.

    >>> with CostMeter() as cost:
    ...     res = solve(model, x0, steps=4)
    ...     cost.add(res)           # doctest: +SKIP
    >>> cost.summary()              # {'wall_s': ..., 'nfe': 4, ...}  # doctest: +SKIP
    """

    device: torch.device | str | None = None
    wall_s: float = 0.0
    nfe: int = 0
    n_samples: int = 0
    _start: float | None = field(default=None, repr=False)

    def _sync(self) -> None:
        dev = torch.device(self.device) if self.device is not None else None
        if dev is not None and dev.type == "cuda" and torch.cuda.is_available():
            torch.cuda.synchronize(dev)

    def __enter__(self) -> CostMeter:
        self._sync()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self._sync()
        assert self._start is not None
        self.wall_s += time.perf_counter() - self._start
        self._start = None

    def add(self, result: Any, n_samples: int | None = None) -> None:
        """Add a solver result's NFE (and its batch size, from ``result.x``, unless given)."""
        self.nfe += nfe_of(result)
        if n_samples is None:
            x = getattr(result, "x", None)
            n_samples = int(x.shape[0]) if torch.is_tensor(x) and x.dim() > 0 else 0
        self.n_samples += n_samples

    def summary(self) -> dict[str, float]:
        """``wall_s``, ``nfe``, ``n_samples`` and ``ms_per_sample`` as plain numbers."""
        per = 1000.0 * self.wall_s / self.n_samples if self.n_samples else float("nan")
        return {"wall_s": self.wall_s, "nfe": float(self.nfe), "n_samples": float(self.n_samples),
                "ms_per_sample": per}


Timer = CostMeter
