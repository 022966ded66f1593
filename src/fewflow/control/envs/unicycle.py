"""A unicycle robot on a figure-8 track, with actuator gains that can change mid-episode.

The testbed of "Action Flow Matching for Continual Robot Learning" (Murillo-Gonzalez & Liu, RSS 2025,
arXiv 2504.18471), rebuilt small: a ground vehicle with state ``s = (x, y, theta)`` and commands
``a = (v, omega)`` (forward speed in ``[-1, 1]`` m/s, turn rate in ``[-pi/2, pi/2]`` rad/s) held for ``dt``
seconds. The actuators scale and shift the command, ``v_eff = g_v v + b_v`` and
``omega_eff = g_w omega + b_w``; the *nominal* model has ``g = (1, 1)``, ``b = (0, 0)``, and the true gains
may switch at a given step (a worn motor, a changed payload, a swapped wire: ``g_v = -1``).

Dynamics (exact for a command held over ``dt``): with ``w = omega_eff`` and ``u = v_eff``,

    theta' = theta + w dt,
    x' = x + (u / w) (sin theta' - sin theta),     y' = y - (u / w) (cos theta' - cos theta),

which tends to ``x + u dt cos theta``, ``y + u dt sin theta`` as ``w -> 0`` (used below ``|w| < 1e-6``).

The track is the lemniscate of Gerono ``p(phi) = (A sin phi, B sin 2 phi)``, ``phi in [0, 2 pi)``, sampled
at ``n_waypoints`` points of equal arc length; an episode runs ``laps`` laps. The robot starts at the
crossing point facing along the track. A waypoint counts as *reached* when the robot comes within
``reach_radius`` of it; the target moves on to the next waypoint when it is reached or passed (the robot
is beyond it along the track's tangent).
Per step the reward is minus the cross-track error (distance to the densely sampled track).

:class:`CEMPlanner` is a sampling MPC on the nominal model (cross-entropy method over ``horizon``
commands, replanned every step) that tracks the next waypoints; ``env.expert()`` returns one. Metrics of
an episode (:func:`tracking_metrics`): waypoints reached, mean cross-track error, and the recovery steps
after a gain switch (how long the cross-track error stays above a tolerance after the switch).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fewflow._validate import FewflowError
from fewflow.control.envs import register_env
from fewflow.control.envs.base import ControlEnv

__all__ = [
    "ACTION_HIGH",
    "ACTION_LOW",
    "CEMPlanner",
    "Unicycle",
    "body_frame_error",
    "figure8_track",
    "intended_action",
    "recovery_steps",
    "tracking_metrics",
    "unicycle_step",
]

ACTION_LOW = np.array([-1.0, -math.pi / 2])
ACTION_HIGH = np.array([1.0, math.pi / 2])


def _pair(name: str, value: Any) -> np.ndarray:
    try:
        arr = np.array(value, dtype=np.float64, copy=True).reshape(-1)
    except (TypeError, ValueError):
        raise FewflowError(f"unicycle: {name} must be two numbers, got {value!r}") from None
    if arr.shape != (2,) or not np.all(np.isfinite(arr)):
        raise FewflowError(f"unicycle: {name} must be two finite numbers, got {value!r}")
    return arr


def unicycle_step(
    state: np.ndarray, action: np.ndarray, dt: float = 0.2, gains: Any = (1.0, 1.0), bias: Any = (0.0, 0.0),
) -> np.ndarray:
    """Next state of the unicycle (module docstring) for states ``(..., 3)`` and commands ``(..., 2)``
    (broadcast), the command held for ``dt`` seconds through the actuator ``gains`` and ``bias``
    (each ``(2,)`` or broadcastable to ``(..., 2)``). Commands are used as given (no clipping)."""
    state = np.asarray(state, dtype=np.float64)
    action = np.asarray(action, dtype=np.float64)
    if state.shape[-1:] != (3,) or action.shape[-1:] != (2,):
        raise FewflowError(f"unicycle_step needs states (..., 3) and actions (..., 2), got "
                           f"{state.shape} and {action.shape}")
    g = np.asarray(gains, dtype=np.float64)
    b = np.asarray(bias, dtype=np.float64)
    eff = action * g + b
    u, w = eff[..., 0], eff[..., 1]
    x, y, th = state[..., 0], state[..., 1], state[..., 2]
    th1 = th + w * dt
    small = np.abs(w) < 1e-6
    w_safe = np.where(small, 1.0, w)
    dx = np.where(small, u * dt * np.cos(th + 0.5 * w * dt), (u / w_safe) * (np.sin(th1) - np.sin(th)))
    dy = np.where(small, u * dt * np.sin(th + 0.5 * w * dt), -(u / w_safe) * (np.cos(th1) - np.cos(th)))
    return np.stack(np.broadcast_arrays(x + dx, y + dy, th1), axis=-1)


def body_frame_error(prev_state: np.ndarray, realised: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """``realised - predicted`` next state, its position part rotated into the body frame of
    ``prev_state`` and its heading part wrapped to ``(-pi, pi]``: ``(..., 3)``. The unicycle is invariant
    to translations and rotations, so this error depends only on the command and the true actuators."""
    prev_state, realised, predicted = (np.asarray(a, dtype=np.float64) for a in (prev_state, realised,
                                                                                 predicted))
    d = realised - predicted
    c, s = np.cos(prev_state[..., 2]), np.sin(prev_state[..., 2])
    ex = c * d[..., 0] + s * d[..., 1]
    ey = -s * d[..., 0] + c * d[..., 1]
    eth = (d[..., 2] + math.pi) % (2 * math.pi) - math.pi
    return np.stack([ex, ey, eth], axis=-1)


def intended_action(planned: np.ndarray, gains: Any, bias: Any = (0.0, 0.0), *, clip: bool = True
                    ) -> np.ndarray:
    """The command that makes the true actuators produce what the nominal model expects from ``planned``:
    ``g a_int + b = a_plan``, so ``a_int = (a_plan - b) / g`` (clipped into the action box when ``clip``).
    Gains must be non-zero."""
    g = np.asarray(gains, dtype=np.float64)
    if np.any(np.abs(g) < 1e-9):
        raise FewflowError("intended_action: gains must be non-zero (a dead actuator has no inverse)")
    out = (np.asarray(planned, dtype=np.float64) - np.asarray(bias, dtype=np.float64)) / g
    return np.clip(out, ACTION_LOW, ACTION_HIGH) if clip else out


def figure8_track(n_waypoints: int = 60, size: tuple[float, float] = (2.0, 1.0), dense: int = 2000
                  ) -> tuple[np.ndarray, np.ndarray]:
    """``(waypoints (n, 2), dense (dense, 2))``: the lemniscate ``(A sin phi, B sin 2 phi)`` at equal arc
    length, starting just after the crossing point at the origin, and a dense polyline of the closed
    track (for cross-track errors)."""
    if not isinstance(n_waypoints, int) or n_waypoints < 4:
        raise FewflowError(f"unicycle: n_waypoints must be an int >= 4, got {n_waypoints!r}")
    a, b = float(size[0]), float(size[1])
    phi = np.linspace(0.0, 2 * math.pi, 20001)
    pts = np.stack([a * np.sin(phi), b * np.sin(2 * phi)], axis=1)
    seg = np.linalg.norm(np.diff(pts, axis=0), axis=1)
    arc = np.concatenate([[0.0], np.cumsum(seg)])
    total = arc[-1]

    def at(s: np.ndarray) -> np.ndarray:
        return np.stack([np.interp(s, arc, pts[:, 0]), np.interp(s, arc, pts[:, 1])], axis=1)

    way = at(np.arange(1, n_waypoints + 1) * total / n_waypoints)
    dense_pts = at(np.linspace(0.0, total, dense, endpoint=False))
    return way, dense_pts


def _cross_track(p: np.ndarray, dense: np.ndarray) -> float:
    return float(np.sqrt(((dense - p[None, :2]) ** 2).sum(1).min()))


class Unicycle(ControlEnv):
    """The unicycle on the figure-8 track (module docstring).

    Args:
        n_waypoints: waypoints of one lap.
        laps: laps of the episode's task (its waypoints are the lap's, repeated).
        dt: control period in seconds.
        max_steps: episode length limit.
        gains, bias: the actuators' gains and bias before the switch (nominal: ``(1, 1)``, ``(0, 0)``).
        switch_step: the step at which the actuators change (``None``: never).
        switch_gains, switch_bias: the actuators after the switch.
        reach_radius: distance at which a waypoint counts as reached.
        noise: std of Gaussian noise added to the next state (simulator noise).

    Observation ``(6,)``: ``x, y, cos theta, sin theta`` and the current target waypoint. The full state
    is ``env.state``; ``env.target`` is the target's index. ``info`` holds ``success`` (the lap is done
    with at least 90 % of the waypoints reached), ``reached``, ``cross_track`` and ``gains``.
    """

    name = "unicycle"
    obs_dim = 6
    act_dim = 2
    action_low = ACTION_LOW.copy()
    action_high = ACTION_HIGH.copy()

    def __init__(
        self,
        n_waypoints: int = 60,
        laps: int = 2,
        dt: float = 0.2,
        max_steps: int = 300,
        gains: Sequence[float] = (1.0, 1.0),
        bias: Sequence[float] = (0.0, 0.0),
        switch_step: int | None = None,
        switch_gains: Sequence[float] = (0.6, 1.4),
        switch_bias: Sequence[float] = (0.0, 0.0),
        reach_radius: float = 0.25,
        noise: float = 0.0,
    ) -> None:
        super().__init__()
        if not (isinstance(max_steps, int) and max_steps >= 1):
            raise FewflowError(f"unicycle: max_steps must be a positive int, got {max_steps!r}")
        if not (math.isfinite(dt) and dt > 0):
            raise FewflowError(f"unicycle: dt must be a positive number, got {dt!r}")
        if switch_step is not None and not (isinstance(switch_step, int) and switch_step >= 0):
            raise FewflowError(f"unicycle: switch_step must be a non-negative int or None, got "
                               f"{switch_step!r}")
        if not (math.isfinite(noise) and noise >= 0):
            raise FewflowError(f"unicycle: noise must be >= 0, got {noise!r}")
        self.max_steps = max_steps
        self.dt = float(dt)
        self.gains0, self.bias0 = _pair("gains", gains), _pair("bias", bias)
        self.gains1, self.bias1 = _pair("switch_gains", switch_gains), _pair("switch_bias", switch_bias)
        self.switch_step = switch_step
        self.reach_radius = float(reach_radius)
        self.noise = float(noise)
        if not (isinstance(laps, int) and laps >= 1):
            raise FewflowError(f"unicycle: laps must be a positive int, got {laps!r}")
        lap, self.dense = figure8_track(n_waypoints)
        self.waypoints = np.tile(lap, (laps, 1))
        self.state = np.zeros(3)
        self.target = 0
        self.reached = np.zeros(len(self.waypoints), dtype=bool)

    # -- actuators ------------------------------------------------------------------------------------
    def actuators(self, step: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(gains, bias)`` in force at ``step`` (default: the current step)."""
        k = self.steps if step is None else step
        if self.switch_step is not None and k >= self.switch_step:
            return self.gains1.copy(), self.bias1.copy()
        return self.gains0.copy(), self.bias0.copy()

    # -- episode --------------------------------------------------------------------------------------
    def _obs(self) -> np.ndarray:
        x, y, th = self.state
        w = self.waypoints[min(self.target, len(self.waypoints) - 1)]
        return np.array([x, y, math.cos(th), math.sin(th), w[0], w[1]])

    def reset(self, seed: int | None = None) -> np.ndarray:
        self._seed(seed)
        first = self.waypoints[0]
        heading = math.atan2(first[1], first[0])
        self.state = np.array([0.0, 0.0, heading])
        self.target = 0
        self.reached = np.zeros(len(self.waypoints), dtype=bool)
        return self._obs()

    def _advance_target(self) -> None:
        n = len(self.waypoints)
        while self.target < n:
            w = self.waypoints[self.target]
            d = self.state[:2] - w
            if float(np.hypot(*d)) < self.reach_radius:
                self.reached[self.target] = True
                self.target += 1
                continue
            nxt = self.waypoints[self.target + 1] if self.target + 1 < n else self.waypoints[0]
            tangent = nxt - w
            if float(d @ tangent) > 0.0 and float(np.hypot(*d)) < 4 * self.reach_radius:
                self.target += 1  # passed it without reaching it
                continue
            break

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, dict[str, Any]]:
        a = self.clip_action(action)
        g, b = self.actuators()
        nxt = unicycle_step(self.state, a, self.dt, g, b)
        if self.noise > 0:
            nxt = nxt + self.noise * self.rng.standard_normal(3)
        self.state = nxt
        self.steps += 1
        self._advance_target()
        cte = _cross_track(self.state, self.dense)
        lap = self.target >= len(self.waypoints)
        success = bool(lap and self.reached.mean() >= 0.9)
        done = bool(lap or self.steps >= self.max_steps)
        info = {"success": success, "reached": int(self.reached.sum()), "cross_track": cte,
                "gains": g.tolist(), "bias": b.tolist()}
        return self._obs(), -cte, done, info

    def expert(self) -> CEMPlanner:
        """A CEM planner on the nominal model that tracks this environment's waypoints (fresh per episode,
        seeded from the environment's generator)."""
        return CEMPlanner(self, seed=int(self.rng.integers(2**31)))

    def render(self) -> np.ndarray:
        """A 160x240 RGB picture: track (grey), waypoints (reached green, others blue), robot (red)."""
        h, w = 160, 240
        img = np.full((h, w, 3), 255, dtype=np.uint8)

        def px(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            u = ((np.asarray(p)[..., 0] + 2.6) / 5.2 * (w - 1)).round().astype(int).clip(0, w - 1)
            v = ((1.0 - (np.asarray(p)[..., 1] + 1.7) / 3.4) * (h - 1)).round().astype(int).clip(0, h - 1)
            return v, u

        img[px(self.dense)] = (190, 190, 190)
        for i, p in enumerate(self.waypoints):
            v, u = px(p)
            color = (40, 160, 40) if self.reached[i] else (60, 90, 220)
            img[max(v - 1, 0):v + 2, max(u - 1, 0):u + 2] = color
        v, u = px(self.state[:2])
        img[max(v - 3, 0):v + 4, max(u - 3, 0):u + 4] = (220, 30, 30)
        return img


# --------------------------------------------------------------------------------------------- planner


class CEMPlanner:
    """Sampling MPC with the cross-entropy method on a unicycle *model* (nominal by default).

    Every call plans ``horizon`` commands: ``iters`` rounds of ``samples`` Gaussian command sequences
    (clipped into the action box) around the current mean, scored by the model's rollout cost
    ``sum_h ||p_h - w_{k+h}||^2`` (``w_k`` the target waypoint, ``p_h`` the predicted position after
    ``h + 1`` steps), refitting mean and std to the ``elites`` best; the first command is returned and the
    mean is shifted by one step for the next call (warm start). ``gains``/``bias`` are the model's
    actuators: the nominal ``(1, 1)``/``(0, 0)``, or fitted ones (online model adaptation).

    Call it as ``planner(obs)`` (the expert protocol; reads the environment's state and target) or
    ``planner.plan(state, target)``.
    """

    def __init__(
        self, env: Unicycle, *, horizon: int = 5, samples: int = 128, iters: int = 3, elites: int = 16,
        gains: Any = (1.0, 1.0), bias: Any = (0.0, 0.0), seed: int = 0,
    ) -> None:
        if not isinstance(env, Unicycle):
            raise FewflowError(f"CEMPlanner needs a Unicycle environment, got {type(env).__name__}")
        if horizon < 1 or samples < 2 or iters < 1 or not (1 <= elites <= samples):
            raise FewflowError("CEMPlanner: need horizon >= 1, samples >= 2, iters >= 1 and "
                               "1 <= elites <= samples")
        self.env = env
        self.horizon, self.samples, self.iters, self.elites = horizon, samples, iters, elites
        self.gains, self.bias = _pair("gains", gains), _pair("bias", bias)
        self.rng = np.random.default_rng(seed)
        self.mean = np.tile(np.array([0.8, 0.0]), (horizon, 1))
        self.std0 = np.array([0.5, 0.8])

    def _cost(self, state: np.ndarray, seqs: np.ndarray, target: int) -> np.ndarray:
        n = len(self.env.waypoints)
        s = np.broadcast_to(state, (seqs.shape[0], 3))
        cost = np.zeros(seqs.shape[0])
        for h in range(self.horizon):
            s = unicycle_step(s, seqs[:, h], self.env.dt, self.gains, self.bias)
            w = self.env.waypoints[min(target + h, n - 1)]
            cost += ((s[:, :2] - w) ** 2).sum(1)
        return cost

    def plan(self, state: np.ndarray, target: int) -> np.ndarray:
        """The first command of the best plan from ``state`` towards waypoint ``target``."""
        mean, std = self.mean.copy(), np.tile(self.std0, (self.horizon, 1))
        for _ in range(self.iters):
            eps = self.rng.standard_normal((self.samples, self.horizon, 2))
            seqs = np.clip(mean + std * eps, ACTION_LOW, ACTION_HIGH)
            seqs[0] = mean  # keep the incumbent
            cost = self._cost(state, seqs, target)
            elite = seqs[np.argsort(cost)[: self.elites]]
            mean, std = elite.mean(0), elite.std(0) + 1e-3
        self.mean = np.concatenate([mean[1:], mean[-1:]], axis=0)
        return mean[0].copy()

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        return self.plan(self.env.state.copy(), self.env.target)


# --------------------------------------------------------------------------------------------- metrics


def recovery_steps(cross_track: Sequence[float], switch_step: int, tol: float = 0.25) -> int:
    """Steps after ``switch_step`` until the cross-track error is back below ``tol`` for good: the index
    (relative to the switch) one past the last step at which it exceeds ``tol``; 0 when it never does.
    ``cross_track[k]`` is the error after step ``k + 1`` (the list :func:`tracking_metrics` takes)."""
    e = np.asarray(cross_track, dtype=np.float64)
    if e.ndim != 1:
        raise FewflowError("recovery_steps: cross_track must be a 1-D sequence")
    after = e[switch_step:]
    bad = np.nonzero(after > tol)[0]
    return 0 if bad.size == 0 else int(bad[-1] + 1)


@dataclass
class TrackingMetrics:
    """One episode: ``reached`` waypoints (of ``n_waypoints``), ``steps`` taken, ``lap`` completed, mean
    cross-track error overall and after the switch, and ``recovery`` steps after the switch."""

    reached: int
    n_waypoints: int
    steps: int
    lap: bool
    cte_mean: float
    cte_after: float
    recovery: int


def tracking_metrics(env: Unicycle, cross_track: Sequence[float], tol: float = 0.25) -> TrackingMetrics:
    """The :class:`TrackingMetrics` of the episode that just ran in ``env`` with per-step errors
    ``cross_track`` (recovery measured from ``env.switch_step``, or step 0 when there is no switch)."""
    e = np.asarray(cross_track, dtype=np.float64)
    ks = env.switch_step if env.switch_step is not None else 0
    after = e[ks:] if ks < len(e) else e[-1:]
    return TrackingMetrics(
        reached=int(env.reached.sum()), n_waypoints=len(env.waypoints), steps=int(env.steps),
        lap=bool(env.target >= len(env.waypoints)), cte_mean=float(e.mean()) if e.size else 0.0,
        cte_after=float(after.mean()) if after.size else 0.0, recovery=recovery_steps(e, ks, tol),
    )


register_env("unicycle", Unicycle)
