"""Learning-rate schedules: linear warm-up, then constant, cosine or linear decay.

The schedule is a pure function of the step, :func:`lr_factor`; :func:`make_scheduler` wraps it in a
``torch.optim.lr_scheduler.LambdaLR`` whose state (``last_epoch``) is saved in checkpoints.
Cosine decay follows Loshchilov & Hutter, "SGDR: Stochastic Gradient Descent with Warm Restarts"
(one cycle, no restarts); warm-up follows Goyal et al., "Accurate, Large Minibatch SGD".
"""

from __future__ import annotations

import functools
import math

import torch

from fewflow._validate import FewflowError, unknown_name
from fewflow.train.config import SCHEDULES


def lr_factor(
    step: int, *, total: int, warmup: int = 0, schedule: str = "constant", min_ratio: float = 0.0
) -> float:
    """Multiplier of the base learning rate used for optimiser step ``step + 1`` (``step`` = steps done).

    Warm-up: ``f = (step + 1) / warmup`` for ``step < warmup``. After it, with progress
    ``p = (step - warmup) / max(1, total - warmup)`` clamped to ``[0, 1]`` and ``m = min_ratio``:

    - ``"constant"``: ``f = 1``
    - ``"cosine"``: ``f = m + (1 - m) * (1 + cos(pi p)) / 2``
    - ``"linear"``: ``f = m + (1 - m) * (1 - p)``
    """
    if schedule not in SCHEDULES:
        raise unknown_name("lr schedule", schedule, SCHEDULES)
    if step < 0 or total < 1 or warmup < 0:
        raise FewflowError(
            f"lr_factor needs step >= 0, total >= 1, warmup >= 0; got {step}, {total}, {warmup}"
        )
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    p = min(1.0, max(0.0, (step - warmup) / max(1, total - warmup)))
    if schedule == "cosine":
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))
    return min_ratio + (1.0 - min_ratio) * (1.0 - p)


def make_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    total: int,
    warmup: int = 0,
    schedule: str = "constant",
    min_ratio: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` applying :func:`lr_factor`; call ``.step()`` once after each optimiser step."""
    lr_factor(0, total=total, warmup=warmup, schedule=schedule, min_ratio=min_ratio)  # validates
    fn = functools.partial(lr_factor, total=total, warmup=warmup, schedule=schedule, min_ratio=min_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
