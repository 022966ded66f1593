"""The SCOOP benchmark part in smoke mode: claims format, finite numbers, cached rerun."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from fewflow._validate import FewflowError
from fewflow.bench.geo_scoop import METHODS, TEST_SETS, part

torch.set_num_threads(1)


def test_smoke(tmp_path: Path):
    out = part("smoke", tmp_path, seed=0, verbose=False)
    assert [(r["dataset"], r["method"]) for r in out["rows"]] == [(d, m) for d in TEST_SETS for m in METHODS]
    for r in out["rows"]:
        for k in ("epe3d", "acc_strict", "acc_relax", "outliers"):
            assert math.isfinite(r[k])
        assert 0.0 <= r["acc_strict"] <= r["acc_relax"] <= 1.0 and 0.0 <= r["outliers"] <= 1.0
    assert len(out["claims"]) == 5
    for c in out["claims"]:
        assert set(c) == {"claim", "dataset", "met", "value"} and isinstance(c["met"], bool)
    assert out["lines"][0].startswith("## ")
    assert any(line.startswith("| test set | method") for line in out["lines"])
    assert all(Path(p).exists() for p in out["plots"])
    again = part("smoke", tmp_path, seed=0, verbose=False)  # cached: same rows
    assert again["rows"] == out["rows"]
    with pytest.raises(FewflowError, match="mode"):
        part("huge", tmp_path)
