"""The video-editing benchmark part (fewflow.bench.geo_video) in smoke mode: claims format, finite numbers,
cached rerun."""

from __future__ import annotations

import math
import time

import pytest

from fewflow import FewflowError
from fewflow.bench.geo_video import part


def test_smoke_part(tmp_path):
    out = part("smoke", tmp_path, seed=0, verbose=False)
    assert out["lines"][0].startswith("## ")
    assert any(line.startswith("| variant") for line in out["lines"])
    variants = {r["variant"] for r in out["rows"]}
    assert {"reference", "per-frame", "warp", "flowvid", "calibration"} <= variants
    for r in out["rows"]:
        for k, v in r.items():
            if isinstance(v, float):
                assert math.isfinite(v), (k, r)
    ref = next(r for r in out["rows"] if r["variant"] == "reference")
    assert ref["fidelity_mse"] == 0 and ref["structure_error"] == 0
    assert len(out["claims"]) == 3
    for c in out["claims"]:
        assert set(c) == {"claim", "dataset", "met", "value"} and isinstance(c["met"], bool)
    assert out["plots"] and all(p.endswith(".png") for p in out["plots"])
    t0 = time.perf_counter()
    again = part("smoke", tmp_path, seed=0, verbose=False)  # cached: no training, no sampling
    assert again["rows"] == out["rows"] and time.perf_counter() - t0 < 5


def test_unknown_mode(tmp_path):
    with pytest.raises(FewflowError, match="mode"):
        part("huge", tmp_path)
