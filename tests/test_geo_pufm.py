"""The PUFM++ benchmark part in smoke mode: claims format, finite numbers, caching."""

from __future__ import annotations

import math

from fewflow.bench.geo_pufm import part


def test_smoke_part(tmp_path):
    r = part("smoke", tmp_path, seed=0, verbose=False)
    assert r["rows"] and r["lines"][0].startswith("## ")
    methods = {row["method"] for row in r["rows"]}
    assert "midpoint interpolation" in methods and "PUFM++ (1+2, adaptive, manifold)" in methods
    for row in r["rows"]:
        assert math.isfinite(row["chamfer"]) and math.isfinite(row["hausdorff"]) and row["chamfer"] > 0
        assert row["points_out"] == 128
    assert len(r["claims"]) == 4
    for c in r["claims"]:
        assert set(c) == {"claim", "dataset", "met", "value"} and isinstance(c["met"], bool)
    # a rerun reads the cached rows
    again = part("smoke", tmp_path, seed=0, verbose=False)
    assert again["rows"] == r["rows"]
