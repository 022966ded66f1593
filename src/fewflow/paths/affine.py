r"""Affine probability paths ``x_t = alpha_t x1 + sigma_t x0`` and conversions between predictions.

A model trained on an affine path can predict the velocity ``v = d_alpha x1 + d_sigma x0``, the data ``x1``,
the source sample ``x0`` (= epsilon for a Gaussian source) or the score of ``p_t``. Given ``x_t`` the map
between any two of them is affine; with ``det_t = alpha_t d_sigma_t - sigma_t d_alpha_t``:

    x1 = (d_sigma x_t - sigma v) / det        x0 = (alpha v - d_alpha x_t) / det
    v  = (d_sigma x_t - det x1) / sigma       v  = (d_alpha x_t + det x0) / alpha
    x0 = (x_t - alpha x1) / sigma             x1 = (x_t - sigma x0) / alpha
    score = -x0 / sigma                       x0 = -sigma score     (N(0, I) source, Tweedie)

References: Lipman et al., "Flow Matching Guide and Code" (2024), sections "Affine conditional flows"
(velocity / x1 / epsilon parameterisations) and "scheduler change"; Lai et al., "The Principles of Diffusion
Models" (2025) for the score relation ``s(x_t) = -E[x0 | x_t] / sigma_t``.

Singularities. Each conversion divides by ``det``, ``sigma`` or ``alpha``: ``sigma = 0`` at ``t = 1``
(``*_to_score``, ``x1_to_velocity``, ``x1_to_x0``), ``alpha = 0`` at ``t = 0`` (``x0_to_velocity``,
``score_to_velocity``, ``x0_to_x1``) and ``det = 0`` where the path is stationary (e.g. the polynomial
schedule with ``n > 1`` at ``t = 0``). There the quantity is not determined by ``x_t`` and the prediction.
``AffinePath`` clamps every such denominator away from zero (keeping its sign) at ``eps`` (default: the
dtype's machine epsilon), so results stay finite but are meaningless exactly at the singular times; away from
them the floor has no effect.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fewflow._validate import (
    FewflowError,
    as_batch_time,
    check_batch,
    check_finite,
    check_same_shape,
    check_time,
    expand_like,
    unknown_name,
)
from fewflow.paths.schedules import Schedule, get_schedule

__all__ = ["PathSample", "AffinePath", "RescheduledVelocity", "reschedule", "PREDICTIONS"]

#: Names accepted by :meth:`AffinePath.convert` (``"epsilon"`` is an alias of ``"x0"``).
PREDICTIONS = ("velocity", "x1", "x0", "epsilon", "score")
_CANON = {"velocity": "velocity", "v": "velocity", "x1": "x1", "data": "x1", "x0": "x0", "epsilon": "x0",
          "eps": "x0", "noise": "x0", "score": "score"}


@dataclass
class PathSample:
    """One draw from a probability path: the point ``x_t``, its target ``velocity`` and what made it.

    ``t`` is a ``(B,)`` tensor; ``z`` is the extra Gaussian noise of a stochastic interpolant (else None).
    """

    x_t: Tensor
    velocity: Tensor
    t: Tensor
    x0: Tensor
    x1: Tensor
    z: Tensor | None = None


def _check_time_arg(t: Tensor | float, x: Tensor, name: str = "t") -> Tensor:
    """Validate ``t`` (scalar or (B,), finite, in [0, 1]) and return it as (B,) on x's device/dtype."""
    if torch.is_tensor(t) and t.dim() > 1 and t.numel() != x.shape[0]:
        raise FewflowError(f"{name} must be a scalar or have shape ({x.shape[0]},), got {tuple(t.shape)}")
    check_time(t, name)
    return as_batch_time(t, x)


def _as_schedule(s: Schedule | str | AffinePath) -> Schedule:
    if isinstance(s, AffinePath):
        return s.schedule
    if isinstance(s, Schedule):
        return s
    if isinstance(s, str):
        return get_schedule(s)
    raise FewflowError(f"expected a Schedule, a schedule name or an AffinePath, got {type(s).__name__}")


