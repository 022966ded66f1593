"""``pusht``: the Push-T task of Diffusion Policy (``gym_pusht/PushT-v0``, state observations) with a
scripted pushing expert.

Observation ``(5,)``: ``agent_x, agent_y, block_x, block_y, block_angle`` (pixels of the 512 x 512
board; the block position is the T's body origin, the angle is taken modulo ``2 pi``). Action ``(2,)``:
the target position of the round pusher (radius 15) in ``[0, 512]^2``, tracked by a PD controller for
0.1 s. The goal pose is ``(256, 256, pi / 4)``. **Success** is gym-pusht's own: the T covers more than
``success_coverage = 0.95`` of its goal region (a looser threshold can be passed and is then recorded
in the run); the episode ends on success or after ``max_steps = 300`` steps (the gym-pusht limit).
Reward: gym-pusht's, ``clip(coverage / 0.95, 0, 1)``.

**Expert** (fewflow's own, reading only the observation). The block is quasi-static (the simulation's
damping is 0, so it stops when not pushed) and moves like a free rigid body under the pusher's impulse:
pushing at boundary point ``p`` along the inward normal ``f`` gives it a twist proportional to
``(f, (r x f) / rho^2)``, ``r = p - c`` from the centre of mass ``c``, with ``rho^2 = I / m = 3000`` for
gym-pusht's T. The desired twist is ``D = (c* - c, rho * wrap(theta* - theta))`` (pose error, the angle
scaled by ``rho ~ 55`` px). Every control step the expert scores the reachable contact points of the T
outline by the cosine between ``(f, (r x f) / rho)`` and ``D``, keeps its current contact unless a much
better one appears, and then either travels to the staging point ``p - 21 f`` (around the block along a
circle when the straight path would touch it) or pushes: the target ``p + (d - 15) f`` puts the
pusher's rim ``d`` pixels inside the block, ``d`` proportional to the remaining error along the chosen twist.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from fewflow._validate import FewflowError
from fewflow.control.envs.base import ControlEnv, Expert, check_obs, missing_control_extra

__all__ = ["PushT", "T_OUTLINE"]

# outline of gym-pusht's T in body coordinates (bar 120 x 30 on y in [0, 30], stem 30 x 90 below it)
T_OUTLINE = np.array([[-60, 0], [60, 0], [60, 30], [15, 30], [15, 120], [-15, 120], [-15, 30], [-60, 30]],
                     dtype=np.float64)
T_COG = np.array([0.0, 45.0])
GOAL = np.array([256.0, 256.0, np.pi / 4])
RHO = float(np.sqrt(3000.0))
AGENT_R = 15.0


def _rot(theta: float) -> np.ndarray:
    c, s = np.cos(theta), np.sin(theta)
    return np.array([[c, -s], [s, c]])


def _wrap(a: float) -> float:
    return float((a + np.pi) % (2 * np.pi) - np.pi)


def _seg_dist(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance from points ``p (..., 2)`` to the segment ``a b``."""
    ab = b - a
    t = np.clip(((p - a) @ ab) / max(float(ab @ ab), 1e-12), 0.0, 1.0)
    return np.linalg.norm(p - (a + t[..., None] * ab), axis=-1)


def _outline_dist(p: np.ndarray, poly: np.ndarray) -> np.ndarray:
    return np.min([_seg_dist(p, poly[i], poly[(i + 1) % len(poly)]) for i in range(len(poly))], axis=0)


