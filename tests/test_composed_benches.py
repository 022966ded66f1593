"""``fewflow bench geometry`` / ``control``: the composer runs parts, writes the claims and copies plots."""

from __future__ import annotations

import json

import pytest

from fewflow._validate import FewflowError
from fewflow.bench import control, geometry
from fewflow.bench.parts import run_parts


def test_unknown_parts_and_modes_are_one_error(tmp_path):
    with pytest.raises(FewflowError, match="unknown parts"):
        geometry.run("smoke", ("nope",), cache_dir=tmp_path)
    with pytest.raises(FewflowError, match="unknown mode"):
        control.run("huge", cache_dir=tmp_path)


@pytest.mark.slow
def test_geometry_smoke_writes_claims_and_plots(tmp_path):
    out = geometry.run("smoke", ("reynolds",), cache_dir=tmp_path / "cache", out_dir=tmp_path / "out",
                       verbose=False)
    data = json.loads((tmp_path / "out" / "geometry.json").read_text())
    keys = {"claim", "dataset", "met", "value", "part"}
    assert data["claims"] and all(set(c) >= keys for c in data["claims"])
    assert all(c["part"] == "reynolds" for c in data["claims"])
    md = (tmp_path / "out" / "geometry.md").read_text()
    assert "## Claims" in md and (tmp_path / "out" / "geometry.png").is_file()
    assert out["parts"]["reynolds"]["wall_s"] >= 0


def test_part_plots_are_copied(tmp_path, monkeypatch):
    import sys
    import types

    png = tmp_path / "fig.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n")
    mod = types.ModuleType("fewflow.bench.tst_fake")
    mod.part = lambda mode, cache, seed=0, verbose=True: {
        "rows": [{"a": 1}], "claims": [{"claim": "c", "dataset": "d", "met": False, "value": "1"}],
        "lines": ["## fake"], "plots": [str(png)]}
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    out = run_parts("stem", "tst", ("fake",), "T", "smoke", cache_dir=tmp_path, out_dir=tmp_path / "o",
                    verbose=False)
    assert (tmp_path / "o" / "stem-fig.png").read_bytes() == png.read_bytes()
    assert "![fake: fig](stem-fig.png)" in (tmp_path / "o" / "stem.md").read_text()
    assert out["claims"][0]["met"] is False and out["claims"][0]["part"] == "fake"
