"""Fine-tuning flow matching by maximum likelihood of its N-step reconstructions (straightforward and
residual variants).

Paper: "Fine-Tuning Flow Matching via Maximum Likelihood Estimation of Reconstructions" (Li, Ding, Li, Li;
arXiv 2510.02081). The paper integrates from noise at t = 0 to data at t = 1, fewflow's convention, so
nothing is reversed here.

Flow matching never evaluates the sampler it trains for: the N-step solution ``Phi_theta^N(x0; c)`` is not
in the loss, and the training error ``delta`` of the field reaches the sample amplified by roughly
``exp(L)`` (L the field's Lipschitz constant; :func:`fewflow.metrics.stiffness.lipschitz_estimate`).
The paper treats the solver as a deterministic decoder and maximises the likelihood of the ground truth
``x1`` under an observation model around the reconstruction ``x_hat = Phi_theta^N(x0; c)``:

    Gaussian:  -log p(x1 | x_hat) = ||x_hat - x1||^2 / (2 sigma^2) + const,
    Laplace:   -log p(x1 | x_hat) = ||x_hat - x1||_1 / sigma + const,

with ``Phi^N`` the N-step Euler solver on the uniform grid ``t_k = k / N`` (``x_{k+1} = x_k + v(x_k, t_k) /
N``; N drawn per batch from ``steps``), kept as a flow-matching anchor:

    L(theta) = E[ -log p(x1 | Phi_theta^N(x0; c)) ] / D + fm_weight * L_FM(theta),

(``D`` = data dimension; ``L_FM`` = the mean-over-dimensions CFM loss of :class:`~fewflow.objectives.cfm.
CFMLoss`, so ``sigma`` and ``fm_weight`` mean the same at every data size).

**Pairing** ``(x0, x1)``: ``"noise"``: ``x0`` from the source with ``x1`` the observed target for its
condition (the paper's conditional tasks: forecasts and robot actions, near-deterministic given ``c``);
``"inverse"``: ``x0`` is the frozen pretrained model's inverse ODE of ``x1`` (``inverse_steps`` Heun steps
from t = 1 to 0), an encode-then-decode reconstruction that keeps every mode of a multimodal target
(random pairing would pull the decoder towards the conditional mean); ``"auto"``: ``noise`` when the batch
carries a condition (``y`` or ``c``), else ``inverse``.

**Memory.** Backpropagating through N solver steps stores N network graphs. ``backprop="checkpoint"``
(default) recomputes each step in the backward pass (``torch.utils.checkpoint``): the same gradient as
``"full"`` with one step's activations plus the N states in memory. ``"truncated"`` backpropagates only
through the last ``truncate_k`` steps (the earlier ones run without a graph): a biased but cheaper
gradient, equal to the full one when ``truncate_k >= N``. The sources available to fewflow do not say
which of the two the paper uses; checkpointing is the default because it is exact.

**Variants.** ``"straightforward"``: every weight of the pretrained network is fine-tuned (the run starts
as its teacher). ``"residual"`` (method ``mle_finetune_residual``): the pretrained field is frozen and a
contractive residual ``v = v_pre + r_psi`` is trained,
``r_psi = b(t, c) + alpha(t, c) (h_psi(x, t, c) - x)`` with ``Lip_x(h) <= lip < 1`` by spectral
normalisation (:class:`fewflow.models.residual.ContractiveResidual`): ``||J_r|| <= alpha_max (1 + lip)``
and ``mu(J_r) < 0``, so the correction is input-to-state stable and never makes the flow more expansive.
Sampling a residual run integrates ``v_pre + r`` with its teacher.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from fewflow._validate import FewflowError, check_batch, check_finite, unknown_name
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
from fewflow.objectives.cfm import CFMLoss
from fewflow.objectives.common import sample_source

__all__ = ["MLEFinetuneConfig", "MLEFinetuneLoss", "euler_rollout", "reconstruction_nll"]

VARIANTS = ("straightforward", "residual")
BACKPROPS = ("full", "checkpoint", "truncated")
PAIRINGS = ("auto", "noise", "inverse")
LIKELIHOODS = ("gaussian", "laplace")


def euler_rollout(
    field: Any, x0: Tensor, steps: int, *, backprop: str = "full", truncate_k: int = 1, **cond: Any
) -> Tensor:
    """``Phi^N(x0)``: ``steps`` Euler steps of ``field(x, t, **cond)`` on the uniform grid from t = 0 to 1,
    differentiable (module docstring for ``backprop``: ``"full"``, ``"checkpoint"``, ``"truncated"``)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise FewflowError(f"steps must be a positive integer, got {steps!r}")
    if backprop not in BACKPROPS:
        raise unknown_name("backprop", backprop, BACKPROPS)
    if backprop == "truncated" and (isinstance(truncate_k, bool) or not isinstance(truncate_k, int)
                                    or truncate_k < 1):
        raise FewflowError(f"truncate_k must be a positive integer, got {truncate_k!r}")
    h = 1.0 / steps
    x = x0

    def step(z: Tensor, tt: Tensor) -> Tensor:
        return z + h * field(z, tt, **cond)

    for k in range(steps):
        t = torch.full((x0.shape[0],), k * h, device=x0.device, dtype=x0.dtype)
        if backprop == "truncated" and k < steps - truncate_k:
            with torch.no_grad():
                x = step(x, t)
        elif backprop == "checkpoint" and torch.is_grad_enabled():
            x = checkpoint(step, x, t, use_reentrant=False)
        else:
            x = step(x, t)
    return x


