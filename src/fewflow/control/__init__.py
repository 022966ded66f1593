"""Control: small robot environments with scripted experts, demonstrations, and policy rollouts.

* :mod:`fewflow.control.envs` — :func:`make_env` (``nav2d``, ``pusht``, ``reach``, ``unicycle``) and the
  :class:`ControlEnv` contract;
* :mod:`fewflow.control.demos` — :func:`collect_demos`, :class:`Demos`, :func:`save_demos` /
  :func:`load_demos`, :func:`chunk_dataset` and the ``[-1, 1]`` normalisation;
* :mod:`fewflow.control.rollout` — :func:`rollout` of a chunk policy, :class:`RolloutResult`,
  :func:`save_gif`.

Nothing here imports a simulator until an environment that needs one is built.
"""

from __future__ import annotations

from fewflow.control.demos import (
    Demos,
    chunk_dataset,
    collect_demos,
    demos_dataset,
    load_demos,
    normalize,
    save_demos,
    unnormalize,
)
from fewflow.control.envs import ENVS, ControlEnv, make_env, register_env
from fewflow.control.rollout import ExpertChunkPolicy, RolloutResult, rollout, save_gif

__all__ = ["ENVS", "ControlEnv", "Demos", "ExpertChunkPolicy", "RolloutResult", "chunk_dataset",
           "collect_demos", "demos_dataset", "load_demos", "make_env", "normalize", "register_env", "rollout",
           "save_demos", "save_gif", "unnormalize"]
