"""Training objectives: each is ``objective(model, x1, *, generator=None, **cond) -> LossOutput``.

Flow matching (CFM, with any path/coupling/source/time sampler), stochastic-interpolant losses, and the
few-step objectives: MeanFlow, SplitMeanFlow, the MF-RAE recipe (CMT -> MFD -> MFT), MDT-dist (VM, VD),
consistency / shortcut models, Rectified Diffusion; plus the fine-tuning losses of the fast samplers
(BOSS refinement, FlowTurbo refiner) and Blockwise Flow Matching.
"""

from fewflow.objectives.base import LossOutput, Objective
from fewflow.objectives.blockwise import BlockwiseFMLoss, FRNLoss
from fewflow.objectives.boss_refine import BossRefineLoss
from fewflow.objectives.cfm import CFMLoss
from fewflow.objectives.consistency import ConsistencyLoss, ShortcutLoss
from fewflow.objectives.flowturbo_refiner import FlowTurboRefinerLoss
from fewflow.objectives.interpolant import InterpolantScoreLoss, InterpolantVelocityLoss
from fewflow.objectives.mdt import MDTDistLoss
from fewflow.objectives.meanflow import MeanFlowLoss, TimePairSampler
from fewflow.objectives.mfrae import (
    ConsistencyMidTrainingLoss,
    MeanFlowBootstrapLoss,
    MeanFlowDistillationLoss,
)
from fewflow.objectives.rectified_diffusion import RectifiedDiffusionLoss
from fewflow.objectives.splitmeanflow import SplitMeanFlowLoss
from fewflow.objectives.time_samplers import (
    LogitNormalTime,
    ShiftedTime,
    TimeSampler,
    UniformTime,
    shift_time,
)

__all__ = [
    "BlockwiseFMLoss",
    "BossRefineLoss",
    "CFMLoss",
    "ConsistencyLoss",
    "ConsistencyMidTrainingLoss",
    "FRNLoss",
    "FlowTurboRefinerLoss",
    "InterpolantScoreLoss",
    "InterpolantVelocityLoss",
    "LogitNormalTime",
    "LossOutput",
    "MDTDistLoss",
    "MeanFlowBootstrapLoss",
    "MeanFlowDistillationLoss",
    "MeanFlowLoss",
    "Objective",
    "RectifiedDiffusionLoss",
    "ShiftedTime",
    "ShortcutLoss",
    "SplitMeanFlowLoss",
    "TimePairSampler",
    "TimeSampler",
    "UniformTime",
    "shift_time",
]
