"""NFE budgets: how many steps of a stepper spend a given number of network evaluations.

One function for the whole library (the CLI, the evaluation harness and the benchmarks all call it):

==============  ===================================  =====================================
stepper         evaluations                           steps for ``nfe``
==============  ===================================  =====================================
euler           1 per step                            ``nfe``
midpoint, heun  2 per step                            ``nfe // 2`` (``nfe >= 2``)
rk4             4 per step                            ``nfe // 4`` (``nfe >= 4``)
flowturbo       one Heun step (2) + pseudo-corrector  ``nfe - 1`` (``nfe >= 3``): FlowTurbo's
                steps (1 each, the velocity cached)   sequence of Zhao et al. (2024)
flow_map        1 per jump                            ``nfe``
==============  ===================================  =====================================

With ``exact=True`` a budget that a stepper cannot spend exactly (Heun at an odd NFE) is an error
instead of being rounded down.
"""

from __future__ import annotations

from typing import Any

from fewflow._validate import FewflowError, unknown_name

__all__ = ["STEPPER_NAMES", "nfe_per_step", "stepper_for_nfe", "steps_for_nfe"]

_PER_STEP = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4, "flow_map": 1}
#: steppers a sampling command can name (``flow_map`` for flow-map models)
STEPPER_NAMES = ("euler", "midpoint", "heun", "rk4", "flowturbo", "flow_map")


def _check_nfe(nfe: Any) -> int:
    if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
        raise FewflowError(f"nfe must be a positive integer, got {nfe!r}")
    if nfe > 100_000:
        raise FewflowError(f"nfe={nfe} is more than 100000 evaluations per sample; use a smaller budget")
    return nfe


def nfe_per_step(stepper: str) -> int:
    """Network evaluations of one step of ``stepper`` (FlowTurbo's pseudo-corrector steps: 1)."""
    if stepper == "flowturbo":
        return 1
    if stepper not in _PER_STEP:
        raise unknown_name("stepper", str(stepper), STEPPER_NAMES)
    return _PER_STEP[stepper]


def steps_for_nfe(stepper: str, nfe: int, *, exact: bool = False) -> int:
    """Number of steps of ``stepper`` that spend ``nfe`` evaluations (table in the module docstring)."""
    nfe = _check_nfe(nfe)
    if stepper == "flowturbo":
        if nfe < 3:
            raise FewflowError(f"flowturbo needs nfe >= 3 (a Heun step + pseudo-corrector steps), got {nfe}")
        return nfe - 1
    per = nfe_per_step(stepper)
    if nfe < per:
        raise FewflowError(f"stepper {stepper!r} spends {per} evaluations per step; nfe={nfe} is too small")
    if exact and nfe % per:
        raise FewflowError(f"stepper {stepper!r} spends {per} evaluations per step; nfe={nfe} is no multiple")
    return nfe // per


def stepper_for_nfe(stepper: str, nfe: int, *, exact: bool = False) -> tuple[int, Any]:
    """``(steps, stepper)`` for :func:`fewflow.solvers.solve`: the name for the plain steppers, a
    :class:`~fewflow.solvers.flowturbo.FlowTurboStepper` (1 Heun + ``nfe - 2`` pseudo-corrector steps)
    for ``flowturbo``."""
    steps = steps_for_nfe(stepper, nfe, exact=exact)
    if stepper == "flowturbo":
        from fewflow.solvers.flowturbo import FlowTurboStepper

        return steps, FlowTurboStepper(1, steps - 1)
    return steps, stepper
