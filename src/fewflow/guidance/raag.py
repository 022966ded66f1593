"""RAAG: Ratio-Aware Adaptive Guidance.

Paper: *Ratio-Aware Adaptive Guidance* (Zhu et al., arXiv 2508.03442). No official code (see
``docs/methods/raag.md``).

With the conditional and unconditional predictions ``v_c = v(x, t | y)``, ``v_u = v(x, t | null)`` of a
model trained with label dropout, RAAG measures per sample the ratio of the guidance signal to the
unconditional prediction -- the paper's RATIO, a ratio of *squared* norms (the default)::

    r = || v_c - v_u ||^2 / max(|| v_u ||, eps)^2       (``squared=False``: r = ||v_c - v_u|| / ||v_u||)

(norms over all non-batch dimensions) and replaces the constant CFG weight by the closed-form decay

    w(r) = 1 + (w_max - 1) exp(-alpha r),      v_guided = v_u + w(r) (v_c - v_u).

The ratio spikes at the first, noisiest step: at t = 0 the state is pure noise ``x_0`` and, for the exact
velocities of the linear path, ``v_c = E[x_1 | y] - x_0`` and ``v_u = E[x_1] - x_0``, so
``r_0 = ||E[x_1 | y] - E[x_1]||^2 / ||E[x_1] - x_0||^2`` -- set by the data's class-mean shift alone -- while
near the data the class posterior is sharp and ``v_c ~ v_u``. Guidance is damped exactly where strong CFG
overshoots at low NFE. ``alpha = 0`` gives constant CFG with scale
``w_max``. Both predictions come from ONE batched forward: RAAG composes :class:`fewflow.guidance.CFG`
with an adaptive scale, so the batching (``[x, x]`` with labels ``[y, null]``), label checks, flow-map
support and guidance interval are CFG's. ``alpha`` and ``w_max`` have no defaults: a third-party ComfyUI
port uses ``alpha = 12``, ``w_max = 18`` for SD-class latents, not toys; ``eps = 1e-8``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fewflow._validate import FewflowError
from fewflow.guidance.cfg import CFG

__all__ = ["RAAG", "RatioRecord", "plot_ratio_history", "raag_ratio", "raag_scale"]


def raag_ratio(v_c: Tensor, v_u: Tensor, squared: bool = True, eps: float = 1e-8) -> Tensor:
    """Per-sample ``||v_c - v_u||^2 / max(||v_u||, eps)^2`` (the paper's RATIO), shape ``(B,)``;
    ``squared=False`` gives the unsquared ``||v_c - v_u|| / max(||v_u||, eps)``."""
    if v_c.shape != v_u.shape:
        raise FewflowError(f"v_c has shape {tuple(v_c.shape)} but v_u has shape {tuple(v_u.shape)}")
    num = (v_c - v_u).flatten(1).norm(dim=1)
    den = v_u.flatten(1).norm(dim=1).clamp_min(eps)
    r = num / den
    return r * r if squared else r


def raag_scale(ratio: Tensor, w_max: float, alpha: float) -> Tensor:
    """``w = 1 + (w_max - 1) exp(-alpha ratio)``, elementwise."""
    return 1.0 + (w_max - 1.0) * torch.exp(-alpha * ratio)


@dataclass
class RatioRecord:
    """One guided call: the ``(B,)`` time, ratio and guidance scale, detached on the CPU."""

    t: Tensor
    ratio: Tensor
    scale: Tensor


class RAAG:
    """Ratio-aware adaptive CFG as a velocity (or flow-map) model ``raag(x, t, y=labels)`` (or ``c=cond``).

    Args:
        model: conditional model, label ``num_classes`` = null class (as for :class:`CFG`).
        w_max: the guidance scale reached when the ratio is 0 (``>= 0``; ``1`` = the conditional model).
        alpha: decay rate ``>= 0``; ``alpha = 0`` is constant CFG with scale ``w_max``.
        num_classes: K (null label K); ``None`` for a model conditioned on a tensor ``c`` alone (its
            unconditional branch is the null condition, ``c_mask = False``; see :class:`CFG`).
        squared: the paper's ratio of squared norms (default True); False for the unsquared ratio
            (its square root, which needs a different ``alpha`` for the same damping).
        eps: floor of ``||v_u||`` (near data ``v_u`` can vanish).
        interval: optional CFG guidance interval ``(lo, hi)``.
        record: append a :class:`RatioRecord` to ``ratio_history`` at every guided call (opt-in; clear it
            with ``ratio_history.clear()`` between runs). No step counter is kept: records carry their time.
    """

    def __init__(
        self,
        model: Callable[..., Tensor],
        w_max: float,
        alpha: float,
        num_classes: int | None = None,
        squared: bool = True,
        eps: float = 1e-8,
        interval: tuple[float, float] | None = None,
        record: bool = False,
    ) -> None:
        w_max, alpha, eps = float(w_max), float(alpha), float(eps)
        if not math.isfinite(w_max) or w_max < 0:
            raise FewflowError(f"w_max must be a finite number >= 0, got {w_max}")
        if not math.isfinite(alpha) or alpha < 0:
            raise FewflowError(f"alpha must be a finite number >= 0, got {alpha}")
        if not eps > 0:
            raise FewflowError(f"eps must be > 0, got {eps}")
        self.w_max, self.alpha, self.eps = w_max, alpha, eps
        self.squared = bool(squared)
        self.record = bool(record)
        self.ratio_history: list[RatioRecord] = []
        self.cfg = CFG(model, scale=self._scale, num_classes=num_classes, interval=interval)
        self.is_flow_map = self.cfg.is_flow_map
        self.num_classes = self.cfg.num_classes

    def _scale(self, t: Tensor, v_c: Tensor, v_u: Tensor) -> Tensor:
        r = raag_ratio(v_c, v_u, squared=self.squared, eps=self.eps)
        w = raag_scale(r, self.w_max, self.alpha)
        if self.record:
            self.ratio_history.append(
                RatioRecord(t=t.detach().cpu(), ratio=r.detach().cpu(), scale=w.detach().cpu())
            )
        return w

    def __call__(self, x: Tensor, *times: Tensor | float, y: Tensor | None = None, **cond: Any) -> Tensor:
        return self.cfg(x, *times, y=y, **cond)

    def __repr__(self) -> str:
        return (f"RAAG(w_max={self.w_max}, alpha={self.alpha}, squared={self.squared}, "
                f"num_classes={self.num_classes}, interval={self.cfg.interval})")


def plot_ratio_history(
    history: Sequence[RatioRecord] | dict[str, Sequence[RatioRecord]],
    path: str | Path,
    *,
    title: str | None = None,
    show_scale: bool = True,
) -> Path:
    """Plot the RAAG ratio (mean and 10-90 % band over samples) against t; with ``show_scale`` the
    guidance scale on a second panel. ``history`` is a ``ratio_history`` list or a dict label -> list.
    Writes a PNG with matplotlib's Agg backend and returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = history if isinstance(history, dict) else {"RAAG": history}
    if not runs or not any(len(h) for h in runs.values()):
        raise FewflowError("ratio history is empty: build RAAG with record=True and sample first")
    ncols = 2 if show_scale else 1
    fig, axes = plt.subplots(1, ncols, figsize=(4.5 * ncols, 3.3), squeeze=False)
    for label, recs in runs.items():
        if not recs:
            continue
        ts = [float(r.t.double().mean()) for r in recs]
        for ax, key in zip(axes[0], ("ratio", "scale")):
            vals = [getattr(r, key).double() for r in recs]
            mean = [float(v.mean()) for v in vals]
            lo = [float(v.quantile(0.1)) for v in vals]
            hi = [float(v.quantile(0.9)) for v in vals]
            (line,) = ax.plot(ts, mean, marker="o", ms=3, label=label)
            ax.fill_between(ts, lo, hi, color=line.get_color(), alpha=0.2)
    axes[0][0].set_ylabel("RAAG ratio r")
    if show_scale:
        axes[0][1].set_ylabel("guidance scale w")
    for ax in axes[0]:
        ax.set_xlabel("t (0 = noise, 1 = data)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
