"""BOSS: Bellman Optimal Step-size Straightening — phase 1, the optimal K-step time grid.

Paper: *Bellman Optimal Step-size Straightening of Flow-Matching Models* (Nguyen, Nguyen, Nguyen;
ICLR 2024, arXiv 2312.16414; code ``nguyenngocbaocmt02/BOSS``).

A trained velocity model ``v(x, t)`` is integrated on a fine uniform reference grid
``0 = t_0 < t_1 < ... < t_N = 1`` (time runs from the source at t = 0 to data at t = 1), giving
reference states ``x_ref(t_k)`` for ``n`` source draws. The cost of jumping from node ``i`` to node
``j > i`` in ONE Euler step, *starting from the reference state*, is

    C[i, j] = mean_b || x_ref(t_j) - ( x_ref(t_i) + (t_j - t_i) v(x_ref(t_i), t_i) ) ||^2

(squared L2 summed over the feature dimensions, averaged over the samples). Because every jump starts
on the reference trajectory the costs are local and additive, and the K-step schedule
``0 = i_0 < i_1 < ... < i_K = N`` of least total cost ``sum_k C[i_k, i_{k+1}]`` is found exactly by
the dynamic program

    D_0(N) = 0,   D_k(i) = min_{j > i} C[i, j] + D_{k-1}(j),

read off from ``D_K(0)`` by backtracking. The result is an ordinary 1-D float64 time grid, usable by
any stepper through :func:`fewflow.solvers.solve` (``grid=schedule.grid``) and saved as JSON beside
the model (:meth:`BossSchedule.save` / :meth:`BossSchedule.load`).

Phase 2 (fine-tuning the velocity on the chosen reference segments) is
:class:`fewflow.objectives.boss_refine.BossRefineLoss`; :func:`boss_segments` builds its data from the
same reference trajectories that produced the cost matrix.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fewflow._io import atomic_write_json
from fewflow._validate import FewflowError, as_batch_time, check_batch, check_finite, check_same_shape
from fewflow.solvers.grids import uniform_grid

__all__ = [
    "BossReference",
    "BossSegments",
    "BossSchedule",
    "bellman_schedule",
    "bellman_schedule_bruteforce",
    "boss_cost_matrix",
    "boss_reference",
    "boss_schedule",
    "boss_segments",
]


@dataclass
class BossSegments:
    """Stored reference segments: row ``m`` is one jump ``x_start[m] (at t_start[m]) -> x_end[m]
    (at t_end[m])`` of a reference trajectory; ``cond`` holds per-row conditioning (e.g. ``y``)."""

    x_start: Tensor
    x_end: Tensor
    t_start: Tensor
    t_end: Tensor
    cond: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_same_shape("x_start", self.x_start, "x_end", self.x_end)
        m = self.x_start.shape[0]
        for name, t in (("t_start", self.t_start), ("t_end", self.t_end)):
            if t.shape != (m,):
                raise FewflowError(f"{name} must have shape ({m},) to match x_start, got {tuple(t.shape)}")
        if bool((self.t_end <= self.t_start).any()):
            raise FewflowError("every segment needs t_end > t_start (time runs from source 0 to data 1)")

    def __len__(self) -> int:
        return int(self.x_start.shape[0])

    def select(self, idx: Tensor) -> BossSegments:
        """The rows ``idx`` (a LongTensor), conditioning included."""
        n = len(self)
        cond = {k: (v[idx] if torch.is_tensor(v) and v.dim() >= 1 and v.shape[0] == n else v)
                for k, v in self.cond.items()}
        return BossSegments(self.x_start[idx], self.x_end[idx], self.t_start[idx], self.t_end[idx], cond)


@dataclass
class BossReference:
    """Reference trajectories of a trained model on a fine grid.

    ``times``: ``(N + 1,)`` float64 grid; ``states``: ``(N + 1, B, ...)`` with ``states[k]`` the
    reference state at ``times[k]``; ``cond``: the per-sample conditioning used (e.g. ``{"y": labels}``).
    """

    times: Tensor
    states: Tensor
    cond: dict[str, Any] = field(default_factory=dict)

    @property
    def fine_steps(self) -> int:
        return int(self.times.numel()) - 1


@dataclass
class BossSchedule:
    """The Bellman-optimal K-step schedule: node ``indices`` into the fine grid, the time ``grid``
    (1-D float64, ``K + 1`` entries from t0 to t1), and its total jump ``cost``."""

    indices: list[int]
    grid: Tensor
    cost: float

    @property
    def steps(self) -> int:
        return len(self.indices) - 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": "boss",
            "indices": [int(i) for i in self.indices],
            "grid": [float(t) for t in self.grid.tolist()],
            "cost": float(self.cost),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BossSchedule:
        try:
            indices, grid, cost = list(d["indices"]), list(d["grid"]), float(d["cost"])
        except (KeyError, TypeError) as e:
            raise FewflowError(f"not a BOSS schedule (need 'indices', 'grid', 'cost'): {e}") from None
        if len(indices) != len(grid) or len(grid) < 2:
            raise FewflowError(
                f"BOSS schedule has {len(indices)} indices and {len(grid)} grid times; need equal counts >= 2"
            )
        return cls(indices=[int(i) for i in indices], grid=torch.tensor(grid, dtype=torch.float64), cost=cost)

    def save(self, path: str | Path) -> Path:
        """Write the schedule as JSON (e.g. ``boss_K4.json`` beside a checkpoint)."""
        return atomic_write_json(path, self.to_dict(), indent=2)

    @classmethod
    def load(cls, path: str | Path) -> BossSchedule:
        path = Path(path)
        if not path.is_file():
            raise FewflowError(f"BOSS schedule file not found: {path}")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise FewflowError(f"BOSS schedule file {path} is not valid JSON: {e}") from None
        return cls.from_dict(d)


def _states_tensor(traj: Any, n_nodes: int, x0: Tensor) -> Tensor:
    if isinstance(traj, (list, tuple)):
        traj = torch.stack(list(traj), 0)
    if not torch.is_tensor(traj) or traj.shape[0] != n_nodes or traj.shape[1:] != x0.shape:
        shape = tuple(traj.shape) if torch.is_tensor(traj) else type(traj).__name__
        raise FewflowError(
            f"solve(trajectory=True) returned a trajectory of shape {shape}; expected "
            f"({n_nodes}, {', '.join(map(str, x0.shape))})"
        )
    return traj


@torch.no_grad()
def boss_reference(
    model: Any,
    x0: Tensor,
    fine_steps: int = 100,
    *,
    stepper: Any = "euler",
    t0: float = 0.0,
    t1: float = 1.0,
    cond: Mapping[str, Any] | None = None,
) -> BossReference:
    """Integrate ``model`` from ``x0`` on a uniform grid of ``fine_steps`` steps (default 100 and
    Euler, as in the BOSS code) with :func:`fewflow.solvers.solve` and keep every state."""
    from fewflow.solvers import solve  # lazy: avoids a cycle with the package __init__

    check_finite("x0", x0)
    check_batch("x0", x0)
    if int(fine_steps) < 1:
        raise FewflowError(f"fine_steps must be >= 1, got {fine_steps}")
    grid = uniform_grid(int(fine_steps), t0=t0, t1=t1)
    cond = dict(cond or {})
    res = solve(model, x0, grid=grid, stepper=stepper, cond=cond, trajectory=True)
    states = _states_tensor(res.trajectory, int(fine_steps) + 1, x0)
    return BossReference(times=grid.to(torch.float64).cpu(), states=states, cond=cond)


def _model_velocity(model: Any, x: Tensor, t: float, cond: Mapping[str, Any]) -> Tensor:
    v = model(x, as_batch_time(t, x), **cond)
    if v.shape != x.shape:
        raise FewflowError(f"model returned shape {tuple(v.shape)} for input of shape {tuple(x.shape)}")
    return v


@torch.no_grad()
def boss_cost_matrix(
    model: Any,
    x0: Tensor | None = None,
    fine_steps: int = 100,
    *,
    reference: BossReference | None = None,
    stepper: Any = "euler",
    t0: float = 0.0,
    t1: float = 1.0,
    cond: Mapping[str, Any] | None = None,
) -> Tensor:
    """The BOSS jump-cost matrix ``C`` of shape ``(N + 1, N + 1)`` (``N = fine_steps``).

    ``C[i, j] = mean_b || x_ref(t_j) - x_ref(t_i) - (t_j - t_i) v(x_ref(t_i), t_i) ||^2`` for ``i < j``
    (one Euler jump that starts on the reference trajectory) and ``+inf`` for ``i >= j``. Pass either
    ``x0`` (reference trajectories are integrated here) or a precomputed ``reference`` from
    :func:`boss_reference` — use the same reference for :func:`boss_segments` so schedule and
    fine-tuning data agree. ``C`` lives on the states' device and dtype.
    """
    if reference is None:
        if x0 is None:
            raise FewflowError("boss_cost_matrix needs x0 (source draws) or reference=")
        reference = boss_reference(model, x0, fine_steps, stepper=stepper, t0=t0, t1=t1, cond=cond)
    elif x0 is not None:
        raise FewflowError("pass either x0 or reference= to boss_cost_matrix, not both")
    states, times, rcond = reference.states, reference.times.tolist(), reference.cond
    n = len(times) - 1
    b = states.shape[1]
    cost = torch.full((n + 1, n + 1), math.inf, device=states.device, dtype=states.dtype)
    flat = states.reshape(n + 1, b, -1)
    tt = torch.tensor(times, device=states.device, dtype=states.dtype)
    for i in range(n):
        v = _model_velocity(model, states[i], times[i], rcond).reshape(b, -1)
        dt = (tt[i + 1 :] - tt[i]).reshape(-1, 1, 1)
        err = flat[i + 1 :] - flat[i].unsqueeze(0) - dt * v.unsqueeze(0)  # (N - i, B, D)
        cost[i, i + 1 :] = err.pow(2).sum(-1).mean(-1)
    return cost


def _check_cost(cost: Tensor, steps: int) -> int:
    if not torch.is_tensor(cost) or cost.dim() != 2 or cost.shape[0] != cost.shape[1]:
        shape = tuple(cost.shape) if torch.is_tensor(cost) else type(cost).__name__
        raise FewflowError(f"cost matrix must be a square 2-D tensor, got {shape}")
    n = cost.shape[0] - 1
    if n < 1:
        raise FewflowError("cost matrix must be at least 2 x 2 (one fine step)")
    upper = cost[torch.triu(torch.ones_like(cost, dtype=torch.bool), diagonal=1)]
    if not bool(torch.isfinite(upper).all()):
        raise FewflowError("cost matrix has non-finite entries above the diagonal (C[i, j] for i < j)")
    if int(steps) != steps or not 1 <= int(steps) <= n:
        raise FewflowError(f"steps K must be an integer in [1, {n}] for a {n}-step fine grid, got {steps}")
    return n


def _grid_for(indices: list[int], times: Tensor | None, n: int) -> Tensor:
    if times is None:
        times = torch.linspace(0.0, 1.0, n + 1, dtype=torch.float64)
    times = torch.as_tensor(times, dtype=torch.float64).detach().cpu().reshape(-1)
    if times.numel() != n + 1:
        raise FewflowError(f"times has {times.numel()} entries but the cost matrix has {n + 1} nodes")
    return times[torch.tensor(indices)].clone()


def bellman_schedule(cost: Tensor, steps: int, times: Tensor | None = None) -> BossSchedule:
    """Exact least-cost K-step path ``0 -> N`` through the nodes of a ``(N + 1, N + 1)`` cost matrix.

    Dynamic program (BOSS, Nguyen et al. 2024): ``D_0(N) = 0``, ``D_k(i) = min_{j > i} C[i, j] +
    D_{k-1}(j)``; the schedule is the argmin path from node 0 with exactly ``K = steps`` jumps.
    ``times`` is the fine grid (default: uniform on [0, 1]); the returned ``grid`` holds its entries at
    the chosen nodes. Ties are broken towards the smaller next index. O(K N^2) in float64.
    """
    n = _check_cost(cost, steps)
    k_steps = int(steps)
    c = cost.detach().to("cpu", torch.float64)
    c = torch.where(torch.triu(torch.ones_like(c, dtype=torch.bool), diagonal=1), c, torch.inf)
    best = torch.full((n + 1,), math.inf, dtype=torch.float64)
    best[n] = 0.0
    choice = torch.zeros((k_steps + 1, n + 1), dtype=torch.long)
    for k in range(1, k_steps + 1):
        total = c + best.unsqueeze(0)  # total[i, j] = C[i, j] + D_{k-1}(j)
        best, choice[k] = total.min(dim=1)
    if not math.isfinite(float(best[0])):
        raise FewflowError(f"no {k_steps}-step path exists through the cost matrix")
    indices, i = [0], 0
    for k in range(k_steps, 0, -1):
        i = int(choice[k, i])
        indices.append(i)
    return BossSchedule(indices=indices, grid=_grid_for(indices, times, n), cost=float(best[0]))


def bellman_schedule_bruteforce(cost: Tensor, steps: int, times: Tensor | None = None) -> BossSchedule:
    """Reference search over all ``binom(N - 1, K - 1)`` interior node subsets (tests, tiny N only)."""
    n = _check_cost(cost, steps)
    if math.comb(n - 1, int(steps) - 1) > 200_000:
        raise FewflowError(f"brute force over binom({n - 1}, {int(steps) - 1}) subsets is too large")
    c = cost.detach().to("cpu", torch.float64).tolist()
    best_cost, best_path = math.inf, None
    for inner in itertools.combinations(range(1, n), int(steps) - 1):
        path = [0, *inner, n]
        total = sum(c[a][b] for a, b in itertools.pairwise(path))
        if total < best_cost:
            best_cost, best_path = total, path
    assert best_path is not None
    return BossSchedule(indices=best_path, grid=_grid_for(best_path, times, n), cost=best_cost)


def boss_schedule(
    model: Any,
    x0: Tensor,
    steps: int,
    fine_steps: int = 100,
    *,
    stepper: Any = "euler",
    cond: Mapping[str, Any] | None = None,
) -> BossSchedule:
    """One call: reference trajectories from ``x0``, cost matrix, and the Bellman-optimal ``steps``-step
    schedule (defaults from the BOSS code: 100 fine Euler steps; ~100 source draws suffice)."""
    ref = boss_reference(model, x0, fine_steps, stepper=stepper, cond=cond)
    cost = boss_cost_matrix(model, reference=ref)
    return bellman_schedule(cost, steps, times=ref.times)


def boss_segments(reference: BossReference, *schedules: BossSchedule) -> BossSegments:
    """Training data for BOSS refinement: for every sample and every jump ``(i_k, i_{k+1})`` of each
    schedule, the pair ``(x_ref(t_{i_k}), x_ref(t_{i_{k+1}}))`` with its times and the sample's
    conditioning. Several schedules (e.g. K = 2, 4, 6) can be stacked, as in the BOSS code."""
    if not schedules:
        raise FewflowError("boss_segments needs at least one BossSchedule")
    n = reference.fine_steps
    states, times = reference.states, reference.times
    b = states.shape[1]
    xs, xe, ts, te, idx = [], [], [], [], []
    for sched in schedules:
        if sched.indices[0] != 0 or sched.indices[-1] != n or max(sched.indices) > n:
            raise FewflowError(
                f"schedule indices {sched.indices} do not run 0 -> {n} on this {n}-step reference"
            )
        for a, c in itertools.pairwise(sched.indices):
            xs.append(states[a])
            xe.append(states[c])
            ts.append(torch.full((b,), float(times[a]), device=states.device, dtype=states.dtype))
            te.append(torch.full((b,), float(times[c]), device=states.device, dtype=states.dtype))
            idx.append(torch.arange(b, device=states.device))
    sample = torch.cat(idx)
    cond = {}
    for key, val in reference.cond.items():
        if torch.is_tensor(val) and val.dim() >= 1 and val.shape[0] == b:
            cond[key] = val[sample]
        else:
            cond[key] = val
    return BossSegments(
        x_start=torch.cat(xs), x_end=torch.cat(xe), t_start=torch.cat(ts), t_end=torch.cat(te), cond=cond
    )
