"""The Action FM benchmark part in smoke mode: claims format, finite numbers, cached rerun."""

from __future__ import annotations

import math
import time

import pytest
import torch

from fewflow._validate import FewflowError
from fewflow.bench.ctl_actionfm import part

torch.set_num_threads(1)


@pytest.mark.slow
def test_smoke_part_reports_finite_numbers_and_claims(tmp_path):
    out = part("smoke", tmp_path, seed=0, verbose=False)
    assert {"rows", "claims", "lines"} <= set(out)
    assert {r["mode"] for r in out["rows"]} == {"none", "finetune", "actionfm"}
    for r in out["rows"]:
        for k in ("plan_err_after", "cte_after", "cte_mean"):
            assert math.isfinite(r[k]) and r[k] >= 0
        assert 0 <= r["reached"] <= r["n_waypoints"] and r["adapt_steps"] >= 0
    assert len(out["claims"]) == 4
    for c in out["claims"]:
        assert set(c) == {"claim", "dataset", "met", "value"}
        assert isinstance(c["met"], bool) and c["dataset"] == "unicycle"
    assert out["lines"][0].startswith("## ") and any(line.startswith("| gains") for line in out["lines"])
    t0 = time.perf_counter()
    again = part("smoke", tmp_path, seed=0, verbose=False)  # flow and rows cached
    assert time.perf_counter() - t0 < 3.0
    assert again["rows"] == out["rows"]


def test_unknown_mode_is_refused(tmp_path):
    with pytest.raises(FewflowError, match="mode"):
        part("huge", tmp_path)
