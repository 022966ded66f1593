"""Run logs: CSV files (``log.csv``, ``eval.csv``) that survive resume, and optional TensorBoard."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Any

from fewflow._io import atomic_path


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
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                self.writer.add_scalar(f"{prefix}/{k}", v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
