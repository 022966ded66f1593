"""The GoalFlow benchmark part in smoke mode: claims format, finite numbers, cached rerun."""

from __future__ import annotations

import math
import time

import pytest
import torch

from fewflow._validate import FewflowError
from fewflow.bench.ctl_goalflow import part

torch.set_num_threads(1)


@pytest.mark.slow
def test_smoke_part_reports_finite_numbers_and_claims(tmp_path):
    out = part("smoke", tmp_path, seed=0, verbose=False)
    assert {"rows", "claims", "lines"} <= set(out)
    assert [(r["method"], r["steps"]) for r in out["rows"]] == [("goalflow", 1), ("plain", 1), ("plain", 8)]
    for r in out["rows"]:
        assert 0.0 <= r["offroad"] <= 1.0 and 0.0 <= r["offroad_top1"] <= 1.0
        assert math.isfinite(r["min_ade"]) and math.isfinite(r["min_fde"]) and r["min_ade"] >= 0
    assert len(out["claims"]) == 2
    for c in out["claims"]:
        assert set(c) == {"claim", "dataset", "met", "value"}
        assert isinstance(c["met"], bool) and c["dataset"] == "nav2d"
    assert out["lines"][0].startswith("## ") and any(line.startswith("| sampler") for line in out["lines"])
    t0 = time.perf_counter()
    again = part("smoke", tmp_path, seed=0, verbose=False)
    assert time.perf_counter() - t0 < 2.0
    assert again["rows"] == out["rows"]


def test_unknown_mode_is_refused(tmp_path):
    with pytest.raises(FewflowError, match="mode"):
        part("huge", tmp_path)
