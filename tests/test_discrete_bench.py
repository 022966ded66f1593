"""``fewflow bench discrete`` in its smoke mode: every part it can run offline writes claims in the common
format, the numbers are finite, and a rerun reuses the cached runs and rows."""

from __future__ import annotations

import json
import math

import pytest

from fewflow.bench.discrete import DiscreteConfig, run


@pytest.mark.slow
def test_discrete_smoke_tables_claims_and_cache(tmp_path) -> None:
    cfg = DiscreteConfig(mode="smoke", cache_dir=tmp_path / "c", out_dir=tmp_path / "out", verbose=False,
                         sizes={"Ks": (4, 6)})
    out = run(cfg)
    js = json.loads((tmp_path / "out" / "discrete.json").read_text())
    assert js["mode"] == "smoke" and js["claims"] == out["claims"]
    for c in js["claims"]:
        assert set(c) == {"claim", "dataset", "met", "value"} and isinstance(c["met"], bool)
    datasets = {c["dataset"] for c in js["claims"]}
    assert {"markov", "8gaussians"} <= datasets
    for r in js["results"]["simplex"]:
        assert math.isfinite(r["unigram_kl"]) and math.isfinite(r["bigram_kl"]) and r["bigram_kl"] >= 0
    tm = js["results"]["tm"][0]
    for T in ("1", "2", "4", "8", "16"):
        # equal backbone evaluations: DTM's T transitions against T Euler steps
        assert tm["dtm"][T]["backbone"] == tm["fm"][T]["backbone"] == int(T)
        assert tm["dtm"][T]["head"] == int(T) * 4
        assert math.isfinite(tm["dtm"][T]["sliced_w2"]) and math.isfinite(tm["fm"][T]["sliced_w2"])
    md = (tmp_path / "out" / "discrete.md").read_text()
    assert "GSFM vs linear-simplex FM" in md and "## Claims" in md
    assert (tmp_path / "out" / "discrete.png").stat().st_size > 1000
    # a rerun trains nothing and reports the same numbers (runs and rows are cached)
    done = sorted((tmp_path / "c").rglob("DONE"))
    stamps = [p.stat().st_mtime_ns for p in done]
    again = run(DiscreteConfig(mode="smoke", cache_dir=tmp_path / "c", verbose=False, sizes={"Ks": (4, 6)}))
    assert [p.stat().st_mtime_ns for p in done] == stamps
    assert again["claims"] == out["claims"]
