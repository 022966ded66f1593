"""Control environments: :func:`make_env` by name.

``ENVS`` lists the names. Each environment lives in its own module of this package and is imported only
when asked for, so the optional simulators (MuJoCo for ``reach``, pymunk/pygame for ``pusht``) are needed
only by the environments that use them. A module adds its environment with :func:`register_env`; a name
not registered yet is looked up as the module ``fewflow.control.envs.<name>``, whose import registers it
(or which defines a :class:`ControlEnv` subclass whose ``name`` is that name).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from fewflow._validate import FewflowError, unknown_name
from fewflow.control.envs.base import ControlEnv, check_action, check_obs, missing_control_extra

__all__ = ["ENVS", "ControlEnv", "check_action", "check_obs", "make_env", "missing_control_extra",
           "register_env"]

ENVS: list[str] = ["nav2d", "pusht", "reach", "unicycle"]

_FACTORIES: dict[str, Callable[..., ControlEnv]] = {}
_MODULES = {"nav2d": "nav2d", "pusht": "pusht", "reach": "reach", "unicycle": "unicycle"}


def register_env(name: str, factory: Callable[..., ControlEnv]) -> None:
    """Register ``factory(**kwargs) -> ControlEnv`` under ``name`` (a later call replaces it)."""
    _FACTORIES[name] = factory
    if name not in ENVS:
        ENVS.append(name)


def _find_factory(name: str) -> Callable[..., ControlEnv]:
    if name in _FACTORIES:
        return _FACTORIES[name]
    if name not in ENVS:
        raise unknown_name("environment", name, ENVS)
    modname = f"fewflow.control.envs.{_MODULES.get(name, name)}"
    try:
        module = importlib.import_module(modname)
    except ModuleNotFoundError as e:
        if e.name == modname:
            raise FewflowError(f"environment {name!r} is not available in this installation") from None
        raise
    if name in _FACTORIES:
        return _FACTORIES[name]
    for obj in vars(module).values():
        if isinstance(obj, type) and issubclass(obj, ControlEnv) and getattr(obj, "name", None) == name:
            _FACTORIES[name] = obj
            return obj
    raise FewflowError(f"module {modname} defines no environment named {name!r}")


def make_env(name: str, **kwargs: Any) -> ControlEnv:
    """Build the environment ``name`` (one of :data:`ENVS`) with its keyword settings.

    Unknown names raise :class:`FewflowError` with the closest valid name; a missing optional simulator
    package raises one naming ``pip install 'fewflow[control]'``."""
    if not isinstance(name, str):
        raise FewflowError(f"environment name must be a string, got {type(name).__name__}")
    factory = _find_factory(name)
    try:
        return factory(**kwargs)
    except TypeError as e:
        if "unexpected keyword" in str(e) or "positional argument" in str(e):
            raise FewflowError(f"environment {name!r}: {e}") from None
        raise