def reconstruction_nll(x_hat: Tensor, x1: Tensor, sigma: float, likelihood: str = "gaussian") -> Tensor:
    """Per-sample negative log-likelihood of ``x1`` around ``x_hat`` divided by the dimension ``D``
    (constants dropped): ``||x_hat - x1||^2 / (2 sigma^2 D)`` or ``||x_hat - x1||_1 / (sigma D)``."""
    err = (x_hat - x1).reshape(x1.shape[0], -1)
    if likelihood == "gaussian":
        return err.pow(2).mean(1) / (2.0 * sigma**2)
    if likelihood == "laplace":
        return err.abs().mean(1) / sigma
    raise unknown_name("likelihood", likelihood, LIKELIHOODS)


class MLEFinetuneLoss:
    """``loss(model, x1, *, generator=None, **cond) -> LossOutput`` (module docstring).

    Args:
        path: the run's path, for the flow-matching anchor.
        source: draws ``x0`` (``None``: N(0, I)).
        teacher: the frozen pretrained velocity model: the base field of the residual variant and the
            encoder of ``"inverse"`` pairing.
        variant: ``"straightforward"`` (``model`` is the whole field) or ``"residual"`` (``model`` is the
            residual; the field is ``teacher + model``).
        steps: solver step counts; one is drawn per batch.
        sigma: scale of the observation model; likelihood: ``"gaussian"`` or ``"laplace"``.
        fm_weight: weight of the flow-matching anchor (0: none).
        backprop, truncate_k: memory-bounded backpropagation (see :func:`euler_rollout`).
        pairing: ``"auto"``, ``"noise"`` or ``"inverse"``; inverse_steps: Heun steps of the inverse ODE.
        time_sampler, label_dropout, num_classes: of the flow-matching anchor (the reconstruction term
            always sees the full condition).

    Diagnostics: ``loss``, ``nll``, ``recon_mse`` (mean squared reconstruction error per dimension),
    ``fm`` and ``steps``.
    """

    def __init__(
        self,
        path: Any,
        source: Any = None,
        teacher: Any = None,
        variant: str = "straightforward",
        steps: tuple[int, ...] = (1, 2, 4),
        sigma: float = 0.1,
        likelihood: str = "gaussian",
        fm_weight: float = 1.0,
        backprop: str = "checkpoint",
        truncate_k: int = 1,
        pairing: str = "auto",
        inverse_steps: int = 16,
        time_sampler: Any = None,
        label_dropout: float = 0.0,
        num_classes: int | None = None,
    ) -> None:
        if variant not in VARIANTS:
            raise unknown_name("variant", variant, VARIANTS)
        if backprop not in BACKPROPS:
            raise unknown_name("backprop", backprop, BACKPROPS)
        if pairing not in PAIRINGS:
            raise unknown_name("pairing", pairing, PAIRINGS)
        if likelihood not in LIKELIHOODS:
            raise unknown_name("likelihood", likelihood, LIKELIHOODS)
        steps = tuple(steps) if isinstance(steps, (list, tuple)) else (steps,)
        if not steps or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in steps):
            raise FewflowError(f"steps must be positive step counts, got {steps}")
        if not (math.isfinite(float(sigma)) and float(sigma) > 0):
            raise FewflowError(f"sigma must be a positive number, got {sigma}")
        if not (math.isfinite(float(fm_weight)) and float(fm_weight) >= 0):
            raise FewflowError(f"fm_weight must be a number >= 0, got {fm_weight}")
        if isinstance(truncate_k, bool) or not isinstance(truncate_k, int) or truncate_k < 1:
            raise FewflowError(f"truncate_k must be a positive integer, got {truncate_k!r}")
        if isinstance(inverse_steps, bool) or not isinstance(inverse_steps, int) or inverse_steps < 1:
            raise FewflowError(f"inverse_steps must be a positive integer, got {inverse_steps!r}")
        if teacher is not None and not callable(teacher):
            raise FewflowError(f"teacher must be a velocity model v(x, t), got {type(teacher).__name__}")
        if variant == "residual" and teacher is None:
            raise FewflowError("the residual variant needs the pretrained model (teacher=)")
        if getattr(teacher, "is_flow_map", False):
            raise FewflowError("the teacher must be a velocity model v(x, t), got a flow map")
        self.path, self.source, self.teacher, self.variant = path, source, teacher, variant
        self.steps, self.sigma, self.likelihood = steps, float(sigma), likelihood
        self.fm_weight, self.backprop, self.truncate_k = float(fm_weight), backprop, truncate_k
        self.pairing, self.inverse_steps = pairing, inverse_steps
        self.fm = CFMLoss(path, source=source, time_sampler=time_sampler, label_dropout=label_dropout,
                          num_classes=num_classes) if self.fm_weight > 0 else None

    def field(self, model: Any) -> Any:
        """The velocity field being fine-tuned: ``model``, or ``teacher + model`` (residual variant)."""
        if self.variant == "straightforward":
            return model
        teacher = self.teacher

        def v(x: Tensor, t: Tensor, **cond: Any) -> Tensor:
            return teacher(x, t, **cond) + model(x, t, **cond)

        return v

    def pair(self, x1: Tensor, generator: torch.Generator | None = None, **cond: Any) -> Tensor:
        """The starting point ``x0`` paired with ``x1`` (module docstring, *Pairing*)."""
        mode = self.pairing
        if mode == "auto":
            mode = "noise" if (cond.get("y") is not None or cond.get("c") is not None) else "inverse"
        if mode == "noise":
            return sample_source(self.source, x1, generator)
        if self.teacher is None:
            raise FewflowError("pairing 'inverse' needs the pretrained model (teacher=) to encode x1")
        from fewflow.solvers import solve

        with torch.no_grad():
            return solve(self.teacher, x1, steps=self.inverse_steps, stepper="heun", t0=1.0, t1=0.0,
                         cond=cond or None).x.detach()

    def __call__(
        self, model: Any, x1: Tensor, *, generator: torch.Generator | None = None, **cond: Any
    ) -> LossOutput:
        check_finite("x1", x1)
        check_batch("x1", x1)
        cond = {k: v for k, v in cond.items() if v is not None}
        x0 = self.pair(x1, generator, **cond)
        if len(self.steps) == 1:
            n = self.steps[0]
        else:
            gdev = generator.device if generator is not None else torch.device("cpu")
            n = self.steps[int(torch.randint(len(self.steps), (1,), generator=generator, device=gdev))]
        x_hat = euler_rollout(self.field(model), x0, n, backprop=self.backprop, truncate_k=self.truncate_k,
                              **cond)
        if x_hat.shape != x1.shape:
            raise FewflowError(f"model output has shape {tuple(x_hat.shape)}, expected {tuple(x1.shape)}")
        nll = reconstruction_nll(x_hat, x1, self.sigma, self.likelihood).mean()
        loss = nll
        diag = {"nll": float(nll.detach()), "steps": float(n),
                "recon_mse": float((x_hat.detach() - x1).pow(2).mean())}
        if self.fm is not None:
            fm = self.fm(self.field(model), x1, generator=generator, **cond).loss
            loss = loss + self.fm_weight * fm
            diag["fm"] = float(fm.detach())
        diag["loss"] = float(loss.detach())
        return LossOutput(loss=loss, diagnostics=diag)

    def __repr__(self) -> str:
        return (f"MLEFinetuneLoss(variant={self.variant!r}, steps={self.steps}, sigma={self.sigma:g}, "
                f"fm_weight={self.fm_weight:g}, backprop={self.backprop!r}, pairing={self.pairing!r})")


