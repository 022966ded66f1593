"""``fewflow bench inverse``: claims computed from the numbers, and a smoke run (JSON format, finite
numbers, tables, plot, resume from the cached rows)."""

from __future__ import annotations

import json
import math

import pytest

from fewflow.bench.inverse import ETA_MULTS, SOLVERS, TASKS, InverseBenchConfig, check_claims, run


def _row(psnr: float, ratio: float) -> dict:
    return {"psnr": psnr, "residual_over_floor": ratio}


def _fake(flair: float, dps: float, ratio: float, ablation: float, conv: dict, edit: tuple,
          inv: tuple = (1e-4, 1e-3)) -> dict:
    rows = {"flair": _row(flair, ratio), "dps": _row(dps, 3.0), "dps_equal_nfe": _row(dps - 1.0, 3.0)}
    rows.update({f"flair_no_{a}": _row(ablation, 2.0) for a in ("dta", "crw", "hdc")})
    return {
        "dataset": "digits",
        "restore": {"inpaint": rows, "sr2": rows},
        "invert": {"flowopt_mse": inv[0], "ode_mse": inv[1]},
        "sweep": {"runs": {str(m): {"converged": c} for m, c in conv.items()}},
        "edit": {"p_before": edit[0], "p_after": edit[1], "mse_edit": edit[2], "mse_fresh": edit[3]},
    }


def test_claims_are_computed_from_the_numbers() -> None:
    ok = {0.25: True, 0.5: True, 1.0: True, 2.0: False, 4.0: False}
    good = check_claims(_fake(20.0, 18.0, 1.2, 19.0, ok, (0.01, 0.9, 0.05, 0.4)))
    assert len(good) == 2 * 6 + 3 and all(c["met"] for c in good)
    assert {c["dataset"] for c in good} == {"digits"}
    gains = [c["value"] for c in good if c["claim"].startswith("FLAIR beats DPS")]
    assert gains == [pytest.approx(2.0), pytest.approx(3.0)] * 2
    inv = next(c for c in good if c["claim"].startswith("FlowOpt inversion"))
    assert inv["value"] == pytest.approx(0.1)
    sweep = next(c for c in good if c["claim"].startswith("FlowOpt converges"))
    assert sweep["value"] == 1.0
    bad_sweep = {0.25: True, 0.5: False, 1.0: True, 2.0: True, 4.0: True}
    bad = check_claims(_fake(16.0, 18.0, 1.6, 19.0, bad_sweep, (0.01, 0.9, 0.5, 0.4), inv=(2e-3, 1e-3)))
    assert not any(c["met"] for c in bad)
    hdc = [c["value"] for c in bad if c["claim"].startswith("HDC")]
    assert hdc == [1.6, 1.6]


def test_main_refuses_two_datasets(tmp_path) -> None:
    from fewflow._validate import FewflowError
    from fewflow.bench.inverse import main

    with pytest.raises(FewflowError, match="one data set"):
        main(["--smoke", "--datasets", "digits,mnist", "--out", str(tmp_path)])
    with pytest.raises(FewflowError, match="digits or mnist"):
        InverseBenchConfig(mode="smoke", dataset="moons")


def test_smoke_run_writes_claims_and_resumes(tmp_path) -> None:
    cfg = InverseBenchConfig(mode="smoke", cache_dir=tmp_path / "c", out_dir=tmp_path / "out", verbose=False)
    out = run(cfg)
    js = json.loads((tmp_path / "out" / "inverse.json").read_text())
    assert js["mode"] == "smoke" and len(js["claims"]) == 15
    for c in js["claims"]:
        assert set(c) == {"claim", "dataset", "met", "value"}
        assert isinstance(c["met"], bool) and c["dataset"] == "digits" and math.isfinite(c["value"])

    def numbers(o):
        if isinstance(o, dict):
            for v in o.values():
                yield from numbers(v)
        elif isinstance(o, list):
            for v in o:
                yield from numbers(v)
        elif isinstance(o, (int, float)) and not isinstance(o, bool):
            yield o

    assert all(math.isfinite(v) for v in numbers(js))
    res = js["results"]
    assert set(res["restore"]) == set(TASKS)
    for task in TASKS:
        assert set(res["restore"][task]) == set(SOLVERS)
        for r in res["restore"][task].values():
            assert r["finite"] and r["nfe"] > 0 and 0.0 <= r["agreement"] <= 1.0 and r["diversity"] >= 0
            assert r["noise_floor"] == pytest.approx(0.05 * math.sqrt(32 if task == "inpaint" else 16))
    assert res["invert"]["flowopt_nfe"] == res["invert"]["ode_nfe"]  # equal NFE
    assert set(res["sweep"]["runs"]) == {str(m) for m in ETA_MULTS}
    # the papers' effects that show even with the smoke prior (large margins; the claims check the rest)
    for task in TASKS:  # HDC: hard data consistency cuts the data residual
        rows = res["restore"][task]
        assert rows["flair"]["residual"] < 0.8 * rows["flair_no_hdc"]["residual"]
    assert res["invert"]["flowopt_mse"] < res["invert"]["ode_mse"]  # FlowOpt beats ODE inversion, equal NFE
    runs = res["sweep"]["runs"]  # a step well below the estimated bound converges, 4x above it does not
    assert runs["0.25"]["converged"] and not runs["4.0"]["converged"]
    ed = res["edit"]
    assert ed["p_after"] > ed["p_before"] and ed["mse_edit"] < ed["mse_fresh"]
    md = (tmp_path / "out" / "inverse.md").read_text()
    assert "Claims" in md and "flair_no_dta" in md and "ODE inversion" in md
    assert (tmp_path / "out" / "inverse.png").stat().st_size > 1000
    # resume: every row is cached; a rerun recomputes nothing and reports the same numbers
    rows = sorted((tmp_path / "c").glob("digits/rows-*/*.json"))
    assert len(rows) == len(TASKS) * len(SOLVERS) + 3
    mtimes = [f.stat().st_mtime_ns for f in rows]
    again = run(InverseBenchConfig(mode="smoke", cache_dir=tmp_path / "c", out_dir=None, verbose=False))
    assert [f.stat().st_mtime_ns for f in rows] == mtimes
    assert again["results"]["restore"] == out["results"]["restore"]
    assert again["wall_s"] < out["wall_s"]
