"""The PFGM++ benchmark part in smoke mode: claims format, finite numbers, cached rerun."""

from __future__ import annotations

import math
import time

import pytest
import torch

from fewflow.bench.ll_pfgmpp import part

torch.set_num_threads(1)


@pytest.mark.slow
def test_smoke_part_reports_finite_numbers_and_claims(tmp_path):
    out = part("smoke", tmp_path, seed=0, verbose=False)
    assert set(out) == {"rows", "claims", "lines"}
    assert [r["D"] for r in out["rows"]] == ["64", "inf"]
    for r in out["rows"]:
        vals = [*r["fd_nfe"].values(), *r["fd_alpha"].values()]
        assert vals and all(math.isfinite(v) and v >= 0 for v in vals)
    assert len(out["claims"]) >= 2
    for c in out["claims"]:
        assert set(c) == {"claim", "dataset", "met", "value"}
        assert isinstance(c["met"], bool) and c["dataset"] == "digits" and "FD" in c["value"]
    assert out["lines"][0].startswith("## ") and any(line.startswith("| D |") for line in out["lines"])
    t0 = time.perf_counter()
    again = part("smoke", tmp_path, seed=0, verbose=False)  # rows cached as JSON
    assert time.perf_counter() - t0 < 2.0
    assert again["rows"] == out["rows"]


def test_unknown_mode_is_refused(tmp_path):
    from fewflow._validate import FewflowError

    with pytest.raises(FewflowError, match="mode"):
        part("huge", tmp_path)
