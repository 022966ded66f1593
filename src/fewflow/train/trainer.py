"""The training loop: AdamW, LR schedule, EMA, AMP, torch.compile, checkpoints + exact resume, NaN guard,
CSV/TensorBoard/tqdm logging, evaluation and sampling callbacks, and DDP under torchrun.

One step (``k`` = steps done so far)::

    batch   = next global batch (data set: a slice of this epoch's permutation)   -> this rank's slice
    out     = objective(model, x1, generator=g_rank, **cond)                      (autocast on CUDA if amp)
    stop if out.loss (or the gradient norm) is not finite: the weights are still those after step k;
        they go to ``out_dir/diverged-<k+1>/`` (never to a checkpoint: ``latest`` keeps naming the last
        good one) with the offending loss and gradient values
    loss.backward(); average gradients over ranks; clip to grad_clip; AdamW step; LR schedule step
    ema <- d ema + (1 - d) model

Every source of randomness (the epoch permutations, the objective's generator ``g_rank``, the global torch /
numpy / python RNGs) is seeded from ``config.seed`` and saved in checkpoints, so ``fit(resume=True)`` after a
kill continues bit-for-bit like an uninterrupted run (same device, same seed).

**Prefetched OT pairs.** When the objective exposes a ``coupling`` that solves an OT problem per batch (exact
OT, class-conditional OT, Sinkhorn / Schroedinger bridge) and a ``result_loss(model, CouplingResult, ...)``
(as :class:`~fewflow.objectives.cfm.CFMLoss` does), and the data is a data set or a tensor (batches of
``x1`` and optional labels ``y``), the trainer draws ``x0`` and solves the couplings of the next batches in
background threads (:class:`~fewflow.couplings.PrefetchCoupler`, ``config.prefetch_workers`` of them) and
hands the objective the finished pairs, so the O(B^3) solve leaves the critical path. The pairs come from
their own random stream (``x0`` from a generator seeded by ``(seed, rank, step at which the stream
started)``, a random coupling's draws from one seeded by the batch's index in that stream), restarted at
every checkpoint, so a resumed run is still bit-identical to an uninterrupted one and the pairs do not
depend on the number of workers. With ``prefetch_workers=0`` the objective draws ``x0`` and couples each
batch itself from ``g_rank``: the same distribution of pairs but not the same draws (there ``x0`` of step
k+1 is drawn from one generator after step k's times and label dropout, which a prefetcher cannot
reproduce without waiting for step k).

Longer than fewflow's ~400-line guide on purpose: the training loop (AMP, EMA, DDP, NaN guard, resume) is
one state machine.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import math
import random
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fewflow._io import atomic_path, clean_stale_temps, json_default
from fewflow._validate import FewflowError
from fewflow.couplings import (
    ClassConditionalOT,
    Coupling,
    CouplingResult,
    ExactOTCoupling,
    PrefetchCoupler,
    SinkhornCoupling,
)
from fewflow.objectives.base import LossOutput
from fewflow.train import distributed as ddp
from fewflow.train.batches import BatchSource, shard
from fewflow.train.checkpoint import (
    capture_rng_state,
    list_checkpoints,
    load_checkpoint,
    load_state_into,
    restore_rng_state,
    save_checkpoint,
    unwrap_model,
    write_run_config,
)
from fewflow.train.config import TrainConfig, TrainResult
from fewflow.train.ema import EMA
from fewflow.train.loggers import CSVLog, MetricLogs
from fewflow.train.schedules import make_scheduler

log = logging.getLogger("fewflow.train")

_FORWARDED_ATTRS = ("is_flow_map", "num_classes", "config")
#: couplings that solve an OT problem per batch: worth computing ahead in background threads
PREFETCHED_COUPLINGS: tuple[type, ...] = (ExactOTCoupling, ClassConditionalOT, SinkhornCoupling)
#: ``out_dir/diverged-<step>/``: the state of a run stopped by a non-finite loss (never a checkpoint)
DIVERGED_PREFIX = "diverged-"


def prefetched_coupling(objective: Any) -> Coupling | None:
    """The coupling the :class:`Trainer` computes ahead for ``objective``: its ``coupling`` attribute when
    that is one of :data:`PREFETCHED_COUPLINGS` and the objective has ``result_loss`` (the loss on a
    precomputed :class:`~fewflow.couplings.CouplingResult`); ``None`` otherwise."""
    coupling = getattr(objective, "coupling", None)
    if isinstance(coupling, PREFETCHED_COUPLINGS) and callable(getattr(objective, "result_loss", None)):
        return coupling
    return None


def derive_seed(*parts: int) -> int:
    """A 63-bit seed mixing integers (numpy SeedSequence): independent streams per (seed, purpose, rank)."""
    return int(
        np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> np.uint64(1)
    )


def resolve_device(device: str | torch.device, local_rank: int = 0) -> torch.device:
    """``"auto"`` -> ``cuda:<local_rank>`` when CUDA is available, else ``cpu``; other strings as given."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise FewflowError(f"unknown device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FewflowError(f"device {device!r} requested but CUDA is not available")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device(f"cuda:{local_rank}")
    return dev


