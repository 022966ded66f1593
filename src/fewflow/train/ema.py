"""Exponential moving average of model weights.

``theta_ema <- d * theta_ema + (1 - d) * theta`` after each optimiser step (Polyak & Juditsky,
"Acceleration of Stochastic Approximation by Averaging"; the EMA used for sampling in
Song et al., "Score-Based Generative Modeling through Stochastic Differential Equations").
With warm-up the decay after ``n`` updates is ``min(d, (1 + n) / (10 + n))`` (as in TensorFlow's
``ExponentialMovingAverage(num_updates=...)``), so early weights are forgotten quickly in short runs.
Buffers are copied, not averaged.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from fewflow._validate import FewflowError


class EMA:
    """A frozen copy of ``model`` (``.module``) tracking an exponential moving average of its weights."""

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True) -> None:
        if not 0.0 <= decay < 1.0:
            raise FewflowError(f"EMA decay must lie in [0, 1), got {decay}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.num_updates = 0
        self.module = copy.deepcopy(model)
        self.module.eval()
        self.module.requires_grad_(False)

    def current_decay(self) -> float:
        """The decay the next :meth:`update` will use."""
        if not self.warmup:
            return self.decay
        n = self.num_updates
        return min(self.decay, (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """``ema <- d ema + (1 - d) model`` for floating-point parameters; buffers are copied."""
        d = self.current_decay()
        ema_params = dict(self.module.named_parameters())
        for name, p in model.named_parameters():
            e = ema_params.get(name)
            if e is None:
                raise FewflowError(f"EMA: parameter {name!r} is not in the EMA copy (was the model rebuilt?)")
            if e.is_floating_point():
                e.lerp_(p.detach(), 1.0 - d)
            else:
                e.copy_(p.detach())
        ema_buffers = dict(self.module.named_buffers())
        for name, b in model.named_buffers():
            if name in ema_buffers:
                ema_buffers[name].copy_(b)
        self.num_updates += 1
