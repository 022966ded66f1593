"""Exact log-likelihood of a continuous normalising flow by the instantaneous change of variables.

For ``dx/dt = v(x, t)`` the density along a trajectory obeys ``d/dt log p_t(x_t) = -div v(x_t, t)``
(Chen et al., "Neural Ordinary Differential Equations", 2018), hence

    log p_1(x_1) = log p_0(x_0) - int_0^1 div v(x_t, t) dt,

where ``x_0`` is obtained by integrating the ODE backwards from ``x_1`` at t = 1 to t = 0. We integrate the
augmented state ``[x, l]`` with ``dl/dt = div v`` from t = 1 (``l = 0``) to t = 0, so
``l(0) = -int_0^1 div v dt`` and ``log p_1(x_1) = log p_0(x_0) + l(0)``.

The divergence is exact (one backward pass per dimension; fine for small D) or Hutchinson's estimator
``div v ~ eps^T (dv/dx) eps`` with Rademacher or Gaussian probes ``eps`` held fixed along each trajectory
(Grathwohl et al., "FFJORD: Free-form Continuous Dynamics for Scalable Reversible Generative Models", 2019).
The augmented ODE runs through the shared loop (:func:`fewflow.solvers.solve`) or the adaptive solver.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from fewflow._validate import FewflowError, check_batch, check_finite, unknown_name
from fewflow.solvers.grids import as_grid, uniform_grid
from fewflow.solvers.loop import solve, solve_adaptive
from fewflow.solvers.steppers import Stepper

__all__ = ["log_likelihood", "divergence_exact", "divergence_hutchinson"]


def divergence_exact(v: Tensor, x: Tensor) -> Tensor:
    """``sum_i d v_i / d x_i`` per sample for ``v = v(x)`` built with ``x.requires_grad``; shapes ``(B, D)``.

    One backward pass per dimension D (the graph is kept between passes).
    """
    div = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
    for i in range(x.shape[1]):
        (gi,) = torch.autograd.grad(v[:, i].sum(), x, retain_graph=True)
        div = div + gi[:, i]
    return div


def divergence_hutchinson(v: Tensor, x: Tensor, probes: Tensor) -> Tensor:
    """Hutchinson's estimate ``mean_k eps_k^T (dv/dx) eps_k`` with ``probes`` of shape ``(K, B, D)``."""
    est = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
    for k in range(probes.shape[0]):
        (vjp,) = torch.autograd.grad(v, x, grad_outputs=probes[k], retain_graph=True)
        est = est + (vjp * probes[k]).sum(1)
    return est / probes.shape[0]


def _source_log_prob(source: Any) -> Callable[[Tensor], Tensor]:
    if hasattr(source, "log_prob") and callable(source.log_prob):
        return source.log_prob
    if callable(source):
        return source
    raise FewflowError("source must be a callable log-density or an object with .log_prob(x)")


def log_likelihood(
    model: Callable[..., Tensor],
    x1: Tensor,
    source: Any,
    *,
    steps: int = 32,
    stepper: str | Stepper = "rk4",
    grid: Sequence[float] | Tensor | None = None,
    divergence: str = "exact",
    n_probes: int = 1,
    probe: str = "rademacher",
    generator: torch.Generator | None = None,
    cond: Mapping[str, Any] | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
) -> Tensor:
    """``log p_1(x_1)`` under the flow of the velocity model, shape ``(B,)``.

    Args:
        model: velocity model ``v(x, t, **cond)`` (a flow-map model is used through ``u(x, t, t)``).
        x1: data points ``(B, ...)``.
        source: the source density ``log p_0``: a callable ``x -> (B,)`` or an object with ``.log_prob``.
        steps: uniform steps from t = 1 to t = 0 (ignored when ``grid`` or ``stepper="adaptive"``).
        stepper: a fixed-grid stepper name/instance, or ``"adaptive"`` (torchdiffeq dopri5 with rtol/atol).
        grid: explicit nodes, integrated from the largest to the smallest (an increasing grid is reversed);
            the result is ``log p_{g_max}`` relative to ``source`` at ``g_min`` (normally 1 and 0).
        divergence: ``"exact"`` (autograd, D backward passes) or ``"hutchinson"``.
        n_probes / probe: number and kind (``"rademacher"`` or ``"gaussian"``) of Hutchinson probes,
            drawn once from ``generator`` and fixed along each trajectory.
    """
    check_finite("x1", x1)
    check_batch("x1", x1, min_dim=2)
    log_p0 = _source_log_prob(source)
    if divergence not in ("exact", "hutchinson"):
        raise unknown_name("divergence", divergence, ("exact", "hutchinson"))
    shape = x1.shape
    b = shape[0]
    d = x1[0].numel()
    kw = dict(cond) if cond else {}
    is_map = bool(getattr(model, "is_flow_map", False))

    probes = None
    if divergence == "hutchinson":
        if int(n_probes) < 1:
            raise FewflowError(f"n_probes must be >= 1, got {n_probes}")
        probes = torch.randn((int(n_probes), b, d), generator=generator, device=x1.device, dtype=x1.dtype)
        if probe == "rademacher":
            probes = torch.where(probes >= 0, torch.ones_like(probes), -torch.ones_like(probes))
        elif probe != "gaussian":
            raise unknown_name("probe", probe, ("rademacher", "gaussian"))

    def augmented(z: Tensor, t: Tensor) -> Tensor:
        with torch.enable_grad():
            x = z[:, :d].detach().requires_grad_(True)
            xs = x.reshape(shape)
            v = model(xs, t, t, **kw) if is_map else model(xs, t, **kw)
            v = v.reshape(b, d)
            div = divergence_exact(v, x) if probes is None else divergence_hutchinson(v, x, probes)
        return torch.cat([v.detach(), div.detach()[:, None]], dim=1)

    z1 = torch.cat([x1.detach().reshape(b, d), torch.zeros(b, 1, device=x1.device, dtype=x1.dtype)], dim=1)
    if isinstance(stepper, str) and stepper == "adaptive":
        res = solve_adaptive(augmented, z1, t0=1.0, t1=0.0, rtol=rtol, atol=atol)
    else:
        g = as_grid(grid) if grid is not None else uniform_grid(steps, 1.0, 0.0)
        if float(g[0]) < float(g[-1]):
            g = g.flip(0)
        res = solve(augmented, z1, grid=g, stepper=stepper)
    x0 = res.x[:, :d].reshape(shape)
    return log_p0(x0) + res.x[:, d]
