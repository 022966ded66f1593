"""Rectified Diffusion: rectification of a diffusion teacher in its own parameterisation.

From "Rectified Diffusion: Straightness Is Not Your Need in Rectified Flow" (Wang et al., ICLR 2025;
arXiv 2410.07303; code ``G-U-N/Rectified-Diffusion``), in **fewflow time** (t = 0 noise, t = 1 data).

Reflow ("Flow Straight and Fast", Liu et al. 2022; :mod:`fewflow.couplings.reflow`) retrains on matched pairs
``(x0, x1 = ODE_teacher(x0))``. Rectified Diffusion keeps the teacher's affine path ``x_t = alpha_t x1 +
sigma_t x0`` (VP / cosine schedule) *and* its prediction type (``"epsilon"`` = ``x0`` here, or ``"x1"``, the
"x0-prediction" of diffusion papers), and trains on the pairs with the paired noise (never resampled)::

    x_t = alpha_t x1 + sigma_t x0,           target in the model's parameterisation:
    epsilon-model: x0,   x1-model: x1,   velocity-model: d_alpha_t x1 + d_sigma_t x0,
    L = E_t rho( x1_hat(model(x_t, t), x_t, t) - x1 )      (the code: pseudo-Huber in data space, c = 1e-3)

with ``rho(e) = sqrt(e^2 + c^2) - c`` averaged over dims and ``x1_hat`` from
``fewflow.paths.AffinePath.convert``. Every ``x_t`` of a pair lies on the *first-order* (DDIM) path
``alpha_t x1 + sigma_t x0``; the target is constant along it, so the teacher's unchanged first-order
sampler (:class:`FirstOrderStep`, DDIM: ``x_{t'} = alpha_{t'} x1_hat + sigma_{t'} x0_hat``) lands on ``x1``
in one step from any ``t``. For the linear schedule it is Euler on the velocity, and the loss with
``prediction="velocity"``, ``space="prediction"``, ``loss="mse"`` is exactly reflow's CFM loss on the pairs.

Pairs: :func:`rectified_diffusion_pairs` (in memory) or ``fewflow.couplings.reflow.generate_reflow_pairs(
teacher, source, n, out_dir, steps=..., stepper=FirstOrderStep(path, prediction))`` (safetensors shards);
both run the teacher's deterministic sampler through ``fewflow.solvers.solve``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fewflow._validate import FewflowError, check_batch, check_finite, check_same_shape, unknown_name
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
from fewflow.objectives.common import drop_labels
from fewflow.objectives.time_samplers import TimeSampler, UniformTime
from fewflow.solvers import Stepper, solve

__all__ = ["RectifiedDiffusionLoss", "FirstOrderStep", "rectified_diffusion_pairs", "pair_target"]

_PRED = ("epsilon", "x0", "x1", "velocity")
_SPACES = ("x1", "prediction")
_LOSSES = ("huber", "mse")


def _check_path(path: Any) -> None:
    if not (hasattr(path, "convert") and hasattr(path, "coefficients") and hasattr(path, "schedule")):
        raise FewflowError(
            f"path must be a fewflow.paths.AffinePath (with convert), got {type(path).__name__}"
        )


def _check_pred(prediction: str) -> str:
    if prediction not in _PRED:
        raise unknown_name("prediction", prediction, _PRED)
    return "x0" if prediction == "epsilon" else prediction


def pair_target(path: Any, prediction: str, x0: Tensor, x1: Tensor, t: Tensor | float) -> Tensor:
    """The pair target in the model's parameterisation: ``x0`` (epsilon), ``x1``, or the path velocity
    ``d_alpha_t x1 + d_sigma_t x0`` (which is ``x1 - x0``, reflow's target, on the linear path)."""
    _check_path(path)
    pred = _check_pred(prediction)
    if pred == "x0":
        return x0
    if pred == "x1":
        return x1
    return path.sample(x0, x1, t).velocity


class FirstOrderStep(Stepper):
    """The first-order (DDIM) step of a prediction model on an affine path, 1 NFE::

        x1_hat, x0_hat = convert(model(x, t)),     x_{t'} = alpha_{t'} x1_hat + sigma_{t'} x0_hat.

    Exact whenever the prediction is constant along the step (the Rectified Diffusion pairs); equal to
    Euler on the converted velocity for the linear schedule. "Denoising Diffusion Implicit Models" (Song,
    Meng, Ermon 2021) with eta = 0, written for any schedule. Use with ``fewflow.solvers.solve(model, x0,
    steps=k, stepper=FirstOrderStep(path, "epsilon"))``; ``model`` returns its raw prediction.
    """

    nfe_per_step = 1

    def __init__(self, path: Any, prediction: str = "epsilon") -> None:
        _check_path(path)
        self.path, self.prediction = path, _check_pred(prediction)

    def step(self, f, x, t, t_next, generator=None):
        pred = f(x, t)
        x1_hat = self.path.convert(pred, x, t, self.prediction, "x1")
        x0_hat = self.path.convert(pred, x, t, self.prediction, "x0")
        a, s, _, _ = self.path.coefficients(t_next, x)
        return a * x1_hat + s * x0_hat

    def __repr__(self) -> str:
        return f"FirstOrderStep({self.path!r}, prediction={self.prediction!r})"


@torch.no_grad()
def rectified_diffusion_pairs(
    teacher: Any,
    path: Any,
    x0: Tensor,
    *,
    prediction: str = "epsilon",
    steps: int = 50,
    t0: float = 0.0,
    cond: dict[str, Any] | None = None,
) -> tuple[Tensor, Tensor]:
    """``(x0, x1)``: the teacher's deterministic first-order sampler from the stored noise ``x0`` (the
    Rectified Diffusion pair; the noise is returned unchanged). ``t0 > 0`` starts where ``alpha_t0 > 0`` for
    epsilon models on schedules with ``alpha_0 = 0`` (cosine), treating ``x0`` as the state at ``t0``."""
    check_finite("x0", x0)
    res = solve(teacher, x0, steps=steps, t0=t0, t1=1.0, stepper=FirstOrderStep(path, prediction), cond=cond)
    return x0, res.x


class RectifiedDiffusionLoss:
    """Rectified Diffusion retraining on teacher pairs:
    ``objective(model, x1, *, x0, generator=None, **cond)``.

    ``x0`` (the stored noise of each pair) is required: the trainer passes it from batch dicts
    ``{"x1": ..., "x0": ...}``; :meth:`pair_loss` takes it positionally. From "Rectified Diffusion:
    Straightness Is Not Your Need in Rectified Flow" (Wang et al., ICLR 2025).

    Args:
        path: the teacher's ``fewflow.paths.AffinePath`` (e.g. ``AffinePath("cosine")``,
            ``AffinePath("vp")``).
        prediction: the teacher's (and student's) output: ``"epsilon"``/``"x0"``, ``"x1"`` or ``"velocity"``.
        loss: ``"huber"`` (pseudo-Huber ``sqrt(e^2 + c^2) - c``, the code's choice) or ``"mse"``.
        huber_c: pseudo-Huber constant (1e-3).
        space: ``"x1"`` compares the converted data prediction with the pair's ``x1`` (the code);
            ``"prediction"`` compares raw outputs with :func:`pair_target`.
        time_sampler: training times (uniform, as the code's uniform timesteps). Epsilon models on a
            schedule with ``alpha_0 = 0`` need ``UniformTime(lo > 0)`` in x1-space (the conversion divides
            by ``alpha_t``).
        label_dropout, num_classes: null-label dropout (the code drops the prompt with ``drop_ratio``).
    """

    def __init__(
        self,
        path: Any,
        prediction: str = "epsilon",
        loss: str = "huber",
        huber_c: float = 1e-3,
        space: str = "x1",
        time_sampler: TimeSampler | None = None,
        label_dropout: float = 0.0,
        num_classes: int | None = None,
    ) -> None:
        _check_path(path)
        self.prediction = _check_pred(prediction)
        if loss not in _LOSSES:
            raise unknown_name("loss", loss, _LOSSES)
        if space not in _SPACES:
            raise unknown_name("space", space, _SPACES)
        if not (math.isfinite(huber_c) and huber_c > 0):
            raise FewflowError(f"huber_c must be a positive number, got {huber_c}")
        if not 0.0 <= label_dropout < 1.0:
            raise FewflowError(f"label_dropout must lie in [0, 1), got {label_dropout}")
        self.path, self.loss, self.huber_c, self.space = path, loss, float(huber_c), space
        self.time_sampler = time_sampler if time_sampler is not None else UniformTime()
        self.label_dropout, self.num_classes = float(label_dropout), num_classes

    def sampler(self) -> FirstOrderStep:
        """The matching few-step sampler: ``solve(model, x0, steps=k, stepper=loss.sampler())``."""
        return FirstOrderStep(self.path, self.prediction)

    def _rho(self, err: Tensor) -> Tensor:
        if self.loss == "mse":
            return err.pow(2)
        c = self.huber_c
        return torch.sqrt(err.pow(2) + c * c) - c

    def pair_loss(
        self,
        model: Any,
        x0: Tensor,
        x1: Tensor,
        *,
        t: Tensor | None = None,
        generator: torch.Generator | None = None,
        **cond: Any,
    ) -> LossOutput:
        """The loss on pairs ``(x0, x1)`` at times ``t`` (drawn from ``time_sampler`` when None)."""
        check_finite("x0", x0)
        check_finite("x1", x1)
        check_batch("x1", x1)
        check_same_shape("x0", x0, "x1", x1)
        b = x1.shape[0]
        if t is None:
            t = self.time_sampler.sample(b, device=x1.device, dtype=x1.dtype, generator=generator)
        cond, _ = drop_labels(cond, self.label_dropout, self.num_classes, x1, generator)
        x_t = self.path.sample(x0, x1, t).x_t
        pred = model(x_t, t, **cond)
        if not torch.is_tensor(pred) or pred.shape != x1.shape:
            raise FewflowError(f"model output must have the shape of x {tuple(x1.shape)}")
        if self.space == "x1":
            err = self.path.convert(pred, x_t, t, self.prediction, "x1") - x1
        else:
            err = pred - pair_target(self.path, self.prediction, x0, x1, t)
        per = self._rho(err).reshape(b, -1).mean(1)
        return LossOutput(
            loss=per.mean(), diagnostics={"loss": float(per.detach().mean()), "t_mean": float(t.mean())}
        )

    def __call__(
        self, model: Any, x1: Tensor, *, generator: torch.Generator | None = None, **cond: Any
    ) -> LossOutput:
        x0 = cond.pop("x0", None)
        if x0 is None:
            raise FewflowError(
                "RectifiedDiffusionLoss trains on teacher pairs: pass the stored noise as x0= (batch dicts "
                "{'x1': ..., 'x0': ...}); it must not be resampled"
            )
        return self.pair_loss(model, x0, x1, generator=generator, **cond)

    def __repr__(self) -> str:
        return (
            f"RectifiedDiffusionLoss({self.path!r}, prediction={self.prediction!r}, loss={self.loss!r}, "
            f"space={self.space!r})"
        )


# --------------------------------------------------------------------------- registration


@dataclass
class RectifiedDiffusionConfig:
    """Settings of :class:`RectifiedDiffusionLoss` and the pair set. ``prediction`` must be the teacher's
    parameterisation (fewflow's runs train velocities); the loss, its space and ``huber_c`` are the
    authors' code defaults."""

    prediction: str = field(default="velocity", metadata={"help": "the teacher output: velocity|epsilon|x1"})
    loss: str = field(default="huber", metadata={"help": "huber (pseudo-Huber) or mse"})
    huber_c: float = 1e-3
    space: str = field(default="x1", metadata={"help": "x1 (data space) or prediction"})
    n_pairs: int = field(default=50_000, metadata={"help": "teacher pairs"})
    pair_steps: int = field(default=50, metadata={"help": "Heun steps of the teacher ODE per pair"})


def _build_rd(cfg: RectifiedDiffusionConfig, ctx: BuildContext) -> list[Stage]:
    from fewflow.couplings.reflow import reflow_batches

    teacher = ctx.need_teacher("rectified_diffusion")
    assert ctx.pairs is not None
    if cfg.prediction != "velocity":  # the pairs integrate the teacher's ODE as a velocity field
        raise FewflowError(
            f"prediction={cfg.prediction!r}: fewflow's teacher runs predict velocities; use "
            "prediction=velocity (epsilon or x1 teachers: RectifiedDiffusionLoss with FirstOrderStep pairs)"
        )
    loss = RectifiedDiffusionLoss(
        ctx.path, prediction=cfg.prediction, loss=cfg.loss, huber_c=cfg.huber_c, space=cfg.space,
        time_sampler=ctx.time_sampler, **ctx.conditioning(),
    )

    def data(model: Any, batch_size: int) -> Any:
        folder = ctx.pairs(teacher, tag="teacher", n=cfg.n_pairs, steps=cfg.pair_steps, seed=ctx.seed)
        return reflow_batches(folder, batch_size, ctx.seed)

    return [Stage("rectified_diffusion", loss, data, pair_sets=1)]


def _sampling_rd(model: Any, cfg: RectifiedDiffusionConfig, *, path: Any, **_: Any) -> SamplingPlan:
    return SamplingPlan(model, FirstOrderStep(path, cfg.prediction))


register(MethodSpec(
    name="rectified_diffusion",
    label="Rectified Diffusion",
    paper="Wang et al., Rectified Diffusion: Straightness Is Not Your Need in Rectified Flow (2410.07303)",
    summary="rectify a teacher on its own pairs in its own parameterisation; first-order (DDIM) sampler",
    config=RectifiedDiffusionConfig,
    loss=RectifiedDiffusionLoss,
    build=_build_rd,
    needs=Needs(teacher="required", init_from_teacher=True, pairs=True, coupling="fixed"),
    sampler=DefaultSampler("euler", nfe=2),
    sampling=_sampling_rd,
    recipe_fields=("n_pairs", "pair_steps"),
    family="fewstep",
))
