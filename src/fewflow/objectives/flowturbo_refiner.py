"""FlowTurbo's velocity-refiner objective.

Paper: *FlowTurbo: Towards Real-time Flow-Based Image Generation with Velocity Refiner* (Zhao, Shi, Yu,
Zhou, Lu; NeurIPS 2024, arXiv 2409.18128; code ``shiml20/FlowTurbo``, ``transport.training_losses``).

Late in sampling the velocity of a flow model changes slowly, so a tiny network can predict the change
of velocity between consecutive steps instead of re-evaluating the large predictor ``v_phi`` (frozen).
With data ``x1``, source ``x0``, ``t`` uniform, ``x_t`` on the training path (linear by default:
``x_t = t x1 + (1 - t) x0``; t = 0 noise, t = 1 data), ``v_t = v_phi(x_t, t)``, one step size per batch
``dt ~ U(0, 0.12)`` and ``x' = x_t + dt v_t``, the refiner ``r_psi(x, t, v_prev)`` minimises

    L(psi) = E || r_psi(x', t + dt, v_t) + v_t - v_phi(x', t + dt) ||^2,

i.e. it learns the velocity increment along one Euler step. We draw ``t ~ U(0, 1 - dt)`` so that
``t + dt <= 1`` stays inside the model's time range. To refine a guided sampler, pass the guided model
(e.g. ``CFG(model, w, K)``) as ``predictor``: the refiner then learns guided increments. Code defaults:
AdamW lr 5e-5, EMA; refiner = one DiT block of the predictor's width (a 1-2 layer MLP at toy scale:
:class:`fewflow.solvers.flowturbo.FlowTurboRefiner`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fewflow._validate import FewflowError, check_batch, check_finite, check_same_shape
from fewflow.couplings.base import rand, randn_like
from fewflow.methods.registry import (
    BuildContext,
    DefaultSampler,
    MethodSpec,
    Needs,
    SamplingPlan,
    Stage,
    register,
)
from fewflow.objectives.base import LossOutput

__all__ = ["FlowTurboRefinerLoss"]


class FlowTurboRefinerLoss:
    """``loss(refiner, x1, generator=None, **cond) -> LossOutput`` (the trainer protocol; the model being
    trained is the refiner ``r(x, t, v_prev, **cond)``).

    Args:
        predictor: the frozen velocity model ``v(x, t, **cond)`` (evaluated under ``torch.no_grad``).
        path: ``path.sample(x0, x1, t)`` giving ``x_t`` (default ``AffinePath("linear")``).
        source: ``source.sample_like(x1, generator=...)`` for ``x0`` (default standard normal).
        max_dt: upper end of ``dt ~ U(0, max_dt)`` (0.12 in the code); the refiner is only valid for steps
            up to this size.

    Diagnostics: ``loss``; ``baseline`` = the loss of a zero refiner (``|| v_t - v_phi(x', t + dt) ||^2``);
    ``dt``.
    """

    def __init__(self, predictor: Any, path: Any = None, source: Any = None, max_dt: float = 0.12) -> None:
        if not callable(predictor):
            raise FewflowError(f"predictor must be a velocity model v(x, t), got {type(predictor).__name__}")
        if not (math.isfinite(float(max_dt)) and 0.0 < float(max_dt) < 1.0):
            raise FewflowError(f"max_dt must lie in (0, 1), got {max_dt}")
        if path is None:
            from fewflow.paths.affine import AffinePath

            path = AffinePath("linear")
        if not hasattr(path, "sample"):
            raise FewflowError(f"path needs .sample(x0, x1, t) (e.g. AffinePath), got {type(path).__name__}")
        if source is not None and not hasattr(source, "sample_like"):
            raise FewflowError(f"source needs .sample_like(x1, generator=...), got {type(source).__name__}")
        self.predictor = predictor
        self.path = path
        self.source = source
        self.max_dt = float(max_dt)

    def __call__(
        self, refiner: Any, x1: Tensor, *, generator: torch.Generator | None = None, **cond: Any
    ) -> LossOutput:
        check_finite("x1", x1)
        check_batch("x1", x1)
        b = x1.shape[0]
        if self.source is None:
            x0 = randn_like(x1, generator)
        else:
            x0 = self.source.sample_like(x1, generator=generator)
        check_same_shape("source sample x0", x0, "x1", x1)
        dt = float(rand(1, x1, generator)) * self.max_dt
        t = rand(b, x1, generator) * (1.0 - dt)
        t_next = t + dt
        with torch.no_grad():
            x_t = self.path.sample(x0, x1, t).x_t
            v_t = self.predictor(x_t, t, **cond)
            x_next = x_t + dt * v_t
            target = self.predictor(x_next, t_next, **cond) - v_t
        pred = refiner(x_next, t_next, v_t, **cond)
        if pred.shape != x1.shape:
            raise FewflowError(f"refiner returned shape {tuple(pred.shape)} for x of shape {tuple(x1.shape)}")
        loss = (pred - target).pow(2).flatten(1).sum(1).mean()
        baseline = target.pow(2).flatten(1).sum(1).mean()
        return LossOutput(
            loss=loss, diagnostics={"loss": float(loss.detach()), "baseline": float(baseline), "dt": dt}
        )

    def __repr__(self) -> str:
        return f"FlowTurboRefinerLoss(max_dt={self.max_dt}, path={self.path!r})"


# --------------------------------------------------------------------------- registration


@dataclass
class FlowTurboRefinerConfig:
    """The refiner's loss (``max_dt`` from the authors' code), its network and its share of the steps."""

    max_dt: float = field(default=0.12, metadata={"help": "largest step the refiner is trained for"})
    hidden: int = 64
    depth: int = 2
    refine_fraction: float = field(default=0.3, metadata={"help": "share of sampling steps refined"})
    lr: float = field(default=5e-5, metadata={"help": "refiner learning rate (the authors' code)"})


def _build_turbo(cfg: FlowTurboRefinerConfig, ctx: BuildContext) -> list[Stage]:
    loss = FlowTurboRefinerLoss(ctx.need_teacher("flowturbo_refiner"), path=ctx.path, source=ctx.source,
                                max_dt=cfg.max_dt)
    return [Stage("flowturbo_refiner", loss, lr=cfg.lr)]


def _make_refiner(cfg: FlowTurboRefinerConfig, meta: dict) -> Any:
    from fewflow.solvers.flowturbo import FlowTurboRefiner

    dim = int(math.prod(meta["shape"]))
    k = meta.get("num_classes") if meta.get("conditional") else None
    return FlowTurboRefiner(dim, hidden=cfg.hidden, depth=cfg.depth, num_classes=k)


def _sampling_turbo(
    model: Any, cfg: FlowTurboRefinerConfig, *, nfe: int, teacher: Any, **_: Any
) -> SamplingPlan:
    from fewflow.solvers.flowturbo import FlowTurboStepper

    if teacher is None:
        raise FewflowError("sampling a FlowTurbo refiner needs its teacher run")
    if nfe < 3:
        raise FewflowError(f"FlowTurbo needs nfe >= 3 (one Heun step + pseudo-corrector steps), got {nfe}")
    n_refine = max(1, round(cfg.refine_fraction * (nfe - 1) / (1.0 - cfg.refine_fraction)))
    return SamplingPlan(teacher, FlowTurboStepper(1, nfe - 2, n_refine, refiner=model))


register(MethodSpec(
    name="flowturbo_refiner",
    label="FlowTurbo refiner",
    paper="Zhao et al., FlowTurbo: Towards Real-time Flow-Based Image Generation with Velocity Refiner "
    "(2409.18128)",
    summary="a tiny network predicting the velocity change late in sampling (Heun, pseudo, refiner)",
    docs="flowturbo",
    config=FlowTurboRefinerConfig,
    loss=FlowTurboRefinerLoss,
    build=_build_turbo,
    needs=Needs(teacher="required", model="custom", coupling="fixed"),
    sampler=DefaultSampler("flowturbo", nfe=8),
    sampling=_sampling_turbo,
    make_model=_make_refiner,
    recipe_fields=("hidden", "depth", "refine_fraction", "lr"),
    small_scale={"lr": 1e-3},
    family="refiner",
))
