"""The ReynoldsFlow benchmark part in smoke mode: claims format, finite numbers, cached rerun, plot."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import torch

from fewflow._validate import FewflowError
from fewflow.bench.geo_reynolds import part

torch.set_num_threads(1)


def test_smoke_part_reports_finite_numbers_and_claims(tmp_path):
    out = part("smoke", tmp_path, seed=0, verbose=False)
    assert set(out) == {"rows", "claims", "lines", "plots"}
    assert [(r["illumination"], r["b"]) for r in out["rows"]] == [("none", 0.0), ("global", 0.1)]
    for r in out["rows"]:
        vals = [r["epe_zero"], r["epe_hs"], r["epe_reynolds"], r["epe_reynolds_const"]]
        assert all(math.isfinite(v) and v >= 0 for v in vals)
        assert r["pairs"] == 2 and r["epe_zero"] > 0.3  # the background pans at 0.5 px per frame
    assert len(out["claims"]) == 2
    for c in out["claims"]:
        assert set(c) == {"claim", "dataset", "met", "value"}
        assert isinstance(c["met"], bool) and c["dataset"] == "sprites" and "EPE" in c["value"]
    assert out["lines"][0].startswith("## ") and any(line.startswith("| motion |") for line in out["lines"])
    assert Path(out["plots"][0]).stat().st_size > 1000
    t0 = time.perf_counter()
    again = part("smoke", tmp_path, seed=0, verbose=False)  # rows cached as JSON
    assert time.perf_counter() - t0 < 2.0
    assert again["rows"] == out["rows"]


def test_unknown_mode_is_refused(tmp_path):
    with pytest.raises(FewflowError, match="mode"):
        part("huge", tmp_path)
