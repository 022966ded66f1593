"""The flow-policy benchmark part in smoke mode: claims format, finite numbers, a plot, cached rerun."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch

from fewflow._validate import FewflowError
from fewflow.bench.ctl_policies import MP1_SETTINGS, SIZES, VERSION, part

torch.set_num_threads(1)


def test_smoke_part_reports_finite_numbers_and_claims(tmp_path: Path) -> None:
    out = part("smoke", tmp_path, seed=0, verbose=False)
    assert {"rows", "claims", "lines"} <= set(out)
    assert [r["policy"] for r in out["rows"]] == ["fm10", "mf1", "mf1_infonce_l2", "noise"]
    for r in out["rows"]:
        assert 0.0 <= r["success"] <= 1.0 and 0.0 <= r["mode_coverage"] <= 1.0
        assert math.isfinite(r["latency_ms"]) and r["latency_ms"] > 0
        assert sum(r["corridors"]) <= r["episodes"]
    assert [r["nfe"] for r in out["rows"]] == [10, 1, 1, 0]
    assert len(out["claims"]) == 3
    for c in out["claims"]:
        assert set(c) == {"claim", "dataset", "met", "value"}
        assert isinstance(c["met"], bool) and c["dataset"] == "nav2d" and c["value"]
    assert out["lines"][0].startswith("## ") and any(line.startswith("| env |") for line in out["lines"])
    assert all(Path(p).is_file() for p in out.get("plots", []))
    # every policy trains the same budget (steps, schedule); MeanFlow runs use MP1's settings, not the
    # method's small-scale recipe
    runs = tmp_path / "ctl_policies" / f"smoke-v{VERSION}-seed0" / "runs"
    trains, methods = {}, {}
    for key in ("fm10", "mf1", "mf1_infonce_l2"):
        rc = json.loads((runs / f"nav2d-4-{key}" / "config.json").read_text())["run_config"]
        trains[key] = {k: rc["train"][k] for k in ("steps", "lr", "lr_schedule", "warmup", "batch_size")}
        methods[key] = rc["method"]
    assert trains["fm10"] == trains["mf1"] == trains["mf1_infonce_l2"]
    assert trains["fm10"]["lr_schedule"] == "cosine"
    for key in ("mf1", "mf1_infonce_l2"):
        assert {k: methods[key][k] for k in MP1_SETTINGS} == MP1_SETTINGS
    assert methods["mf1"]["dispersive"] == "none" and methods["mf1_infonce_l2"]["dispersive"] == "infonce_l2"
    t0 = time.perf_counter()
    again = part("smoke", tmp_path, seed=0, verbose=False)  # rows cached as JSON
    assert time.perf_counter() - t0 < 5.0
    assert again["rows"] == out["rows"]


def test_unknown_mode_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FewflowError, match="mode"):
        part("huge", tmp_path)


def test_mp1_settings_are_the_papers_defaults_and_full_mode_trains_to_convergence() -> None:
    """The benchmark's MeanFlow settings are ``MP1Config``'s defaults (MP1's own: logit-normal(0.4, 1) time
    pairs in fewflow time, half the rows with s = t, adaptive p = 0.5), and the full mode trains every
    policy at least 3000 steps (600 left MeanFlow-1 short of convergence at 200 nav2d demos)."""
    from dataclasses import fields

    from fewflow.objectives.mp1 import MP1Config

    defaults = {f.name: f.default for f in fields(MP1Config)}
    assert {k: defaults[k] for k in MP1_SETTINGS} == MP1_SETTINGS
    assert SIZES["full"]["steps"] >= 3000 and SIZES["full"]["warmup"] < SIZES["full"]["steps"]
