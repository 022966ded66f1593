"""Import paths ``package.module:name`` for data functions (``--data``) and network classes (``--model``).

The module is imported with :func:`importlib.import_module`: it must be installed, on ``PYTHONPATH``, or in
the current folder (tried last, as ``python -m`` would). ``name`` may be dotted (``module:Outer.Inner``).
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from typing import Any

from fewflow._validate import FewflowError

__all__ = ["import_object", "import_path_of", "is_import_path", "parse_import_path"]

_IMPORT_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


def is_import_path(text: Any) -> bool:
    """Whether ``text`` reads ``module:name`` (``pkg.mod:func``, ``mod:Outer.Inner``)."""
    return isinstance(text, str) and bool(_IMPORT_PATH.match(text.strip()))


def parse_import_path(text: Any, what: str) -> tuple[str, str]:
    """``"pkg.mod:Name"`` -> ``("pkg.mod", "Name")``; anything else raises naming ``what``."""
    if not is_import_path(text):
        raise FewflowError(f"{what} must read module:name (e.g. mypkg.nets:Net), got {text!r}")
    module, name = str(text).strip().split(":")
    return module, name


def import_path_of(obj: Any) -> str:
    """The ``module:qualname`` of a class or function (the inverse of :func:`import_object`)."""
    module, qual = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not module or not qual or "<" in qual:
        raise FewflowError(f"{obj!r} has no import path (define it at the top level of a module)")
    return f"{module}:{qual}"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _import_module(module: str, text: str, what: str) -> Any:
    importlib.invalidate_caches()  # a module written a moment ago (tests, notebooks) is found
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        missing = e.name or ""
        ours = module == missing or module.startswith(missing + ".")
        cwd = os.getcwd()
        if ours and cwd not in sys.path and "" not in sys.path:
            sys.path.append(cwd)  # like `python -m`: the current folder, tried last
            try:
                return importlib.import_module(module)
            except ModuleNotFoundError:
                pass
            except Exception as e2:  # noqa: BLE001 - the user's module failed while importing
                raise FewflowError(f"cannot import {what} {text!r}: {_first_line(e2)}") from e2
            finally:
                sys.path.remove(cwd)
        if ours:
            raise FewflowError(
                f"cannot import {what} {text!r}: no module named {missing!r} (install it, add its folder "
                "to PYTHONPATH, or run fewflow from the folder that holds it)"
            ) from None
        raise FewflowError(f"cannot import {what} {text!r}: {_first_line(e)}") from e
    except Exception as e:  # noqa: BLE001 - SyntaxError, ImportError, errors raised at import time
        raise FewflowError(f"cannot import {what} {text!r}: {_first_line(e)}") from e


def import_object(text: str, what: str) -> Any:
    """Import ``module:name`` and return the object; any failure is one :class:`FewflowError` naming
    ``what`` (e.g. ``"model class"``) and the path."""
    module, name = parse_import_path(text, what)
    obj = _import_module(module, text, what)
    for part in name.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise FewflowError(f"cannot import {what} {text!r}: module {module!r} has no {part!r}") from None
    return obj