class Trainer:
    """Train ``model`` by minimising ``objective`` on ``data`` (see the module docstring for one step).

    Parameters
    ----------
    model: an ``nn.Module`` (moved to ``config.device``). ``trainer.model`` is the plain module being trained;
        ``trainer.ema_model`` is its EMA copy (the one to sample from; ``model`` itself when EMA is off).
    objective: ``objective(model, x1, *, generator=None, **cond) -> LossOutput`` (fewflow.objectives).
    data: a ``fewflow.data.Dataset`` (its labels, if any, are passed as ``y=``, its condition as ``c=``), a
        tensor or numpy array of examples, a tuple ``(x, y)`` / ``(x, y, c)`` or a dict ``{"x", "y", "c"}``
        of tensors or numpy arrays, a map-style ``torch.utils.data.Dataset`` (items: a sample, ``(sample,
        label)`` or ``(sample, label, condition)``), or an iterator / iterable of batches such as a
        ``DataLoader`` (tensors, ``(x1, y)`` tuples or dicts with ``"x1"`` and conditioning keys). Numpy
        samples become float32 and floating data takes the model's dtype; anything else is one clear
        error (:class:`fewflow.train.BatchSource`). Iterator batches are global batches, sliced across DDP
        ranks like data-set batches.
    config: a :class:`TrainConfig` (or a dict for :meth:`TrainConfig.from_dict`).
    out_dir: run folder for ``config.json``, checkpoints, ``log.csv``, ``eval.csv`` and TensorBoard events
        (``None``: nothing is written).
    run_config: JSON-able description of the run saved in ``config.json`` and every checkpoint; it should hold
        ``"model"`` (the model's ``.config``) for :func:`fewflow.train.load_model`. Default:
        ``{"model": model.config, "meta": ...}`` (``"model"`` when the model has a dict ``.config``), where
        ``meta`` records what sampling needs to know about the data (:meth:`record_data`), so that
        ``fewflow sample RUN`` reads the folder; ``fewflow.runs.run_config_for(model, data)`` gives a
        complete run config that ``fewflow eval`` reads too.
    eval_fn: ``eval_fn(trainer, step) -> dict[str, float]`` every ``eval_every`` steps and at the end; rows
        go to ``eval.csv`` (rank 0 only).
    sample_fn: ``sample_fn(trainer, step, out_dir)`` every ``sample_every`` steps and at the end (rank 0),
        e.g. to save sample plots.
    use_labels: pass a data set's labels to the objective as ``y=``. ``None`` (default): yes, unless the
        model declares itself unconditional with ``model.num_classes is None`` (fewflow.models do), so an
        unconditional model can train on a labelled data set.
    """

    def __init__(
        self,
        model: nn.Module,
        objective: Callable[..., LossOutput],
        data: Any,
        config: TrainConfig | dict | None = None,
        out_dir: str | Path | None = None,
        run_config: dict | None = None,
        eval_fn: Callable[[Trainer, int], dict[str, float]] | None = None,
        sample_fn: Callable[[Trainer, int, Path | None], Any] | None = None,
        use_labels: bool | None = None,
    ) -> None:
        if config is None:
            config = TrainConfig()
        elif isinstance(config, dict):
            config = TrainConfig.from_dict(config)
        elif not isinstance(config, TrainConfig):
            raise FewflowError(f"config must be a TrainConfig or a dict, got {type(config).__name__}")
        if not isinstance(model, nn.Module):
            raise FewflowError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(objective):
            raise FewflowError(f"objective must be callable, got {type(objective).__name__}")
        self.config = config
        self.dist = ddp.init_distributed(device=None if config.device == "auto" else config.device)
        self.device = resolve_device(config.device, self.dist.local_rank)
        if config.batch_size % self.dist.world_size != 0:
            raise FewflowError(
                f"batch_size={config.batch_size} must be divisible by the world size {self.dist.world_size} "
                "(each rank takes an equal slice of the global batch)"
            )
        self.model = model.to(self.device)
        self.objective = objective
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self._default_run_config = run_config is None
        if run_config is None:
            mc = getattr(model, "config", None)
            run_config = {"model": dict(mc)} if isinstance(mc, dict) else {}
        self.run_config = run_config
        self.eval_fn = eval_fn
        self.sample_fn = sample_fn

        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise FewflowError("the model has no trainable parameters")
        if self.dist.world_size > 1 and config.ddp_mode == "allreduce":
            with torch.no_grad():  # every rank starts from rank 0's weights, as DDP would do
                for t in list(self.model.parameters()) + list(self.model.buffers()):
                    torch.distributed.broadcast(t.data, 0)
        self._ema = (
            EMA(self.model, config.ema_decay, config.ema_warmup) if config.ema_decay is not None else None
        )
        self.optimizer = torch.optim.AdamW(
            params, lr=config.lr, betas=tuple(config.betas), weight_decay=config.weight_decay
        )
        self.scheduler = make_scheduler(
            self.optimizer,
            total=config.steps,
            warmup=config.warmup,
            schedule=config.lr_schedule,
            min_ratio=config.min_lr_ratio,
        )

        # mixed precision: CUDA only
        self.amp_enabled = bool(config.amp) and self.device.type == "cuda"
        if config.amp and not self.amp_enabled:
            warnings.warn(
                f"amp=True is ignored on device {self.device}: autocast is used on CUDA only", stacklevel=2
            )
        self.amp_dtype = torch.bfloat16 if config.amp_dtype == "bfloat16" else torch.float16
        self.scaler = torch.amp.GradScaler(
            "cuda", enabled=self.amp_enabled and self.amp_dtype == torch.float16
        )

        # the module the objective calls: DDP-wrapped and/or compiled
        train_model: nn.Module = self.model
        if self.dist.world_size > 1 and config.ddp_mode == "wrap":
            ids = [self.device.index] if self.device.type == "cuda" else None
            train_model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
            for name in _FORWARDED_ATTRS:
                if hasattr(self.model, name) and not hasattr(train_model, name):
                    object.__setattr__(train_model, name, getattr(self.model, name))
        if config.compile:
            train_model = torch.compile(train_model)
        self.train_model = train_model

        floats = [p.dtype for p in self.model.parameters() if p.is_floating_point()]
        self.batches = BatchSource(data, config.batch_size, config.seed, self.device,
                                   dtype=floats[0] if floats else None)
        if use_labels is None:
            use_labels = not (hasattr(model, "num_classes") and model.num_classes is None)
        if not use_labels:
            self.batches.drop_labels()
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(derive_seed(config.seed, 1, self.dist.rank))
        # prefetched OT pairs (module docstring): data sets only, whose batches are {"x1"[, "y"]}
        plain = self.batches.sampler is not None and not self.batches.has_condition
        self._pair_coupling = (
            prefetched_coupling(objective) if config.prefetch_workers > 0 and plain else None
        )
        self._coupler: PrefetchCoupler | None = None
        self._pair_states: collections.deque[Any] = collections.deque()
        self._pair_data_state: Any = None
        self.diverged: Path | None = None
        self.step = 0
        self.last_loss = float("nan")
        self.last_checkpoint: Path | None = None
        self._saved_step: int | None = None
        self._started = False
        main = self.dist.is_main and self.out_dir is not None
        self.log_csv = CSVLog(self.out_dir / "log.csv" if main else None)
        self.eval_csv = CSVLog(self.out_dir / "eval.csv" if main else None)
        self._tb: MetricLogs | None = None
        self._diagnostics: dict[str, float] = {}
        if self._default_run_config:
            self.run_config["meta"] = self.record_data()

    # ------------------------------------------------------------------------------------------ properties
    @property
    def ema_model(self) -> nn.Module:
        """The EMA weights (an ``nn.Module`` in eval mode); ``model`` itself when EMA is off."""
        return self._ema.module if self._ema is not None else self.model

    @property
    def ema(self) -> EMA | None:
        return self._ema

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    @property
    def history(self) -> list[dict[str, Any]]:
        return self.log_csv.rows

    def record_data(self) -> dict[str, Any]:
        """The ``meta`` of the default run config: what sampling needs to know about the data without it:
        ``shape`` (one sample's), ``num_classes`` (the model's, else the data's) and ``conditional`` (labels
        reach the model), ``cond_shape`` (data with a condition ``c``), ``label_dropout`` (the objective's),
        ``value_range`` and, for data from the user, ``normalization`` (undone by ``fewflow sample``);
        ``model_class`` names the network's class."""
        from fewflow.data import user_data_meta

        d = self.batches.describe()
        k = getattr(self.model, "num_classes", None)
        k = k if isinstance(k, int) and not isinstance(k, bool) and k > 0 else d["num_classes"]
        meta: dict[str, Any] = {"shape": d["shape"], "num_classes": k, "conditional": bool(d["labels"] and k)}
        if d["cond_shape"] is not None:
            meta["cond_shape"] = d["cond_shape"]
        drop = getattr(self.objective, "label_dropout", None)
        if isinstance(drop, (int, float)) and not isinstance(drop, bool) and drop > 0:
            meta["label_dropout"] = float(drop)
        vr = getattr(self.batches.data, "value_range", None)
        if isinstance(vr, (tuple, list)) and len(vr) == 2:
            meta["value_range"] = [float(v) for v in vr]
        meta.update(user_data_meta(self.batches.data))
        cls = type(self.model)
        meta["model_class"] = f"{cls.__module__}:{cls.__qualname__}"
        return meta

    # ------------------------------------------------------------------------------------------ state
    def _seed_globals(self) -> None:
        s = derive_seed(self.config.seed, 2, self.dist.rank)
        torch.manual_seed(s)
        np.random.seed(s % (2**32))
        random.seed(s)

    def _rng_state(self) -> dict[str, Any]:
        mine = capture_rng_state()
        mine["objective"] = self.generator.get_state()
        return {"ranks": ddp.all_gather_object(mine)}

    def save(self) -> Path | None:
        """Checkpoint the current state (collective under DDP; rank 0 writes). Returns its folder.

        A prefetched pair stream is stopped here (the batches it read ahead go back to the data) and a new
        one starts at the next step, so a run resumed from this checkpoint draws the same pairs."""
        self._stop_pairs()
        rng = self._rng_state()  # every rank takes part in the gather
        if self.out_dir is None or not self.is_main:
            self._saved_step = self.step
            return None
        if self._default_run_config and not self.run_config["meta"].get("shape"):
            self.run_config["meta"] = self.record_data()  # an iterator's sample shape is known by now
        extra = {
            "data": self.batches.state_dict(),
            "ema_updates": self._ema.num_updates if self._ema is not None else 0,
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "last_loss": self.last_loss,
            "world_size": self.dist.world_size,
        }
        path = save_checkpoint(
            self.out_dir,
            model=self.model,
            ema_model=self._ema.module if self._ema is not None else None,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            step=self.step,
            run_config=self.run_config,
            rng_state=rng,
            keep_last=self.config.keep_last,
            train_config=self.config,
            extra=extra,
        )
        self.last_checkpoint = path
        self._saved_step = self.step
        return path

    def load(self, path: str | Path) -> int:
        """Restore model, EMA, optimiser, schedule, RNGs and batch position; returns the step."""
        ckpt = load_checkpoint(path)
        self._stop_pairs(rewind=False)  # the data position comes from the checkpoint
        load_state_into(self.model, ckpt.model_state(), what=f"model checkpoint {ckpt.path}")
        ema_state = ckpt.ema_state()
        if self._ema is not None:
            if ema_state is not None:
                load_state_into(self._ema.module, ema_state, what=f"EMA checkpoint {ckpt.path}")
            else:
                warnings.warn(
                    f"{ckpt.path} has no EMA weights; the EMA restarts from the model", stacklevel=2
                )
                self._ema.module.load_state_dict(self.model.state_dict())
        try:
            opt_state = ckpt.state("optimizer")
            if opt_state is not None:
                self.optimizer.load_state_dict(opt_state)
            sched_state = ckpt.state("scheduler")
            if sched_state is not None:
                self.scheduler.load_state_dict(sched_state)
        except (ValueError, KeyError, RuntimeError) as e:
            if isinstance(e, FewflowError):
                raise
            raise FewflowError(
                f"optimizer/scheduler state in {ckpt.path} does not fit this model: {e}"
            ) from None
        extra = ckpt.state("extra") or {}
        if not self.batches.load_state_dict(extra.get("data")):
            warnings.warn(
                "the data iterator's position cannot be restored; resuming with its next batches",
                stacklevel=2,
            )
        if self._ema is not None:
            self._ema.num_updates = int(extra.get("ema_updates", ckpt.step))
        if extra.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(extra["scaler"])
        self.last_loss = float(extra.get("last_loss", float("nan")))
        self.step = ckpt.step
        ranks = (ckpt.state("rng") or {}).get("ranks", [])
        if len(ranks) == self.dist.world_size:
            mine = ranks[self.dist.rank]
            self.generator.set_state(mine["objective"].to(torch.uint8))
            restore_rng_state(mine)
        else:
            warnings.warn(
                f"checkpoint saved with {len(ranks)} rank(s), resuming with {self.dist.world_size}: "
                "RNG streams are reseeded, so the run will not be bit-identical to an uninterrupted one",
                stacklevel=2,
            )
            self.generator.manual_seed(derive_seed(self.config.seed, 1, self.dist.rank, self.step))
            s = derive_seed(self.config.seed, 2, self.dist.rank, self.step)
            torch.manual_seed(s)
            np.random.seed(s % (2**32))
            random.seed(s)
        self.last_checkpoint = ckpt.path
        self._saved_step = self.step
        return self.step

    # ------------------------------------------------------------------------------------------ loop
    def _start(self, resume: bool) -> None:
        if self._started:
            return
        self._started = True
        if self.out_dir is not None and self.is_main:
            n = clean_stale_temps(self.out_dir)  # temps of a run killed mid-write, before anything reads
            if n:
                log.info("removed %d stale temp file(s) of a killed run from %s", n, self.out_dir)
        if resume:
            if self.out_dir is None:
                raise FewflowError("fit(resume=True) needs an out_dir holding the run to resume")
            if list_checkpoints(self.out_dir):
                self.load(self.out_dir)
                log.info("resumed %s at step %d", self.out_dir, self.step)
            else:
                warnings.warn(f"nothing to resume in {self.out_dir}: starting a new run", stacklevel=3)
                resume = False
        if not resume:
            if self.out_dir is not None and list_checkpoints(self.out_dir):
                raise FewflowError(
                    f"{self.out_dir} already holds checkpoints of another run; pass resume=True to "
                    "continue it or choose an empty out_dir"
                )
            self._seed_globals()
            self.log_csv.clear()
            self.eval_csv.clear()
        else:
            self.log_csv.truncate_after(self.step)
            self.eval_csv.truncate_after(self.step)
        if self.out_dir is not None and self.is_main:
            write_run_config(self.out_dir, self.run_config, self.config)
            self._tb = MetricLogs(self.config.logger, self.out_dir, self.out_dir.name, self.run_config)

    def _forward(self, batch: dict[str, Any] | CouplingResult) -> Tensor:
        ctx = (
            torch.autocast(device_type="cuda", dtype=self.amp_dtype)
            if self.amp_enabled
            else contextlib.nullcontext()
        )
        if isinstance(batch, CouplingResult):  # prefetched pairs of this rank's slice
            with ctx:
                out = self.objective.result_loss(self.train_model, batch, generator=self.generator)
        else:
            local = shard(batch, self.dist.rank, self.dist.world_size)
            x1 = local.pop("x1")
            with ctx:
                out = self.objective(self.train_model, x1, generator=self.generator, **local)
        if torch.is_tensor(out):
            out = LossOutput(out)
        if not hasattr(out, "loss") or not torch.is_tensor(out.loss):
            raise FewflowError(f"the objective must return a LossOutput, got {type(out).__name__}")
        if out.loss.numel() != 1:
            raise FewflowError(f"the objective's loss must be a scalar, got shape {tuple(out.loss.shape)}")
        self._diagnostics = dict(getattr(out, "diagnostics", {}) or {})
        return out.loss.reshape(())

    def _grad_norm(self) -> Tensor:
        params = [p for p in self.model.parameters() if p.grad is not None]
        if not params:
            return torch.zeros((), device=self.device)
        if self.config.grad_clip is not None:
            return torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip)
        return torch.nn.utils.get_total_norm([p.grad for p in params])

    def _nonfinite_stop(self, what: str, value: float, loss: float, grad_norm: float) -> str:
        """Stop on a non-finite loss / gradient norm: the weights stay those after step ``self.step`` and
        are written apart (:meth:`save_diverged`), never as a checkpoint, so ``latest`` keeps naming the
        last good checkpoint. Returns the stop reason (``"non-finite ..."``)."""
        reason = (
            f"non-finite {what} ({value}) at step {self.step + 1}; stopped with the weights after step "
            f"{self.step}"
        )
        if self.out_dir is not None:
            reason += (
                f"; the last good checkpoint is {self.last_checkpoint}"
                if self.last_checkpoint is not None
                else "; no checkpoint was written before"
            )
            where = self.save_diverged(what=what, loss=loss, grad_norm=grad_norm) if self.is_main else None
            if where is not None:
                reason += f"; the diverged state is in {where}"
        log.error(reason)
        if self.is_main:
            warnings.warn(reason, RuntimeWarning, stacklevel=3)
        return reason

    def _log(self, window: dict[str, Any], pbar: Any) -> None:
        n = max(1, window["n"])
        loss = torch.tensor(window["loss"] / n, dtype=torch.float64, device=self.device)
        loss = float(ddp.all_reduce_mean(loss)) if self.dist.world_size > 1 else float(loss)
        dt = time.perf_counter() - window["t0"]
        row: dict[str, Any] = {
            "step": self.step,
            "loss": loss,
            "lr": window["lr"],
            "grad_norm": window["grad_norm"] / n,
            "steps_per_s": n / dt if dt > 0 else float("nan"),
        }
        for k, v in window["diag"].items():
            row[k] = v / n
        if self.is_main:
            self.log_csv.append(row)
            if self._tb is not None:
                self._tb.log(row, self.step)
            if pbar is not None:
                pbar.set_postfix(loss=f"{loss:.4g}", lr=f"{row['lr']:.2e}")
        log.info(
            "step %d loss %.5g lr %.3g grad_norm %.3g (%.1f steps/s)",
            self.step,
            loss,
            row["lr"],
            row["grad_norm"],
            row["steps_per_s"],
        )

    def _callbacks(self, final: bool) -> None:
        c = self.config
        if not self.is_main:
            return
        due_eval = self.eval_fn is not None and c.eval_every > 0 and (self.step % c.eval_every == 0 or final)
        due_sample = (
            self.sample_fn is not None and c.sample_every > 0 and (self.step % c.sample_every == 0 or final)
        )
        if due_eval:
            metrics = self.eval_fn(self, self.step) or {}
            if not isinstance(metrics, dict):
                raise FewflowError(f"eval_fn must return a dict of metrics, got {type(metrics).__name__}")
            row = {"step": self.step, **{k: float(v) for k, v in metrics.items()}}
            self.eval_csv.append(row)
            if self._tb is not None:
                self._tb.log(row, self.step, prefix="eval")
        if due_sample:
            self.sample_fn(self, self.step, self.out_dir)
        if due_eval or due_sample:
            self.model.train()

    def fit(self, resume: bool = False) -> TrainResult:
        """Train until ``config.steps`` (or a stop); ``resume=True`` continues the newest checkpoint in
        ``out_dir`` (a fresh run when there is none). Returns a :class:`TrainResult`."""
        c = self.config
        self._start(resume)
        if self.step >= c.steps:
            return self._result("already complete")
        self.model.train()
        pbar = None
        if c.progress and self.is_main:
            from fewflow._progress import progress_bar

            pbar = progress_bar(total=c.steps, initial=self.step, desc="train")
        window = self._new_window()
        reason = "completed"
        try:
            while self.step < c.steps:
                batch = self._next_batch()
                if batch is None:
                    reason = f"data exhausted after step {self.step}"
                    break
                loss = self._forward(batch)
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                if self.dist.world_size > 1 and c.ddp_mode == "allreduce":
                    ddp.average_gradients(self.model.parameters())
                self.scaler.unscale_(self.optimizer)
                gn = self._grad_norm()
                vals = torch.stack([loss.detach().float(), gn.detach().float().to(loss.device)])
                if self.dist.world_size > 1:
                    ok = ddp.all_reduce_min(torch.isfinite(vals).all().to(torch.float32).reshape(1))
                    all_ok = bool(ok.item())
                else:
                    all_ok = True
                loss_v, gn_v = vals.tolist()
                if not math.isfinite(loss_v) or not all_ok:
                    reason = self._nonfinite_stop(
                        "loss" if not math.isfinite(loss_v) else "loss on another rank", loss_v, loss_v, gn_v
                    )
                    break
                if not math.isfinite(gn_v) and not self.scaler.is_enabled():
                    reason = self._nonfinite_stop("gradient norm", gn_v, loss_v, gn_v)
                    break
                lr = self.optimizer.param_groups[0]["lr"]
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.scheduler.step()
                if self._ema is not None:
                    self._ema.update(self.model)
                self.step += 1
                self.last_loss = loss_v
                window["n"] += 1
                window["loss"] += loss_v
                window["grad_norm"] += gn_v
                window["lr"] = lr
                for k, v in self._diagnostics.items():
                    try:
                        window["diag"][k] = window["diag"].get(k, 0.0) + float(v)
                    except (TypeError, ValueError):
                        pass
                if pbar is not None:
                    pbar.update(1)
                final = self.step == c.steps
                if (c.log_every > 0 and self.step % c.log_every == 0) or (final and window["n"] > 0):
                    self._log(window, pbar)
                    window = self._new_window()
                self._callbacks(final)
                if self.out_dir is not None and c.ckpt_every > 0 and self.step % c.ckpt_every == 0:
                    self.save()
            if reason == "completed" or reason.startswith("data exhausted"):
                if window["n"] > 0:
                    self._log(window, pbar)
                if self.out_dir is not None and self._saved_step != self.step:
                    self.save()
        finally:
            self._stop_pairs()
            if pbar is not None:
                pbar.close()
            if self._tb is not None:
                self._tb.close()
                self._tb = None
        ddp.barrier()
        return self._result(reason)

    # ------------------------------------------------------------------------------------------ pairs
    def _next_batch(self) -> dict[str, Any] | CouplingResult | None:
        """The next global batch dict, or this rank's prefetched :class:`CouplingResult`; ``None`` at the
        end of a one-shot iterator."""
        if self._pair_coupling is None:
            return self.batches.next()
        if self._coupler is None:
            self._coupler = self._start_pairs(self._pair_coupling)
        try:
            res = next(self._coupler)
        except StopIteration:
            return None
        self._pair_data_state = self._pair_states.popleft()
        return res

    def _start_pairs(self, coupling: Coupling) -> PrefetchCoupler:
        """A pair stream from the current batch position, seeded by ``(seed, rank, step)``."""
        src, rank, world = self.batches, self.dist.rank, self.dist.world_size
        states = self._pair_states
        states.clear()
        self._pair_data_state = src.state_dict()

        def local_batches() -> Any:  # runs in the producer thread, in batch order
            while True:
                batch = src.next()
                if batch is None:
                    return
                states.append(src.state_dict())  # the data position once this batch is consumed
                local = shard(batch, rank, world)
                yield local["x1"], local.get("y")

        return PrefetchCoupler(
            local_batches(),
            coupling,
            depth=max(2, self.config.prefetch_workers),
            source=_SourceOf(getattr(self.objective, "source", None)),
            seed=derive_seed(self.config.seed, 3, rank, self.step),
            num_workers=self.config.prefetch_workers,
        ).start()

    def _stop_pairs(self, rewind: bool = True) -> None:
        """Stop the pair stream; with ``rewind`` the batches it read ahead go back to the data."""
        if self._coupler is None:
            return
        self._coupler.close()
        self._coupler = None
        self._pair_states.clear()
        if rewind and self._pair_data_state is not None:
            self.batches.load_state_dict(self._pair_data_state)

    # ------------------------------------------------------------------------------------------ divergence
    def save_diverged(self, *, what: str, loss: float, grad_norm: float) -> Path | None:
        """Write the state that produced a non-finite ``what`` to ``out_dir/diverged-<step>/`` (``<step>``:
        the failed step) for inspection: ``model.safetensors`` (and ``ema.safetensors``) with the weights
        after the last finished step, ``grads.safetensors`` with the failed step's gradients (NaN included)
        and ``diverged.json`` with the loss, gradient norm, learning rate, the parameters whose gradients
        are not finite, the last good checkpoint and the data position. Not a checkpoint: ``latest`` and
        resuming never see it. Returns the folder (``None`` without an ``out_dir`` or when it cannot be
        written: the stop itself is never masked)."""
        if self.out_dir is None:
            return None
        from safetensors.torch import save_file

        step = self.step + 1
        grads = {
            name: p.grad.detach().to("cpu").contiguous()
            for name, p in unwrap_model(self.model).named_parameters()
            if p.grad is not None
        }
        bad = [k for k, g in grads.items() if g.is_floating_point() and not bool(torch.isfinite(g).all())]
        doc = {
            "step": step,
            "weights_after_step": self.step,
            "non_finite": what,
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": self.optimizer.param_groups[0]["lr"],
            "non_finite_grads": bad,
            "last_good_checkpoint": self.last_checkpoint.name if self.last_checkpoint is not None else None,
            "last_finite_loss": self.last_loss,
            "data": self.batches.state_dict() if self._coupler is None else self._pair_data_state,
            "diagnostics": self._diagnostics,
        }
        files = {"model.safetensors": _cpu_state(self.model), "grads.safetensors": grads}
        if self._ema is not None:
            files["ema.safetensors"] = _cpu_state(self._ema.module)
        folder = self.out_dir / f"{DIVERGED_PREFIX}{step}"
        try:
            text = json.dumps(_json_safe(doc), indent=1, default=json_default, allow_nan=False)
            with atomic_path(folder) as tmp:
                tmp.mkdir()
                for fname, tensors in files.items():
                    save_file(tensors, str(tmp / fname))
                (tmp / "diverged.json").write_text(text + "\n")
        except (OSError, TypeError, ValueError) as e:
            log.error("could not save the diverged state to %s: %s", folder, e)
            return None
        self.diverged = folder
        return folder

    def _new_window(self) -> dict[str, Any]:
        return {
            "n": 0,
            "loss": 0.0,
            "grad_norm": 0.0,
            "lr": self.optimizer.param_groups[0]["lr"],
            "diag": {},
            "t0": time.perf_counter(),
        }

    def _result(self, reason: str) -> TrainResult:
        return TrainResult(
            step=self.step,
            last_loss=self.last_loss,
            history=list(self.log_csv.rows),
            stopped_reason=reason,
            evals=list(self.eval_csv.rows),
            checkpoint=str(self.last_checkpoint) if self.last_checkpoint is not None else None,
            diverged=str(self.diverged) if self.diverged is not None else None,
        )


class _SourceOf:
    """The objective's ``x0`` draw for the pair stream: ``sample_source`` (standard normal noise when the
    objective has no source; shape-checked and moved to ``x1``'s device and dtype otherwise)."""

    def __init__(self, source: Any) -> None:
        self.source = source

    def sample_like(self, x1: Tensor, generator: torch.Generator | None = None) -> Tensor:
        from fewflow.objectives.common import sample_source

        return sample_source(self.source, x1, generator)


def _cpu_state(module: nn.Module) -> dict[str, Tensor]:
    state = unwrap_model(module).state_dict()
    return {k: v.detach().to("cpu").clone().contiguous() for k, v in state.items()}


def _json_safe(obj: Any) -> Any:
    """``obj`` with non-finite floats as the strings ``"nan"``, ``"inf"``, ``"-inf"`` (strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj
