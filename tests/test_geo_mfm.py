"""The Meta Flow Matching benchmark part runs in smoke mode and reports well-formed, finite results."""

from __future__ import annotations

import math

import pytest
import torch

from fewflow._validate import FewflowError
from fewflow.bench.geo_mfm import part

torch.set_num_threads(1)


def test_smoke_part(tmp_path):
    r = part("smoke", tmp_path, seed=0, verbose=False)
    assert {row["method"] for row in r["rows"]} == {"mfm", "fm", "cgfm", "identity"}
    for row in r["rows"]:
        for k in ("unseen_w1", "unseen_w2", "unseen_mmd"):
            assert math.isfinite(row[k])
        assert row["unseen_w2"] >= 0 and row["unseen_w1"] >= 0
    ident = next(row for row in r["rows"] if row["method"] == "identity")
    assert ident["unseen_w2"] > 0.5  # the treatment moves the patients: the source is not the answer
    assert r["claims"] and all(set(c) == {"claim", "dataset", "met", "value"} for c in r["claims"])
    assert all(isinstance(c["met"], bool) for c in r["claims"])
    assert r["lines"][0].startswith("## ") and any(line.startswith("| data") for line in r["lines"])
    again = part("smoke", tmp_path, seed=0, verbose=False)  # cached: the same rows without training
    assert again["rows"] == r["rows"]


def test_unknown_mode():
    with pytest.raises(FewflowError, match="mode must be one of"):
        part("huge", None)  # type: ignore[arg-type]
