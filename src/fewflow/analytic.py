"""Closed-form flows between Gaussians: exact velocity, score, density and flow map.

For a standard normal source ``x0 ~ N(0, I)`` and Gaussian data ``x1 ~ N(m, S)`` the affine path
``x_t = alpha_t x1 + sigma_t x0`` has Gaussian marginals

    p_t = N(alpha_t m, Sigma_t),    Sigma_t = alpha_t^2 S + sigma_t^2 I,

and the marginal (flow-matching) velocity ``v(x, t) = E[d_alpha x1 + d_sigma x0 | x_t = x]`` is linear in x:

    v(x, t) = d_alpha m + (d_alpha alpha S + d_sigma sigma I) Sigma_t^{-1} (x - alpha_t m).

In the eigenbasis ``S = Q diag(lam) Q^T`` every coordinate ``y_i = (Q^T (x - alpha_t m))_i`` obeys
``dy_i/dt = k_i(t) y_i`` with
``k_i = (d_alpha alpha lam_i + d_sigma sigma) / Sigma_{t,i} = 1/2 d/dt log Sigma_{t,i}``,
so the flow map of the probability-flow ODE is exact for any schedule:

    X_{s->t}(x) = alpha_t m + Q diag(sqrt(Sigma_t / Sigma_s)) Q^T (x - alpha_s m).

References: Lipman et al., "Flow Matching for Generative Modeling" (2023) for the path and the marginal
velocity; Albergo, Boffi & Vanden-Eijnden, "Stochastic Interpolants: A Unifying Framework for Flows and
Diffusions" (2023) for the Gaussian score ``s = -Sigma_t^{-1}(x - alpha_t m)``; Boffi, Albergo &
Vanden-Eijnden, "Flow Map Matching" (2024) / Geng et al., "Mean Flows for One-step Generative Modeling"
(2025) for the flow map and the average velocity ``u(x, s, t) = (X_{s->t}(x) - x) / (t - s)``.
These objects are test oracles for solvers, likelihoods and few-step objectives.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from fewflow._validate import FewflowError, as_batch_time, check_finite

__all__ = ["GaussianFlow"]

_SCHEDULE_METHODS = ("alpha", "sigma", "d_alpha", "d_sigma")


class GaussianFlow:
    """Exact marginal velocity / score / density / flow map for ``N(0, I) -> N(mean, cov)``.

    Args:
        mean: ``(D,)`` data mean ``m``.
        cov: ``(D, D)`` symmetric positive semi-definite data covariance ``S``, or ``(D,)`` variances
            (diagonal ``S``). The velocity is singular at a time where ``Sigma_t`` has a zero eigenvalue
            (e.g. at ``t = 1`` if ``S`` is singular).
        schedule: any object with ``alpha(t)``, ``sigma(t)``, ``d_alpha(t)``, ``d_sigma(t)`` mapping a
            tensor to a tensor of the same shape (e.g. ``fewflow.paths.LinearSchedule()``).

    Inputs ``x`` are ``(B, D)`` or ``(B, ...)`` with ``prod(...) = D``; outputs keep ``x``'s shape,
    device and dtype. The object is itself a velocity model: ``flow(x, t) == flow.velocity(x, t)``.
    """

    is_flow_map = False

    def __init__(self, mean: Tensor, cov: Tensor, schedule: Any) -> None:
        mean = torch.as_tensor(mean)
        cov = torch.as_tensor(cov)
        check_finite("mean", mean)
        check_finite("cov", cov)
        if mean.dim() != 1:
            raise FewflowError(f"mean must be a 1-D tensor (D,), got shape {tuple(mean.shape)}")
        d = mean.shape[0]
        missing = [name for name in _SCHEDULE_METHODS if not callable(getattr(schedule, name, None))]
        if missing:
            raise FewflowError(f"schedule must provide alpha, sigma, d_alpha, d_sigma; missing {missing}")
        m64 = mean.detach().to(torch.float64)
        c64 = cov.detach().to(device=mean.device, dtype=torch.float64)
        if c64.dim() == 1:
            if c64.shape[0] != d:
                raise FewflowError(f"cov variances have shape {tuple(c64.shape)} but mean has D = {d}")
            lam = c64.clone()
            q = torch.eye(d, dtype=torch.float64, device=mean.device)
            c64 = torch.diag(lam)
        elif c64.dim() == 2:
            if c64.shape != (d, d):
                raise FewflowError(f"cov must have shape ({d}, {d}) to match mean, got {tuple(c64.shape)}")
            if not torch.allclose(c64, c64.T, atol=1e-8 * (1.0 + float(c64.abs().max()))):
                raise FewflowError("cov must be symmetric")
            lam, q = torch.linalg.eigh(c64)
        else:
            raise FewflowError(f"cov must be (D, D) or (D,), got shape {tuple(c64.shape)}")
        if float(lam.min()) < -1e-8 * (1.0 + float(lam.abs().max())):
            raise FewflowError(
                f"cov must be positive semi-definite, smallest eigenvalue {float(lam.min()):.3g}"
            )
        self.mean = mean
        self.cov = c64.to(cov.dtype if cov.is_floating_point() else torch.float64)
        self.schedule = schedule
        self.dim = d
        self._m64, self._q64, self._lam64 = m64, q, lam.clamp_min(0.0)
        self._cache: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor, Tensor]] = {}

    # ------------------------------------------------------------------ helpers
    def _params(self, ref: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        key = (ref.device, ref.dtype)
        if key not in self._cache:
            kw = {"device": ref.device, "dtype": ref.dtype}
            self._cache[key] = (self._m64.to(**kw), self._q64.to(**kw), self._lam64.to(**kw))
        return self._cache[key]

    def _flat(self, x: Tensor) -> Tensor:
        if not torch.is_tensor(x) or not x.is_floating_point():
            raise FewflowError("x must be a floating-point tensor")
        if x.dim() < 2 or x[0].numel() != self.dim:
            raise FewflowError(f"x must have shape (B, ...) with {self.dim} features, got {tuple(x.shape)}")
        return x.reshape(x.shape[0], self.dim)

    def _coeffs(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        sch = self.schedule
        return sch.alpha(t), sch.sigma(t), sch.d_alpha(t), sch.d_sigma(t)

    def _sigma_t(self, a: Tensor, s: Tensor, lam: Tensor) -> Tensor:
        """Eigenvalues of ``Sigma_t`` as ``(B, D)``: ``alpha^2 lam + sigma^2``."""
        return a[:, None] ** 2 * lam + s[:, None] ** 2

    # ------------------------------------------------------------------ public API
    def marginal(self, t: float) -> tuple[Tensor, Tensor]:
        """Mean ``alpha_t m`` and covariance ``alpha_t^2 S + sigma_t^2 I`` of ``p_t`` (float64)."""
        tt = torch.tensor([float(t)], dtype=torch.float64, device=self._m64.device)
        a, s = float(self.schedule.alpha(tt)[0]), float(self.schedule.sigma(tt)[0])
        eye = torch.eye(self.dim, dtype=torch.float64, device=self._m64.device)
        return a * self._m64, a * a * (self._q64 * self._lam64) @ self._q64.T + s * s * eye

    def velocity(self, x: Tensor, t: Tensor | float) -> Tensor:
        """``v(x, t) = d_alpha m + (d_alpha alpha S + d_sigma sigma I) Sigma_t^{-1} (x - alpha m)``."""
        xf = self._flat(x)
        m, q, lam = self._params(xf)
        tb = as_batch_time(t, xf)
        a, s, da, ds = self._coeffs(tb)
        sig = self._sigma_t(a, s, lam)
        k = (da[:, None] * a[:, None] * lam + ds[:, None] * s[:, None]) / sig
        y = (xf - a[:, None] * m) @ q
        v = da[:, None] * m + (k * y) @ q.T
        return v.reshape(x.shape)

    __call__ = velocity

    def divergence(self, x: Tensor, t: Tensor | float) -> Tensor:
        """``div v = tr((d_alpha alpha S + d_sigma sigma I) Sigma_t^{-1})`` (independent of x), shape (B,)."""
        xf = self._flat(x)
        _, _, lam = self._params(xf)
        tb = as_batch_time(t, xf)
        a, s, da, ds = self._coeffs(tb)
        return ((da[:, None] * a[:, None] * lam + ds[:, None] * s[:, None]) / self._sigma_t(a, s, lam)).sum(1)

    def log_prob(self, x: Tensor, t: Tensor | float = 1.0) -> Tensor:
        """``log N(x; alpha_t m, Sigma_t)``, shape (B,)."""
        xf = self._flat(x)
        m, q, lam = self._params(xf)
        tb = as_batch_time(t, xf)
        a, s = self.schedule.alpha(tb), self.schedule.sigma(tb)
        sig = self._sigma_t(a, s, lam)
        y = (xf - a[:, None] * m) @ q
        return -0.5 * (y * y / sig).sum(1) - 0.5 * torch.log(2 * math.pi * sig).sum(1)

    def score(self, x: Tensor, t: Tensor | float) -> Tensor:
        """``grad_x log p_t(x) = -Sigma_t^{-1} (x - alpha_t m)``."""
        xf = self._flat(x)
        m, q, lam = self._params(xf)
        tb = as_batch_time(t, xf)
        a, s = self.schedule.alpha(tb), self.schedule.sigma(tb)
        y = (xf - a[:, None] * m) @ q
        return (-(y / self._sigma_t(a, s, lam)) @ q.T).reshape(x.shape)

    def sample(
        self,
        n: int,
        t: float = 1.0,
        generator: torch.Generator | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        """``n`` exact samples of ``p_t = N(alpha_t m, Sigma_t)`` as ``(n, D)``.

        Device and dtype default to ``mean``'s (float32 if ``mean`` is not floating point).
        """
        if int(n) < 1:
            raise FewflowError(f"n must be a positive integer, got {n}")
        dev = torch.device(device) if device is not None else self.mean.device
        dt = dtype or (self.mean.dtype if self.mean.is_floating_point() else torch.get_default_dtype())
        ref = torch.empty(0, device=dev, dtype=dt)
        m, q, lam = self._params(ref)
        tt = torch.full((1,), float(t), device=dev, dtype=dt)
        a, s = self.schedule.alpha(tt), self.schedule.sigma(tt)
        sig = self._sigma_t(a, s, lam)
        eps = torch.randn(int(n), self.dim, generator=generator, device=dev, dtype=dt)
        return a * m + (eps * sig.sqrt()) @ q.T

    def flow_map(self, x: Tensor, s: Tensor | float, t: Tensor | float) -> Tensor:
        """Exact ODE flow map
        ``X_{s->t}(x) = alpha_t m + Q diag(sqrt(Sigma_t/Sigma_s)) Q^T (x - alpha_s m)``."""
        xf = self._flat(x)
        m, q, lam = self._params(xf)
        sb, tb = as_batch_time(s, xf), as_batch_time(t, xf)
        a_s, s_s = self.schedule.alpha(sb), self.schedule.sigma(sb)
        a_t, s_t = self.schedule.alpha(tb), self.schedule.sigma(tb)
        ratio = (self._sigma_t(a_t, s_t, lam) / self._sigma_t(a_s, s_s, lam)).sqrt()
        y = (xf - a_s[:, None] * m) @ q
        return (a_t[:, None] * m + (ratio * y) @ q.T).reshape(x.shape)

    def average_velocity(self, x: Tensor, s: Tensor | float, t: Tensor | float) -> Tensor:
        """``u(x, s, t) = (X_{s->t}(x) - x) / (t - s)``; equals ``v(x, s)`` where ``t == s``.

        Computed as
        ``[(alpha_t - alpha_s) m + Q expm1(1/2 log(Sigma_t/Sigma_s)) Q^T (x - alpha_s m)] / (t - s)``
        so short jumps keep their precision.
        """
        xf = self._flat(x)
        m, q, lam = self._params(xf)
        sb, tb = as_batch_time(s, xf), as_batch_time(t, xf)
        a_s, s_s = self.schedule.alpha(sb), self.schedule.sigma(sb)
        a_t, s_t = self.schedule.alpha(tb), self.schedule.sigma(tb)
        log_ratio = torch.log(self._sigma_t(a_t, s_t, lam)) - torch.log(self._sigma_t(a_s, s_s, lam))
        y = (xf - a_s[:, None] * m) @ q
        delta = (a_t - a_s)[:, None] * m + (torch.expm1(0.5 * log_ratio) * y) @ q.T
        h = tb - sb
        same = h == 0
        u = delta / torch.where(same, torch.ones_like(h), h)[:, None]
        if bool(same.any()):
            u = torch.where(same[:, None], self.velocity(xf, sb), u)
        return u.reshape(x.shape)

    def as_flow_map_model(self) -> _GaussianFlowMapModel:
        """A flow-map model ``u(x, s, t)`` (``is_flow_map = True``) returning the exact average velocity."""
        return _GaussianFlowMapModel(self)


class _GaussianFlowMapModel:
    """``u(x, s, t)`` view of a :class:`GaussianFlow` for solvers that take flow-map models."""

    is_flow_map = True

    def __init__(self, flow: GaussianFlow) -> None:
        self.flow = flow

    def __call__(self, x: Tensor, s: Tensor | float, t: Tensor | float) -> Tensor:
        return self.flow.average_velocity(x, s, t)