# --------------------------------------------------------------------------- registration


@dataclass
class MLEFinetuneConfig:
    """The loss's settings (paper: Gaussian likelihood with the FM loss kept; fewflow's small defaults),
    the residual network's and the fine-tuning learning rate."""

    variant: str = field(default="straightforward", metadata={"help": "straightforward | residual"})
    steps: tuple[int, ...] = field(default=(1, 2, 4), metadata={"help": "solver steps N (one per batch)"})
    sigma: float = field(default=0.1, metadata={"help": "scale of the likelihood around the reconstruction"})
    likelihood: str = field(default="gaussian", metadata={"help": "gaussian | laplace"})
    fm_weight: float = field(default=1.0, metadata={"help": "weight of the flow-matching anchor"})
    backprop: str = field(default="checkpoint", metadata={"help": "full | checkpoint | truncated"})
    truncate_k: int = field(default=1, metadata={"help": "steps backpropagated when truncated"})
    pairing: str = field(default="auto", metadata={"help": "auto | noise | inverse (x0 for x1)"})
    inverse_steps: int = field(default=16, metadata={"help": "Heun steps of the inverse ODE"})
    lr: float | None = field(default=None, metadata={"help": "null: 2e-4 (straightforward), 1e-3 (residual)"})
    hidden: int = field(default=64, metadata={"help": "residual network width"})
    depth: int = field(default=2, metadata={"help": "residual network layers"})
    alpha_max: float = field(default=4.0, metadata={"help": "largest damping rate of the residual"})
    lip: float = field(default=0.9, metadata={"help": "Lipschitz bound (< 1) of the residual's target"})


