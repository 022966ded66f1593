"""The benchmark harness: evaluation bookkeeping (equal budgets), the smoke runs of both benchmarks, the
cache (resume) and the computed claims."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fewflow.bench.common import (
    BWD,
    FWD,
    JVP,
    Counted,
    Ledger,
    budget_steps,
    count_step,
)
from fewflow.models import MLP


def _mlp(flow_map: bool = False, dim: int = 2) -> MLP:
    torch.manual_seed(0)
    return MLP(dim, hidden=16, depth=1, time_features="fourier", num_frequencies=2, flow_map=flow_map)


def test_counted_weights_forward_backward_jvp() -> None:
    ledger = Ledger()
    net = Counted(_mlp(), ledger)
    x, t = torch.randn(7, 2), torch.rand(7)
    with torch.no_grad():
        net(x, t)
    assert ledger.evals == 7 * FWD
    net(x, t).sum().backward()
    assert ledger.evals == 7 * FWD + 7 * (FWD + BWD)
    ledger.reset()
    frozen = Counted(_mlp().requires_grad_(False), ledger, "teacher")
    frozen(x, t)  # grad mode on, but nothing to differentiate: a plain forward
    assert ledger.evals == 7 * FWD and set(ledger.by_kind) == {"teacher:fwd"}
    ledger.reset()
    fm = Counted(_mlp(flow_map=True), ledger)
    s = torch.zeros(5)
    out, tangent = torch.func.jvp(
        lambda a: fm(a, s, torch.ones(5)), (torch.randn(5, 2),), (torch.randn(5, 2),)
    )
    assert out.shape == tangent.shape == (5, 2)
    assert ledger.evals == 5 * (JVP + BWD)  # trainable weights: the primal carries the gradient
    ledger.reset()
    with torch.no_grad():
        torch.func.jvp(lambda a: fm(a, s, torch.ones(5)), (torch.randn(5, 2),), (torch.randn(5, 2),))
    assert ledger.evals == 5 * JVP


def test_count_step_matches_hand_count_and_leaves_ledger_alone() -> None:
    from fewflow.objectives import CFMLoss
    from fewflow.objectives.meanflow import MeanFlowLoss, TimePairSampler
    from fewflow.objectives.mfrae import ConsistencyMidTrainingLoss
    from fewflow.paths import AffinePath

    ledger = Ledger()
    ledger.add("earlier", 3, 1.0)
    b = 32
    x1 = torch.randn(b, 2)
    v = Counted(_mlp(), ledger)
    assert count_step(CFMLoss(AffinePath("linear")), v, x1, {}, ledger) == b * (FWD + BWD)
    fm = Counted(_mlp(flow_map=True), ledger)
    mf = MeanFlowLoss(time_sampler=TimePairSampler.uniform(), ratio=0.75, adaptive_p=0.0)
    assert count_step(mf, fm, x1, {}, ledger) == b * (JVP + BWD)  # fused JVP: every row
    teacher = Counted(_mlp().requires_grad_(False), ledger, "teacher")
    cmt = ConsistencyMidTrainingLoss(teacher, steps=16, pairs_per_trajectory=8)
    # 16 teacher Euler steps per trajectory + 8 differentiated regression rows per trajectory
    assert count_step(cmt, fm, x1[:4], {}, ledger) == 4 * 16 * FWD + 4 * 8 * (FWD + BWD)
    assert ledger.evals == 3.0 and ledger.calls == 1  # the probes charged nothing
    assert budget_steps(1000.0, 96.0) == 10 and budget_steps(10.0, 96.0) == 1


def _fake(kind: str, teacher: dict, methods: dict) -> dict:
    met = "sliced_w2" if kind == "toy" else "fd"
    return {
        "kind": kind,
        "metric": met,
        "teacher": {"metrics": {k: {met: v} for k, v in teacher.items()}},
        "methods": {m: {"metrics": {k: {met: v} for k, v in vals.items()}} for m, vals in methods.items()},
    }


def test_claims_are_computed_from_the_numbers() -> None:
    from fewflow.bench.fewstep import check_claims

    good = _fake(
        "toy",
        {"1": 1.2, "100": 0.05},
        {"reflow": {"1": 0.07}, "meanflow": {"1": 0.39}, "meanflow_ratio0": {"1": 5.0}},
    )  # ablations don't count
    bad = _fake("toy", {"1": 1.2, "100": 0.05}, {"reflow": {"1": 0.08}, "meanflow": {"1": 0.41}})
    img = _fake("image", {"1": 90.0, "100": 2.0}, {"reflow": {"2": 2.9}, "mfrae": {"2": 3.1}})
    c = check_claims({"moons": good, "checkerboard": bad, "digits": img})
    got = {(x["dataset"], x["claim"].split()[0]): x["met"] for x in c}
    assert got == {
        ("moons", "best"): True,
        ("moons", "every"): True,
        ("checkerboard", "best"): False,
        ("checkerboard", "every"): False,
        ("digits", "best"): True,
    }


@pytest.mark.slow
def test_fewstep_smoke_tables_and_cache(tmp_path) -> None:
    from fewflow.bench.fewstep import FewstepConfig, run
    from fewflow.methods import list_methods

    fewstep = list_methods(family="fewstep")
    methods = (*[s.name for s in fewstep if not s.ablation], "meanflow_ratio0")
    cfg = FewstepConfig(
        mode="smoke",
        datasets=("checkerboard",),
        methods=methods,
        cache_dir=tmp_path / "c",
        out_dir=tmp_path / "out",
        verbose=False,
    )
    out = run(cfg)
    res = out["results"]["checkerboard"]
    budget = res["budget"]
    for m in methods:
        r = res["methods"][m]
        assert r["error"] is None, (m, r["error"])
        assert set(r["metrics"]) == {"1", "2", "4", "8"}
        for k, v in r["metrics"].items():
            assert v["nfe"] == int(k) and math.isfinite(v["sliced_w2"]) and v["sample_wall_s"] > 0
        # equal budget: every method spends at most the budget and at least budget minus one step per stage
        assert r["train_evals"] <= budget + 1e-6
        slack = sum(s["per_step_evals"] for s in r["stages"])
        assert r["train_evals"] > budget - slack - 1e-6, m
    # pair generation is paid from the budget
    assert res["methods"]["reflow"]["ledger"]["pair-teacher:fwd"] > 0
    assert "meanflow_wrong_tangents" in {s.name for s in fewstep if s.ablation}
    # the two-stage methods split the budget left after their pairs between their stages
    assert [st["stage"] for st in res["methods"]["mdt_vd"]["stages"]] == ["vm", "vm+vd"]
    assert [st["stage"] for st in res["methods"]["reflow2"]["stages"]] == ["reflow-1", "reflow-2"]
    md = (tmp_path / "out" / "fewstep.md").read_text()
    for label in ("Reflow (2-RF)", "MeanFlow", "MDT-dist VM+VD", "Shortcut", "teacher (Euler)", "Claims"):
        assert label in md
    table = [ln for ln in md.splitlines() if ln.startswith("| ")]
    assert len({ln.count("|") for ln in table if "sliced-W2 @1" in ln or ln.startswith("| MeanFlow")}) == 1
    js = json.loads((tmp_path / "out" / "fewstep.json").read_text())
    assert {c["claim"].split()[0] for c in js["claims"]} == {"best", "every"}
    assert all(isinstance(c["met"], bool) for c in js["claims"])
    assert (tmp_path / "out" / "fewstep.png").stat().st_size > 1000
    # resume: every result is cached; a rerun trains nothing and reports the same numbers
    files = sorted((tmp_path / "c" / "checkerboard").glob("*/result.json"))
    assert len(files) == len(methods)
    mtimes = [f.stat().st_mtime_ns for f in files]
    again = run(
        FewstepConfig(
            mode="smoke",
            datasets=("checkerboard",),
            methods=methods,
            cache_dir=tmp_path / "c",
            out_dir=None,
            verbose=False,
        )
    )
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    assert (
        again["results"]["checkerboard"]["methods"]["meanflow"]["metrics"]
        == res["methods"]["meanflow"]["metrics"]
    )


@pytest.mark.slow
def test_samplers_smoke_tables(tmp_path) -> None:
    from fewflow.bench.samplers import GRID_NAMES, SamplersConfig, run

    cfg = SamplersConfig(
        mode="smoke",
        datasets=("checkerboard", "digits"),
        nfe=(1, 2, 4),
        cache_dir=tmp_path / "c",
        out_dir=tmp_path / "out",
        verbose=False,
    )
    out = run(cfg)
    for name in ("checkerboard", "digits"):
        r = out["results"][name]
        met = "sliced_w2" if name == "checkerboard" else "fd"
        for sched in GRID_NAMES:
            assert set(r["grid"][f"{sched}/euler"]) == {"1", "2", "4"}
            assert set(r["grid"][f"{sched}/heun"]) == {"2", "4"}
            assert set(r["grid"][f"{sched}/flowturbo"]) == {"4"}
            for k, v in r["grid"][f"{sched}/euler"].items():
                assert v["nfe"] == int(k) and math.isfinite(v[met])
            assert (
                r["grid"][f"{sched}/flowturbo"]["4"]["nfe"] == 4
            )  # 1 Heun (2) + 2 pseudo-corrector (1 each)
        assert set(r["boss_refined"]["metrics"]) == {"1", "2", "4"}
        assert r["flowturbo_refiner"]["metrics"]["4"]["refiner_calls"] > 0
        # BOSS grids run from noise to data
        for g in r["boss_grids"].values():
            assert g[0] == 0.0 and g[-1] == 1.0 and all(a < b for a, b in zip(g, g[1:]))
    pr = out["results"]["digits"]["pruning"]
    assert 0.0 < pr["acceptance_rate"] <= 1.0 and set(pr["metrics"]) == {"5", "10", "100"}
    gd = out["results"]["digits"]["guidance"]["metrics"]
    assert any(k.startswith("RAAG") for k in gd) and any(k.startswith("CFG") for k in gd)
    assert all(0.0 <= v["2"]["accuracy"] <= 1.0 for v in gd.values())
    md = (tmp_path / "out" / "samplers.md").read_text()
    assert "boss refined / euler" in md and "Claims" in md and "Guidance" in md
    for f in ("samplers.json", "samplers.png", "samplers_raag_ratio.png"):
        assert (tmp_path / "out" / f).stat().st_size > 100
