"""Demonstrations from the scripted experts, their files, and the chunked training set of a policy.

A :class:`Demos` holds every step of ``E`` episodes of an environment's scripted expert: the observation
the expert saw and the action it took, with the episode index of each step and whether each episode
succeeded. Episode ``e`` of :func:`collect_demos` starts from ``env.reset(seed + e)``.

An action-chunking policy (Diffusion Policy, and the MeanFlow policies MP1 arXiv 2507.10543 and DM1
arXiv 2510.07865) predicts the next ``act_horizon`` actions from the last ``obs_horizon`` observations.
:func:`chunk_dataset` cuts one training pair per step ``t`` of every episode::

    cond_t    = [o_{t-obs_horizon+1}, ..., o_t]          (first observation repeated before the start)
    actions_t = [a_t, ..., a_{t+act_horizon-1}]          (last action repeated after the end)

and maps both to ``[-1, 1]`` per coordinate with min-max statistics of the demonstrations,
``normalize(x) = 2 (x - lo) / (hi - lo) - 1`` (a coordinate with ``hi - lo < 1e-6`` is only shifted by
its centre). The statistics are a dict of float32 arrays (``obs_min``, ``obs_max``, ``act_min``,
``act_max``) that a trained policy must store and apply: ``normalize`` on the observation history and
``unnormalize`` on the sampled actions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fewflow._validate import FewflowError

__all__ = ["Demos", "chunk_dataset", "collect_demos", "demo_stats", "demos_dataset", "load_demos",
           "normalize", "save_demos", "unnormalize"]

_EPS = 1e-6


@dataclass
class Demos:
    """Expert demonstrations of one environment.

    Attributes:
        obs: ``(N, obs_dim)`` float32, the observation at every step of every episode.
        act: ``(N, act_dim)`` float32, the action taken at that step.
        episode: ``(N,)`` int64, the episode index of each step (``0 .. E-1``, steps in order).
        success: ``(E,)`` bool, whether each episode reached the goal.
        env: the environment name (for :func:`fewflow.control.envs.make_env`).
        env_kwargs: the environment's keyword settings used for collection (plain JSON values).
    """

    obs: np.ndarray
    act: np.ndarray
    episode: np.ndarray
    success: np.ndarray
    env: str
    env_kwargs: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self.obs = np.asarray(self.obs, dtype=np.float32)
        self.act = np.asarray(self.act, dtype=np.float32)
        self.episode = np.asarray(self.episode, dtype=np.int64)
        self.success = np.asarray(self.success, dtype=bool)
        if self.obs.ndim != 2 or self.act.ndim != 2 or self.episode.ndim != 1:
            raise FewflowError(
                f"Demos: obs, act must be (N, dim) and episode (N,), got {self.obs.shape}, "
                f"{self.act.shape}, {self.episode.shape}")
        n = len(self.obs)
        if len(self.act) != n or len(self.episode) != n:
            raise FewflowError(f"Demos: obs ({n}), act ({len(self.act)}) and episode ({len(self.episode)}) "
                               "must have the same number of rows")
        if n == 0:
            raise FewflowError("Demos: no steps (empty demonstrations)")
        if not (np.isfinite(self.obs).all() and np.isfinite(self.act).all()):
            raise FewflowError("Demos: obs or act contains non-finite values")
        if np.any(np.diff(self.episode) < 0) or self.episode[0] < 0:
            raise FewflowError("Demos: episode indices must be non-negative and non-decreasing")
        if self.success.ndim != 1 or len(self.success) != int(self.episode.max()) + 1:
            raise FewflowError(f"Demos: success must have one entry per episode "
                               f"({int(self.episode.max()) + 1}), got {self.success.shape}")

    @property
    def n_episodes(self) -> int:
        return int(len(self.success))

    @property
    def obs_dim(self) -> int:
        return int(self.obs.shape[1])

    @property
    def act_dim(self) -> int:
        return int(self.act.shape[1])

    def episodes(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """The ``(obs (T, obs_dim), act (T, act_dim))`` arrays of every episode, in order."""
        starts = np.searchsorted(self.episode, np.arange(self.n_episodes), side="left")
        ends = np.searchsorted(self.episode, np.arange(self.n_episodes), side="right")
        return [(self.obs[s:e], self.act[s:e]) for s, e in zip(starts, ends, strict=True)]

    def select(self, episodes: np.ndarray | list[int]) -> Demos:
        """A new :class:`Demos` with only the given episodes, renumbered from 0."""
        idx = np.asarray(episodes, dtype=np.int64)
        if idx.size == 0:
            raise FewflowError("Demos.select: no episodes selected")
        parts = self.episodes()
        obs, act, ep = [], [], []
        for new, old in enumerate(idx):
            if not 0 <= old < self.n_episodes:
                raise FewflowError(f"Demos.select: episode {int(old)} out of range 0..{self.n_episodes - 1}")
            o, a = parts[int(old)]
            obs.append(o)
            act.append(a)
            ep.append(np.full(len(o), new, dtype=np.int64))
        return Demos(np.concatenate(obs), np.concatenate(act), np.concatenate(ep), self.success[idx].copy(),
                     self.env, dict(self.env_kwargs or {}))


def collect_demos(env_name: str, n_episodes: int, seed: int = 0, progress: bool = False,
                  **env_kwargs: Any) -> Demos:
    """Run the scripted expert of ``env_name`` for ``n_episodes`` episodes (resets ``seed + e``).

    Every episode is kept (``Demos.success`` flags the failures; :func:`chunk_dataset` can drop them)."""
    from fewflow.control.envs import make_env

    if isinstance(n_episodes, bool) or not isinstance(n_episodes, (int, np.integer)) or n_episodes < 1:
        raise FewflowError(f"n_episodes must be a positive integer, got {n_episodes!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise FewflowError(f"seed must be a non-negative integer, got {seed!r}")
    env = make_env(env_name, **env_kwargs)
    obs_l, act_l, ep_l, succ = [], [], [], []
    bar = None
    if progress:
        from fewflow._progress import progress_bar

        bar = progress_bar(total=int(n_episodes), desc=f"demos {env_name}")
    try:
        for e in range(int(n_episodes)):
            obs = env.reset(seed=int(seed) + e)
            expert = env.expert()
            done, info = False, {"success": False}
            while not done:
                a = np.asarray(expert(obs), dtype=np.float64)
                obs_l.append(np.asarray(obs, dtype=np.float32))
                act_l.append(a.astype(np.float32))
                ep_l.append(e)
                obs, _, done, info = env.step(a)
            succ.append(bool(info.get("success", False)))
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        env.close()
    return Demos(np.stack(obs_l), np.stack(act_l), np.asarray(ep_l), np.asarray(succ), env_name,
                 _plain(env_kwargs))


def _plain(kw: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in kw.items():
        if isinstance(v, np.generic):
            v = v.item()
        if not isinstance(v, (int, float, str, bool)) and v is not None:
            raise FewflowError(f"environment setting {k}={v!r} must be a plain number, string or bool")
        out[k] = v
    return out


def save_demos(demos: Demos, path: str | Path) -> Path:
    """Write ``demos`` to an ``.npz`` file atomically (readable with ``allow_pickle=False``)."""
    import json

    from fewflow._io import atomic_path

    path = Path(path)
    if path.suffix != ".npz":
        raise FewflowError(f"demonstrations are saved as .npz, got {path.name!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(
            f, obs=demos.obs, act=demos.act, episode=demos.episode, success=demos.success,
            env=np.array(demos.env), env_kwargs=np.array(json.dumps(demos.env_kwargs or {})))
    return path


def load_demos(path: str | Path) -> Demos:
    """Read a file written by :func:`save_demos`; any problem is one :class:`FewflowError`."""
    import json
    import zipfile

    path = Path(path)
    if not path.is_file():
        raise FewflowError(f"no such demonstrations file: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("obs", "act", "episode", "success", "env") if k not in z.files]
            if missing:
                raise FewflowError(f"{path} is not a demonstrations file (missing {', '.join(missing)})")
            kw = json.loads(str(z["env_kwargs"])) if "env_kwargs" in z.files else {}
            return Demos(z["obs"], z["act"], z["episode"], z["success"], str(z["env"]), kw)
    except (OSError, ValueError, zipfile.BadZipFile, json.JSONDecodeError) as e:
        if isinstance(e, FewflowError):
            raise
        raise FewflowError(f"cannot read demonstrations {path}: {str(e).splitlines()[0]}") from None


def normalize(x: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Map ``x (..., dim)`` from ``[lo, hi]`` to ``[-1, 1]`` per coordinate (a new array)."""
    x = np.asarray(x, dtype=np.float64)
    lo, hi = np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)
    if x.shape[-1:] != lo.shape or lo.shape != hi.shape:
        raise FewflowError(f"normalize: x has last axis {x.shape[-1:]} but the statistics have {lo.shape}")
    span = hi - lo
    wide = span > _EPS
    scale = np.where(wide, 2.0 / np.where(wide, span, 1.0), 1.0)
    return (x - (lo + hi) / 2) * scale


