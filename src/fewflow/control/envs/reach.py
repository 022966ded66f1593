"""``reach``: gymnasium MuJoCo ``Reacher-v5`` (a two-link planar arm) with an analytic IK + PD expert.

Observation ``(10,)`` as in ``Reacher-v5``: ``cos q0, cos q1, sin q0, sin q1, target_x, target_y,
dq0, dq1, (fingertip - target)_x, (fingertip - target)_y``; action ``(2,)``: joint torques in
``[-1, 1]`` (gear 200). The control period is ``dt = 0.02`` s; ``max_steps`` is 50 (the gymnasium limit).

**Success** (fewflow's definition; Reacher itself has none): the fingertip centre comes within
``tolerance = 0.02`` of the target centre, i.e. the fingertip sphere (radius 0.01) touches the target
sphere (radius 0.009). The episode ends there (``done``). The reward is Reacher-v5's own with its
default weights (``-||fingertip - target|| - ||a||^2``).

**Expert.** The arm has link lengths ``l1 = 0.1`` (shoulder to elbow) and ``l2 = 0.11`` (elbow to
fingertip). Inverse kinematics of the target ``(x, y)`` at distance ``r``: ``cos q1* = (r^2 - l1^2 -
l2^2) / (2 l1 l2)`` (clipped to [-1, 1]), ``q1* = +-acos(.)`` (the elbow branch nearer the current
``q1``), ``q0* = atan2(y, x) - atan2(l2 sin q1*, l1 + l2 cos q1*)``. A PD law drives the joints there:
``tau = clip(kp wrap(q* - q) - kd dq, -1, 1)`` with ``kp = 2``, ``kd = 0.1`` (gains picked on this
model so that the arm settles within the step limit without overshooting the tolerance).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from fewflow._validate import FewflowError
from fewflow.control.envs.base import ControlEnv, Expert, check_obs, missing_control_extra

__all__ = ["Reach", "reach_ik"]

L1, L2 = 0.1, 0.11


def _wrap(a: np.ndarray | float) -> np.ndarray:
    return (np.asarray(a) + np.pi) % (2 * np.pi) - np.pi


def reach_ik(target: np.ndarray, q1_now: float = 0.0) -> np.ndarray:
    """Joint angles ``(q0, q1)`` putting the fingertip on ``target (2,)`` (the elbow branch nearer
    ``q1_now``; an unreachable target gives the closest stretched or folded pose)."""
    x, y = float(target[0]), float(target[1])
    r2 = x * x + y * y
    c = np.clip((r2 - L1 * L1 - L2 * L2) / (2 * L1 * L2), -1.0, 1.0)
    best = None
    for sign in (1.0, -1.0):
        q1 = sign * float(np.arccos(c))
        q0 = float(np.arctan2(y, x) - np.arctan2(L2 * np.sin(q1), L1 + L2 * np.cos(q1)))
        cost = abs(float(_wrap(q1 - q1_now)))
        if best is None or cost < best[0]:
            best = (cost, q0, q1)
    assert best is not None
    return np.array([best[1], best[2]])


class Reach(ControlEnv):
    """``Reacher-v5`` with fewflow's success rule and an IK + PD expert (see the module docstring)."""

    name = "reach"
    obs_dim = 10
    act_dim = 2

    def __init__(self, tolerance: float = 0.02, max_steps: int = 50, kp: float = 2.0, kd: float = 0.1,
                 expert_noise: float = 0.0) -> None:
        super().__init__()
        if not (np.isfinite(tolerance) and tolerance > 0):
            raise FewflowError(f"reach: tolerance must be a positive number, got {tolerance}")
        if int(max_steps) < 1:
            raise FewflowError(f"reach: max_steps must be >= 1, got {max_steps}")
        try:
            import gymnasium as gym
            import mujoco  # noqa: F401
        except ImportError as e:
            raise missing_control_extra(e.name or "gymnasium[mujoco]") from None
        os.environ.setdefault("MUJOCO_GL", "egl")
        self.tolerance = float(tolerance)
        self.max_steps = int(max_steps)
        self.kp, self.kd, self.expert_noise = float(kp), float(kd), float(expert_noise)
        self.action_low = -np.ones(2)
        self.action_high = np.ones(2)
        try:
            self._env = gym.make("Reacher-v5", render_mode="rgb_array", max_episode_steps=10**6)
        except Exception as e:  # a broken MuJoCo install
            raise FewflowError(f"reach: cannot build Reacher-v5: {str(e).splitlines()[0]}") from None
        self._obs = np.zeros(self.obs_dim)

    def reset(self, seed: int | None = None) -> np.ndarray:
        self._seed(seed)
        gym_seed = int(self.rng.integers(2**31 - 1))
        obs, _ = self._env.reset(seed=gym_seed)
        self._obs = check_obs(self.name, obs, self.obs_dim)
        return self._obs.copy()

    def distance(self, obs: np.ndarray | None = None) -> float:
        """Fingertip-to-target distance of ``obs`` (default: the current observation)."""
        o = self._obs if obs is None else np.asarray(obs, dtype=np.float64)
        return float(np.linalg.norm(o[8:10]))

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, dict[str, Any]]:
        a = self.clip_action(action)
        obs, reward, _, _, info = self._env.step(a.astype(np.float32))
        self._obs = np.asarray(obs, dtype=np.float64).copy()
        self.steps += 1
        dist = self.distance()
        success = dist <= self.tolerance
        done = success or self.steps >= self.max_steps
        return self._obs.copy(), float(reward), bool(done), {"success": bool(success), "distance": dist}

    def render(self) -> np.ndarray:
        try:
            img = self._env.render()
        except Exception as e:  # no OpenGL context (headless machine without EGL/OSMesa)
            raise FewflowError(f"reach cannot render here: {str(e).splitlines()[0]}") from None
        if img is None:
            raise FewflowError("reach cannot render here")
        return np.asarray(img, dtype=np.uint8).copy()

    def expert(self) -> Expert:
        """Inverse kinematics of the target, then a PD law on the joint angles (see the module docstring)."""
        env = self

        def act(obs: np.ndarray) -> np.ndarray:
            o = check_obs(env.name, obs, env.obs_dim)
            q = np.arctan2(o[2:4], o[0:2])
            q_star = reach_ik(o[4:6], float(q[1]))
            tau = env.kp * _wrap(q_star - q) - env.kd * o[6:8]
            if env.expert_noise > 0:
                tau = tau + env.expert_noise * env.rng.standard_normal(2)
            return np.clip(tau, -1.0, 1.0)

        return act

    def close(self) -> None:
        self._env.close()
