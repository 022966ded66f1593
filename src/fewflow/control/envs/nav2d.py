"""``nav2d``: a 2-D point robot that must cross a wall through one of several corridors.

The map is the square ``[-1, 1]^2``. A horizontal wall ``|y| <= wall_half`` spans the map except for
``n_corridors`` gaps of width ``corridor_width`` centred at ``x = c_k`` (``c = linspace(-0.6, 0.6, n)``).
Each episode starts at a uniform point of the start box ``[-0.3, 0.3] x [-0.9, -0.7]`` below the wall;
the goal is the disc of radius ``goal_radius`` around ``(0, 0.75)`` above it.

* observation ``(2,)``: the robot position ``p = (x, y)``;
* action ``(2,)``: a velocity command ``a`` in ``[-1, 1]^2``; the robot moves by ``speed * dt * a``
  (``0.05`` per step by default). A move that would end inside an obstacle or outside the map slides along
  the free axis (x alone, else y alone) or, if neither is free, leaves the robot where it was;
  ``info["collision"]`` records it.
* reward: progress toward the goal centre, ``||p_prev - g|| - ||p - g||``, plus 1 on reaching the goal;
  ``done`` on success (``p`` inside the goal disc) or after ``max_steps`` (100) steps.

The scripted expert is multimodal on purpose: at its first call in an episode it picks a corridor
uniformly at random (from the environment's seeded ``rng``) and steers through three waypoints: below the
corridor, above it, and the goal, with a small per-episode jitter of the crossing point and Gaussian
action noise (``expert_noise``). Demonstrations therefore hold ``n_corridors`` distinct ways of solving the
same start state, the setting in which a unimodal regressor (which averages the modes into the wall)
fails and a generative policy does not. This is the point-mass "pass left or right" test bed used for
MeanFlow policies (MP1, arXiv 2507.10543; DM1, arXiv 2510.07865) at small scale.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fewflow._validate import FewflowError
from fewflow.control.envs.base import ControlEnv, Expert, check_obs

__all__ = ["Nav2D"]


class Nav2D(ControlEnv):
    """A point robot crossing a wall through one of ``n_corridors`` corridors (see the module docstring).

    Attributes:
        obstacles: ``(K, 4)`` array of axis-aligned boxes ``(xmin, ymin, xmax, ymax)`` (the wall pieces).
        corridors: ``(n_corridors,)`` x-centres of the gaps.
        start: the start box ``(xmin, ymin, xmax, ymax)``.
        goal: the goal centre ``(2,)``; ``goal_radius`` its radius.
        bounds: the map ``(xmin, ymin, xmax, ymax)``.
    """

    name = "nav2d"
    obs_dim = 2
    act_dim = 2

    def __init__(
        self,
        n_corridors: int = 3,
        corridor_width: float = 0.3,
        wall_half: float = 0.1,
        goal_radius: float = 0.15,
        speed: float = 0.5,
        dt: float = 0.1,
        max_steps: int = 100,
        expert_noise: float = 0.1,
    ) -> None:
        super().__init__()
        if not isinstance(n_corridors, (int, np.integer)) or not 1 <= n_corridors <= 5:
            raise FewflowError(f"nav2d: n_corridors must be an integer in 1..5, got {n_corridors!r}")
        if not 0.05 <= corridor_width <= 0.3:
            raise FewflowError(f"nav2d: corridor_width must lie in [0.05, 0.3], got {corridor_width}")
        positive = (("wall_half", wall_half), ("goal_radius", goal_radius), ("speed", speed), ("dt", dt))
        for key, val in positive:
            if not (np.isfinite(val) and val > 0):
                raise FewflowError(f"nav2d: {key} must be a positive number, got {val}")
        if int(max_steps) < 1:
            raise FewflowError(f"nav2d: max_steps must be >= 1, got {max_steps}")
        if expert_noise < 0:
            raise FewflowError(f"nav2d: expert_noise must be >= 0, got {expert_noise}")
        self.n_corridors = int(n_corridors)
        self.corridor_width = float(corridor_width)
        self.wall_half = float(wall_half)
        self.goal_radius = float(goal_radius)
        self.speed = float(speed)
        self.dt = float(dt)
        self.max_steps = int(max_steps)
        self.expert_noise = float(expert_noise)
        self.action_low = -np.ones(2)
        self.action_high = np.ones(2)
        self.bounds = np.array([-1.0, -1.0, 1.0, 1.0])
        self.start = np.array([-0.3, -0.9, 0.3, -0.7])
        self.goal = np.array([0.0, 0.75])
        self.corridors = (np.linspace(-0.6, 0.6, self.n_corridors) if self.n_corridors > 1
                          else np.zeros(1))
        edges = [-1.0]
        for c in self.corridors:
            edges += [c - self.corridor_width / 2, c + self.corridor_width / 2]
        edges.append(1.0)
        self.obstacles = np.array([[edges[i], -self.wall_half, edges[i + 1], self.wall_half]
                                   for i in range(0, len(edges), 2) if edges[i + 1] > edges[i]])
        self.pos = self.start[:2].copy()
        self.path: list[np.ndarray] = []

    # ------------------------------------------------------------------ geometry

    def collides(self, points: np.ndarray) -> np.ndarray:
        """Boolean array ``(...)``: whether each point ``(..., 2)`` lies inside an obstacle."""
        p = np.asarray(points, dtype=np.float64)
        if p.shape[-1:] != (2,):
            raise FewflowError(f"nav2d: points must have shape (..., 2), got {tuple(p.shape)}")
        x, y = p[..., 0:1], p[..., 1:2]
        o = self.obstacles
        inside = (x >= o[:, 0]) & (x <= o[:, 2]) & (y >= o[:, 1]) & (y <= o[:, 3])
        return inside.any(axis=-1)

    def inside_map(self, points: np.ndarray) -> np.ndarray:
        """Boolean array ``(...)``: whether each point ``(..., 2)`` lies in the map square."""
        p = np.asarray(points, dtype=np.float64)
        if p.shape[-1:] != (2,):
            raise FewflowError(f"nav2d: points must have shape (..., 2), got {tuple(p.shape)}")
        b = self.bounds
        return (p[..., 0] >= b[0]) & (p[..., 0] <= b[2]) & (p[..., 1] >= b[1]) & (p[..., 1] <= b[3])

    def drivable(self, points: np.ndarray) -> np.ndarray:
        """Boolean array ``(...)``: inside the map and not inside an obstacle."""
        return self.inside_map(points) & ~self.collides(points)

    def in_goal(self, points: np.ndarray) -> np.ndarray:
        """Boolean array ``(...)``: whether each point ``(..., 2)`` lies in the goal disc."""
        p = np.asarray(points, dtype=np.float64)
        return np.linalg.norm(p - self.goal, axis=-1) <= self.goal_radius

    def corridor_of(self, trajectory: np.ndarray) -> int:
        """Index of the corridor a trajectory ``(T, 2)`` crossed the wall through, or -1 if it never did."""
        t = np.asarray(trajectory, dtype=np.float64)
        above = np.nonzero(t[:, 1] > self.wall_half)[0]
        if len(above) == 0 or t[0, 1] > 0:
            return -1
        k = above[0]
        x = t[max(k - 1, 0), 0]
        return int(np.argmin(np.abs(self.corridors - x)))

    def _free(self, p: np.ndarray) -> bool:
        return bool(self.drivable(p)) and not self._crosses_wall(self.pos, p)

    def _crosses_wall(self, a: np.ndarray, b: np.ndarray) -> bool:
        # a move is at most speed*dt long; check points along the segment at a spacing finer than the wall
        n = max(2, int(np.ceil(np.linalg.norm(b - a) / (0.25 * self.wall_half))) + 1)
        seg = a + np.linspace(0.0, 1.0, n)[:, None] * (b - a)
        return bool(self.collides(seg).any())

    # ------------------------------------------------------------------ episode

    def reset(self, seed: int | None = None) -> np.ndarray:
        self._seed(seed)
        s = self.start
        self.pos = np.array([self.rng.uniform(s[0], s[2]), self.rng.uniform(s[1], s[3])])
        self.path = [self.pos.copy()]
        self._expert_plan: np.ndarray | None = None
        return self.pos.copy()

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, dict[str, Any]]:
        a = self.clip_action(action)
        d_before = float(np.linalg.norm(self.pos - self.goal))
        move = self.speed * self.dt * a
        collision = False
        target = self.pos + move
        if not self._free(target):
            collision = True
            for cand in (self.pos + np.array([move[0], 0.0]), self.pos + np.array([0.0, move[1]])):
                if self._free(cand):
                    target = cand
                    break
            else:
                target = self.pos.copy()
        self.pos = target
        self.path.append(self.pos.copy())
        self.steps += 1
        success = bool(self.in_goal(self.pos))
        reward = d_before - float(np.linalg.norm(self.pos - self.goal)) + (1.0 if success else 0.0)
        done = success or self.steps >= self.max_steps
        return self.pos.copy(), reward, done, {"success": success, "collision": collision}

    # ------------------------------------------------------------------ expert

    def expert(self) -> Expert:
        """A fresh multimodal expert: a random corridor per episode, three waypoints, noisy actions."""
        env = self
        state: dict[str, Any] = {"waypoints": None, "k": 0}
        margin = self.wall_half + 0.12

        def act(obs: np.ndarray) -> np.ndarray:
            p = check_obs(env.name, obs, env.obs_dim)
            if state["waypoints"] is None:
                c = int(env.rng.integers(env.n_corridors))
                jitter = env.rng.uniform(-0.25, 0.25) * env.corridor_width
                x = env.corridors[c] + jitter
                state["corridor"] = c
                state["waypoints"] = [np.array([x, -margin]), np.array([x, margin]), env.goal.copy()]
            wps = state["waypoints"]
            # skip waypoints already passed: anything at or below the robot's height side of the wall
            while state["k"] < 2:
                wp = wps[state["k"]]
                close = np.linalg.norm(p - wp) < 0.04
                passed = (state["k"] == 0 and p[1] > -env.wall_half - 0.02) or (
                    state["k"] == 1 and p[1] > env.wall_half + 0.02)
                if close or passed:
                    state["k"] += 1
                else:
                    break
            d = wps[state["k"]] - p
            step = env.speed * env.dt
            a = d / step
            n = np.linalg.norm(a)
            if n > 1.0:
                a = a / n
            if env.expert_noise > 0:
                a = a + env.expert_noise * env.rng.standard_normal(2)
            return np.clip(a, -1.0, 1.0)

        return act

    # ------------------------------------------------------------------ drawing

    def render(self, size: int = 256) -> np.ndarray:
        """The map (wall in grey, start box in blue, goal in green) with the path so far, via Pillow."""
        try:
            from PIL import Image, ImageDraw
        except ImportError:  # pragma: no cover - Pillow ships with matplotlib
            raise FewflowError("rendering nav2d needs Pillow: pip install pillow") from None
        img = Image.new("RGB", (size, size), (255, 255, 255))
        draw = ImageDraw.Draw(img)

        def px(p: np.ndarray) -> tuple[float, float]:
            return ((p[0] + 1) / 2 * (size - 1), (1 - (p[1] + 1) / 2) * (size - 1))

        for o in self.obstacles:
            (x0, y1), (x1, y0) = px(o[:2]), px(o[2:])
            draw.rectangle([x0, y0, x1, y1], fill=(120, 120, 120))
        (x0, y1), (x1, y0) = px(self.start[:2]), px(self.start[2:])
        draw.rectangle([x0, y0, x1, y1], outline=(60, 90, 220))
        gx, gy = px(self.goal)
        r = self.goal_radius / 2 * (size - 1)
        draw.ellipse([gx - r, gy - r, gx + r, gy + r], outline=(30, 160, 60), width=2)
        if len(self.path) > 1:
            draw.line([px(p) for p in self.path], fill=(220, 60, 40), width=2)
        cx, cy = px(self.pos)
        draw.ellipse([cx - 4, cy - 4, cx + 4, cy + 4], fill=(220, 60, 40))
        return np.asarray(img, dtype=np.uint8).copy()
