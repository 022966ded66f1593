"""Run logs: CSV files (``log.csv``, ``eval.csv``) that survive resume, and optional TensorBoard and
Weights & Biases (``TrainConfig.logger``). Every scalar goes under the same key everywhere: the CSV column
``k`` of ``log.csv`` (``eval.csv``) is ``train/k`` (``eval/k``) in TensorBoard and W&B."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Any

from fewflow._io import atomic_path
from fewflow._validate import FewflowError
from fewflow.train.config import LOGGERS


def _parse(v: str) -> float | int | str | None:
    if v == "":
        return None
    try:
        f = float(v)
    except ValueError:
        return v
    return int(f) if f.is_integer() and "." not in v and "e" not in v.lower() and math.isfinite(f) else f


class CSVLog:
    """Rows of named numbers in a CSV file; new column names rewrite the file with a wider header.

    ``truncate_after(step)`` drops rows logged after ``step`` (the tail of a killed run that is resumed).
    """

    def __init__(self, path: str | os.PathLike | None) -> None:
        self.path = Path(path) if path is not None else None
        self.rows: list[dict[str, Any]] = []
        self.columns: list[str] = []
        if self.path is not None and self.path.is_file():
            with open(self.path, newline="") as f:
                reader = csv.DictReader(f)
                self.columns = list(reader.fieldnames or [])
                for r in reader:
                    self.rows.append(
                        {k: _parse(v) for k, v in r.items() if k is not None and v not in ("", None)}
                    )

    def truncate_after(self, step: int) -> None:
        kept = [r for r in self.rows if int(r.get("step", 0)) <= step]
        if len(kept) != len(self.rows):
            self.rows = kept
            self._rewrite()

    def clear(self) -> None:
        self.rows = []
        self.columns = []
        if self.path is not None and self.path.exists():
            self.path.unlink()

    def _rewrite(self) -> None:
        if self.path is None:
            return
        with atomic_path(self.path) as tmp, open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.columns)
            w.writeheader()
            for r in self.rows:
                w.writerow({k: r.get(k, "") for k in self.columns})

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(dict(row))
        if self.path is None:
            return
        new = [k for k in row if k not in self.columns]
        if new or not self.path.exists():
            self.columns.extend(new)
            self._rewrite()
            return
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.columns).writerow({k: row.get(k, "") for k in self.columns})


class TensorBoardLog:
    """Scalars to TensorBoard when the ``tensorboard`` package imports; silently nothing otherwise."""

    def __init__(self, log_dir: str | os.PathLike | None) -> None:
        self.writer = None
        if log_dir is None:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception:  # tensorboard is optional
            return
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, row: dict[str, Any], step: int, prefix: str = "train") -> None:
        if self.writer is None:
            return
        for key, v in _scalars(row, prefix).items():
            self.writer.add_scalar(key, v, step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _scalars(row: dict[str, Any], prefix: str) -> dict[str, float]:
    return {f"{prefix}/{k}": v for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def require_wandb() -> Any:
    """The ``wandb`` module, or one clear error naming the extra to install."""
    try:
        import wandb
    except ImportError:
        raise FewflowError("the W&B logger needs the wandb package: pip install 'fewflow[wandb]'") from None
    return wandb


class WandbLog:
    """Scalars to Weights & Biases (``pip install 'fewflow[wandb]'``). Offline by default, so it never needs
    the network: runs land in ``log_dir/wandb`` and ``wandb sync`` uploads them later; set
    ``WANDB_MODE=online`` to stream instead."""

    def __init__(self, log_dir: str | os.PathLike, name: str, config: dict[str, Any] | None = None) -> None:
        wandb = require_wandb()
        mode = os.environ.get("WANDB_MODE", "offline")
        os.makedirs(log_dir, exist_ok=True)
        self.run = wandb.init(dir=str(log_dir), name=name, config=config or {}, mode=mode)

    def log(self, row: dict[str, Any], step: int, prefix: str = "train") -> None:
        values = _scalars(row, prefix)
        if values:
            self.run.log(values, step=int(step))

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.run.finish()


class MetricLogs:
    """The run's scalar loggers besides the CSV files, chosen by ``TrainConfig.logger``: ``"tensorboard"``
    (events in ``out_dir/tb`` when the package imports), ``"wandb"``, ``"both"`` or ``"none"``."""

    def __init__(self, kind: str, out_dir: str | os.PathLike, name: str,
                 config: dict[str, Any] | None = None) -> None:
        if kind not in LOGGERS:
            raise FewflowError(f"unknown logger {kind!r}; choose one of: {', '.join(LOGGERS)}")
        self.logs: list[Any] = []
        if kind in ("tensorboard", "both"):
            self.logs.append(TensorBoardLog(os.path.join(out_dir, "tb")))
        if kind in ("wandb", "both"):
            self.logs.append(WandbLog(out_dir, name, config))

    def log(self, row: dict[str, Any], step: int, prefix: str = "train") -> None:
        for lg in self.logs:
            lg.log(row, step, prefix)

    def flush(self) -> None:
        for lg in self.logs:
            lg.flush()

    def close(self) -> None:
        for lg in self.logs:
            lg.close()
