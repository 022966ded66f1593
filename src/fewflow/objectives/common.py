"""Small helpers shared by the objectives: source draws, label / condition dropout, per-sample errors, checks.

One copy of each so that every loss (CFM, MeanFlow, SplitMeanFlow, MF-RAE, MDT-dist, consistency,
Rectified Diffusion, ...) draws noise, drops labels and validates its model the same way.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from fewflow._validate import FewflowError, check_batch, check_finite, check_same_shape
from fewflow.couplings.base import rand, randn_like
from fewflow.objectives.base import LossOutput

__all__ = [
    "SampledTimesObjective",
    "check_flow_map",
    "check_linear_path",
    "drop_labels",
    "is_ddp",
    "per_sample_sq",
    "rand",
    "randn_like",
    "sample_source",
    "select_rows",
    "unwrap",
]


def is_ddp(model: Any) -> bool:
    """True for a ``DistributedDataParallel`` / ``DataParallel`` wrapper."""
    return isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel))


def unwrap(model: Any) -> Any:
    """The module inside a DDP wrapper (``torch.func`` transforms need the bare module)."""
    return model.module if is_ddp(model) else model


def check_flow_map(model: Any, who: str) -> None:
    """Raise unless ``model`` is a flow-map model ``u(x, s, t, **cond)`` (``is_flow_map`` not False)."""
    if getattr(unwrap(model), "is_flow_map", True) is False:
        raise FewflowError(
            f"{who} needs a flow-map model u(x, s, t, **cond) (is_flow_map=True), got a velocity model "
            f"{type(unwrap(model)).__name__}; build it with flow_map=True"
        )


def check_linear_path(path: Any, who: str) -> None:
    """Accept ``None``/``"linear"`` or an affine path with ``alpha_t = t``, ``sigma_t = 1 - t``."""
    if path is None or path == "linear":
        return
    sched = getattr(path, "schedule", path)
    try:
        tt = torch.linspace(0.0, 1.0, 7, dtype=torch.float64)
        ok = torch.allclose(sched.alpha(tt), tt) and torch.allclose(sched.sigma(tt), 1.0 - tt)
    except Exception as exc:  # noqa: BLE001 - any failure means "not a usable linear path"
        raise FewflowError(f"{who} supports the linear path only; cannot evaluate {path!r}: {exc}") from exc
    if not ok:
        raise FewflowError(
            f"{who} supports the linear path only (x_t = t x1 + (1 - t) x0), got {path!r}; its identity "
            "uses the straight-line conditional velocity x1 - x0"
        )


def sample_source(source: Any, x1: Tensor, generator: torch.Generator | None) -> Tensor:
    """``x0`` shaped like ``x1``: standard normal noise when ``source`` is None, else
    ``source.sample_like(x1, generator=...)`` (checked for shape, moved to ``x1``'s device and dtype)."""
    if source is None:
        return randn_like(x1, generator)
    x0 = source.sample_like(x1, generator=generator)
    check_same_shape("source sample x0", x0, "x1", x1)
    return x0.to(device=x1.device, dtype=x1.dtype)


def drop_labels(
    cond: dict[str, Any], p: float, num_classes: int | None, like: Tensor, generator: torch.Generator | None
) -> tuple[dict[str, Any], Tensor | None]:
    """Classifier-free-guidance training (Ho & Salimans 2022): drop each row's condition with probability
    ``p``. Returns ``(cond, mask of dropped rows or None)``.

    One Bernoulli draw per row, ``d_i ~ Bernoulli(p)``, drops *every* condition of that row together (so
    the model learns ``v(x, t | null)``, the unconditional branch CFG and RAAG evaluate):

    * class labels: ``y_i <- num_classes`` (the null class) where ``d_i``;
    * a condition tensor ``c`` (any shape ``(B, ...)``): ``c`` is kept as is and ``c_mask_i <- c_mask_i and
      not d_i`` is added to ``cond`` (``c_mask`` False = null row: the model uses its learned null
      embedding there, see :class:`fewflow.models.embeddings.Conditioning`).

    The draw is the same whether ``y``, ``c`` or both are passed (``rand(B)`` on ``like``'s device)."""
    if p <= 0.0:
        return cond, None
    y, c = cond.get("y"), cond.get("c")
    if y is None and c is None:
        raise FewflowError("label_dropout > 0 but neither labels y nor a condition c were passed")
    if y is not None and num_classes is None:
        raise FewflowError("label_dropout > 0 needs num_classes (the null label is y = num_classes)")
    drop = rand((y if y is not None else c).shape[0], like, generator) < p
    out = dict(cond)
    if y is not None:
        out["y"] = torch.where(drop.to(y.device), torch.full_like(y, int(num_classes)), y)
    if c is not None:
        keep = ~drop.to(c.device)
        mask = cond.get("c_mask")
        out["c_mask"] = keep if mask is None else keep & mask.to(c.device).bool()
    return out, drop


def per_sample_sq(err: Tensor, reduction: str = "mean") -> Tensor:
    """Per-sample squared error ``(B,)``: summed (``"sum"``) or averaged (``"mean"``) over data dims."""
    flat = err.reshape(err.shape[0], -1).pow(2)
    return flat.sum(1) if reduction == "sum" else flat.mean(1)


def select_rows(cond: dict[str, Any], mask: Tensor) -> dict[str, Any]:
    """Select the masked rows of every batch-shaped conditioning tensor (others pass through)."""
    n = mask.shape[0]
    return {
        k: (v[mask.to(v.device)] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == n else v)
        for k, v in cond.items()
    }


class SampledTimesObjective:
    """Base of the flow-map objectives that draw ``x0`` from a source, sample times and drop labels, then
    score ``loss_at(model, x0, x1, *times, **cond)`` (MeanFlow, SplitMeanFlow, consistency, shortcut,
    MF-RAE distillation). Subclasses set ``source``, ``label_dropout``, ``num_classes`` and implement
    ``sample_times(n, like, generator) -> tuple of (B,) tensors`` and ``loss_at``; ``pass_dropped = True``
    also hands ``loss_at`` the mask of rows whose label was dropped (MeanFlow's guided target needs it)."""

    source: Any = None
    label_dropout: float = 0.0
    num_classes: int | None = None
    pass_dropped: bool = False

    def sample_times(self, n: int, like: Tensor, generator: torch.Generator | None) -> tuple[Tensor, ...]:
        raise NotImplementedError

    def loss_at(self, model: Any, x0: Tensor, x1: Tensor, *times: Tensor, **cond: Any) -> LossOutput:
        raise NotImplementedError

    def __call__(
        self, model: Any, x1: Tensor, *, generator: torch.Generator | None = None, **cond: Any
    ) -> LossOutput:
        check_finite("x1", x1)
        check_batch("x1", x1)
        x0 = sample_source(self.source, x1, generator)
        times = self.sample_times(x1.shape[0], x1, generator)
        cond, dropped = drop_labels(cond, self.label_dropout, self.num_classes, x1, generator)
        if self.pass_dropped:
            cond["dropped"] = dropped
        return self.loss_at(model, x0, x1, *times, **cond)
