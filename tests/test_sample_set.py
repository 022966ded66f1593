"""``fewflow sample RUN --set method.FIELD=VALUE``: sampling-time method settings without touching the run."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from fewflow.cli.main import cli

TINY = ["--steps", "5", "--set", "model.hidden=16", "--set", "model.depth=1", "--batch-size", "32",
        "--set", "data.n=256", "--no-progress"]


@pytest.fixture(scope="module")
def tarflow_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tf") / "r"
    r = CliRunner().invoke(cli, ["train", "--data", "moons", "--method", "tarflow", "--out", str(out), *TINY,
                                 "--set", "method.width=16", "--set", "method.blocks=2"])
    assert r.exit_code == 0, r.output + r.stderr
    return out


def test_a_sampling_field_changes_the_samples_not_the_run(tarflow_run, tmp_path):
    before = (tarflow_run / "config.json").read_text()
    run = CliRunner().invoke
    a = run(cli, ["sample", str(tarflow_run), "--n", "64", "--out", str(tmp_path / "a.npy")])
    b = run(cli, ["sample", str(tarflow_run), "--n", "64", "--out", str(tmp_path / "b.npy"),
                  "--set", "method.temperature=0.1"])
    assert a.exit_code == 0 and b.exit_code == 0, a.output + a.stderr + b.output + b.stderr
    xa, xb = np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy")
    assert xa.shape == xb.shape == (64, 2) and np.isfinite(xb).all()
    assert xb.std(0).sum() < xa.std(0).sum()  # a colder source gives less spread samples
    assert (tarflow_run / "config.json").read_text() == before
    assert json.loads(before)["run_config"]["method"]["temperature"] == 1.0


@pytest.mark.parametrize("item, words", [("method.temprature=0.1", "temperature"),
                                         ("train.lr=1", "method.FIELD"), ("method.name=cfm", "method.FIELD")])
def test_bad_settings_are_one_line(tarflow_run, tmp_path, item, words):
    r = CliRunner().invoke(cli, ["sample", str(tarflow_run), "--out", str(tmp_path / "s.npy"), "--set", item])
    assert r.exit_code == 2 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1
