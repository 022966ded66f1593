"""Training configuration and result: plain dataclasses, saved as JSON beside every checkpoint."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from fewflow._validate import FewflowError, unknown_name

SCHEDULES = ("constant", "cosine", "linear")
AMP_DTYPES = ("bfloat16", "float16")
DDP_MODES = ("wrap", "allreduce")
LOGGERS = ("tensorboard", "wandb", "both", "none")
#: more optimiser steps than this is a typo, not a plan
MAX_STEPS = 10**9


@dataclass
class TrainConfig:
    """Everything the :class:`~fewflow.train.Trainer` loop needs besides model, objective and data.

    JSON round trip: ``TrainConfig.from_dict(json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg``
    (``from_dict`` rejects unknown keys with a :class:`FewflowError` naming them; ``TrainConfig(**d)`` works
    too but raises a plain ``TypeError`` on unknown keys).

    Fields
    ------
    steps: optimiser steps in total (a resumed run continues up to this number).
    batch_size: the *global* batch; under DDP each of the ``W`` ranks takes ``batch_size / W`` of it.
    lr, weight_decay, betas: AdamW (decoupled weight decay, Loshchilov & Hutter, "Decoupled Weight Decay
        Regularization").
    warmup, lr_schedule: learning rate ``lr * f(step)`` with a linear warm-up over ``warmup`` steps then
        ``"constant"``, ``"cosine"`` or ``"linear"`` decay to ``min_lr_ratio * lr`` at ``steps``
        (see :func:`fewflow.train.schedules.lr_factor`).
    grad_clip: clip the global gradient 2-norm to this (``None``: no clipping; the norm is still logged).
    ema_decay: exponential moving average of the weights (``None``: no EMA, ``ema_model is model``).
    ema_warmup: use ``min(ema_decay, (1 + n) / (10 + n))`` after ``n`` updates, so short runs are not
        dominated by the initial weights.
    amp, amp_dtype: autocast on CUDA (``"bfloat16"``; ``"float16"`` adds a GradScaler); a no-op with a
        warning on other devices.
    compile: wrap the model with ``torch.compile`` (opt-in).
    seed: seeds the batch order, the objective's generator and the global RNGs.
    log_every, eval_every, sample_every, ckpt_every: periods in steps (``0``: never; checkpoints are also
        written at the end when an ``out_dir`` is given).
    keep_last: how many checkpoints to keep (``0``: all).
    progress: a tqdm bar with loss and rate.
    device: ``"auto"`` (``cuda:<local_rank>`` when available, else ``cpu``) or any torch device string.
    prefetch_workers: threads that draw ``x0`` and solve the OT / Sinkhorn couplings of the next batches
        while the network trains (see :mod:`fewflow.train.trainer`); ``0``: the objective couples each batch
        itself. Used only for objectives with such a ``coupling`` and ``result_loss`` on a data set.
    ddp_mode: ``"wrap"`` wraps the model in ``DistributedDataParallel``; ``"allreduce"`` averages gradients
        with one all-reduce per step after backward (works with objectives that call the model several times
        or through ``torch.func``).
    logger: where scalars go besides ``log.csv`` / ``eval.csv``: ``"tensorboard"`` (``out_dir/tb`` when
        the package imports), ``"wandb"`` (Weights & Biases, offline unless ``WANDB_MODE=online``; the extra
        ``fewflow[wandb]``), ``"both"`` or ``"none"``; the same key everywhere (``train/loss``).
    """

    steps: int = 1000
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup: int = 0
    lr_schedule: str = "constant"
    min_lr_ratio: float = 0.0
    grad_clip: float | None = 1.0
    ema_decay: float | None = 0.999
    ema_warmup: bool = True
    amp: bool = False
    amp_dtype: str = "bfloat16"
    compile: bool = False
    seed: int = 0
    log_every: int = 50
    eval_every: int = 0
    sample_every: int = 0
    ckpt_every: int = 500
    keep_last: int = 3
    progress: bool = True
    device: str = "auto"
    ddp_mode: str = "wrap"
    prefetch_workers: int = 1
    logger: str = "tensorboard"

    def __post_init__(self) -> None:
        if isinstance(self.betas, list):
            self.betas = tuple(self.betas)
        if not (isinstance(self.betas, tuple) and len(self.betas) == 2):
            raise FewflowError(f"TrainConfig.betas must be a pair of floats, got {self.betas!r}")
        for name in ("steps", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise FewflowError(f"TrainConfig.{name} must be a positive integer, got {v!r}")
        if self.steps > MAX_STEPS:
            raise FewflowError(
                f"TrainConfig.steps={self.steps} is absurd (more than 10**9 optimiser steps); check the "
                "number"
            )
        for name in ("warmup", "log_every", "eval_every", "sample_every", "ckpt_every", "keep_last", "seed",
                     "prefetch_workers"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise FewflowError(f"TrainConfig.{name} must be a non-negative integer, got {v!r}")
        if not self.lr > 0:
            raise FewflowError(f"TrainConfig.lr must be positive, got {self.lr!r}")
        if self.weight_decay < 0:
            raise FewflowError(f"TrainConfig.weight_decay must be >= 0, got {self.weight_decay!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise FewflowError(f"TrainConfig.min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio!r}")
        if self.lr_schedule not in SCHEDULES:
            raise unknown_name("lr schedule", self.lr_schedule, SCHEDULES)
        if self.amp_dtype not in AMP_DTYPES:
            raise unknown_name("amp dtype", self.amp_dtype, AMP_DTYPES)
        if self.ddp_mode not in DDP_MODES:
            raise unknown_name("ddp mode", self.ddp_mode, DDP_MODES)
        if self.logger not in LOGGERS:
            raise unknown_name("logger", self.logger, LOGGERS)
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise FewflowError(f"TrainConfig.grad_clip must be positive or None, got {self.grad_clip!r}")
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            raise FewflowError(f"TrainConfig.ema_decay must lie in [0, 1) or be None, got {self.ema_decay!r}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``dataclasses.asdict``; ``betas`` becomes a list in JSON)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Build from a dict (e.g. parsed JSON/YAML), rejecting unknown keys with a clear error."""
        if not isinstance(d, dict):
            raise FewflowError(f"TrainConfig.from_dict expects a dict, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise FewflowError(
                f"unknown TrainConfig key(s) {unknown}; valid keys are: {', '.join(sorted(known))}"
            )
        return cls(**d)


@dataclass
class TrainResult:
    """What :meth:`Trainer.fit` returns.

    ``step``: optimiser steps done; ``last_loss``: the last finite training loss (``nan`` if none);
    ``history``: one dict per logged step (the rows of ``log.csv``, including those of the run being resumed);
    ``stopped_reason``: ``"completed"``, ``"already complete"``, ``"data exhausted ..."`` or
    ``"non-finite loss ..."`` / ``"non-finite gradient norm ..."``; ``evals``: the rows of ``eval.csv``;
    ``checkpoint``: the last good checkpoint; ``diverged``: the ``diverged-<step>`` folder holding the state
    of a non-finite stop (``None`` otherwise).
    """

    step: int
    last_loss: float
    history: list[dict[str, float]] = field(default_factory=list)
    stopped_reason: str = "completed"
    evals: list[dict[str, float]] = field(default_factory=list)
    checkpoint: str | None = None
    diverged: str | None = None
