"""Conditional flow matching (CFM), with any coupling, time sampler and path.

"Flow Matching for Generative Modeling" (Lipman, Chen, Ben-Hamu, Nickel, Le; ICLR 2023) and
"Improving and generalizing flow-based generative models with minibatch optimal transport" (Tong et al.,
TMLR 2024). For a path ``x_t = alpha_t x1 + sigma_t x0`` with conditional velocity
``u_t = d_alpha_t x1 + d_sigma_t x0`` and a coupling pi of (x0, x1),

    L(theta) = E_{t ~ p(t), (x0, x1) ~ pi} [ lambda(t) w(x0, x1) || v_theta(x_t, t, c) - u_t ||^2 ],

whose minimiser is the marginal velocity ``v*(x, t) = E[u_t | x_t = x]``. The loss of ``v*`` is the
irreducible conditional variance ``E || u_t - v*(x_t, t) ||^2 > 0``; only differences of the loss are
informative. ``w`` are per-pair coupling weights (W-CFM, "Weighted Conditional Flow Matching"), ``lambda``
an optional time weighting. With Brownian-bridge path noise (SB-CFM),
``x_t = mu_t + s(t) z`` and ``u_t = dmu_t + s'(t) z``, ``s(t) = sigma sqrt(t (1 - t))``.
Classifier-free guidance training ("Classifier-Free Diffusion Guidance", Ho & Salimans 2021) replaces the
label by the null class ``num_classes`` with probability ``label_dropout``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fewflow._validate import (
    FewflowError,
    check_batch,
    check_finite,
    check_same_shape,
    expand_like,
    unknown_name,
)
from fewflow.couplings import Coupling, CouplingResult, IndependentCoupling, brownian_bridge_noise
from fewflow.couplings.base import randn_like
from fewflow.methods.registry import BuildContext, MethodSpec, Stage, register
from fewflow.objectives.base import LossOutput
from fewflow.objectives.common import drop_labels, sample_source
from fewflow.objectives.time_samplers import TimeSampler, UniformTime


class CFMLoss:
    """The CFM objective: ``loss = cfm(model, x1, generator=None, **cond) -> LossOutput``.

    Args:
        path: an affine path (``fewflow.paths.AffinePath``): ``path.sample(x0, x1, t)`` returns a
            ``PathSample`` with ``x_t`` and the target ``velocity``.
        source: draws ``x0`` via ``source.sample_like(x1, generator=...)``; ``None``: standard normal noise
            shaped like ``x1`` (what ``GaussianSource(x1.shape[1:])`` gives).
        coupling: pairs ``x0`` with ``x1`` (default :class:`~fewflow.couplings.IndependentCoupling`).
        time_sampler: distribution of t (default :class:`UniformTime`).
        weighting: optional ``lambda(t) -> (B,)`` time weighting multiplied into the per-sample loss.
        label_dropout: probability of dropping a row's condition (CFG training): ``y`` becomes the null
            class ``num_classes`` and a condition tensor ``c`` is marked null (``c_mask = False``); see
            :func:`fewflow.objectives.common.drop_labels`.
        num_classes: number of real classes; required when labels are dropped.
        sigma_path_noise: Brownian-bridge noise level sigma (``x_t += sigma sqrt(t(1-t)) z``). ``None``: use
            ``coupling.path_noise(t)`` if the coupling has one (``SchrodingerBridgeCoupling``), else none.
            ``0.0`` disables the coupling's noise.
        norm: ``"l2"`` (the squared error, the default) or ``"l1"`` (the absolute error, as GoalFlow trains
            its trajectory flow; it regresses the conditional median rather than the mean).

    The per-sample loss is the mean squared (or absolute) error over all non-batch dimensions; the batch
    loss is the mean of ``lambda(t_i) w_i err_i`` (coupling weights have mean 1). Diagnostics: ``loss``,
    ``mse`` (unweighted), ``t_mean``, and the coupling's (``cost_independent``, ``cost_coupled``,
    ``ot_cost_ratio`` = coupled / independent mean squared pair distance, ``ess`` / ``ess_fraction``
    for W-CFM).

    For precomputed pairs (a :class:`~fewflow.couplings.PrefetchCoupler`, reflow pairs) call
    :meth:`pair_loss` or :meth:`result_loss`; they skip the source and coupling.
    """

    def __init__(
        self,
        path: Any,
        source: Any = None,
        coupling: Coupling | None = None,
        time_sampler: TimeSampler | None = None,
        weighting: Callable[[Tensor], Tensor] | None = None,
        label_dropout: float = 0.0,
        num_classes: int | None = None,
        sigma_path_noise: float | None = None,
        norm: str = "l2",
    ) -> None:
        if norm not in ("l2", "l1"):
            raise unknown_name("CFM loss norm", norm, ("l2", "l1"))
        if not hasattr(path, "sample"):
            raise FewflowError(f"path needs .sample(x0, x1, t) (e.g. AffinePath), got {type(path).__name__}")
        if not (0.0 <= label_dropout <= 1.0):
            raise FewflowError(f"label_dropout must lie in [0, 1], got {label_dropout}")
        if num_classes is not None and num_classes < 1:
            raise FewflowError(f"num_classes must be a positive int (the null class is y = num_classes), "
                               f"got {num_classes}")
        if sigma_path_noise is not None and not (math.isfinite(sigma_path_noise) and sigma_path_noise >= 0):
            raise FewflowError(f"sigma_path_noise must be a finite number >= 0, got {sigma_path_noise}")
        if source is not None and not hasattr(source, "sample_like"):
            raise FewflowError(f"source needs .sample_like(x1, generator=...), got {type(source).__name__}")
        self.path = path
        self.source = source
        self.coupling = coupling if coupling is not None else IndependentCoupling()
        self.time_sampler = time_sampler if time_sampler is not None else UniformTime()
        self.weighting = weighting
        self.label_dropout = float(label_dropout)
        self.num_classes = num_classes
        self.sigma_path_noise = sigma_path_noise
        self.norm = norm

    # -- pieces -----------------------------------------------------------------------------------------
    def _path_noise(self, t: Tensor) -> tuple[Tensor, Tensor] | None:
        if self.sigma_path_noise is not None:
            if self.sigma_path_noise == 0.0:
                return None
            return brownian_bridge_noise(t, self.sigma_path_noise)
        fn = getattr(self.coupling, "path_noise", None)
        return fn(t) if callable(fn) else None

    def _drop_labels(self, cond: dict[str, Any], generator: torch.Generator | None) -> dict[str, Any]:
        ref = cond.get("y") if torch.is_tensor(cond.get("y")) else cond.get("c")
        like = torch.empty(0, device=ref.device) if torch.is_tensor(ref) else torch.empty(0)
        return drop_labels(cond, self.label_dropout, self.num_classes, like, generator)[0]

    def _sample_source(self, x1: Tensor, generator: torch.Generator | None) -> Tensor:
        return sample_source(self.source, x1, generator)

    # -- entry points ---------------------------------------------------------------------------------
    def __call__(
        self,
        model: Any,
        x1: Tensor,
        *,
        generator: torch.Generator | None = None,
        x0: Tensor | None = None,
        **cond: Any,
    ) -> LossOutput:
        """Draw x0, couple it with x1, and return the CFM loss (see the class docstring).

        With ``x0`` given the pairs are fixed -- reflow pairs ``(x0, teacher(x0))`` streamed by
        :class:`fewflow.couplings.ReflowPairs` -- and neither the source nor the coupling is used."""
        check_finite("x1", x1)
        check_batch("x1", x1)
        if x0 is not None:
            check_same_shape("x0", x0, "x1", x1)
            return self.pair_loss(model, x0, x1, generator=generator, **cond)
        x0 = self._sample_source(x1, generator)
        result = self.coupling(x0, x1, y=cond.get("y"), generator=generator)
        return self.pair_loss(
            model, result.x0, result.x1, weights=result.weights, generator=generator,
            extra_diagnostics=result.diagnostics, **cond,
        )

    def result_loss(
        self, model: Any, result: CouplingResult, *, generator: torch.Generator | None = None, **cond: Any
    ) -> LossOutput:
        """The loss on a precomputed :class:`CouplingResult` (uses ``result.y`` unless ``y`` is given)."""
        if result.y is not None and "y" not in cond:
            cond = {**cond, "y": result.y}
        return self.pair_loss(
            model, result.x0, result.x1, weights=result.weights, generator=generator,
            extra_diagnostics=result.diagnostics, **cond,
        )

    def pair_loss(
        self,
        model: Any,
        x0: Tensor,
        x1: Tensor,
        weights: Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
        extra_diagnostics: dict[str, float] | None = None,
        **cond: Any,
    ) -> LossOutput:
        """The CFM loss on given pairs ``(x0_i, x1_i)`` (no source draw, no coupling).

        Samples ``t``, builds ``x_t`` and the target with the path (plus bridge noise if configured),
        applies label dropout to ``cond["y"]``, calls ``model(x_t, t, **cond)`` and returns the weighted
        mean of the per-sample MSE.
        """
        check_finite("x1", x1)
        check_finite("x0", x0)
        check_batch("x1", x1)
        check_same_shape("x0", x0, "x1", x1)
        b = x1.shape[0]
        if weights is not None:
            if weights.shape != (b,):
                raise FewflowError(f"weights must have shape ({b},), got {tuple(weights.shape)}")
            check_finite("weights", weights)
        t = self.time_sampler.sample(b, device=x1.device, dtype=x1.dtype, generator=generator)
        ps = self.path.sample(x0, x1, t)
        x_t, target = ps.x_t, ps.velocity
        noise = self._path_noise(t)
        if noise is not None:
            std, d_std = noise
            z = randn_like(x1, generator)
            x_t = x_t + expand_like(std, x1) * z
            target = target + expand_like(d_std, x1) * z
        cond = self._drop_labels(cond, generator)
        pred = model(x_t, t, **cond)
        if not torch.is_tensor(pred) or pred.shape != x1.shape:
            shape = tuple(pred.shape) if torch.is_tensor(pred) else type(pred).__name__
            raise FewflowError(f"model output has shape {shape}, expected the shape of x {tuple(x1.shape)}")
        err = (pred - target.detach()).reshape(b, -1)
        sq = err.pow(2).mean(1)
        per = sq if self.norm == "l2" else err.abs().mean(1)
        w = torch.ones_like(per)
        if weights is not None:
            w = w * weights.detach().to(per.dtype)
        if self.weighting is not None:
            lam = self.weighting(t)
            if lam.shape != (b,):
                raise FewflowError(f"weighting(t) must return shape ({b},), got {tuple(lam.shape)}")
            w = w * lam.detach().to(per.dtype)
        loss = (w * per).mean()
        diag: dict[str, float] = {
            "loss": float(loss.detach()),
            "mse": float(sq.detach().mean()),
            "t_mean": float(t.mean()),
        }
        if extra_diagnostics:
            diag.update(extra_diagnostics)
            if "cost_independent" in diag and "cost_coupled" in diag and diag["cost_independent"] > 0:
                diag["ot_cost_ratio"] = diag["cost_coupled"] / diag["cost_independent"]
        if weights is not None and "ess" not in diag:
            ws = weights.detach().to(torch.float64)
            diag["ess"] = float(ws.sum() ** 2 / ws.pow(2).sum().clamp_min(1e-300))
        return LossOutput(loss=loss, diagnostics=diag)

    def __repr__(self) -> str:
        return (
            f"CFMLoss(path={self.path!r}, coupling={self.coupling!r}, time_sampler={self.time_sampler!r}, "
            f"label_dropout={self.label_dropout:g})"
        )


# --------------------------------------------------------------------------- registration


@dataclass
class CFMConfig:
    """Settings of :class:`CFMLoss` beyond the run's path, coupling, time sampler and source."""

    sigma_path_noise: float | None = field(
        default=None, metadata={"help": "std of Gaussian noise around the path (I-CFM); null: the coupling's"}
    )
    norm: str = field(default="l2", metadata={"help": "per-sample error: l2 (squared, default) or l1"})


def _build_cfm(cfg: CFMConfig, ctx: BuildContext) -> list[Stage]:
    loss = CFMLoss(
        ctx.path, source=ctx.source, coupling=ctx.coupling, time_sampler=ctx.time_sampler,
        sigma_path_noise=cfg.sigma_path_noise, norm=cfg.norm, **ctx.conditioning(),
    )
    return [Stage("cfm", loss)]


register(MethodSpec(
    name="cfm",
    label="CFM",
    paper="Lipman et al., Flow Matching for Generative Modeling (2210.02747); Tong et al., Improving and "
    "Generalizing Flow-Based Generative Models with Minibatch Optimal Transport (2302.00482)",
    summary="conditional flow matching on any path, coupling (independent, OT, Sinkhorn, W-CFM) and source",
    config=CFMConfig,
    loss=CFMLoss,
    build=_build_cfm,
))
