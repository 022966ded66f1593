"""What every objective returns, and the protocol the trainer relies on."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor


@dataclass
class LossOutput:
    """A scalar to minimise plus named diagnostics (plain floats, for logging)."""

    loss: Tensor
    diagnostics: dict[str, float] = field(default_factory=dict)


class Objective(Protocol):
    """``objective(model, x1, generator=None, **cond) -> LossOutput``: one training loss."""

    def __call__(
        self, model: Any, x1: Tensor, *, generator: torch.Generator | None = None, **cond: Any
    ) -> LossOutput: ...
