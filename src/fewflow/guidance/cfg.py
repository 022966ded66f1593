"""Classifier-free guidance in one batched forward.

Ho & Salimans, "Classifier-Free Diffusion Guidance" (2022): with a model trained with label dropout to
the null class, the guided velocity is

    v_w(x, t | y) = v(x, t | null) + w (v(x, t | y) - v(x, t | null)),

``w = 1`` is the conditional model, ``w = 0`` the unconditional one. The same combination applies to the
average velocity of a flow-map model ``u(x, s, t | y)``. With ``interval=(lo, hi)`` guidance is applied only
for times in ``[lo, hi]`` and the plain conditional prediction is used elsewhere (Kynkaanniemi et al.,
"Applying Guidance in a Limited Interval Improves Sample and Distribution Quality in Diffusion Models",
2024); outside the interval only the conditional half is evaluated.

Condition tensors: with a condition ``c`` (any shape ``(B, ...)``, e.g. a vector) the conditional branch
is ``v(x, t | y, c)`` and the unconditional one ``v(x, t | null)``: the null class (when labels are
given) and the null condition, i.e. the same ``c`` with ``c_mask = False`` (the model's learned null
embedding, see :class:`fewflow.models.embeddings.Conditioning`), so

    v_w(x, t | y, c) = v(x, t | null) + w (v(x, t | y, c) - v(x, t | null)).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from fewflow._validate import FewflowError, as_batch_time, check_finite, check_time

__all__ = ["CFG"]

ScaleFn = Callable[[Tensor, Tensor, Tensor], Tensor | float]


class CFG:
    """Wrap a conditional model (class labels ``y`` and/or a condition tensor ``c``) into a guided
    velocity (or flow-map) model.

    Args:
        model: ``v(x, t, y=..., c=..., c_mask=..., **cond)`` or, if ``model.is_flow_map``,
            ``u(x, s, t, ...)``; label ``num_classes`` is the null (unconditional) class and
            ``c_mask = False`` marks a null condition ``c``.
        scale: the guidance weight ``w`` (a float), or a function ``scale(t, v_c, v_u) -> float | (B,)``
            for adaptive schedules (e.g. RAAG); ``t`` is the ``(B,)`` time of ``x``.
        num_classes: K; the null label is ``K``. Needed only when called with labels ``y`` (``None``
            for a model conditioned on ``c`` alone).
        interval: optional ``(lo, hi)``; guidance only where the time of ``x`` (``t``, or ``s`` for a flow
            map) lies in ``[lo, hi]``, the conditional prediction elsewhere.

    Calling ``cfg(x, t, y=labels)`` (or ``cfg(x, s, t, y=labels)``, or ``c=cond`` in place of or beside
    ``y``) makes exactly one model forward: a ``2B`` batch ``[x, x]`` with labels ``[y, null]`` and
    conditions ``[c, c]`` with ``c_mask = [c_mask or True, False]`` when guidance is active, a ``B`` batch
    otherwise. Other tensor keyword arguments with batch dimension B are duplicated along the batch.
    """

    def __init__(
        self,
        model: Callable[..., Tensor],
        scale: float | ScaleFn,
        num_classes: int | None = None,
        interval: tuple[float, float] | None = None,
    ) -> None:
        if num_classes is not None and (
            isinstance(num_classes, bool) or int(num_classes) != num_classes or int(num_classes) < 1
        ):
            raise FewflowError(f"num_classes must be a positive integer or None, got {num_classes!r}")
        if not callable(scale):
            try:
                scale = float(scale)
            except (TypeError, ValueError) as err:
                raise FewflowError(f"scale must be a number or a callable, got {scale!r}") from err
            if not math.isfinite(scale):
                raise FewflowError(f"scale must be a finite number, got {scale}")
        if interval is not None:
            lo, hi = (float(v) for v in interval)
            if not lo <= hi:
                raise FewflowError(f"interval must be (lo, hi) with lo <= hi, got {interval}")
            interval = (lo, hi)
        self.model = model
        self.scale = scale
        self.num_classes = None if num_classes is None else int(num_classes)
        self.interval = interval
        self.is_flow_map = bool(getattr(model, "is_flow_map", False))

    def _expected_times(self) -> int:
        return 2 if self.is_flow_map else 1

    def __call__(self, x: Tensor, *times: Tensor | float, y: Tensor | None = None, **cond: Any) -> Tensor:
        if len(times) != self._expected_times():
            kind = "u(x, s, t, y=...)" if self.is_flow_map else "v(x, t, y=...)"
            raise FewflowError(f"CFG of this model is called as {kind}; got {len(times)} time arguments")
        if not torch.is_tensor(x) or x.dim() < 2 or not x.is_floating_point():
            got = f"{x.dtype} {tuple(x.shape)}" if torch.is_tensor(x) else type(x).__name__
            raise FewflowError(f"x must be a batched floating-point tensor (B, ...), got {got}")
        check_finite("x", x)
        if torch.is_tensor(y) and (y.is_floating_point() or y.is_complex()):
            raise FewflowError(f"class labels y must be integers (LongTensor), got {y.dtype}")
        for name, t in zip(("s", "t") if self.is_flow_map else ("t",), times):
            check_time(t, name)  # NaN or outside [0, 1]: a caller's bug, not something to guide
        c, c_mask = cond.pop("c", None), cond.pop("c_mask", None)
        if y is None and c is None:
            raise FewflowError("CFG needs class labels y (LongTensor of shape (B,)) or a condition c")
        b = x.shape[0]
        own: dict[str, Tensor] = {}  # the model's conditioning, conditional branch
        if y is not None:
            if self.num_classes is None:
                raise FewflowError("CFG with class labels y needs num_classes (the null label)")
            if not torch.is_tensor(y) or y.shape != (b,):
                raise FewflowError(f"y must be a tensor of shape ({b},), got {getattr(y, 'shape', type(y))}")
            if y.numel() and (int(y.min()) < 0 or int(y.max()) > self.num_classes):
                raise FewflowError(
                    f"labels y must lie in [0, {self.num_classes}] (the last is the null class)"
                )
            own["y"] = y
        if c is not None:
            if not torch.is_tensor(c) or c.dim() < 1 or c.shape[0] != b:
                got = getattr(c, "shape", type(c))
                raise FewflowError(f"condition c must be a tensor of shape ({b}, ...), got {got}")
            if c_mask is not None and (not torch.is_tensor(c_mask) or c_mask.shape != (b,)):
                got = getattr(c_mask, "shape", type(c_mask))
                raise FewflowError(f"c_mask must be a bool tensor of shape ({b},), got {got}")
            own["c"] = c
            if c_mask is not None:
                own["c_mask"] = c_mask
        ts = tuple(as_batch_time(t, x) for t in times)
        t_ref = ts[0]
        scale_is_one = not callable(self.scale) and self.scale == 1.0
        if scale_is_one:
            return self.model(x, *ts, **own, **cond)
        mask = None
        if self.interval is not None:
            lo, hi = self.interval
            mask = (t_ref >= lo) & (t_ref <= hi)
            if not bool(mask.any()):
                return self.model(x, *ts, **own, **cond)
            if bool(mask.all()):
                mask = None

        def dup(v: Any) -> Any:
            return torch.cat([v, v]) if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == b else v

        both: dict[str, Tensor] = {}  # [conditional, null] halves
        if y is not None:
            both["y"] = torch.cat([y, torch.full_like(y, self.num_classes)])
        if c is not None:
            keep = torch.ones(b, dtype=torch.bool, device=c.device) if c_mask is None else c_mask.bool()
            both["c"], both["c_mask"] = torch.cat([c, c]), torch.cat([keep, torch.zeros_like(keep)])
        out = self.model(
            torch.cat([x, x]), *(torch.cat([t, t]) for t in ts), **both,
            **{k: dup(v) for k, v in cond.items()},
        )
        v_c, v_u = out[:b], out[b:]
        w = self.scale(t_ref, v_c, v_u) if callable(self.scale) else self.scale
        if torch.is_tensor(w) and w.dim() > 0:
            w = w.reshape(b, *([1] * (x.dim() - 1)))
        guided = v_u + w * (v_c - v_u)
        if mask is not None:
            guided = torch.where(mask.reshape(b, *([1] * (x.dim() - 1))), guided, v_c)
        return guided

    def __repr__(self) -> str:
        return f"CFG(scale={self.scale!r}, num_classes={self.num_classes}, interval={self.interval})"
