r"""Stochastic interpolants ``x_t = alpha(t) x0 + beta(t) x1 + gamma(t) z``, ``z ~ N(0, I)``.

From Albergo, Boffi & Vanden-Eijnden, "Stochastic Interpolants: A Unifying Framework for Flows and
Diffusions" (2023). ``(x0, x1)`` is any coupling of the two end distributions and ``z`` is independent of it.
Boundary conditions: ``alpha(0) = beta(1) = 1``, ``alpha(1) = beta(0) = 0``, ``gamma(0) = gamma(1) = 0`` and
``gamma > 0`` on ``(0, 1)``. The quantities a model learns (conditional expectations given ``x_t = x``):

- drift (probability-flow velocity) ``b(x, t) = E[d_alpha x0 + d_beta x1 + d_gamma z | x_t = x]``;
- denoiser ``eta_z(x, t) = E[z | x_t = x]`` and score ``s(x, t) = grad log rho_t(x) = -eta_z / gamma``;
- one-sided interpolant (``x0 ~ N(0, I)``, ``gamma = 0``): ``s = -E[x0 | x_t] / alpha``.

Generative dynamics: the ODE ``dX = b dt`` and, for any ``eps(t) >= 0``, the forward SDE
``dX = [b + eps s] dt + sqrt(2 eps) dW`` share the marginals ``rho_t``.

Note ``d_gamma = a (1 - 2t) / (2 gamma)`` diverges at ``t = 0, 1`` for ``gamma = sqrt(a t (1 - t))``. The
target ``d_gamma z`` then has unbounded variance near the ends; the paper (and its code) handles this with
antithetic sampling (evaluate at ``x_t^+- = I_t +- gamma z``) and by sampling ``t`` away from the ends, which
is what :class:`fewflow.objectives.InterpolantVelocityLoss` does. Exactly at ``t = 0, 1`` the factories'
``d_gamma`` use ``gamma`` floored at the dtype's machine epsilon (large but finite).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from fewflow._validate import (
    FewflowError,
    as_batch_time,
    check_batch,
    check_finite,
    check_same_shape,
    expand_like,
)
from fewflow.paths.affine import PathSample, _check_time_arg
from fewflow.paths.schedules import _as_time, _like_time, time_derivative
from fewflow.sources import _randn

__all__ = ["StochasticInterpolant"]

TimeFn = Callable[[Tensor], Tensor]


def _floor_pos(x: Tensor) -> Tensor:
    return x.clamp_min(torch.finfo(x.dtype).eps)


class StochasticInterpolant:
    r"""The interpolant ``x_t = alpha(t) x0 + beta(t) x1 + gamma(t) z`` of Albergo, Boffi & Vanden-Eijnden,
    "Stochastic Interpolants: A Unifying Framework for Flows and Diffusions".

    ``alpha``, ``beta``, ``gamma`` are element-wise callables of a time tensor; missing derivatives are taken
    by forward-mode autodiff. ``gamma=None`` means ``gamma = 0``: the *one-sided* interpolant, where ``x0`` is
    the N(0, I) noise and the score is ``-E[x0 | x_t] / alpha`` (see :meth:`score_from_denoiser`).
    """

    def __init__(
        self,
        alpha: TimeFn,
        beta: TimeFn,
        gamma: TimeFn | None,
        d_alpha: TimeFn | None = None,
        d_beta: TimeFn | None = None,
        d_gamma: TimeFn | None = None,
        *,
        name: str = "custom",
    ) -> None:
        for nm, fn in [("alpha", alpha), ("beta", beta), ("gamma", gamma), ("d_alpha", d_alpha),
                       ("d_beta", d_beta), ("d_gamma", d_gamma)]:
            if fn is not None and not callable(fn):
                raise FewflowError(f"StochasticInterpolant: {nm} must be callable, got {type(fn).__name__}")
        if alpha is None or beta is None:
            raise FewflowError("StochasticInterpolant needs callables alpha and beta")
        self._alpha, self._beta, self._gamma = alpha, beta, gamma
        self._d_alpha, self._d_beta, self._d_gamma = d_alpha, d_beta, d_gamma
        self.name = name

    # ------------------------------------------------------------------ coefficients
    @property
    def one_sided(self) -> bool:
        """True when ``gamma = 0`` (``x0`` plays the role of the Gaussian noise)."""
        return self._gamma is None

    def alpha(self, t: Tensor) -> Tensor:
        """Source coefficient ``alpha(t)``."""
        t = _as_time(t)
        return _like_time(self._alpha(t), t)

    def beta(self, t: Tensor) -> Tensor:
        """Data coefficient ``beta(t)``."""
        t = _as_time(t)
        return _like_time(self._beta(t), t)

    def gamma(self, t: Tensor) -> Tensor:
        """Noise coefficient ``gamma(t)`` (zeros for a one-sided interpolant)."""
        t = _as_time(t)
        if self._gamma is None:
            return torch.zeros_like(t)
        return _like_time(self._gamma(t), t)

    def d_alpha(self, t: Tensor) -> Tensor:
        """``d alpha / dt``."""
        return self._derivative(self._d_alpha, self.alpha, t)

    def d_beta(self, t: Tensor) -> Tensor:
        """``d beta / dt``."""
        return self._derivative(self._d_beta, self.beta, t)

    def d_gamma(self, t: Tensor) -> Tensor:
        """``d gamma / dt`` (zeros for a one-sided interpolant)."""
        if self._gamma is None:
            return torch.zeros_like(_as_time(t))
        return self._derivative(self._d_gamma, self.gamma, t)

    @staticmethod
    def _derivative(given: TimeFn | None, fn: TimeFn, t: Tensor) -> Tensor:
        t = _as_time(t)
        if given is None:
            return time_derivative(fn, t)
        return _like_time(given(t), t)

    # ------------------------------------------------------------------ sampling
    def sample(
        self,
        x0: Tensor,
        x1: Tensor,
        t: Tensor | float,
        z: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> PathSample:
        """Draw ``x_t = alpha x0 + beta x1 + gamma z``, target drift ``d_alpha x0 + d_beta x1 + d_gamma z``.

        ``z`` is drawn from N(0, I) (with ``generator``) unless given; for a one-sided interpolant no ``z``
        is used and ``PathSample.z`` is None. ``t``: scalar or ``(B,)`` in ``[0, 1]``.
        """
        check_finite("x0", x0)
        check_finite("x1", x1)
        check_same_shape("x0", x0, "x1", x1)
        check_batch("x1", x1)
        tb = _check_time_arg(t, x1)
        a, b, da, db = (expand_like(f(tb), x1) for f in (self.alpha, self.beta, self.d_alpha, self.d_beta))
        x_t = a * x0 + b * x1
        vel = da * x0 + db * x1
        if self.one_sided:
            if z is not None:
                raise FewflowError("a one-sided interpolant (gamma = 0) takes no z; x0 is the Gaussian noise")
            return PathSample(x_t=x_t, velocity=vel, t=tb, x0=x0, x1=x1, z=None)
        if z is None:
            z = _randn(x1.shape, device=x1.device, dtype=x1.dtype, generator=generator)
        else:
            check_finite("z", z)
            check_same_shape("z", z, "x1", x1)
        g, dg = expand_like(self.gamma(tb), x1), expand_like(self.d_gamma(tb), x1)
        return PathSample(x_t=x_t + g * z, velocity=vel + dg * z, t=tb, x0=x0, x1=x1, z=z)

    # ------------------------------------------------------------------ dynamics
    def score_from_denoiser(self, eta_z: Tensor, x: Tensor, t: Tensor | float) -> Tensor:
        """Score ``s = -eta_z / gamma(t)`` from the denoiser ``eta_z = E[z | x_t = x]``.

        One-sided interpolant: ``eta`` predicts ``E[x0 | x_t]`` and ``s = -eta / alpha(t)``. The denominator
        is floored at the dtype's machine epsilon (the score is singular where gamma, resp. alpha, vanishes).
        """
        check_same_shape("eta_z", eta_z, "x", x)
        tb = _check_time_arg(t, x)
        den = self.alpha(tb) if self.one_sided else self.gamma(tb)
        return -eta_z / expand_like(_floor_pos(den), x)

    def score_model(self, denoiser: Callable[..., Tensor]) -> Callable[..., Tensor]:
        """Wrap a denoiser model ``eta(x, t, **cond)`` into a score model ``s(x, t, **cond)``."""

        def score(x: Tensor, t: Tensor | float, **cond: Any) -> Tensor:
            tb = as_batch_time(t, x)
            return self.score_from_denoiser(denoiser(x, tb, **cond), x, tb)

        return score

    def drift(
        self,
        b: Callable[..., Tensor],
        s: Callable[..., Tensor],
        eps: float | Callable[[Tensor], Tensor],
    ) -> Callable[..., Tensor]:
        """Drift ``f(x, t) = b(x, t) + eps(t) s(x, t)`` of the forward SDE ``dX = f dt + sqrt(2 eps) dW``.

        ``eps`` is a number >= 0 or a callable of the ``(B,)`` time. With ``eps = 0`` this is the
        probability-flow ODE ``dX = b dt`` and ``s`` is not evaluated.
        """
        if not callable(eps):
            if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
                raise FewflowError(f"diffusion coefficient eps must be a finite number >= 0, got {eps!r}")

        def f(x: Tensor, t: Tensor | float, **cond: Any) -> Tensor:
            tb = as_batch_time(t, x)
            out = b(x, tb, **cond)
            if callable(eps):
                e = _like_time(eps(tb), tb)
            elif eps == 0:
                return out
            else:
                e = torch.full_like(tb, float(eps))
            return out + expand_like(e, x) * s(x, tb, **cond)

        return f

    def __repr__(self) -> str:
        return f"StochasticInterpolant({self.name})"

    # ------------------------------------------------------------------ factories
    @classmethod
    def linear(cls, a: float = 1.0) -> StochasticInterpolant:
        """Two-sided linear interpolant ``alpha = 1 - t, beta = t, gamma = sqrt(a t (1 - t))``."""
        gamma, d_gamma = _brownian(a)
        return cls(lambda t: 1.0 - t, lambda t: t, gamma, d_alpha=lambda t: -torch.ones_like(t),
                   d_beta=torch.ones_like, d_gamma=d_gamma, name=f"linear(a={a:g})")

    @classmethod
    def trig(cls, a: float = 1.0) -> StochasticInterpolant:
        """Trigonometric interpolant ``alpha = cos(pi t/2), beta = sin(pi t/2), gamma = sqrt(a t (1 - t))``.

        (The paper's code also offers a variance-matched variant that multiplies alpha and beta by
        ``sqrt(1 - gamma^2)``; build it with the constructor if needed.)
        """
        h = 0.5 * math.pi
        gamma, d_gamma = _brownian(a)
        return cls(lambda t: torch.cos(h * t), lambda t: torch.sin(h * t), gamma,
                   d_alpha=lambda t: -h * torch.sin(h * t), d_beta=lambda t: h * torch.cos(h * t),
                   d_gamma=d_gamma, name=f"trig(a={a:g})")

    @classmethod
    def one_sided_linear(cls) -> StochasticInterpolant:
        """One-sided linear interpolant ``x_t = (1 - t) x0 + t x1``, ``x0 ~ N(0, I)``, ``gamma = 0``."""
        return cls(lambda t: 1.0 - t, lambda t: t, None, d_alpha=lambda t: -torch.ones_like(t),
                   d_beta=torch.ones_like, name="one_sided_linear")

    @classmethod
    def one_sided_trig(cls) -> StochasticInterpolant:
        """One-sided trigonometric interpolant ``x_t = cos(pi t/2) x0 + sin(pi t/2) x1``, ``x0 ~ N(0, I)``."""
        h = 0.5 * math.pi
        return cls(lambda t: torch.cos(h * t), lambda t: torch.sin(h * t), None,
                   d_alpha=lambda t: -h * torch.sin(h * t), d_beta=lambda t: h * torch.cos(h * t),
                   name="one_sided_trig")


def _brownian(a: float) -> tuple[TimeFn, TimeFn]:
    """``gamma = sqrt(a t (1 - t))``, ``d_gamma = a (1 - 2t) / (2 gamma)`` (gamma floored at machine eps)."""
    if not (isinstance(a, (int, float)) and math.isfinite(a) and a > 0):
        raise FewflowError(f"interpolant noise level a must be a finite number > 0, got {a!r}")
    a = float(a)

    def gamma(t: Tensor) -> Tensor:
        return torch.sqrt((a * t * (1.0 - t)).clamp_min(0.0))

    def d_gamma(t: Tensor) -> Tensor:
        return a * (1.0 - 2.0 * t) / (2.0 * _floor_pos(gamma(t)))

    return gamma, d_gamma

