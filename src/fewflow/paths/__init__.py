"""Probability paths: schedules ``(alpha_t, sigma_t)``, affine paths with prediction conversions and
rescheduling, and stochastic interpolants (t = 0 source, t = 1 data)."""

from fewflow.paths.affine import PREDICTIONS, AffinePath, PathSample, RescheduledVelocity, reschedule
from fewflow.paths.interpolant import StochasticInterpolant
from fewflow.paths.schedules import (
    SCHEDULES,
    CosineSchedule,
    FunctionSchedule,
    LinearSchedule,
    PolynomialSchedule,
    Schedule,
    VPSchedule,
    get_schedule,
    time_derivative,
)

__all__ = [
    "PREDICTIONS",
    "AffinePath",
    "CosineSchedule",
    "FunctionSchedule",
    "LinearSchedule",
    "PathSample",
    "PolynomialSchedule",
    "RescheduledVelocity",
    "SCHEDULES",
    "Schedule",
    "StochasticInterpolant",
    "VPSchedule",
    "get_schedule",
    "reschedule",
    "time_derivative",
]
