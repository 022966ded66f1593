"""Closed-loop evaluation of an action-chunking policy: receding-horizon rollouts, metrics, GIFs.

A chunk policy is any callable ``policy(obs_hist) -> actions`` with ``obs_hist`` the last
``obs_horizon`` observations ``(obs_horizon, obs_dim)`` (oldest first; the first observation of an
episode is repeated until there is enough history) and ``actions`` the next ``act_horizon`` actions
``(act_horizon, act_dim)`` in the environment's units. :func:`rollout` executes the first
``exec_horizon`` actions of every chunk, then asks again (receding horizon, as in Diffusion Policy and
the MeanFlow policies MP1 arXiv 2507.10543 / DM1 arXiv 2510.07865). A policy with a ``reset(env)``
method has it called at the start of every episode (stateful policies, the wrapped expert).

Episode ``e`` starts from ``env.reset(EVAL_SEED_OFFSET + seed + e)``: evaluation start states are
disjoint from those of :func:`fewflow.control.demos.collect_demos` (resets ``seed + e``) for any
realistic number of demonstrations.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fewflow._validate import FewflowError

__all__ = ["EVAL_SEED_OFFSET", "ExpertChunkPolicy", "RolloutResult", "rollout", "save_gif"]

EVAL_SEED_OFFSET = 1_000_000
ChunkPolicy = Callable[[np.ndarray], np.ndarray]


@dataclass
class RolloutResult:
    """What :func:`rollout` measured.

    Attributes:
        success_rate: fraction of episodes whose ``info["success"]`` became true.
        mean_reward: mean over episodes of the summed reward.
        rewards: per-episode summed rewards.
        successes: per-episode success flags.
        steps: per-episode number of environment steps.
        latency_ms: ``{"mean", "p95", "n"}`` of the wall time of one policy call (one chunk), in ms.
        frames: rendered frames of the first ``record_episodes`` episodes (one list per episode).
        trajectories: per-episode observations ``(T + 1, obs_dim)`` (including the first).
        infos: per-episode dict of counters (``collisions`` when the env reports them).
    """

    success_rate: float
    mean_reward: float
    rewards: list[float]
    successes: list[bool]
    steps: list[int]
    latency_ms: dict[str, float]
    frames: list[list[np.ndarray]] = field(default_factory=list)
    trajectories: list[np.ndarray] = field(default_factory=list)
    infos: list[dict[str, Any]] = field(default_factory=list)

    def metrics(self) -> dict[str, Any]:
        """Plain-JSON summary (for ``metrics.json``)."""
        out: dict[str, Any] = {
            "episodes": len(self.rewards), "success_rate": float(self.success_rate),
            "mean_reward": float(self.mean_reward), "rewards": [float(r) for r in self.rewards],
            "successes": [bool(s) for s in self.successes], "steps": [int(s) for s in self.steps],
            "latency_ms": {k: float(v) for k, v in self.latency_ms.items()},
        }
        if self.infos and "collisions" in self.infos[0]:
            out["collision_episodes"] = float(np.mean([i["collisions"] > 0 for i in self.infos]))
        return out


class ExpertChunkPolicy:
    """The scripted expert of an environment as a chunk policy (for tests and as a reference).

    At each call it returns the expert's action for the newest observation, repeated ``act_horizon``
    times (with ``exec_horizon=1`` the rollout is exactly the expert). ``rollout`` calls
    :meth:`reset` with its environment at the start of every episode."""

    def __init__(self, act_horizon: int = 1) -> None:
        if act_horizon < 1:
            raise FewflowError(f"act_horizon must be >= 1, got {act_horizon}")
        self.act_horizon = int(act_horizon)
        self._expert: Callable[[np.ndarray], np.ndarray] | None = None

    def reset(self, env: Any) -> None:
        self._expert = env.expert()

    def __call__(self, obs_hist: np.ndarray) -> np.ndarray:
        if self._expert is None:
            raise FewflowError("ExpertChunkPolicy: call reset(env) before using it")
        a = np.asarray(self._expert(np.asarray(obs_hist)[-1]), dtype=np.float64)
        return np.repeat(a[None], self.act_horizon, axis=0)


def _check_chunk(env: Any, chunk: Any) -> np.ndarray:
    try:
        a = np.asarray(chunk, dtype=np.float64)
    except (TypeError, ValueError):
        raise FewflowError(f"policy must return a numeric array, got {type(chunk).__name__}") from None
    if a.ndim == 3 and a.shape[0] == 1:
        a = a[0]
    if a.ndim == 1 and a.shape[0] == env.act_dim:
        a = a[None]
    if a.ndim != 2 or a.shape[1] != env.act_dim or a.shape[0] < 1:
        raise FewflowError(
            f"policy must return actions of shape (act_horizon, {env.act_dim}) for {env.name}, "
            f"got {tuple(a.shape)}")
    if not np.all(np.isfinite(a)):
        raise FewflowError("policy returned non-finite actions")
    return a


def rollout(
    env_name: str,
    policy: ChunkPolicy,
    episodes: int = 50,
    obs_horizon: int = 2,
    exec_horizon: int = 4,
    seed: int = 0,
    record_episodes: int = 0,
    env_kwargs: dict[str, Any] | None = None,
    progress: bool = True,
    max_steps: int | None = None,
) -> RolloutResult:
    """Run ``episodes`` closed-loop episodes of ``policy`` on ``env_name`` (see the module docstring).

    ``max_steps`` overrides the environment's step limit. Rendering (``record_episodes > 0``) needs an
    environment that can render."""
    from fewflow.control.envs import make_env

    for key, val, lo in (("episodes", episodes, 1), ("obs_horizon", obs_horizon, 1),
                         ("exec_horizon", exec_horizon, 1), ("seed", seed, 0), ("record_episodes",
                                                                                 record_episodes, 0)):
        if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < lo:
            raise FewflowError(f"{key} must be an integer >= {lo}, got {val!r}")
    if not callable(policy):
        raise FewflowError(f"policy must be callable, got {type(policy).__name__}")
    env = make_env(env_name, **(env_kwargs or {}))
    limit = int(max_steps) if max_steps is not None else int(env.max_steps)
    rewards, successes, steps, lat, frames, trajs, infos = [], [], [], [], [], [], []
    bar = None
    if progress:
        from fewflow._progress import progress_bar

        bar = progress_bar(total=int(episodes), desc=f"rollout {env_name}")
    try:
        for e in range(int(episodes)):
            obs = env.reset(seed=EVAL_SEED_OFFSET + int(seed) + e)
            if hasattr(policy, "reset"):
                policy.reset(env)
            hist: deque[np.ndarray] = deque([obs] * int(obs_horizon), maxlen=int(obs_horizon))
            record = e < record_episodes
            ep_frames = [env.render()] if record else []
            traj, total, success, done, t, collisions = [obs], 0.0, False, False, 0, 0
            while not done and t < limit:
                t0 = time.perf_counter()
                chunk = policy(np.stack(hist))
                lat.append((time.perf_counter() - t0) * 1e3)
                chunk = _check_chunk(env, chunk)
                for a in chunk[: int(exec_horizon)]:
                    obs, r, done, info = env.step(a)
                    t += 1
                    total += float(r)
                    success = success or bool(info.get("success", False))
                    collisions += int(bool(info.get("collision", False)))
                    hist.append(obs)
                    traj.append(obs)
                    if record:
                        ep_frames.append(env.render())
                    if done or t >= limit:
                        break
            rewards.append(total)
            successes.append(success)
            steps.append(t)
            trajs.append(np.stack(traj))
            infos.append({"collisions": collisions})
            if record:
                frames.append(ep_frames)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(success=f"{np.mean(successes):.2f}")
    finally:
        if bar is not None:
            bar.close()
        env.close()
    la = np.asarray(lat)
    return RolloutResult(
        success_rate=float(np.mean(successes)), mean_reward=float(np.mean(rewards)), rewards=rewards,
        successes=successes, steps=steps,
        latency_ms={"mean": float(la.mean()), "p95": float(np.percentile(la, 95)), "n": float(len(la))},
        frames=frames, trajectories=trajs, infos=infos)


def save_gif(frames: Sequence[np.ndarray] | Sequence[Sequence[np.ndarray]], path: str | Path,
             fps: int = 10) -> Path:
    """Write frames ``(H, W, 3)`` uint8 (one episode, or a list of episodes played one after the other)
    as an animated GIF with Pillow, atomically."""
    from PIL import Image

    from fewflow._io import atomic_path

    flat: list[np.ndarray] = []
    for f in frames:
        if isinstance(f, np.ndarray) and f.ndim == 3:
            flat.append(f)
        else:
            flat.extend(f)
    if not flat:
        raise FewflowError("save_gif: no frames")
    for f in flat:
        if not (isinstance(f, np.ndarray) and f.ndim == 3 and f.shape[2] == 3):
            raise FewflowError(f"save_gif: frames must be (H, W, 3) arrays, got {getattr(f, 'shape', f)}")
    if fps < 1:
        raise FewflowError(f"save_gif: fps must be >= 1, got {fps}")
    images = [Image.fromarray(np.asarray(f, dtype=np.uint8)) for f in flat]
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        images[0].save(fh, format="GIF", save_all=True, append_images=images[1:],
                       duration=int(round(1000 / fps)), loop=0)
    return path
