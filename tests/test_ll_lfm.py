"""The LFM part of ``fewflow bench likelihood_latent`` in smoke mode: claims format, finite numbers, cache."""

from __future__ import annotations

import json
import math
import time

import pytest

from fewflow import FewflowError
from fewflow.bench.ll_lfm import part


@pytest.mark.slow
def test_smoke_part_reports_claims_and_reruns_from_cache(tmp_path):
    out = part("smoke", tmp_path, seed=0, verbose=False)
    assert set(out) == {"rows", "claims", "lines"}
    json.dumps(out)  # plain JSON
    spaces = {r["space"] for r in out["rows"]}
    assert spaces == {"pixel", "latent", "reconstruction"}
    for r in out["rows"]:
        assert math.isfinite(r["fd"]) and r["fd"] >= 0
    latent = [r for r in out["rows"] if r["space"] == "latent"]
    assert latent and all(r["model_input"] == "1x4x4" for r in latent)
    rec = next(r for r in out["rows"] if r["space"] == "reconstruction")
    assert 0 < rec["recon_mse"] < rec["data_var"]  # even a 40-step autoencoder beats the mean image
    assert len(out["claims"]) == 3
    for c in out["claims"]:
        assert set(c) == {"claim", "dataset", "met", "value"}
        assert isinstance(c["met"], bool) and c["dataset"] == "digits" and c["value"]
    assert out["lines"][0].startswith("## ") and any(line.startswith("| space") for line in out["lines"])
    t0 = time.perf_counter()
    again = part("smoke", tmp_path, seed=0, verbose=False)
    assert again["rows"] == out["rows"] and time.perf_counter() - t0 < 2.0


def test_unknown_mode():
    with pytest.raises(FewflowError, match="unknown mode"):
        part("huge", None)  # type: ignore[arg-type]
