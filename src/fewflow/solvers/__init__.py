"""Solvers: time grids, steppers, the shared integration loop, adaptive solves and likelihoods.

Time runs from t = 0 (source) to t = 1 (data); a decreasing grid integrates backwards (inversion).
"""

from fewflow.solvers.budget import STEPPER_NAMES, nfe_per_step, stepper_for_nfe, steps_for_nfe
from fewflow.solvers.grids import (
    GRIDS,
    as_grid,
    edm_grid,
    get_grid,
    logsnr_grid,
    shift_time,
    shifted_grid,
    uniform_grid,
)
from fewflow.solvers.likelihood import log_likelihood
from fewflow.solvers.loop import SolveResult, solve, solve_adaptive
from fewflow.solvers.steppers import (
    RK4,
    STEPPERS,
    Euler,
    EulerMaruyama,
    FlowMapStep,
    Heun,
    Midpoint,
    Stepper,
    get_stepper,
    register_stepper,
)

__all__ = [
    "GRIDS",
    "STEPPER_NAMES",
    "get_grid",
    "nfe_per_step",
    "stepper_for_nfe",
    "steps_for_nfe",
    "uniform_grid",
    "shifted_grid",
    "shift_time",
    "edm_grid",
    "logsnr_grid",
    "as_grid",
    "Stepper",
    "Euler",
    "Midpoint",
    "Heun",
    "RK4",
    "FlowMapStep",
    "EulerMaruyama",
    "STEPPERS",
    "get_stepper",
    "register_stepper",
    "SolveResult",
    "solve",
    "solve_adaptive",
    "log_likelihood",
    "BossSchedule",
    "bellman_schedule",
    "boss_cost_matrix",
    "boss_schedule",
    "FlowTurboStepper",
    "flowturbo_sample",
    "FixedGridSampler",
]

# method modules last: they build on the names above
from fewflow.solvers.boss import BossSchedule, bellman_schedule, boss_cost_matrix, boss_schedule
from fewflow.solvers.fast import FixedGridSampler
from fewflow.solvers.flowturbo import FlowTurboStepper, flowturbo_sample
