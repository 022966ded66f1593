"""``fewflow bench likelihood_latent`` composes one part per paper into one claims file (each part's
smoke run is tested beside it); here the composer's format, its CLI and its errors."""

from __future__ import annotations

import json

import pytest
from cli_helpers import assert_one_line_error, invoke

from fewflow import FewflowError
from fewflow.bench.likelihood_latent import PARTS, run


def test_composer_writes_claims_of_its_parts(tmp_path):
    out = run("smoke", ("diagnostics",), cache_dir=tmp_path / "c", out_dir=tmp_path / "o", verbose=False)
    js = json.loads((tmp_path / "o" / "likelihood_latent.json").read_text())
    assert js["mode"] == "smoke" and len(js["claims"]) == len(out["claims"]) > 0
    for c in js["claims"]:
        assert set(c) == {"claim", "dataset", "met", "value", "part"} and c["part"] == "diagnostics"
        assert isinstance(c["met"], bool)
    md = (tmp_path / "o" / "likelihood_latent.md").read_text()
    assert "## Claims" in md and "diagnostics" in md
    assert (tmp_path / "o" / "likelihood_latent.png").stat().st_size > 1000


def test_composer_rejects_unknown_parts_and_modes(tmp_path):
    assert set(PARTS) == {"lfm", "tarflow", "pfgmpp", "mle_finetune", "symmflow", "diagnostics"}
    with pytest.raises(FewflowError, match="unknown parts"):
        run("smoke", ("nope",), cache_dir=tmp_path)
    with pytest.raises(FewflowError, match="unknown mode"):
        run("fast", ("diagnostics",), cache_dir=tmp_path)
    r = invoke(["bench", "likelihood_latent", "--smoke", "--parts", "nope", "--cache", str(tmp_path)])
    assert_one_line_error(r, "unknown parts")