def _build(cfg: MLEFinetuneConfig, ctx: BuildContext, variant: str) -> list[Stage]:
    if cfg.variant != variant:
        other = "mle_finetune_residual" if cfg.variant == "residual" else "mle_finetune"
        raise FewflowError(f"variant {cfg.variant!r} trains a different network: use --method {other}")
    teacher = ctx.need_teacher("mle_finetune" if variant == "straightforward" else "mle_finetune_residual")
    loss = MLEFinetuneLoss(
        ctx.path, source=ctx.source, teacher=teacher, variant=cfg.variant, steps=cfg.steps, sigma=cfg.sigma,
        likelihood=cfg.likelihood, fm_weight=cfg.fm_weight, backprop=cfg.backprop, truncate_k=cfg.truncate_k,
        pairing=cfg.pairing, inverse_steps=cfg.inverse_steps, time_sampler=ctx.time_sampler,
        **ctx.conditioning(),
    )
    lr = cfg.lr if cfg.lr is not None else (2e-4 if variant == "straightforward" else 1e-3)
    return [Stage(f"mle_finetune_{variant}", loss, lr=lr)]


def _build_straightforward(cfg: MLEFinetuneConfig, ctx: BuildContext) -> list[Stage]:
    return _build(cfg, ctx, "straightforward")


def _build_residual(cfg: MLEFinetuneConfig, ctx: BuildContext) -> list[Stage]:
    return _build(cfg, ctx, "residual")


def _make_residual(cfg: MLEFinetuneConfig, meta: dict) -> Any:
    from fewflow.models.residual import ContractiveResidual

    dim = int(math.prod(meta["shape"]))
    k = int(meta["num_classes"]) if meta.get("conditional") else None
    cs = meta.get("cond_shape")
    cond_dim = int(math.prod(cs)) if cs is not None else None
    return ContractiveResidual(dim, hidden=cfg.hidden, depth=cfg.depth, alpha_max=cfg.alpha_max, lip=cfg.lip,
                               num_classes=k, cond_dim=cond_dim)


def _sampling_residual(model: Any, cfg: MLEFinetuneConfig, *, teacher: Any = None, **_: Any) -> SamplingPlan:
    from fewflow.models.residual import ResidualVelocity

    if teacher is None:
        raise FewflowError("sampling a residual MLE fine-tuned run needs its pretrained (teacher) run")
    return SamplingPlan(ResidualVelocity(teacher, model))


_PAPER = ("Li, Ding, Li, Li, Fine-Tuning Flow Matching via Maximum Likelihood Estimation of Reconstructions "
          "(2510.02081)")
_RECIPE = ("lr", "hidden", "depth", "alpha_max", "lip")

MLE_FINETUNE = register(MethodSpec(
    name="mle_finetune",
    label="MLE fine-tuning",
    paper=_PAPER,
    summary="fine-tune a velocity model on the likelihood of its N-step reconstructions (+ FM anchor)",
    config=MLEFinetuneConfig,
    loss=MLEFinetuneLoss,
    build=_build_straightforward,
    needs=Needs(teacher="required", init_from_teacher=True, coupling="fixed"),
    sampler=DefaultSampler("euler", nfe=4),
    recipe_fields=_RECIPE,
    family="refiner",
))

MLE_FINETUNE_RESIDUAL = register(MethodSpec(
    name="mle_finetune_residual",
    label="MLE fine-tuning (residual)",
    paper=_PAPER,
    summary="frozen pretrained field + a contractive residual trained on the reconstruction likelihood",
    config=MLEFinetuneConfig,
    loss=MLEFinetuneLoss,
    build=_build_residual,
    needs=Needs(teacher="required", model="custom", coupling="fixed"),
    sampler=DefaultSampler("euler", nfe=4),
    sampling=_sampling_residual,
    make_model=_make_residual,
    recipe_fields=_RECIPE,
    docs="mle_finetune",
    family="refiner",
    variant_of="mle_finetune",
    overrides={"variant": "residual"},
))
