"""Probability paths on the probability simplex for categorical sequences (t = 0 source, t = 1 data).

A sequence of ``L`` tokens over ``K`` states is a point ``x`` of ``(Delta^{K-1})^L``: ``x`` has shape
``(B, L, K)`` (any ``(B, ..., K)`` works), every row ``x[b, l]`` is non-negative and sums to one, and a
clean token ``k`` is the vertex ``e_k`` (one-hot). All functions here are pure functions of tensors.

**Gumbel-softmax path** (GSFM; Tang, Zhang, Tong, Chatterjee, "Gumbel-Softmax Flow Matching with
Straight-Through Guidance for Controllable Biological Sequence Generation", arXiv 2503.17361). GSFM's own
time already runs from the smooth simplex centre (t = 0, large temperature) to a vertex (t = 1, data),
so it is fewflow's convention unchanged.

* temperature (the paper's Eq. 8): ``tau(t) = tau_max exp(-lambda t)``, so ``d tau / dt = -lambda tau``;
* interpolant (Eq. 9), with i.i.d. Gumbel noise ``g_i = -log(-log U_i)``:
  ``x_t = softmax((e_k + g / beta) / tau(t))``. At ``t = 0`` (``tau_max = 10``) it lies near the centre
  ``1/K``; as ``tau -> 0`` it tends to the vertex ``argmax(e_k + g / beta)`` (``e_k`` unless the noise
  beats the margin 1, which ``beta`` controls);
* conditional velocity (Eq. 13): the time derivative of the interpolant with ``g = 0``. For
  ``x = softmax(z / tau)``, ``dx_i / d tau = -(x_i / tau^2) (z_i - <x, z>)`` and with ``z = e_k``

      u_t(x | e_k)_i = (lambda / tau(t)) x_i (delta_ik - x_k);

* marginal velocity (Eq. 12): ``u_t(x)_i = sum_k p(e_k | x_t = x) u_t(x | e_k)_i
  = (lambda / tau(t)) x_i (p_i - <p, x>)`` with ``p`` the clean-token probabilities a denoiser predicts
  (trained by cross-entropy, Eq. 11). It sums to zero over ``K``: the flow stays on the simplex's affine
  hull, and it is proportional to ``x_i``, so a coordinate at zero stays at zero.

What is the paper's and what is inferred here: Eq. 8, 9, 11, 12 and 13 and the defaults ``tau_max = 10``,
``lambda = 3``, ``beta = 2`` are the paper's as quoted by a third-party implementation (no official code
was available); the derivation of Eq. 13 above is re-done here and checked against autograd in the tests.
Note that with the Gumbel noise kept, ``d x_t / dt = lambda x_i (log x_i - <x, log x>)`` does not depend
on ``k`` at all (``z = tau log x + const``): Eq. 13 is the velocity of the noise-free path, which is what
the paper regresses. The temperature floor ``tau_min`` (``tau(t) >= tau_min`` in the velocity, so the rate
``lambda / tau`` stays bounded) is a sampler safeguard, not in the paper's equations.

**Linear simplex path** (the baseline of the Dirichlet FM paper: Stark et al., "Dirichlet Flow Matching
with Applications to DNA Sequence Design", arXiv 2402.05841): ``x_t = (1 - t) x0 + t e_k`` with
``x0 ~ Dirichlet(1, ..., 1)`` (uniform on the simplex). Its conditional velocity is
``e_k - x0 = (e_k - x_t) / (1 - t)``, so the marginal velocity from a denoiser ``p`` is
``(p - x_t) / (1 - t)``. A step from ``t`` to ``s <= 1`` of Euler is
``x + (s - t) / (1 - t) (p - x)``, a convex combination of ``x`` and ``p``: it stays on the simplex, and
the step that ends at ``t = 1`` lands exactly on ``p``. The velocity itself uses
``max(1 - t, t_eps)`` so it stays finite if evaluated at ``t = 1``.

**Projection** (:func:`project_simplex`): ``"clamp"`` (clamp at 0, renormalise; what the GSFM sampler uses)
or ``"euclidean"`` (the nearest point of the simplex in L2; Wang & Carreira-Perpinan, "Projection onto the
probability simplex: An efficient algorithm with a simple proof, and an application", arXiv 1309.1541).
Both are the identity on the simplex. The sampler uses ``"clamp"``: the GSFM velocity is multiplicative
(``x_i`` times a bounded rate), so the Euler step leaves the simplex only through a coordinate that
overshoots below zero, and clamping it while keeping the ratios of the other coordinates keeps the token
distribution they encode; the Euclidean projection subtracts the same amount from every coordinate and
would zero small but valid ones (which then stay zero under the multiplicative velocity).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fewflow._validate import FewflowError, as_batch_time, check_finite

__all__ = [
    "PROJECTIONS",
    "dirichlet_source",
    "gumbel_conditional_velocity",
    "gumbel_interpolant",
    "gumbel_marginal_velocity",
    "gumbel_noise",
    "gumbel_softmax_start",
    "gumbel_temperature",
    "linear_simplex_interpolant",
    "linear_simplex_velocity",
    "project_simplex",
    "uniform_like",
]

PROJECTIONS = ("clamp", "euclidean")
_TINY = 1e-20


def _check_simplex_input(name: str, x: Tensor) -> None:
    if not torch.is_tensor(x) or not x.is_floating_point():
        raise FewflowError(f"{name} must be a floating-point tensor (B, ..., K), got "
                           f"{type(x).__name__ if not torch.is_tensor(x) else x.dtype}")
    if x.dim() < 2 or x.shape[-1] < 2:
        raise FewflowError(f"{name} must have shape (B, ..., K) with K >= 2 states, got {tuple(x.shape)}")
    check_finite(name, x)


def _bt(t: Tensor | float, x: Tensor) -> Tensor:
    """``t`` as ``(B, 1, ..., 1)`` broadcasting against ``x`` (a scalar is broadcast)."""
    tb = as_batch_time(t, x)
    return tb.reshape(tb.shape[0], *([1] * (x.dim() - 1)))


def _check_schedule(tau_max: float, lam: float, beta: float | None = None) -> None:
    if not (math.isfinite(tau_max) and tau_max > 0):
        raise FewflowError(f"tau_max must be a positive number, got {tau_max}")
    if not (math.isfinite(lam) and lam >= 0):
        raise FewflowError(f"lambda (lam) must be a number >= 0, got {lam}")
    if beta is not None and not (math.isfinite(beta) and beta > 0):
        raise FewflowError(f"beta must be a positive number, got {beta}")


def uniform_like(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """``U(0, 1)`` draws shaped like ``x`` on its device and dtype (drawn on the generator's device)."""
    if generator is None:
        return torch.rand(x.shape, device=x.device, dtype=x.dtype)
    return torch.rand(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)


def gumbel_noise(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Standard Gumbel draws ``g = -log(-log U)`` shaped like ``x`` (``U`` kept inside ``(0, 1)``)."""
    u = uniform_like(x, generator).clamp(1e-10, 1.0 - 1e-7)
    return -torch.log(-torch.log(u))


def gumbel_temperature(t: Tensor | float, tau_max: float = 10.0, lam: float = 3.0,
                       tau_min: float = 0.0) -> Tensor:
    """``tau(t) = max(tau_max exp(-lambda t), tau_min)`` (GSFM Eq. 8; the floor is the sampler's)."""
    _check_schedule(tau_max, lam)
    t = torch.as_tensor(t)
    tau = tau_max * torch.exp(-lam * t)
    return tau.clamp_min(tau_min) if tau_min > 0 else tau


def gumbel_interpolant(
    x1: Tensor, t: Tensor | float, *, tau_max: float = 10.0, lam: float = 3.0, beta: float = 2.0,
    gumbel: Tensor | None = None, generator: torch.Generator | None = None,
) -> Tensor:
    """GSFM's interpolant (Eq. 9): ``x_t = softmax((x1 + g / beta) / tau(t))`` over the last axis.

    Args:
        x1: clean tokens as one-hot vertices ``e_k``, shape ``(B, ..., K)``.
        t: ``(B,)`` times in ``[0, 1]`` (or a scalar).
        gumbel: the Gumbel noise ``g`` shaped like ``x1`` (``torch.zeros_like(x1)`` gives the noise-free
            path of Eq. 13); ``None`` draws it with ``generator``.

    Returns:
        ``x_t``, shaped like ``x1``, on the simplex (entries > 0 summing to one).
    """
    _check_simplex_input("x1", x1)
    _check_schedule(tau_max, lam, beta)
    g = gumbel_noise(x1, generator) if gumbel is None else gumbel
    if g.shape != x1.shape:
        raise FewflowError(f"gumbel noise must have the shape of x1 {tuple(x1.shape)}, got {tuple(g.shape)}")
    tau = gumbel_temperature(_bt(t, x1), tau_max, lam)
    return torch.softmax((x1 + g / beta) / tau, dim=-1)


def gumbel_softmax_start(like: Tensor, *, tau_max: float = 10.0, beta: float = 2.0,
                         gumbel: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
    """The sampler's start ``softmax(g / (beta tau_max))``: the t = 0 interpolant without the target term
    ``e_k / tau_max`` (which the sampler cannot know). This choice is inferred, not stated in the paper."""
    _check_schedule(tau_max, 0.0, beta)
    g = gumbel_noise(like, generator) if gumbel is None else gumbel
    return torch.softmax(g / (beta * tau_max), dim=-1)


def gumbel_conditional_velocity(
    x: Tensor, x1: Tensor, t: Tensor | float, *, tau_max: float = 10.0, lam: float = 3.0,
    tau_min: float = 0.0,
) -> Tensor:
    """GSFM's conditional velocity (Eq. 13): ``u_t(x | x1)_i = (lambda / tau(t)) x_i (x1_i - <x, x1>)``.

    For a vertex ``x1 = e_k`` this is ``(lambda / tau) x_i (delta_ik - x_k)``, the exact time derivative of
    the noise-free interpolant ``softmax(e_k / tau(t))`` at ``x`` on that path. The formula is linear in
    ``x1``, so a probability vector ``x1 = p`` gives the marginal velocity
    (:func:`gumbel_marginal_velocity`). The result sums to zero over the last axis.
    """
    _check_simplex_input("x", x)
    if x1.shape != x.shape:
        raise FewflowError(f"x1 must have the shape of x {tuple(x.shape)}, got {tuple(x1.shape)}")
    tau = gumbel_temperature(_bt(t, x), tau_max, lam, tau_min)
    return (lam / tau) * x * (x1 - (x * x1).sum(-1, keepdim=True))


def gumbel_marginal_velocity(
    x: Tensor, p: Tensor, t: Tensor | float, *, tau_max: float = 10.0, lam: float = 3.0,
    tau_min: float = 0.0,
) -> Tensor:
    """GSFM's marginal (parameterised) velocity (Eq. 12):
    ``u_t(x)_i = sum_k p_k u_t(x | e_k)_i = (lambda / tau(t)) x_i (p_i - <p, x>)``, with ``p`` the clean-token
    probabilities ``p(e_k | x_t = x)`` (a denoiser's softmax). Tangent to the simplex (sums to zero)."""
    return gumbel_conditional_velocity(x, p, t, tau_max=tau_max, lam=lam, tau_min=tau_min)


def dirichlet_source(like: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Draws of the uniform distribution on the simplex, ``Dirichlet(1, ..., 1)``, shaped like ``like``:
    normalised standard exponentials ``E_i / sum_j E_j`` with ``E_i = -log U_i``."""
    _check_simplex_input("like", like)
    e = -torch.log(uniform_like(like, generator).clamp_min(1e-12))
    return e / e.sum(-1, keepdim=True)


def linear_simplex_interpolant(x0: Tensor, x1: Tensor, t: Tensor | float) -> Tensor:
    """``x_t = (1 - t) x0 + t x1`` (a convex combination: on the simplex when ``x0`` and ``x1`` are)."""
    _check_simplex_input("x1", x1)
    if x0.shape != x1.shape:
        raise FewflowError(f"x0 must have the shape of x1 {tuple(x1.shape)}, got {tuple(x0.shape)}")
    tb = _bt(t, x1)
    return (1.0 - tb) * x0 + tb * x1


def linear_simplex_velocity(x: Tensor, p: Tensor, t: Tensor | float, *, t_eps: float = 1e-4) -> Tensor:
    """The linear simplex path's velocity from a denoiser: ``(p - x) / max(1 - t, t_eps)``.

    With ``p = e_k`` and ``x = x_t`` it is the conditional velocity ``e_k - x0``; with ``p = p(e_k | x_t)``
    the marginal one. Sums to zero over the last axis when ``x`` and ``p`` are on the simplex."""
    _check_simplex_input("x", x)
    if p.shape != x.shape:
        raise FewflowError(f"p must have the shape of x {tuple(x.shape)}, got {tuple(p.shape)}")
    if not (t_eps > 0):
        raise FewflowError(f"t_eps must be > 0, got {t_eps}")
    return (p - x) / (1.0 - _bt(t, x)).clamp_min(t_eps)


def project_simplex(x: Tensor, method: str = "clamp") -> Tensor:
    """Map each row ``x[..., :]`` onto the probability simplex (a new tensor; ``x`` is not modified).

    ``"clamp"``: ``max(x, 0) / sum max(x, 0)`` (a row with no positive entry becomes uniform).
    ``"euclidean"``: ``argmin_{y in simplex} ||y - x||_2 = max(x - theta, 0)`` with the threshold
    ``theta = (sum_{j <= r} u_j - 1) / r`` from the entries sorted decreasingly ``u``, where ``r`` is the
    largest index with ``u_r - (sum_{j <= r} u_j - 1) / r > 0`` (Wang & Carreira-Perpinan, arXiv 1309.1541).
    See the module docstring for which the sampler uses and why.
    """
    if not torch.is_tensor(x) or not x.is_floating_point() or x.dim() < 1:
        raise FewflowError("project_simplex needs a floating-point tensor (..., K)")
    check_finite("x", x)
    if method == "clamp":
        y = x.clamp_min(0.0)
        s = y.sum(-1, keepdim=True)
        uniform = torch.full_like(y, 1.0 / y.shape[-1])
        return torch.where(s > _TINY, y / s.clamp_min(_TINY), uniform)
    if method == "euclidean":
        k = x.shape[-1]
        u, _ = torch.sort(x, dim=-1, descending=True)
        css = u.cumsum(-1) - 1.0
        idx = torch.arange(1, k + 1, device=x.device, dtype=x.dtype)
        cond = (u - css / idx) > 0
        r = (cond * idx).amax(-1, keepdim=True)  # the last index (1-based) where cond holds
        theta = css.gather(-1, r.long() - 1) / r
        return (x - theta).clamp_min(0.0)
    raise FewflowError(f"unknown projection {method!r}; choose one of {list(PROJECTIONS)}")
