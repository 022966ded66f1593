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
        self._cache: tuple[int, tuple[list, list, list, list]] | None = None

    def current_decay(self) -> float:
        """The decay the next :meth:`update` will use."""
        if not self.warmup:
            return self.decay
        n = self.num_updates
        return min(self.decay, (1.0 + n) / (10.0 + n))

    def _param_pairs(self, model: nn.Module) -> tuple[list, list, list, list]:
        """(EMA float params, model float params, EMA other params, model other params), cached per model."""
        if self._cache is None or self._cache[0] != id(model):
            ema_params = dict(self.module.named_parameters())
            ef, mf, eo, mo = [], [], [], []
            for name, p in model.named_parameters():
                e = ema_params.get(name)
                if e is None or e.shape != p.shape:
                    raise FewflowError(f"EMA: parameter {name!r} does not match the EMA copy")
                (ef if e.is_floating_point() else eo).append(e)
                (mf if e.is_floating_point() else mo).append(p)
            self._cache = (id(model), (ef, mf, eo, mo))
        return self._cache[1]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """``ema <- d ema + (1 - d) model`` for floating-point parameters; buffers are copied."""
        d = self.current_decay()
        ef, mf, eo, mo = self._param_pairs(model)
        if ef:
            torch._foreach_lerp_(ef, [p.detach() for p in mf], 1.0 - d)
        for e, p in zip(eo, mo):
            e.copy_(p.detach())
        ema_buffers = dict(self.module.named_buffers())
        for name, b in model.named_buffers():
            if name in ema_buffers:
                ema_buffers[name].copy_(b)
        self.num_updates += 1
