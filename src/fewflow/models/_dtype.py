"""One input check shared by the networks: inputs in another float precision are cast to the weights'."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fewflow._validate import FewflowError

__all__ = ["param_dtype_inputs"]


def param_dtype_inputs(module: nn.Module, x: Tensor, c: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """``(x, c)`` cast to the dtype of ``module``'s parameters when they are floating point in another
    precision (a float64 solver state or float16 data into a float32 network, or float32 into a
    ``.half()`` one); the times follow ``x`` (``parse_times``), so the output is in the parameters' dtype.
    Integer or boolean ``x`` is refused (e.g. uint8 images must be scaled to the data range first)."""
    if not torch.is_tensor(x):
        raise FewflowError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise FewflowError(f"x must be a floating-point tensor, got {x.dtype}")
    p = next(module.parameters(), None)
    if p is None or not p.is_floating_point():
        return x, c
    if x.dtype != p.dtype:
        x = x.to(p.dtype)
    if torch.is_tensor(c) and c.is_floating_point() and c.dtype != p.dtype:
        c = c.to(p.dtype)
    return x, c