def _inside(p: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Even-odd rule point-in-polygon for ``p (..., 2)``."""
    x, y = p[..., 0], p[..., 1]
    inside = np.zeros(x.shape, dtype=bool)
    n = len(poly)
    for i in range(n):
        (x0, y0), (x1, y1) = poly[i], poly[(i + 1) % n]
        cross = (y0 > y) != (y1 > y)
        xint = x0 + (y - y0) * (x1 - x0) / np.where(y1 == y0, 1e-12, y1 - y0)
        inside ^= cross & (x < xint)
    return inside


def _contacts(spacing: float = 5.0) -> tuple[np.ndarray, np.ndarray]:
    """Reachable contact points of the T outline and their outward normals (body coordinates)."""
    pts, nrm = [], []
    n = len(T_OUTLINE)
    for i in range(n):
        a, b = T_OUTLINE[i], T_OUTLINE[(i + 1) % n]
        e = b - a
        length = float(np.linalg.norm(e))
        out = np.array([e[1], -e[0]]) / length  # the outline runs counter-clockwise: right side is outward
        k = max(int(length // spacing), 1)
        for s in (np.arange(k) + 0.5) / k:
            p = a + s * e
            centre = p + AGENT_R * out
            if _outline_dist(centre[None], T_OUTLINE)[0] >= AGENT_R - 0.5 and not _inside(centre[None],
                                                                                      T_OUTLINE)[0]:
                pts.append(p)
                nrm.append(out)
    return np.array(pts), np.array(nrm)


class PushT(ControlEnv):
    """gym-pusht's ``PushT-v0`` (state observations) with a scripted expert (see the module docstring)."""

    name = "pusht"
    obs_dim = 5
    act_dim = 2

    def __init__(self, max_steps: int = 300, success_coverage: float = 0.95,
                 expert_noise: float = 0.0) -> None:
        super().__init__()
        if not 0.5 <= float(success_coverage) <= 1.0:
            raise FewflowError(f"pusht: success_coverage must lie in [0.5, 1], got {success_coverage}")
        if int(max_steps) < 1:
            raise FewflowError(f"pusht: max_steps must be >= 1, got {max_steps}")
        os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
        os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
        try:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                from gym_pusht.envs.pusht import PushTEnv
        except ImportError as e:
            raise missing_control_extra(e.name or "gym-pusht") from None
        self.max_steps = int(max_steps)
        self.success_coverage = float(success_coverage)
        self.expert_noise = float(expert_noise)
        self.action_low = np.zeros(2)
        self.action_high = np.full(2, 512.0)
        self.goal = GOAL.copy()
        self._env = PushTEnv(obs_type="state", render_mode="rgb_array", visualization_width=256,
                             visualization_height=256)
        self.coverage = 0.0

    def reset(self, seed: int | None = None) -> np.ndarray:
        self._seed(seed)
        obs, _ = self._env.reset(seed=int(self.rng.integers(2**31 - 1)))
        self.coverage = float(self._env._get_coverage())
        return check_obs(self.name, obs, self.obs_dim)

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, dict[str, Any]]:
        a = self.clip_action(action)
        obs, reward, _, _, info = self._env.step(a)
        self.steps += 1
        self.coverage = float(info["coverage"])
        success = self.coverage > self.success_coverage
        done = success or self.steps >= self.max_steps
        return (np.asarray(obs, dtype=np.float64).copy(), float(reward), bool(done),
                {"success": bool(success), "coverage": self.coverage})

    def render(self) -> np.ndarray:
        try:
            img = self._env.render()
        except Exception as e:  # pygame without a usable video driver
            raise FewflowError(f"pusht cannot render here: {str(e).splitlines()[0]}") from None
        return np.asarray(img, dtype=np.uint8).copy()

    def close(self) -> None:
        self._env.close()

    def expert(self) -> Expert:
        """A fresh scripted pusher (quasi-static contact selection; see the module docstring)."""
        return _PushExpert(self)


class _PushExpert:
    """The Push-T scripted expert; stateful (remembers its contact point)."""

    _pts, _nrm = _contacts()

    def __init__(self, env: PushT, gain: float = 0.6, max_push: float = 25.0, clearance: float = 6.0) -> None:
        self.env = env
        self.gain, self.max_push, self.clearance = gain, max_push, clearance
        self.current: int | None = None

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        o = check_obs("pusht", obs, 5)
        agent, pos, theta = o[:2], o[2:4], float(o[4])
        rot = _rot(theta)
        c = pos + rot @ T_COG
        g_rot = _rot(GOAL[2])
        c_goal = GOAL[:2] + g_rot @ T_COG
        e_p = c_goal - c
        e_th = _wrap(GOAL[2] - theta)
        desired = np.array([e_p[0], e_p[1], RHO * e_th])
        err = float(np.linalg.norm(desired))
        pts = pos + self._pts @ rot.T
        push = -(self._nrm @ rot.T)  # inward normals in the world
        r = pts - c
        torque = r[:, 0] * push[:, 1] - r[:, 1] * push[:, 0]
        twist = np.concatenate([push, (torque / RHO)[:, None]], axis=1)
        twist /= np.linalg.norm(twist, axis=1, keepdims=True)
        score = twist @ desired / max(err, 1e-9)
        best = int(np.argmax(score))
        if self.current is None or score[self.current] < 0.5 or score[best] > score[self.current] + 0.25:
            self.current = best
        k = self.current
        p, f = pts[k], push[k]
        v = agent - p
        along = float(v @ -f)
        lateral = float(np.linalg.norm(v + along * f))
        if 5.0 <= along <= AGENT_R + self.clearance + 6 and lateral < 5.0:
            depth = np.clip(self.gain * max(float(twist[k] @ desired), 0.0), 1.0, self.max_push)
            target = p + (depth - AGENT_R) * f
        else:
            target = self._travel(agent, p - (AGENT_R + self.clearance) * f, pos, rot, c)
        if self.env.expert_noise > 0:
            target = target + self.env.expert_noise * self.env.rng.standard_normal(2)
        return np.clip(target, 20.0, 492.0)

    def _travel(self, agent: np.ndarray, goal: np.ndarray, pos: np.ndarray, rot: np.ndarray,
                c: np.ndarray) -> np.ndarray:
        """The next target on the way to ``goal`` without touching the block (around it if needed)."""
        poly = pos + T_OUTLINE @ rot.T
        seg = agent + np.linspace(0, 1, 25)[:, None] * (goal - agent)
        if np.all(_outline_dist(seg, poly) > AGENT_R + 2) and not _inside(seg, poly).any():
            return goal
        radius = 80.0 + AGENT_R + 8.0
        a_ang = np.arctan2(*(agent - c)[::-1])
        g_ang = np.arctan2(*(goal - c)[::-1])
        d = _wrap(float(g_ang - a_ang))
        dist = float(np.linalg.norm(agent - c))
        if dist < radius - 10:  # first move straight out, away from the block
            return c + radius * np.array([np.cos(a_ang + 0.3 * np.sign(d)), np.sin(a_ang + 0.3 * np.sign(d))])
        nxt = a_ang + np.sign(d) * min(abs(d), 0.7)
        return c + radius * np.array([np.cos(nxt), np.sin(nxt)])
