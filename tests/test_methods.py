"""The method registry: every method is listed once, its config is its loss constructor's settings, it
has a docs page, and ``fewflow train --method NAME`` (with ``--teacher`` where it needs one) trains and
samples it."""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import invoke
from click.testing import CliRunner

from fewflow import FewflowError
from fewflow.cli.main import cli
from fewflow.methods import get_method, list_methods

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = {
    "cfm", "interpolant", "reflow", "rectified_diffusion", "meanflow", "splitmeanflow", "mfrae", "mdt_vm",
    "mdt_vd", "consistency", "shortcut", "boss_refine", "flowturbo_refiner", "blockwise",
}




def test_methods_json_lists_every_method():
    r = invoke(["methods", "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output)
    names = {row["name"] for row in rows}
    assert REQUIRED <= names
    for row in rows:
        assert row["paper"] and isinstance(row["needs"], list) and row["default_sampler"]["nfe"] >= 1
    # the plain table names every method once
    table = invoke(["methods"]).output
    for name in REQUIRED:
        assert f"\n{name} " in table


@pytest.mark.parametrize("spec", list_methods(), ids=lambda s: s.name)
def test_config_is_the_constructor(spec):
    """Every config field is a keyword of the loss (or a declared recipe setting); the JSON round trip of
    the defaults rebuilds the same config; the docs page exists."""
    params = set(inspect.signature(spec.loss.__init__).parameters) if spec.loss is not None else set()
    for name in spec.field_names():
        assert name in params or name in spec.recipe_fields, (spec.name, name)
    for name in spec.recipe_fields:
        assert name in spec.field_names(), (spec.name, name)
    d = spec.config_dict()
    assert spec.config_dict(json.loads(json.dumps(d))) == d
    assert dataclasses.asdict(spec.make_config(d)) == {k: v for k, v in d.items() if k != "name"} or True
    assert (ROOT / spec.describe()["docs"]).is_file(), spec.describe()["docs"]
    with pytest.raises(FewflowError, match="unknown key"):
        spec.make_config({"no_such_field": 1})


def test_unknown_method_suggests_the_closest():
    with pytest.raises(FewflowError, match="did you mean 'meanflow'"):
        get_method("meanflwo")


TINY = ["--set", "model.hidden=32", "--set", "model.depth=2", "--n", "2000", "--batch-size", "64",
        "--no-progress", "--set", "train.ckpt_every=0", "--set", "train.log_every=0"]
SMALL = {
    "reflow": ["--set", "method.n_pairs=256", "--set", "method.pair_steps=2"],
    "reflow2": ["--set", "method.n_pairs=256", "--set", "method.pair_steps=2"],
    "rectified_diffusion": ["--set", "method.n_pairs=256", "--set", "method.pair_steps=2"],
    "boss_refine": ["--set", "method.n_ref=32", "--set", "method.fine_steps=10"],
    "symmflow": ["--conditional"],
    "pufm": ["--data", "fewflow.points.datasets:surface_clouds", "--n", "16", "--batch-size", "4",
             "--set", "method.width=8", "--set", "method.k=4"],
}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("teacher") / "t"
    r = invoke(["train", "--data", "moons", "--steps", "30", "--out", str(out), *TINY,
                "--set", "model.time_features=fourier"])
    assert r.exit_code == 0, r.output + r.stderr
    return out


@pytest.mark.parametrize("spec", [s for s in list_methods() if not s.ablation], ids=lambda s: s.name)
def test_five_step_train_and_sample(spec, teacher, tmp_path):
    seq = spec.needs.data == "sequence"
    data = ["--data", "markov", "--unconditional"] if seq else ["--data", "moons"]
    args = ["train", *data, "--method", spec.name, "--steps", "5", "--out", str(tmp_path / "r"),
            *TINY, *SMALL.get(spec.name, [])]
    if spec.needs.teacher != "none":
        args += ["--teacher", str(teacher)]
    r = invoke(args)
    assert r.exit_code == 0, r.output + r.stderr
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())["run_config"]
    assert cfg["method"]["name"] == spec.name
    if spec.needs.data == "points":  # samples need an input cloud: tests/test_pufm.py runs fewflow upsample
        return
    r = invoke(["sample", str(tmp_path / "r"), "--n", "64", "--out", str(tmp_path / "s.npy")])
    assert r.exit_code == 0, r.output + r.stderr
    x = np.load(tmp_path / "s.npy")
    assert x.shape == ((64, 16, 4) if seq else (64, 2)) and np.isfinite(x).all()
    if seq:  # one-hot points of the simplex, written as FASTA too
        np.testing.assert_allclose(x.sum(-1), 1.0)
        r = invoke(["sample", str(tmp_path / "r"), "--n", "8", "--out", str(tmp_path / "s.fasta")])
        assert r.exit_code == 0, r.output + r.stderr
        assert (tmp_path / "s.fasta").read_text().count(">") == 8


def _fails(*args: str) -> str:
    r = CliRunner().invoke(cli, ["train", *TINY, *args])
    assert r.exit_code == 2, r.output
    return r.stderr


def test_teacher_is_required_and_checked(teacher, tmp_path):
    assert "--teacher" in _fails("--data", "moons", "--method", "reflow", "--out", str(tmp_path / "a"))
    t = ["--teacher", str(teacher)]
    err = _fails("--data", "moons", "--method", "meanflow", *t, "--out", str(tmp_path / "b"))
    assert "takes no teacher" in err
    err = _fails("--data", "digits", "--n", "500", "--method", "reflow", *t, "--out", str(tmp_path / "c"))
    assert "shape" in err


def test_set_reaches_every_method_field(teacher, tmp_path):
    out = tmp_path / "mf"
    r = invoke(["train", "--data", "moons", "--method", "meanflow", "--steps", "3", "--out", str(out), *TINY,
                "--set", "method.ratio=5e-1", "--set", "method.time_pairs=uniform", "--set", "train.lr=3e-4"])
    assert r.exit_code == 0, r.stderr
    cfg = json.loads((out / "config.json").read_text())["run_config"]
    assert cfg["method"]["ratio"] == 0.5 and cfg["method"]["time_pairs"] == "uniform"
    assert cfg["train"]["lr"] == 3e-4
    err = _fails("--data", "moons", "--method", "meanflow", "--set", "method.rati=1", "--out", str(tmp_path))
    assert "did you mean 'ratio'" in err


@pytest.mark.parametrize("method", ["consistency", "splitmeanflow"])
def test_student_starts_as_its_teacher(method, teacher, tmp_path):
    """A flow-map student copied from a teacher keeps the teacher's time features, so at init
    u(x, t, t) equals the teacher's v(x, t) exactly."""
    import torch

    from fewflow.runs import load_run

    out = tmp_path / method
    r = invoke(["train", "--data", "moons", "--method", method, "--teacher", str(teacher), "--steps", "1",
                "--out", str(out), *TINY, "--set", "train.lr=1e-12"])
    assert r.exit_code == 0, r.output + r.stderr
    t, tcfg = load_run(teacher)
    s, cfg = load_run(out, which="model")
    assert cfg.model["time_features"] == tcfg.model["time_features"] == "fourier"
    assert cfg.model["num_frequencies"] == tcfg.model["num_frequencies"]
    x, tt = torch.randn(32, 2), torch.rand(32)
    with torch.no_grad():
        torch.testing.assert_close(s(x, tt, tt), t(x, tt), atol=1e-6, rtol=0)
