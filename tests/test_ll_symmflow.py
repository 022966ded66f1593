"""The SymmFlow part of ``fewflow bench likelihood_latent`` in smoke mode: claims format, finite numbers,
and a rerun served from the cache."""

from __future__ import annotations

import math
import time

import pytest

from fewflow.bench.ll_symmflow import part


@pytest.mark.slow
def test_smoke_part(tmp_path):
    out = part("smoke", tmp_path, seed=0, verbose=False)
    assert set(out) == {"rows", "claims", "lines"}
    assert len(out["rows"]) == 1 and out["rows"][0]["dataset"] == "digits"
    row = out["rows"][0]
    for k, v in row.items():
        if isinstance(v, float):
            assert math.isfinite(v), k
    assert 0.0 <= row["acc_mean_start"] <= 1.0 and 0.0 <= row["iou_mean_start"] <= 1.0
    assert len(out["claims"]) == 3
    for c in out["claims"]:
        assert set(c) == {"claim", "dataset", "met", "value"}
        assert isinstance(c["met"], bool) and c["dataset"] == "digits" and c["value"]
    assert out["lines"][0].startswith("## ") and any(line.startswith("| data") for line in out["lines"])
    t0 = time.perf_counter()
    again = part("smoke", tmp_path, seed=0, verbose=False)
    assert again["rows"] == out["rows"] and time.perf_counter() - t0 < 5.0
