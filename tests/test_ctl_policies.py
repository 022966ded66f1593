"""The flow-policy benchmark part in smoke mode: claims format, finite numbers, a plot, cached rerun."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import torch

from fewflow._validate import FewflowError
from fewflow.bench.ctl_policies import part

torch.set_num_threads(1)


def test_smoke_part_reports_finite_numbers_and_claims(tmp_path: Path) -> None:
    out = part("smoke", tmp_path, seed=0, verbose=False)
    assert {"rows", "claims", "lines"} <= set(out)
    assert [r["policy"] for r in out["rows"]] == ["fm10", "mf1", "mf1_infonce_l2", "noise"]
    for r in out["rows"]:
        assert 0.0 <= r["success"] <= 1.0 and 0.0 <= r["mode_coverage"] <= 1.0
        assert math.isfinite(r["latency_ms"]) and r["latency_ms"] > 0
        assert sum(r["corridors"]) <= r["episodes"]
    assert [r["nfe"] for r in out["rows"]] == [10, 1, 1, 0]
    assert len(out["claims"]) == 3
    for c in out["claims"]:
        assert set(c) == {"claim", "dataset", "met", "value"}
        assert isinstance(c["met"], bool) and c["dataset"] == "nav2d" and c["value"]
    assert out["lines"][0].startswith("## ") and any(line.startswith("| env |") for line in out["lines"])
    assert all(Path(p).is_file() for p in out.get("plots", []))
    t0 = time.perf_counter()
    again = part("smoke", tmp_path, seed=0, verbose=False)  # rows cached as JSON
    assert time.perf_counter() - t0 < 5.0
    assert again["rows"] == out["rows"]


def test_unknown_mode_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FewflowError, match="mode"):
        part("huge", tmp_path)
