"""Straightness of sampling trajectories (Liu, Gong & Liu, "Flow Straight and Fast: Learning to Generate
and Transfer Data with Rectified Flow").

``S(Z) = int_{t_0}^{t_T} E || (Z_T - Z_0) / (t_T - t_0) - dZ_t/dt ||^2 dt / (t_T - t_0)``; zero iff every
trajectory is a straight line traversed at constant speed (then one Euler step is exact). Discretised
on a trajectory ``x_0 .. x_K`` at times ``t_0 .. t_K`` with ``v_k = (x_{k+1} - x_k) / (t_{k+1} - t_k)``:
``S = sum_k w_k mean_b ||v_k - (x_K - x_0)/(t_K - t_0)||^2`` with ``w_k = (t_{k+1} - t_k) / (t_K - t_0)``
(the plain mean over steps on a uniform grid).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from fewflow._validate import FewflowError, check_finite


def _stack(trajectory: Tensor | Sequence[Tensor]) -> Tensor:
    traj = trajectory if torch.is_tensor(trajectory) else torch.stack(list(trajectory))
    check_finite("trajectory", traj)
    if traj.dim() < 2 or traj.shape[0] < 2:
        raise FewflowError(f"trajectory must be (K+1, B, ...) with K >= 1 steps, got {tuple(traj.shape)}")
    return traj


def straightness(trajectory: Tensor | Sequence[Tensor], times: Tensor | Sequence[float]) -> float:
    """Rectified-flow straightness ``S`` of a ``(K+1, B, ...)`` trajectory (or a list of ``(B, ...)``)."""
    traj = _stack(trajectory)
    t = torch.as_tensor(times, dtype=torch.float64).reshape(-1).to(traj.device)
    if t.shape[0] != traj.shape[0]:
        raise FewflowError(f"times has {t.shape[0]} entries but the trajectory has {traj.shape[0]} states")
    dt = torch.diff(t)
    if not (bool((dt > 0).all()) or bool((dt < 0).all())):
        raise FewflowError("times must be strictly monotone (increasing or decreasing)")
    x = traj.reshape(traj.shape[0], traj.shape[1], -1).double()
    v = torch.diff(x, dim=0) / dt[:, None, None]
    chord = (x[-1] - x[0]) / (t[-1] - t[0])
    dev = (v - chord[None]).pow(2).sum(-1).mean(-1)  # (K,)
    return float((dev * dt / (t[-1] - t[0])).sum())


def straightness_of_model(
    model: Any, x0: Tensor, steps: int = 32, *, stepper: str = "euler", cond: dict | None = None
) -> float:
    """Straightness of the ODE trajectories of a velocity model from ``x0`` (``t = 0 -> 1``).

    Integrates with :func:`fewflow.solvers.solve` (``trajectory=True``) and applies :func:`straightness`.
    """
    from fewflow.solvers import solve

    res = solve(model, x0, steps=steps, stepper=stepper, cond=cond, trajectory=True)
    if res.trajectory is None:
        raise FewflowError("the solver returned no trajectory")
    return straightness(res.trajectory, res.times)
