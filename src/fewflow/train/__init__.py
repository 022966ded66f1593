"""Training: the :class:`Trainer` loop, its :class:`TrainConfig`, checkpoints (safetensors + JSON), EMA,
LR schedules and DDP helpers (``fewflow.train.distributed``).

Quick use::

    from fewflow.train import Trainer, TrainConfig, load_model
    result = Trainer(model, objective, dataset, TrainConfig(steps=2000), out_dir="runs/moons").fit()
    model, run_config = load_model("runs/moons")          # EMA weights, rebuilt by fewflow.models.build_model
"""

from fewflow.train import distributed
from fewflow.train.batches import BatchSource, EpochSampler
from fewflow.train.checkpoint import (
    Checkpoint,
    find_checkpoint,
    flatten_state,
    list_checkpoints,
    load_checkpoint,
    load_model,
    load_state_into,
    read_run_config,
    save_checkpoint,
    unflatten_state,
    unwrap_model,
)
from fewflow.train.config import TrainConfig, TrainResult
from fewflow.train.distributed import DistInfo, init_distributed
from fewflow.train.ema import EMA
from fewflow.train.schedules import lr_factor, make_scheduler
from fewflow.train.stages import StageRecord, train_stages
from fewflow.train.trainer import Trainer, resolve_device

__all__ = [
    "StageRecord",
    "train_stages",
    "EMA",
    "BatchSource",
    "Checkpoint",
    "DistInfo",
    "EpochSampler",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "distributed",
    "find_checkpoint",
    "flatten_state",
    "init_distributed",
    "list_checkpoints",
    "load_checkpoint",
    "load_model",
    "load_state_into",
    "lr_factor",
    "make_scheduler",
    "read_run_config",
    "resolve_device",
    "save_checkpoint",
    "unflatten_state",
    "unwrap_model",
]
