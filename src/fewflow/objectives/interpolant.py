r"""Quadratic losses for stochastic interpolants (Albergo, Boffi & Vanden-Eijnden, "Stochastic Interpolants:
A Unifying Framework for Flows and Diffusions", 2023).

For ``x_t = alpha x0 + beta x1 + gamma z`` (see :class:`fewflow.paths.StochasticInterpolant`):

- drift ``b``:  ``L_b = E[ |b(x_t, t)|^2 - 2 (d_alpha x0 + d_beta x1 + d_gamma z) . b(x_t, t) ]``,
  minimised by ``b = E[d_alpha x0 + d_beta x1 + d_gamma z | x_t]``; it equals ``E|b - target|^2`` minus a
  constant.
- denoiser ``eta_z``:  ``L_eta = E |eta_z(x_t, t) - z|^2``, minimised by ``eta_z = E[z | x_t]``; the score is
  ``s = -eta_z / gamma``. One-sided interpolants (``gamma = 0``, ``x0 ~ N(0, I)``) regress ``x0`` instead and
  ``s = -eta / alpha``.

Variance control, as in the paper's code: ``d_gamma`` diverges at ``t = 0, 1`` for ``gamma = sqrt(a t(1-t))``,
so two-sided losses use *antithetic* pairs ``x_t^+- = alpha x0 + beta x1 +- gamma z`` (targets with ``+- z``;
the divergent ``d_gamma z . b`` terms cancel to leading order) and sample ``t`` uniformly on
``[t_min, 1 - t_min]`` with ``t_min = 1e-3`` (``t_min = 0`` for one-sided interpolants, whose targets are
bounded). The velocity loss reports the quadratic form above as ``loss``: its value has bounded variance,
whereas ``E|b - target|^2`` (reported as the ``mse`` diagnostic) contains ``d_gamma^2 |z|^2``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fewflow._validate import FewflowError, check_batch, check_finite, check_same_shape, expand_like
from fewflow.methods.registry import (
    BuildContext,
    MethodSpec,
    Needs,
    Stage,
    register,
)
from fewflow.objectives.base import LossOutput
from fewflow.paths.interpolant import StochasticInterpolant
from fewflow.sources import _randn

__all__ = ["InterpolantVelocityLoss", "InterpolantScoreLoss"]

DEFAULT_T_MIN = 1e-3


class _InterpolantLoss:
    """Shared sampling for the interpolant losses: x0 from the source, t, z, antithetic pairing."""

    def __init__(self, interpolant: StochasticInterpolant, source: Any = None, time_sampler: Any = None,
                 t_min: float | None = None, antithetic: bool = True) -> None:
        if not isinstance(interpolant, StochasticInterpolant):
            raise FewflowError(
                f"interpolant must be a StochasticInterpolant, got {type(interpolant).__name__}"
            )
        if time_sampler is not None and not callable(getattr(time_sampler, "sample", None)):
            raise FewflowError("time_sampler must have a .sample(n, device=, dtype=, generator=) method")
        if source is not None and not callable(getattr(source, "sample_like", None)):
            raise FewflowError("source must have a .sample_like(x1, generator=) method")
        if t_min is None:
            t_min = 0.0 if interpolant.one_sided else DEFAULT_T_MIN
        if not 0.0 <= t_min < 0.5:
            raise FewflowError(f"t_min must lie in [0, 0.5), got {t_min}")
        self.interpolant = interpolant
        self.source = source
        self.time_sampler = time_sampler
        self.t_min = float(t_min)
        self.antithetic = bool(antithetic) and not interpolant.one_sided

    def sample_time(self, n: int, *, device: Any, dtype: torch.dtype,
                    generator: torch.Generator | None = None) -> Tensor:
        """``(n,)`` times: the time sampler's draws clamped to ``[t_min, 1 - t_min]``, or uniform there."""
        lo, hi = self.t_min, 1.0 - self.t_min
        if self.time_sampler is not None:
            t = self.time_sampler.sample(n, device=device, dtype=dtype, generator=generator)
            return t.to(device=device, dtype=dtype).clamp(lo, hi)
        gdev = generator.device if generator is not None else device
        u = torch.rand(n, generator=generator, device=gdev, dtype=dtype).to(device)
        return lo + (hi - lo) * u

    def _draw(self, x1: Tensor, generator: torch.Generator | None):
        check_finite("x1", x1)
        check_batch("x1", x1)
        if self.source is not None:
            x0 = self.source.sample_like(x1, generator=generator)
        else:
            x0 = _randn(x1.shape, device=x1.device, dtype=x1.dtype, generator=generator)
        t = self.sample_time(x1.shape[0], device=x1.device, dtype=x1.dtype, generator=generator)
        ps = self.interpolant.sample(x0, x1, t, generator=generator)
        return ps

    def _forward(self, model: Any, ps, target_plus: Tensor, target_minus: Tensor | None,
                 cond: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """Evaluate the model on ``x_t`` (and its antithetic twin, in one batched call)."""
        if not self.antithetic:
            out = model(ps.x_t, ps.t, **cond)
            check_same_shape("model output", out, "x_t", ps.x_t)
            return out, target_plus
        b = ps.x_t.shape[0]
        gz = expand_like(self.interpolant.gamma(ps.t), ps.x_t) * ps.z
        x_minus = ps.x_t - 2.0 * gz
        cond2 = {k: (torch.cat([v, v]) if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == b else v)
                 for k, v in cond.items()}
        x_in = torch.cat([ps.x_t, x_minus])
        out = model(x_in, torch.cat([ps.t, ps.t]), **cond2)
        check_same_shape("model output", out, "x_t", x_in)
        return out, torch.cat([target_plus, target_minus])


class InterpolantVelocityLoss(_InterpolantLoss):
    r"""Quadratic loss for the interpolant drift ``b(x, t)`` (Albergo, Boffi & Vanden-Eijnden, "Stochastic
    Interpolants: A Unifying Framework for Flows and Diffusions", eq. for ``L_b``):

        loss = mean over entries of  |b(x_t, t)|^2 - 2 (d_alpha x0 + d_beta x1 + d_gamma z) . b(x_t, t),

    averaged over antithetic pairs ``z, -z`` for two-sided interpolants. ``source`` supplies ``x0``
    (default N(0, I)); ``time_sampler`` (``.sample(n, device=, dtype=, generator=)``) replaces the default
    uniform times, always clamped to ``[t_min, 1 - t_min]``. Diagnostics: ``loss``, ``mse``
    (``|b - target|^2``, same gradient, includes the target's variance), ``pred_sq`` and ``t_mean``.
    """

    def __call__(self, model: Any, x1: Tensor, *, generator: torch.Generator | None = None,
                 **cond: Any) -> LossOutput:
        ps = self._draw(x1, generator)
        target_minus = None
        if self.antithetic:
            dgz = expand_like(self.interpolant.d_gamma(ps.t), x1) * ps.z
            target_minus = ps.velocity - 2.0 * dgz
        pred, target = self._forward(model, ps, ps.velocity, target_minus, cond)
        quad = pred.pow(2) - 2.0 * target * pred
        loss = quad.mean()
        with torch.no_grad():
            mse = (pred - target).pow(2).mean()
            diag = {"loss": float(loss.detach()), "mse": float(mse), "pred_sq": float(pred.pow(2).mean()),
                    "t_mean": float(ps.t.mean())}
        return LossOutput(loss=loss, diagnostics=diag)


class InterpolantScoreLoss(_InterpolantLoss):
    r"""Denoiser loss ``E|eta_z(x_t, t) - z|^2`` for stochastic interpolants (Albergo, Boffi & Vanden-Eijnden,
    "Stochastic Interpolants: A Unifying Framework for Flows and Diffusions", ``L_eta``); the minimiser is
    ``eta_z = E[z | x_t]`` and the score is ``s = -eta_z / gamma`` (:meth:`score`).

    One-sided interpolants (``gamma = 0``) regress ``x0`` instead (``eta = E[x0 | x_t]``, ``s = -eta/alpha``).
    Two-sided losses use antithetic pairs (``x_t^- = x_t - 2 gamma z`` with target ``-z``). Diagnostics:
    ``loss``, ``pred_sq``, ``t_mean``.
    """

    def __call__(self, model: Any, x1: Tensor, *, generator: torch.Generator | None = None,
                 **cond: Any) -> LossOutput:
        ps = self._draw(x1, generator)
        target = ps.x0 if self.interpolant.one_sided else ps.z
        pred, target = self._forward(model, ps, target, -target if self.antithetic else None, cond)
        loss = (pred - target).pow(2).mean()
        with torch.no_grad():
            diag = {"loss": float(loss.detach()), "pred_sq": float(pred.pow(2).mean()),
                    "t_mean": float(ps.t.mean())}
        return LossOutput(loss=loss, diagnostics=diag)

    def score(self, model: Any):
        """The score model ``s(x, t, **cond) = -eta(x, t) / gamma(t)`` of a trained denoiser."""
        return self.interpolant.score_model(model)


# --------------------------------------------------------------------------- registration


@dataclass
class InterpolantConfig:
    """The stochastic interpolant and its velocity (drift) loss."""

    interpolant: str = field(
        default="linear", metadata={"help": "linear | trig | one_sided_linear | one_sided_trig"}
    )
    a: float = field(default=1.0, metadata={"help": "gamma_t = sqrt(a t (1 - t)) of two-sided interpolants"})
    t_min: float | None = None
    antithetic: bool = True


def make_interpolant(kind: str, a: float = 1.0) -> StochasticInterpolant:
    """A stochastic interpolant by name."""
    if kind in ("linear", "trig"):
        return getattr(StochasticInterpolant, kind)(a=a)
    if kind in ("one_sided_linear", "one_sided_trig"):
        return getattr(StochasticInterpolant, kind)()
    from fewflow._validate import unknown_name

    raise unknown_name("interpolant", kind, ("linear", "trig", "one_sided_linear", "one_sided_trig"))


def _build_interpolant(cfg: InterpolantConfig, ctx: BuildContext) -> list[Stage]:
    loss = InterpolantVelocityLoss(
        make_interpolant(cfg.interpolant, cfg.a), source=ctx.source, time_sampler=ctx.time_sampler,
        t_min=cfg.t_min, antithetic=cfg.antithetic,
    )
    return [Stage("interpolant", loss)]


register(MethodSpec(
    name="interpolant",
    label="Stochastic interpolant",
    paper="Albergo, Boffi & Vanden-Eijnden, Stochastic Interpolants: A Unifying Framework for Flows and "
    "Diffusions (2303.08797)",
    summary="x_t = alpha x0 + beta x1 + gamma z; the drift b(x, t) by its quadratic loss, sampled as an ODE",
    docs="stochastic_interpolants",
    config=InterpolantConfig,
    loss=InterpolantVelocityLoss,
    build=_build_interpolant,
    needs=Needs(labels="none", coupling="fixed"),
    recipe_fields=("interpolant", "a"),
))