def unnormalize(y: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """The inverse of :func:`normalize`: map ``y (..., dim)`` from ``[-1, 1]`` back to ``[lo, hi]``."""
    y = np.asarray(y, dtype=np.float64)
    lo, hi = np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)
    if y.shape[-1:] != lo.shape or lo.shape != hi.shape:
        raise FewflowError(f"unnormalize: y has last axis {y.shape[-1:]} but the statistics have {lo.shape}")
    span = hi - lo
    wide = span > _EPS
    scale = np.where(wide, span / 2.0, 1.0)
    return y * scale + (lo + hi) / 2


def demo_stats(demos: Demos) -> dict[str, np.ndarray]:
    """Per-coordinate min-max statistics ``obs_min, obs_max, act_min, act_max`` (float32)."""
    return {"obs_min": demos.obs.min(0), "obs_max": demos.obs.max(0),
            "act_min": demos.act.min(0), "act_max": demos.act.max(0)}


def chunk_dataset(
    demos: Demos,
    obs_horizon: int = 2,
    act_horizon: int = 8,
    successful_only: bool = False,
    stats: dict[str, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Training pairs of an action-chunking policy, normalised to ``[-1, 1]``.

    Returns ``cond (M, obs_horizon * obs_dim)``, ``actions (M, act_horizon * act_dim)`` (float32, one row
    per step of every kept episode; row-major: time first, then coordinate) and the statistics used
    (computed from the kept demonstrations unless ``stats`` is given). See the module docstring."""
    for key, val in (("obs_horizon", obs_horizon), ("act_horizon", act_horizon)):
        if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < 1:
            raise FewflowError(f"{key} must be a positive integer, got {val!r}")
    if successful_only:
        keep = np.nonzero(demos.success)[0]
        if keep.size == 0:
            raise FewflowError("chunk_dataset: no successful episode to keep")
        demos = demos.select(keep)
    if stats is None:
        stats = demo_stats(demos)
    missing = {"obs_min", "obs_max", "act_min", "act_max"} - set(stats)
    if missing:
        raise FewflowError(f"chunk_dataset: stats lack {', '.join(sorted(missing))}")
    conds, acts = [], []
    for obs, act in demos.episodes():
        t_len = len(obs)
        t = np.arange(t_len)
        oi = np.clip(t[:, None] + np.arange(-obs_horizon + 1, 1)[None, :], 0, t_len - 1)
        ai = np.clip(t[:, None] + np.arange(act_horizon)[None, :], 0, t_len - 1)
        conds.append(obs[oi])
        acts.append(act[ai])
    cond = normalize(np.concatenate(conds), stats["obs_min"], stats["obs_max"])
    actions = normalize(np.concatenate(acts), stats["act_min"], stats["act_max"])
    m = len(cond)
    return (cond.reshape(m, -1).astype(np.float32), actions.reshape(m, -1).astype(np.float32),
            {k: np.asarray(v, dtype=np.float32).copy() for k, v in stats.items()})


def demos_dataset(demos: Demos, obs_horizon: int = 2, act_horizon: int = 8, successful_only: bool = False
                  ) -> Any:
    """The chunked pairs as a :class:`fewflow.data.Dataset`: ``x`` = action chunks, ``c`` = observation
    history (both normalised), ``meta`` = the statistics (lists) and the horizons, ``name`` = the env."""
    import torch

    from fewflow.data.base import Dataset

    cond, actions, stats = chunk_dataset(demos, obs_horizon, act_horizon, successful_only)
    meta: dict[str, Any] = {k: v.tolist() for k, v in stats.items()}
    meta.update(env=demos.env, env_kwargs=dict(demos.env_kwargs or {}), obs_horizon=int(obs_horizon),
                act_horizon=int(act_horizon), obs_dim=demos.obs_dim, act_dim=demos.act_dim)
    return Dataset(torch.from_numpy(actions), None, f"demos-{demos.env}", value_range=(-1.0, 1.0),
                   description=f"{demos.n_episodes} expert episodes of {demos.env}, action chunks",
                   meta=meta, c=torch.from_numpy(cond))
