"""Noise schedules ``(alpha_t, sigma_t)`` of affine probability paths ``x_t = alpha_t x1 + sigma_t x0``.

Time runs from ``t = 0`` (source ``x0``, e.g. noise) to ``t = 1`` (data ``x1``); the standard schedules
have ``alpha_0 = 0, sigma_0 = 1`` and ``alpha_1 = 1, sigma_1 = 0``. Every method maps a tensor ``t`` of any
shape to a tensor of the same shape, device and dtype.

References: Lipman et al., "Flow Matching Guide and Code" (2024), section "Affine conditional flows"
(schedulers, signal-to-noise ratio); Lipman et al., "Flow Matching for Generative Modeling" (2023);
Song et al., "Score-Based Generative Modeling through Stochastic Differential Equations" (2021) for the
VP schedule.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from fewflow._validate import FewflowError, unknown_name

TimeFn = Callable[[Tensor], Tensor]

__all__ = [
    "Schedule",
    "LinearSchedule",
    "CosineSchedule",
    "VPSchedule",
    "PolynomialSchedule",
    "FunctionSchedule",
    "get_schedule",
    "time_derivative",
]


def _as_time(t: Tensor | float) -> Tensor:
    """A floating tensor view of ``t`` (python numbers use the default dtype)."""
    if not torch.is_tensor(t):
        return torch.tensor(float(t), dtype=torch.get_default_dtype())
    if not t.is_floating_point():
        return t.to(torch.get_default_dtype())
    return t


def _like_time(out: Tensor | float, t: Tensor) -> Tensor:
    """Broadcast a time function's output to ``t``'s shape, device and dtype."""
    out = torch.as_tensor(out, device=t.device, dtype=t.dtype)
    if out.shape != t.shape:
        out = out.expand_as(t)
    return out


def time_derivative(fn: TimeFn, t: Tensor | float) -> Tensor:
    r"""Element-wise derivative ``d fn(t) / dt`` of an element-wise time function, by forward-mode AD.

    Uses ``torch.func.jvp`` with tangent ``1``: for an element-wise ``fn`` the Jacobian is diagonal, so the
    JVP is exactly the derivative at every entry of ``t`` (any shape). The result stays differentiable
    (it composes with autograd and ``torch.func`` transforms).
    """
    t = _as_time(t)

    def f(tt: Tensor) -> Tensor:
        return _like_time(fn(tt), tt)

    _, dfdt = torch.func.jvp(f, (t,), (torch.ones_like(t),))
    return dfdt


class Schedule:
    r"""Base class of ``(alpha_t, sigma_t)`` schedules for ``x_t = alpha_t x1 + sigma_t x0``.

    Subclasses implement :meth:`alpha` and :meth:`sigma`; :meth:`d_alpha` / :meth:`d_sigma` fall back to
    forward-mode autodiff (:func:`time_derivative`) when a subclass does not override them.

    Signal-to-noise ratio (Flow Matching Guide and Code, "scheduler change"):
    ``snr(t) = alpha_t^2 / sigma_t^2`` and ``log_snr(t) = 2 (log alpha_t - log sigma_t)``, which is ``-inf``
    at ``t = 0`` and ``+inf`` at ``t = 1`` for the standard schedules. :meth:`t_from_log_snr` inverts it
    (closed forms in the subclasses; a vectorised float64 bisection in the base class, which requires
    ``log_snr`` to be increasing in ``t``).
    """

    name: str = "schedule"

    def alpha(self, t: Tensor) -> Tensor:
        """Data coefficient ``alpha_t``."""
        raise NotImplementedError

    def sigma(self, t: Tensor) -> Tensor:
        """Source (noise) coefficient ``sigma_t``."""
        raise NotImplementedError

    def d_alpha(self, t: Tensor) -> Tensor:
        """``d alpha_t / dt`` (autodiff unless overridden)."""
        return time_derivative(self.alpha, t)

    def d_sigma(self, t: Tensor) -> Tensor:
        """``d sigma_t / dt`` (autodiff unless overridden)."""
        return time_derivative(self.sigma, t)

    def snr(self, t: Tensor) -> Tensor:
        """Signal-to-noise ratio ``alpha_t^2 / sigma_t^2`` (``inf`` where ``sigma_t = 0``)."""
        t = _as_time(t)
        return self.alpha(t) ** 2 / self.sigma(t) ** 2

    def log_snr(self, t: Tensor) -> Tensor:
        """``lambda_t = log(alpha_t^2 / sigma_t^2) = 2 (log alpha_t - log sigma_t)``."""
        t = _as_time(t)
        return 2.0 * (torch.log(self.alpha(t)) - torch.log(self.sigma(t)))

    def t_from_log_snr(self, lam: Tensor) -> Tensor:
        """Inverse of :meth:`log_snr`: the time ``t in [0, 1]`` with ``log_snr(t) = lam``.

        Generic version: vectorised bisection in float64 (60 halvings, error below 1e-15 in ``t``), which
        requires ``log_snr`` to be increasing on ``[0, 1]``. Values outside the schedule's range clamp to
        the nearest end. Not differentiable; subclasses with a closed form override it.
        """
        lam = _as_time(lam)
        lam64 = lam.detach().to(torch.float64)
        lo = torch.zeros_like(lam64)
        hi = torch.ones_like(lam64)
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            below = self.log_snr(mid) < lam64
            lo = torch.where(below, mid, lo)
            hi = torch.where(below, hi, mid)
        return (0.5 * (lo + hi)).to(lam.dtype)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class LinearSchedule(Schedule):
    r"""Conditional-OT / rectified-flow schedule ``alpha_t = t, sigma_t = 1 - t``.

    From Lipman et al., "Flow Matching for Generative Modeling" (CondOT path, ``sigma_min = 0``) and Liu
    et al., "Flow Straight and Fast" (rectified flow). ``log_snr = 2 log(t / (1 - t))``, so
    ``t = sigmoid(lambda / 2)``.
    """

    name = "linear"

    def alpha(self, t: Tensor) -> Tensor:
        return _as_time(t)

    def sigma(self, t: Tensor) -> Tensor:
        return 1.0 - _as_time(t)

    def d_alpha(self, t: Tensor) -> Tensor:
        return torch.ones_like(_as_time(t))

    def d_sigma(self, t: Tensor) -> Tensor:
        return -torch.ones_like(_as_time(t))

    def t_from_log_snr(self, lam: Tensor) -> Tensor:
        return torch.sigmoid(0.5 * _as_time(lam))


class CosineSchedule(Schedule):
    r"""Cosine (trigonometric) schedule ``alpha_t = sin(pi t / 2), sigma_t = cos(pi t / 2)``.

    Variance preserving (``alpha^2 + sigma^2 = 1``); from Nichol & Dhariwal, "Improved Denoising Diffusion
    Probabilistic Models" in flow time, as listed in the Flow Matching Guide and Code.
    ``snr = tan^2(pi t/2)``, so ``t = (2 / pi) atan(exp(lambda / 2))``.
    """

    name = "cosine"

    def alpha(self, t: Tensor) -> Tensor:
        return torch.sin(0.5 * math.pi * _as_time(t))

    def sigma(self, t: Tensor) -> Tensor:
        return torch.cos(0.5 * math.pi * _as_time(t))

    def d_alpha(self, t: Tensor) -> Tensor:
        return 0.5 * math.pi * torch.cos(0.5 * math.pi * _as_time(t))

    def d_sigma(self, t: Tensor) -> Tensor:
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * _as_time(t))

    def t_from_log_snr(self, lam: Tensor) -> Tensor:
        return (2.0 / math.pi) * torch.atan(torch.exp(0.5 * _as_time(lam)))


class VPSchedule(Schedule):
    r"""Variance-preserving (DDPM / VP-SDE) schedule in fewflow time (``t = 1`` is data).

    With the linear noise rate ``beta(s) = beta_min + s (beta_max - beta_min)`` of Song et al., "Score-Based
    Generative Modeling through Stochastic Differential Equations", and ``T(s) = int_0^s beta(u) du =
    beta_min s + (beta_max - beta_min) s^2 / 2``, the diffusion time is ``s = 1 - t`` and

        alpha_t = exp(-T(1 - t) / 2),    sigma_t = sqrt(1 - alpha_t^2).

    Note: the VP path does *not* start at pure noise: ``alpha(0) = exp(-T(1)/2)``, about ``6.6e-3`` for the
    defaults 0.1 / 20 (``alpha(0)^2 = exp(-T(1))`` about ``4.3e-5``), not 0, so
    ``log_snr(0) = -log(expm1(T(1)))`` is finite (about -10.05). ``d_sigma = -alpha d_alpha / sigma`` diverges
    at ``t = 1``; it is evaluated with ``sigma`` floored at the dtype's machine epsilon, so it is large but
    finite there. ``sigma`` is computed as ``sqrt(-expm1(-T))`` to keep precision near ``t = 1``.
    """

    name = "vp"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0) -> None:
        if not (beta_min > 0 and beta_max >= beta_min):
            raise FewflowError(f"VPSchedule needs 0 < beta_min <= beta_max, got {beta_min}, {beta_max}")
        self.beta_min = float(beta_min)
        self.beta_max = float(beta_max)

    def _T(self, s: Tensor) -> Tensor:
        return self.beta_min * s + 0.5 * (self.beta_max - self.beta_min) * s**2

    def _beta(self, s: Tensor) -> Tensor:
        return self.beta_min + (self.beta_max - self.beta_min) * s

    def alpha(self, t: Tensor) -> Tensor:
        return torch.exp(-0.5 * self._T(1.0 - _as_time(t)))

    def sigma(self, t: Tensor) -> Tensor:
        return torch.sqrt(-torch.expm1(-self._T(1.0 - _as_time(t))))

    def d_alpha(self, t: Tensor) -> Tensor:
        s = 1.0 - _as_time(t)
        return 0.5 * self._beta(s) * torch.exp(-0.5 * self._T(s))

    def d_sigma(self, t: Tensor) -> Tensor:
        t = _as_time(t)
        floor = torch.finfo(t.dtype).eps
        return -self.alpha(t) * self.d_alpha(t) / self.sigma(t).clamp_min(floor)

    def log_snr(self, t: Tensor) -> Tensor:
        # alpha^2 / sigma^2 = exp(-T) / (1 - exp(-T)) = 1 / expm1(T)
        return -torch.log(torch.expm1(self._T(1.0 - _as_time(t))))

    def t_from_log_snr(self, lam: Tensor) -> Tensor:
        # T(1 - t) = log(1 + exp(-lam)) = softplus(-lam); solve the quadratic for s = 1 - t >= 0.
        lam = _as_time(lam)
        # c beyond T(1) means "before t = 0": clamp (also avoids inf / inf for lam = -inf).
        t_one = self.beta_min + 0.5 * (self.beta_max - self.beta_min)
        c = torch.nn.functional.softplus(-lam).clamp_max(t_one)
        db = self.beta_max - self.beta_min
        if db == 0:
            s = c / self.beta_min
        else:
            s = 2.0 * c / (self.beta_min + torch.sqrt(self.beta_min**2 + 2.0 * db * c))
        return (1.0 - s).clamp(0.0, 1.0)

    def __repr__(self) -> str:
        return f"VPSchedule(beta_min={self.beta_min}, beta_max={self.beta_max})"


class PolynomialSchedule(Schedule):
    r"""Polynomial convex schedule ``alpha_t = t^n, sigma_t = 1 - t^n`` (``n > 0``).

    This is the ``PolynomialConvexScheduler`` of Lipman et al., "Flow Matching Guide and Code"; ``n = 1`` is
    the linear schedule. ``sqrt(snr) = t^n / (1 - t^n)``, so ``t = sigmoid(lambda / 2)^(1/n)``. For ``n > 1``
    the path is stationary at ``t = 0`` (``d_alpha(0) = 0``), so predictions cannot be converted from a
    velocity there (see :class:`fewflow.paths.AffinePath`).
    """

    name = "polynomial"

    def __init__(self, n: float = 2.0) -> None:
        if not (isinstance(n, (int, float)) and n > 0):
            raise FewflowError(f"PolynomialSchedule needs an exponent n > 0, got {n!r}")
        self.n = float(n)

    def alpha(self, t: Tensor) -> Tensor:
        return _as_time(t) ** self.n

    def sigma(self, t: Tensor) -> Tensor:
        return 1.0 - _as_time(t) ** self.n

    def d_alpha(self, t: Tensor) -> Tensor:
        t = _as_time(t)
        if self.n == 1.0:
            return torch.ones_like(t)
        return self.n * t ** (self.n - 1.0)

    def d_sigma(self, t: Tensor) -> Tensor:
        return -self.d_alpha(t)

    def t_from_log_snr(self, lam: Tensor) -> Tensor:
        return torch.sigmoid(0.5 * _as_time(lam)) ** (1.0 / self.n)

    def __repr__(self) -> str:
        return f"PolynomialSchedule(n={self.n:g})"


class FunctionSchedule(Schedule):
    r"""A schedule from user callables ``alpha_fn(t)``, ``sigma_fn(t)`` (element-wise on tensors).

    Derivatives use ``d_alpha_fn`` / ``d_sigma_fn`` when given, otherwise forward-mode autodiff, so the
    callables must be written with differentiable torch operations. :meth:`t_from_log_snr` uses the generic
    bisection (``log_snr`` must be increasing).
    """

    name = "function"

    def __init__(
        self,
        alpha_fn: TimeFn,
        sigma_fn: TimeFn,
        d_alpha_fn: TimeFn | None = None,
        d_sigma_fn: TimeFn | None = None,
    ) -> None:
        for nm, fn in [("alpha_fn", alpha_fn), ("sigma_fn", sigma_fn), ("d_alpha_fn", d_alpha_fn),
                       ("d_sigma_fn", d_sigma_fn)]:
            if fn is not None and not callable(fn):
                raise FewflowError(f"FunctionSchedule: {nm} must be callable, got {type(fn).__name__}")
        self.alpha_fn = alpha_fn
        self.sigma_fn = sigma_fn
        self.d_alpha_fn = d_alpha_fn
        self.d_sigma_fn = d_sigma_fn

    def alpha(self, t: Tensor) -> Tensor:
        t = _as_time(t)
        return _like_time(self.alpha_fn(t), t)

    def sigma(self, t: Tensor) -> Tensor:
        t = _as_time(t)
        return _like_time(self.sigma_fn(t), t)

    def d_alpha(self, t: Tensor) -> Tensor:
        if self.d_alpha_fn is None:
            return time_derivative(self.alpha, t)
        t = _as_time(t)
        return _like_time(self.d_alpha_fn(t), t)

    def d_sigma(self, t: Tensor) -> Tensor:
        if self.d_sigma_fn is None:
            return time_derivative(self.sigma, t)
        t = _as_time(t)
        return _like_time(self.d_sigma_fn(t), t)


_SCHEDULES: dict[str, type[Schedule]] = {
    "linear": LinearSchedule,
    "cosine": CosineSchedule,
    "vp": VPSchedule,
    "polynomial": PolynomialSchedule,
}
SCHEDULES = tuple(_SCHEDULES)
_ALIASES = {"condot": "linear", "rectified_flow": "linear", "ot": "linear", "trig": "cosine"}


def get_schedule(name: str, **kw) -> Schedule:
    """Build a schedule by name: ``"linear"``, ``"cosine"``, ``"vp"``, ``"polynomial"`` (keyword arguments
    go to the constructor, e.g. ``get_schedule("polynomial", n=3)``). Unknown names raise FewflowError."""
    if not isinstance(name, str):
        raise FewflowError(f"schedule name must be a string, got {type(name).__name__}")
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in _SCHEDULES:
        raise unknown_name("schedule", name, list(_SCHEDULES) + list(_ALIASES))
    try:
        return _SCHEDULES[key](**kw)
    except TypeError as err:
        raise FewflowError(f"bad arguments for schedule {name!r}: {err}") from None
