"""Run a method's training stages in order with the :class:`~fewflow.train.Trainer`.

A method (:mod:`fewflow.methods`) returns a list of :class:`~fewflow.methods.Stage` s: the two rounds of
reflow, MF-RAE's consistency mid-training then MeanFlow distillation, ... Each stage trains the same
network with its own objective, data, batch and learning rate for its share of the budget; the next
stage starts from the previous stage's EMA weights. ``fewflow train`` gives a stage ``share x steps``
optimiser steps; the benchmarks give it ``share x`` a budget of network evaluations (``steps_of``).

With an ``out_dir`` the last stage writes the run folder itself (checkpoints, ``config.json``, logs), and
earlier stages write ``out_dir/stages/<k>-<name>/``; a finished stage leaves ``stage.json`` there, so a
resumed run skips it and restarts the first unfinished one from its own latest checkpoint.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fewflow._io import atomic_write_json
from fewflow._validate import FewflowError
from fewflow.train.checkpoint import list_checkpoints, load_checkpoint, load_state_into
from fewflow.train.config import TrainConfig, TrainResult
from fewflow.train.trainer import Trainer

__all__ = ["StageRecord", "train_stages"]


@dataclass
class StageRecord:
    """What one stage did: optimiser steps, wall time, last loss and why it stopped."""

    stage: str
    steps: int
    batch_size: int
    lr: float
    wall_s: float
    last_loss: float
    stopped: str


def _stage_dir(out_dir: Path | None, k: int, n: int, name: str) -> Path | None:
    if out_dir is None:
        return None
    return out_dir if k == n - 1 else out_dir / "stages" / f"{k}-{name}"


def train_stages(
    model: nn.Module,
    stages: Sequence[Any],
    data: Any,
    config: TrainConfig,
    *,
    steps_of: Callable[[Any, int, int, Any], int] | None = None,
    seed_of: Callable[[int], int] | None = None,
    out_dir: str | Path | None = None,
    run_config: dict | None = None,
    resume: bool = False,
    eval_fn: Callable[..., Any] | None = None,
) -> tuple[nn.Module, list[StageRecord], TrainResult | None]:
    """Train ``model`` through ``stages`` (module docstring); returns the model holding the final EMA
    weights, one :class:`StageRecord` per stage run, and the last stage's :class:`TrainResult`.

    ``steps_of(stage, index, batch_size, stage_data)`` gives a stage's optimiser steps (default:
    ``max(1, round(stage.share * config.steps))``); ``seed_of(index)`` its seed (default ``config.seed``
    for the first stage, ``config.seed + 1000 k`` after)."""
    if not stages:
        raise FewflowError("a method returned no training stage")
    out = Path(out_dir) if out_dir is not None else None
    records: list[StageRecord] = []
    result: TrainResult | None = None
    n = len(stages)
    for k, st in enumerate(stages):
        batch = max(1, config.batch_size // max(1, int(st.batch_divisor)))
        lr = float(st.lr) if st.lr is not None else config.lr * float(st.lr_scale)
        sdir = _stage_dir(out, k, n, st.name)
        done = sdir / "stage.json" if (sdir is not None and k < n - 1) else None
        if done is not None and done.is_file():  # finished before an interruption: reuse its weights
            ckpt = load_checkpoint(sdir)
            state = ckpt.ema_state() or ckpt.model_state()
            load_state_into(model, state, what=f"stage checkpoint {sdir}")
            records.append(StageRecord(**json.loads(done.read_text())))
            continue
        stage_data = data if st.data is None else (st.data(model, batch) if callable(st.data) else st.data)
        if steps_of is not None:
            steps = steps_of(st, k, batch, stage_data)
        else:
            steps = max(1, round(float(st.share) * config.steps))
        seed = seed_of(k) if seed_of else config.seed + 1000 * k
        cfg = TrainConfig(**{**asdict(config), "steps": int(steps), "batch_size": batch, "lr": lr,
                             "seed": seed})
        trainer = Trainer(model, st.objective, stage_data, cfg, out_dir=sdir, run_config=run_config,
                          eval_fn=eval_fn if k == n - 1 else None)
        again = resume and sdir is not None and bool(list_checkpoints(sdir))
        t0 = time.perf_counter()
        result = trainer.fit(resume=again)
        rec = StageRecord(st.name, int(result.step), batch, lr, time.perf_counter() - t0,
                          float(result.last_loss), str(result.stopped_reason))
        records.append(rec)
        if result.stopped_reason != "completed":
            break
        if trainer.ema is not None:  # the next stage (and the caller) continue from the EMA weights
            with torch.no_grad():
                for p, q in zip(model.parameters(), trainer.ema_model.parameters()):
                    p.copy_(q)
        if done is not None:
            atomic_write_json(done, asdict(rec))
    return model, records, result