class AffinePath:
    r"""The affine path ``x_t = alpha_t x1 + sigma_t x0`` of a :class:`Schedule`, with target velocity
    ``u_t = d_alpha_t x1 + d_sigma_t x0`` (Lipman et al., "Flow Matching Guide and Code").

    ``eps`` is the floor for denominators in the conversions (see the module docstring); ``None`` uses the
    machine epsilon of the input's dtype.
    """

    def __init__(self, schedule: Schedule | str = "linear", eps: float | None = None) -> None:
        self.schedule = _as_schedule(schedule)
        if eps is not None and not eps > 0:
            raise FewflowError(f"AffinePath eps must be positive, got {eps}")
        self.eps = eps

    def __repr__(self) -> str:
        return f"AffinePath({self.schedule!r})"

    # ------------------------------------------------------------------ sampling
    def sample(self, x0: Tensor, x1: Tensor, t: Tensor | float) -> PathSample:
        """Draw ``x_t = alpha_t x1 + sigma_t x0`` and its target velocity ``d_alpha_t x1 + d_sigma_t x0``.

        ``x0``, ``x1``: ``(B, ...)`` tensors of the same shape; ``t``: scalar or ``(B,)`` in ``[0, 1]``.
        """
        check_finite("x0", x0)
        check_finite("x1", x1)
        check_same_shape("x0", x0, "x1", x1)
        check_batch("x1", x1)
        tb = _check_time_arg(t, x1)
        a, s, da, ds = self.coefficients(tb, x1)
        return PathSample(x_t=a * x1 + s * x0, velocity=da * x1 + ds * x0, t=tb, x0=x0, x1=x1)

    def coefficients(self, t: Tensor | float, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(alpha_t, sigma_t, d_alpha_t, d_sigma_t)`` reshaped to broadcast against ``x`` (B, ...)."""
        tb = as_batch_time(t, x)
        sch = self.schedule
        return tuple(expand_like(f(tb), x) for f in (sch.alpha, sch.sigma, sch.d_alpha, sch.d_sigma))

    # ------------------------------------------------------------------ conversions
    def _floor(self, den: Tensor) -> Tensor:
        eps = self.eps if self.eps is not None else torch.finfo(den.dtype).eps
        return torch.where(den.abs() < eps, torch.copysign(torch.full_like(den, eps), den), den)

    def _prep(self, pred: Tensor, x_t: Tensor, t: Tensor | float):
        check_finite("prediction", pred)
        check_finite("x_t", x_t)
        check_same_shape("prediction", pred, "x_t", x_t)
        check_batch("x_t", x_t)
        tb = _check_time_arg(t, x_t)
        a, s, da, ds = self.coefficients(tb, x_t)
        return a, s, da, ds, a * ds - s * da

    def velocity_to_x1(self, pred: Tensor, x_t: Tensor, t: Tensor | float) -> Tensor:
        """Data prediction from a velocity: ``x1 = (d_sigma x_t - sigma v) / det``."""
        a, s, da, ds, det = self._prep(pred, x_t, t)
        return (ds * x_t - s * pred) / self._floor(det)

    def velocity_to_x0(self, pred: Tensor, x_t: Tensor, t: Tensor | float) -> Tensor:
        """Source (epsilon) prediction from a velocity: ``x0 = (alpha v - d_alpha x_t) / det``."""
        a, s, da, ds, det = self._prep(pred, x_t, t)
        return (a * pred - da * x_t) / self._floor(det)

    def x1_to_velocity(self, pred: Tensor, x_t: Tensor, t: Tensor | float) -> Tensor:
        """Velocity from a data prediction: ``v = (d_sigma x_t - det x1) / sigma`` (singular at t = 1)."""
        a, s, da, ds, det = self._prep(pred, x_t, t)
        return (ds * x_t - det * pred) / self._floor(s)

    def x0_to_velocity(self, pred: Tensor, x_t: Tensor, t: Tensor | float) -> Tensor:
        """Velocity from a source (epsilon) prediction: ``v = (d_alpha x_t + det x0) / alpha`` (singular at
        ``alpha = 0``)."""
        a, s, da, ds, det = self._prep(pred, x_t, t)
        return (da * x_t + det * pred) / self._floor(a)

    def x1_to_x0(self, pred: Tensor, x_t: Tensor, t: Tensor | float) -> Tensor:
        """``x0 = (x_t - alpha x1) / sigma``."""
        a, s, _, _, _ = self._prep(pred, x_t, t)
        return (x_t - a * pred) / self._floor(s)

    def x0_to_x1(self, pred: Tensor, x_t: Tensor, t: Tensor | float) -> Tensor:
        """``x1 = (x_t - sigma x0) / alpha``."""
        a, s, _, _, _ = self._prep(pred, x_t, t)
        return (x_t - s * pred) / self._floor(a)

    def x0_to_score(self, pred: Tensor, x_t: Tensor, t: Tensor | float) -> Tensor:
        """Score of ``p_t`` for a N(0, I) source from ``E[x0 | x_t]``: ``s = -x0 / sigma``."""
        _, s, _, _, _ = self._prep(pred, x_t, t)
        return -pred / self._floor(s)

    def score_to_x0(self, pred: Tensor, x_t: Tensor, t: Tensor | float) -> Tensor:
        """``E[x0 | x_t] = -sigma_t s(x_t)`` (N(0, I) source)."""
        _, s, _, _, _ = self._prep(pred, x_t, t)
        return -s * pred

    def velocity_to_score(self, pred: Tensor, x_t: Tensor, t: Tensor | float) -> Tensor:
        """Score of ``p_t`` (N(0, I) source) from a velocity:
        ``s = -(alpha v - d_alpha x_t) / (det sigma)``."""
        return self.x0_to_score(self.velocity_to_x0(pred, x_t, t), x_t, t)

    def score_to_velocity(self, pred: Tensor, x_t: Tensor, t: Tensor | float) -> Tensor:
        """Velocity from the score (N(0, I) source): ``v = (d_alpha x_t - det sigma s) / alpha``."""
        return self.x0_to_velocity(self.score_to_x0(pred, x_t, t), x_t, t)

    def convert(self, pred: Tensor, x_t: Tensor, t: Tensor | float, src: str, dst: str) -> Tensor:
        """Convert a prediction of kind ``src`` to kind ``dst``; kinds: ``"velocity"``, ``"x1"``,
        ``"x0"`` (alias ``"epsilon"``) and ``"score"`` (N(0, I) source). Uses the direct formula when there
        is one, otherwise goes through ``x0``."""
        a, b = self._canon(src), self._canon(dst)
        if a == b:
            check_same_shape("prediction", pred, "x_t", x_t)
            _check_time_arg(t, x_t)
            return pred
        direct = getattr(self, f"{a}_to_{b}", None)
        if direct is not None:
            return direct(pred, x_t, t)
        return getattr(self, f"x0_to_{b}")(getattr(self, f"{a}_to_x0")(pred, x_t, t), x_t, t)

    @staticmethod
    def _canon(name: str) -> str:
        if not isinstance(name, str) or name.lower() not in _CANON:
            raise unknown_name("prediction type", str(name), PREDICTIONS)
        return _CANON[name.lower()]


class RescheduledVelocity:
    r"""A velocity model for schedule B built from a velocity model trained under schedule A.

    Flow Matching Guide and Code (Lipman et al.), "scheduler change": both paths share the data and source,
    so ``x^B_t = s_r x^A_{t_r}`` with ``t_r = lambda_A^{-1}(lambda_B(t))`` (equal log-SNR) and
    ``s_r = sigma_B(t) / sigma_A(t_r) = alpha_B(t) / alpha_A(t_r)``. The chain rule gives

        v_B(x, t) = (ds_r/dt / s_r) x + s_r (dt_r/dt) v_A(x / s_r, t_r),

    with ``dt_r/dt = det_B(t) / (det_A(t_r) s_r^2)`` (``det = alpha d_sigma - sigma d_alpha``, from
    differentiating ``log_snr_A(t_r) = log_snr_B(t)``) and ``s_r^2 = N_B(t) / N_A(t_r)``,
    ``N = alpha^2 + sigma^2``, a form with no 0/0 at either end. ``t = 1`` is singular when the schedules'
    ``d_sigma`` diverge there (VP).
    """

    def __init__(self, model: Callable[..., Tensor], trained_on: AffinePath | Schedule | str,
                 sample_with: AffinePath | Schedule | str) -> None:
        if not callable(model):
            raise FewflowError(f"reschedule: model must be callable, got {type(model).__name__}")
        self.model = model
        self.trained_on = _as_schedule(trained_on)
        self.sample_with = _as_schedule(sample_with)

    def time_and_scale(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(t_r, s_r, dt_r/dt, ds_r/dt)`` at times ``t`` (any shape)."""
        A, B = self.trained_on, self.sample_with
        t_r = A.t_from_log_snr(B.log_snr(t)).to(t.dtype)
        aA, sA, daA, dsA = A.alpha(t_r), A.sigma(t_r), A.d_alpha(t_r), A.d_sigma(t_r)
        aB, sB, daB, dsB = B.alpha(t), B.sigma(t), B.d_alpha(t), B.d_sigma(t)
        nA, nB = aA**2 + sA**2, aB**2 + sB**2
        s_r = torch.sqrt(nB / nA)
        det_a = aA * dsA - sA * daA
        tiny = torch.finfo(t.dtype).eps
        det_a = torch.where(det_a.abs() < tiny, torch.copysign(torch.full_like(det_a, tiny), det_a), det_a)
        dt_r = (aB * dsB - sB * daB) / (det_a * s_r**2)
        ds_r = (2 * (aB * daB + sB * dsB) - s_r**2 * 2 * (aA * daA + sA * dsA) * dt_r) / (2 * s_r * nA)
        return t_r, s_r, dt_r, ds_r

    def __call__(self, x: Tensor, t: Tensor | float, **cond: Any) -> Tensor:
        tb = _check_time_arg(t, x)
        t_r, s_r, dt_r, ds_r = self.time_and_scale(tb)
        s_rx, dt_rx, ds_rx = (expand_like(v, x) for v in (s_r, dt_r, ds_r))
        v_a = self.model(x / s_rx, t_r, **cond)
        return (ds_rx / s_rx) * x + s_rx * dt_rx * v_a

    def __repr__(self) -> str:
        return f"RescheduledVelocity({self.trained_on!r} -> {self.sample_with!r})"


def reschedule(model: Callable[..., Tensor], trained_on: AffinePath | Schedule | str,
               sample_with: AffinePath | Schedule | str) -> RescheduledVelocity:
    """Re-use a velocity model trained on path ``trained_on`` as the velocity of path ``sample_with``
    (same marginals up to a time change and a scale). See :class:`RescheduledVelocity` for the math
    ("Flow Matching Guide and Code", scheduler change)."""
    return RescheduledVelocity(model, trained_on, sample_with)
