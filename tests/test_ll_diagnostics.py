"""The field-diagnostics part of ``fewflow bench likelihood_latent`` in smoke mode: claim format, finite
numbers, the exact and grad-phi fields conservative, and a rerun served from the cache."""

from __future__ import annotations

import json
import math
import time

import torch

from fewflow.bench.ll_diagnostics import MODELS, part

torch.set_num_threads(1)


def test_smoke_part(tmp_path):
    out = part("smoke", tmp_path, seed=0, verbose=False)
    json.dumps(out)
    rows, claims, lines = out["rows"], out["claims"], out["lines"]
    assert [r["model"] for r in rows] == list(MODELS)
    for r in rows:
        for key in ("asymmetry", "circulation", "quality", "floor", "straightness", "curvature"):
            assert isinstance(r[key], float) and math.isfinite(r[key]), (r["model"], key, r[key])
    by = {r["model"]: r for r in rows}
    assert by["exact"]["asymmetry"] < 1e-10 and by["grad_phi"]["asymmetry"] < 1e-4
    assert by["mlp"]["asymmetry"] > 10 * by["grad_phi"]["asymmetry"]
    assert len(claims) == 4
    for c in claims:
        assert set(c) == {"claim", "dataset", "met", "value"}
        assert isinstance(c["met"], bool) and c["dataset"] == "8gaussians" and c["claim"] and c["value"]
    assert lines[0].startswith("## ") and any(line.startswith("| data |") for line in lines)
    t0 = time.perf_counter()
    again = part("smoke", tmp_path, seed=0, verbose=False)
    assert time.perf_counter() - t0 < 2.0 and again["rows"] == rows
