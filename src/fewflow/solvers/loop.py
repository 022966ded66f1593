"""The one shared integration loop (fixed grids) and the adaptive solver.

``solve`` integrates ``dx/dt = v(x, t)`` (or jumps with a flow map ``u(x, s, t)``) over a time grid with
any :class:`~fewflow.solvers.steppers.Stepper`. It counts model evaluations (NFE = batched forwards),
captures trajectories, shows progress and calls callbacks; steppers only implement one step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fewflow._validate import FewflowError, check_batch, check_finite
from fewflow.solvers.grids import as_grid, uniform_grid
from fewflow.solvers.steppers import Euler, FlowMapStep, Stepper, get_stepper

__all__ = ["SolveResult", "solve", "solve_adaptive"]


@dataclass
class SolveResult:
    """Result of a solve.

    Attributes:
        x: the final state, shaped like ``x0``.
        nfe: number of model calls (each one batched forward).
        times: the grid used (1-D float64 CPU tensor, ``T + 1`` nodes).
        trajectory: ``(T + 1, B, ...)`` states at the grid nodes (including ``x0``) if requested, else None.
        carry: the final state of a stateful stepper (e.g. FlowTurbo's call counts), else None.
    """

    x: Tensor
    nfe: int
    times: Tensor
    trajectory: Tensor | None = None
    carry: Any = None


def _resolve_grid(grid: Sequence[float] | Tensor | None, steps: int | None, t0: float, t1: float) -> Tensor:
    if grid is not None:
        g = as_grid(grid)
        if steps is not None and int(steps) != g.numel() - 1:
            raise FewflowError(
                f"steps={steps} disagrees with the grid's {g.numel() - 1} steps; give one of them"
            )
        return g
    if steps is None:
        raise FewflowError("give either grid= or steps=")
    return uniform_grid(steps, t0, t1)


def _resolve_stepper(model: Any, stepper: str | Stepper) -> tuple[Stepper, bool]:
    """Return (stepper, wrap_flow_map_as_velocity)."""
    model_is_map = bool(getattr(model, "is_flow_map", False))
    st = get_stepper(stepper)
    if model_is_map and not st.is_flow_map:
        # a flow-map model with "euler" jumps with the average velocity; other velocity steppers use
        # the instantaneous velocity u(x, t, t).
        if type(st) is Euler:
            return FlowMapStep(), False
        return st, True
    return st, False


def solve(
    model: Callable[..., Tensor],
    x0: Tensor,
    *,
    grid: Sequence[float] | Tensor | None = None,
    steps: int | None = None,
    stepper: str | Stepper = "euler",
    t0: float = 0.0,
    t1: float = 1.0,
    cond: Mapping[str, Any] | None = None,
    trajectory: bool = False,
    progress: bool = False,
    callback: Callable[[int, float, Tensor], Any] | None = None,
    generator: torch.Generator | None = None,
    grad: bool = False,
) -> SolveResult:
    """Integrate from ``x0`` along a time grid.

    Args:
        model: velocity model ``v(x, t, **cond)``, or flow-map model ``u(x, s, t, **cond)`` when
            ``model.is_flow_map`` is True or the stepper is a flow-map stepper. With a flow-map model the
            default "euler" becomes :class:`FlowMapStep` (``x + (t - s) u(x, s, t)``); any other velocity
            stepper then uses the instantaneous velocity ``u(x, t, t)``.
        x0: initial state ``(B, ...)`` at the first grid node.
        grid: explicit nodes (increasing to sample, decreasing to invert); else ``steps`` uniform steps
            from ``t0`` to ``t1``.
        stepper: a name for :func:`get_stepper` or a :class:`Stepper` instance.
        cond: keyword arguments passed to every model call (e.g. ``{"y": labels}``).
        trajectory: also return the states at every node, ``(T + 1, B, ...)``.
        progress: show a tqdm bar.
        callback: ``callback(i, t, x)`` after step ``i`` (0-based) with the reached time ``t`` (float).
        generator: randomness for stochastic steppers.
        grad: keep the autograd graph (default: run under ``torch.no_grad()``).

    Returns:
        :class:`SolveResult` with the exact number of model calls in ``nfe``.
    """
    check_finite("x0", x0)
    check_batch("x0", x0, min_dim=2)
    if not x0.is_floating_point() or x0.shape[0] == 0:
        raise FewflowError(f"x0 must be a non-empty floating-point batch, got {x0.dtype} {tuple(x0.shape)}")
    g = _resolve_grid(grid, steps, t0, t1)
    st, as_velocity = _resolve_stepper(model, stepper)
    kw = dict(cond) if cond else {}
    count = [0]

    if st.is_flow_map:

        def f(x: Tensor, s: Tensor, t: Tensor) -> Tensor:
            count[0] += 1
            return model(x, s, t, **kw)

    elif as_velocity:

        def f(x: Tensor, t: Tensor) -> Tensor:
            count[0] += 1
            return model(x, t, t, **kw)

    else:

        def f(x: Tensor, t: Tensor) -> Tensor:
            count[0] += 1
            return model(x, t, **kw)

    n = g.numel() - 1
    b = x0.shape[0]
    ts = g.to(device=x0.device, dtype=x0.dtype)[:, None].expand(n + 1, b)  # one conversion; rows are views
    times_f = g.tolist() if callback is not None else None
    iterator: Any = range(n)
    if progress:
        from fewflow._progress import progress_bar

        iterator = progress_bar(iterator, desc=f"solve[{type(st).__name__}]", leave=False)

    traj: Tensor | list[Tensor] | None = None
    x = x0
    with torch.set_grad_enabled(grad):
        if trajectory:
            if grad:
                traj = [x0]
            else:
                traj = torch.empty((n + 1, *x0.shape), device=x0.device, dtype=x0.dtype)
                traj[0] = x0
        last = n - 1
        step, step_last = st.step, st.step_last
        carry = st.init_carry() if st.stateful else None
        for i in iterator:
            if carry is not None:
                x, carry = st.step_carry(f, x, ts[i], ts[i + 1], carry)
            elif i == last:
                x = step_last(f, x, ts[i], ts[i + 1], generator)
            else:
                x = step(f, x, ts[i], ts[i + 1], generator)
            if traj is not None:
                if grad:
                    traj.append(x)
                else:
                    traj[i + 1] = x
            if callback is not None:
                callback(i, times_f[i + 1], x)
        if isinstance(traj, list):
            traj = torch.stack(traj)
    return SolveResult(x=x, nfe=count[0], times=g, trajectory=traj, carry=carry)


_ADAPTIVE = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")


def solve_adaptive(
    model: Callable[..., Tensor],
    x0: Tensor,
    t0: float = 0.0,
    t1: float = 1.0,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    method: str = "dopri5",
    cond: Mapping[str, Any] | None = None,
    *,
    grid: Sequence[float] | Tensor | None = None,
    trajectory: bool = False,
    grad: bool = False,
    options: dict[str, Any] | None = None,
) -> SolveResult:
    """Adaptive-step integration with ``torchdiffeq.odeint`` (Chen et al., "Neural Ordinary Differential
    Equations", 2018; dopri5 = Dormand-Prince 5(4)).

    Integrates from ``t0`` to ``t1`` (either direction), or through the nodes of ``grid`` (states at every
    node are returned in ``trajectory`` when ``trajectory=True``). A flow-map model is integrated through
    its instantaneous velocity ``u(x, t, t)``. ``nfe`` counts every model call made by the solver.
    Adaptive methods are told to step exactly onto the grid nodes (torchdiffeq's ``step_t`` option), so
    the model is never evaluated outside ``[min(grid), max(grid)]``.
    """
    import torchdiffeq

    check_finite("x0", x0)
    check_batch("x0", x0, min_dim=2)
    g = as_grid(grid) if grid is not None else as_grid([t0, t1])
    kw = dict(cond) if cond else {}
    is_map = bool(getattr(model, "is_flow_map", False))
    count = [0]
    b = x0.shape[0]

    def func(t: Tensor, x: Tensor) -> Tensor:
        count[0] += 1
        tb = t.to(dtype=x.dtype).expand(b)
        return model(x, tb, tb, **kw) if is_map else model(x, tb, **kw)

    tt = g.to(device=x0.device, dtype=x0.dtype)
    if options is None and method in _ADAPTIVE:
        # land exactly on the requested nodes: otherwise stages can be evaluated past t1 (e.g. t > 1)
        options = {"step_t": tt}
    try:
        with torch.set_grad_enabled(grad):
            out = torchdiffeq.odeint(func, x0, tt, rtol=rtol, atol=atol, method=method, options=options)
    except (AssertionError, ValueError, KeyError) as err:
        if isinstance(err, FewflowError):
            raise
        raise FewflowError(f"adaptive solve failed ({method}): {err}") from err
    return SolveResult(x=out[-1], nfe=count[0], times=g, trajectory=out if trajectory else None)
