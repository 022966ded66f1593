"""The :class:`ControlEnv` contract every fewflow control environment follows.

An environment is a small, seeded simulator with a fixed observation size ``obs_dim`` and action size
``act_dim``. Observations and actions are float64 numpy vectors in the environment's own units (the
policy helpers normalise them with the statistics of the demonstrations, see :mod:`fewflow.control.demos`).

* ``reset(seed)`` starts an episode and returns the first observation ``(obs_dim,)``; the same seed gives
  the same start state and the same random choices of the scripted expert.
* ``step(action)`` applies one action ``(act_dim,)`` (clipped to ``[action_low, action_high]``) and returns
  ``(obs, reward, done, info)``; ``info["success"]`` says whether the task is solved, and ``done`` is true on
  success or after ``max_steps`` steps.
* ``render()`` draws the current state as an ``(H, W, 3)`` uint8 image (optional).
* ``expert()`` returns a fresh scripted expert ``obs -> action`` for the current episode (it may keep state,
  so ask for a new one after each ``reset``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from fewflow._validate import FewflowError

__all__ = ["ControlEnv", "Expert", "check_action", "check_obs", "missing_control_extra"]

Expert = Callable[[np.ndarray], np.ndarray]


def missing_control_extra(package: str) -> FewflowError:
    """The error raised when an optional simulator package is not installed."""
    return FewflowError(f"this environment needs the {package!r} package: pip install 'fewflow[control]'")


def check_action(env_name: str, action: Any, act_dim: int) -> np.ndarray:
    """Return ``action`` as a new float64 vector ``(act_dim,)``; raise one clear line if it is not one.

    A ``(1, act_dim)`` array is accepted (one batched action). NaN or inf raise."""
    try:
        a = np.array(action, dtype=np.float64, copy=True)
    except (TypeError, ValueError):
        raise FewflowError(f"{env_name}: action must be numeric, got {type(action).__name__}") from None
    if a.shape == (1, act_dim):
        a = a[0]
    if a.shape != (act_dim,):
        raise FewflowError(f"{env_name}: action must have shape ({act_dim},), got {tuple(a.shape)}")
    if not np.all(np.isfinite(a)):
        raise FewflowError(f"{env_name}: action contains non-finite values")
    return a


def check_obs(env_name: str, obs: Any, obs_dim: int) -> np.ndarray:
    """Return ``obs`` as a new float64 vector ``(obs_dim,)``; raise one clear line otherwise."""
    try:
        o = np.array(obs, dtype=np.float64, copy=True)
    except (TypeError, ValueError):
        raise FewflowError(f"{env_name}: observation must be numeric, got {type(obs).__name__}") from None
    if o.shape != (obs_dim,):
        raise FewflowError(f"{env_name}: observation must have shape ({obs_dim},), got {tuple(o.shape)}")
    if not np.all(np.isfinite(o)):
        raise FewflowError(f"{env_name}: observation contains non-finite values")
    return o


class ControlEnv:
    """Base class (and protocol) of fewflow's control environments.

    Subclasses set ``name``, ``obs_dim``, ``act_dim``, ``max_steps``, ``action_low`` and ``action_high``
    and implement :meth:`reset`, :meth:`step` and :meth:`expert`; :meth:`render` is optional.
    ``self.rng`` is a ``numpy.random.Generator`` re-seeded by ``reset(seed)``; experts draw their random
    choices from it so that demonstrations are reproducible.
    """

    name: str = "base"
    obs_dim: int = 0
    act_dim: int = 0
    max_steps: int = 0
    action_low: np.ndarray = np.zeros(0)
    action_high: np.ndarray = np.zeros(0)

    def __init__(self) -> None:
        self.rng = np.random.default_rng()
        self.steps = 0

    def _seed(self, seed: int | None) -> None:
        if seed is not None:
            if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
                raise FewflowError(f"{self.name}: seed must be a non-negative integer, got {seed!r}")
            self.rng = np.random.default_rng(int(seed))
        self.steps = 0

    def reset(self, seed: int | None = None) -> np.ndarray:
        """Start an episode; return the first observation ``(obs_dim,)``."""
        raise NotImplementedError

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, dict[str, Any]]:
        """Apply one action; return ``(obs, reward, done, info)`` with ``info["success"]``."""
        raise NotImplementedError

    def render(self) -> np.ndarray:
        """An ``(H, W, 3)`` uint8 picture of the current state."""
        raise FewflowError(f"environment {self.name!r} cannot render")

    def expert(self) -> Expert:
        """A fresh scripted expert ``obs (obs_dim,) -> action (act_dim,)`` for the current episode."""
        raise FewflowError(f"environment {self.name!r} has no scripted expert")

    def clip_action(self, action: Any) -> np.ndarray:
        """Validate ``action`` (shape, finite) and clip it into ``[action_low, action_high]`` (a copy)."""
        a = check_action(self.name, action, self.act_dim)
        return np.clip(a, self.action_low, self.action_high)

    def close(self) -> None:
        """Release simulator resources (a no-op unless the environment wraps an external simulator)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, obs_dim={self.obs_dim}, act_dim={self.act_dim})"
