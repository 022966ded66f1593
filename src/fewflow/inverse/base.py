"""The contract every inverse-problem / editing solver of :mod:`fewflow.inverse` follows.

A *degradation operator* ``A`` maps a clean batch ``x`` (``(B, *shape)``, in the prior's data units) to a
measurement batch; a :class:`Measurement` is ``y = A(x) + sigma * noise`` together with the operator and
the noise level. A *solver* takes a trained prior (a velocity model ``v(x, t)`` in fewflow's time, t = 0
noise, t = 1 data) and a measurement and returns an :class:`InverseResult`. Each solver file registers
one :class:`InverseSpec` at its bottom with :func:`register_inverse`; its config dataclass holds the
paper's defaults and is the solver's only set of settings (``solve(model, meas, cfg, ...)``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from fewflow._validate import FewflowError, unknown_name

__all__ = [
    "InverseResult",
    "InverseSpec",
    "Operator",
    "get_inverse",
    "list_inverse",
    "register_inverse",
]


class Operator:
    """A linear (or affine) degradation ``A``. Subclasses implement :meth:`forward`; linear ones also
    :meth:`adjoint` (so that ``<A x, y> = <x, A^T y>``) and :meth:`pinv` (a right inverse where one exists,
    ``A(pinv(y)) = y``). Every method maps batches and never modifies its input in place."""

    name: str = "operator"

    def forward(self, x: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def adjoint(self, y: Tensor) -> Tensor:  # pragma: no cover - interface
        raise FewflowError(f"operator {self.name!r} has no adjoint")

    def pinv(self, y: Tensor) -> Tensor:  # pragma: no cover - interface
        raise FewflowError(f"operator {self.name!r} has no pseudo-inverse")

    def __call__(self, x: Tensor) -> Tensor:
        return self.forward(x)

    def describe(self) -> dict[str, Any]:
        """Plain-JSON description (name and parameters), recorded with every result."""
        return {"name": self.name}


@dataclass
class InverseResult:
    """What a solver returns.

    Attributes:
        x: the restored / inverted / edited batch, ``(B, *shape)``, in data units.
        nfe: network evaluations spent per sample (forward passes of the prior; a backward counts as 2).
        history: one dict per iteration (``{"iter", "loss", "residual", ...}``), for plots and early stops.
        iterates: intermediate results kept by solvers that monitor them (FlowOpt), else empty.
        z: the optimised latent / initial noise where the solver has one (FlowOpt, ODE inversion).
        meta: solver-specific facts (settings used, stopping reason).
    """

    x: Tensor
    nfe: int
    history: list[dict[str, float]] = field(default_factory=list)
    iterates: list[Tensor] = field(default_factory=list)
    z: Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class InverseSpec:
    """One registered solver: ``solve(model, meas, cfg, *, generator=None, **cond) -> InverseResult``.

    ``tasks`` says what it does: ``"restore"`` (any :class:`Measurement`), ``"invert"`` (find the noise
    that the sampler maps to a given image), ``"edit"`` (change the condition, stay close to the input).
    ``docs`` is the stem of its page in ``docs/methods/``."""

    name: str
    label: str
    paper: str
    summary: str
    config: type
    solve: Callable[..., InverseResult]
    tasks: tuple[str, ...] = ("restore",)
    docs: str = ""


_REGISTRY: dict[str, InverseSpec] = {}


def register_inverse(spec: InverseSpec) -> InverseSpec:
    """Add a solver to the registry (once per name)."""
    if spec.name in _REGISTRY and _REGISTRY[spec.name] is not spec:
        raise FewflowError(f"inverse solver {spec.name!r} is registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def _discover() -> None:
    import importlib
    import pkgutil

    import fewflow.inverse as pkg

    for m in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        importlib.import_module(f"fewflow.inverse.{m.name}")


def get_inverse(name: str) -> InverseSpec:
    """The registered solver ``name`` (one clear error naming the closest one otherwise)."""
    _discover()
    if name not in _REGISTRY:
        raise unknown_name("inverse solver", name, sorted(_REGISTRY))
    return _REGISTRY[name]


def list_inverse(task: str | None = None) -> list[InverseSpec]:
    """Every registered solver (for ``task`` only when given), sorted by name."""
    _discover()
    return [s for _, s in sorted(_REGISTRY.items()) if task is None or task in s.tasks]
