"""The ``fewflow`` command line: train / sample / eval round trip, resume, errors, demo."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import assert_one_line_error, invoke

TINY = [
    "--set",
    "model.hidden=32",
    "--set",
    "model.depth=2",
    "--n",
    "2000",
    "--batch-size",
    "128",
    "--no-progress",
    "--set",
    "train.ckpt_every=0",
    "--set",
    "train.log_every=10",
]






@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "cb"
    r = invoke(["train", "--data", "checkerboard", "--steps", "40", "--out", str(out), *TINY])
    assert r.exit_code == 0, r.output + r.stderr
    return out


@pytest.mark.parametrize("cmd", [[], ["train"], ["sample"], ["eval"], ["fetch"], ["demo"], ["bench"]])
def test_help_has_examples(cmd):
    r = invoke([*cmd, "--help"])
    assert r.exit_code == 0
    assert "Examples:" in r.output
    assert "fewflow" in r.output


def test_train_writes_a_run_folder(run_dir):
    for name in ("config.json", "latest", "log.csv", "samples.png", "trajectories.png"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / (run_dir / "latest").read_text().strip()).is_dir()
    doc = json.loads((run_dir / "config.json").read_text())
    rc = doc["run_config"]
    assert rc["data"]["name"] == "checkerboard" and rc["method"]["name"] == "cfm"
    # the network's complete config, every default included, so the folder rebuilds it alone
    assert {k: rc["model"][k] for k in ("type", "hidden", "depth", "dim")} == {
        "type": "MLP", "hidden": 32, "depth": 2, "dim": 2}
    assert rc["model"]["time_features"] == "sinusoidal" and rc["model"]["time_scale"] == 1000.0
    assert rc["train"]["steps"] == 40 and rc["meta"]["shape"] == [2]


def test_sample_with_fast_samplers(run_dir, tmp_path):
    """Every fast sampler / time grid is reachable from `fewflow sample`: BOSS (cached in the user cache
    folder, never in the run folder), logSNR, FlowTurbo (NFE = predictor calls), RAAG (conditional runs)."""
    import os

    from fewflow.solvers.boss import BossSchedule

    out = tmp_path / "s.npy"
    before = sorted(p.name for p in run_dir.iterdir())
    r = invoke(["sample", str(run_dir), "--grid", "boss", "--nfe", "3", "--n", "50", "--out", str(out)])
    assert r.exit_code == 0, r.output + r.stderr
    assert sorted(p.name for p in run_dir.iterdir()) == before
    (saved_path,) = (Path(os.environ["FEWFLOW_CACHE"]) / "boss").glob("*-K3-*.json")
    saved = BossSchedule.load(saved_path)
    assert len(saved.indices) == 4 and saved.indices[0] == 0 and saved.indices[-1] == 100
    for extra in (["--grid", "logsnr", "--nfe", "4"], ["--solver", "flowturbo", "--nfe", "5"]):
        r = invoke(["sample", str(run_dir), *extra, "--n", "50", "--out", str(out)])
        assert r.exit_code == 0, r.output + r.stderr
        assert np.load(out).shape == (50, 2) and np.isfinite(np.load(out)).all()
    assert "NFE 5" in r.stderr
    r = invoke(["sample", str(run_dir), "--solver", "flowturbo", "--nfe", "2", "--out", str(out)])
    assert_one_line_error(r, "flowturbo", "nfe >= 3")
    # RAAG needs a conditional run
    r = invoke(["sample", str(run_dir), "--raag", "5", "--cfg", "3", "--out", str(out)])
    assert_one_line_error(r, "unconditional")
    cond = tmp_path / "gmm"
    r = invoke(["train", "--data", "gmm", "--conditional", "--label-dropout", "0.1", "--steps", "20",
                "--out", str(cond), *TINY])
    assert r.exit_code == 0, r.output + r.stderr
    r = invoke(["sample", str(cond), "--raag", "5", "--cfg", "3", "--label", "1", "--nfe", "4", "--n", "40",
                "--out", str(out)])
    assert r.exit_code == 0, r.output + r.stderr
    assert np.load(out).shape == (40, 2)


def test_norm_aligned_source_scale_travels_with_the_run(tmp_path):
    """`--source norm_aligned`: the scale fitted on the data at training time is stored in the run's meta
    and used at sampling, so sampling needs no data and matches the training source."""
    from fewflow.data import load_dataset
    from fewflow.runs import build_source, load_run
    from fewflow.sources import gaussian_mean_norm

    out = tmp_path / "na"
    r = invoke(["train", "--data", "moons", "--source", "norm_aligned", "--steps", "10", "--out", str(out),
                *TINY])
    assert r.exit_code == 0, r.output + r.stderr
    _, cfg = load_run(out)
    x = load_dataset("moons", n=2000, seed=cfg.data.seed).x
    want = float(x.norm(dim=1).mean()) / gaussian_mean_norm(2)
    assert cfg.meta["source_scale"] == pytest.approx(want, rel=1e-6)
    src = build_source(cfg)
    assert src.scale == pytest.approx(want, rel=1e-6)


def test_sample_formats(run_dir, tmp_path):
    r = invoke(
        [
            "sample",
            str(run_dir),
            "--nfe",
            "4",
            "--solver",
            "heun",
            "--n",
            "123",
            "--out",
            str(tmp_path / "s.npy"),
        ]
    )
    assert r.exit_code == 0, r.stderr
    x = np.load(tmp_path / "s.npy")
    assert x.shape == (123, 2) and np.isfinite(x).all()
    assert "NFE 4" in r.stderr
    r = invoke(
        ["sample", str(run_dir), "--nfe", "4", "--n", "50", "--out", str(tmp_path / "s.pt"), "--seed", "3"]
    )
    assert r.exit_code == 0
    y = torch.load(tmp_path / "s.pt")
    assert y.shape == (50, 2)
    # same seed, same samples; another seed, other samples
    r = invoke(
        ["sample", str(run_dir), "--nfe", "4", "--n", "50", "--out", str(tmp_path / "s2.pt"), "--seed", "3"]
    )
    torch.testing.assert_close(torch.load(tmp_path / "s2.pt"), y)
    r = invoke(
        ["sample", str(run_dir), "--nfe", "4", "--n", "50", "--out", str(tmp_path / "s3.pt"), "--seed", "4"]
    )
    assert not torch.allclose(torch.load(tmp_path / "s3.pt"), y)
    r = invoke(
        [
            "sample",
            str(run_dir),
            "--nfe",
            "6",
            "--grid",
            "edm",
            "--n",
            "200",
            "--out",
            str(tmp_path / "s.png"),
        ]
    )
    assert r.exit_code == 0 and (tmp_path / "s.png").stat().st_size > 1000


def test_eval_json(run_dir, tmp_path):
    r = invoke(
        [
            "eval",
            str(run_dir),
            "--nfe",
            "1,2,8",
            "--solver",
            "euler,heun",
            "--n",
            "400",
            "--json",
            "--out",
            str(tmp_path / "m.json"),
        ]
    )
    assert r.exit_code == 0, r.stderr
    rep = json.loads(r.stdout)  # ONE JSON object on stdout
    assert rep == json.loads((tmp_path / "m.json").read_text())
    assert set(rep["floor"]) == {"sliced_w2", "mmd", "energy"}
    pairs = [(row["solver"], row["nfe"]) for row in rep["results"]]
    assert pairs == [
        ("euler", 1),
        ("euler", 2),
        ("euler", 8),
        ("heun", 2),
        ("heun", 8),
    ]  # heun NFE 1 impossible
    for row in rep["results"]:
        for k in ("sliced_w2", "mmd", "energy", "straightness", "wall_time_s", "ratio"):
            assert row[k] is not None and np.isfinite(row[k]), (k, row)
        assert row["ratio"] == pytest.approx(row["sliced_w2"] / rep["floor"]["sliced_w2"])
    # a one-step Euler sample is a single linear jump: straightness S = 0 by definition; curved paths S > 0
    assert rep["results"][0]["straightness"] == pytest.approx(0.0, abs=1e-9)
    assert rep["results"][2]["straightness"] > 1e-3
    # more Euler steps get closer to the data
    sw = {row["nfe"]: row["sliced_w2"] for row in rep["results"] if row["solver"] == "euler"}
    assert sw[8] < sw[1]
    # the table form
    r = invoke(["eval", str(run_dir), "--nfe", "2", "--n", "200"])
    assert r.exit_code == 0 and "two-sample floor" in r.stdout


def test_resume_continues(tmp_path):
    out = tmp_path / "r"
    assert invoke(["train", "--data", "moons", "--steps", "20", "--out", str(out), *TINY]).exit_code == 0
    assert (out / "latest").read_text().strip() == "ckpt-20"
    r = invoke(["train", "--out", str(out), "--resume", "--steps", "30", "--no-progress"])
    assert r.exit_code == 0, r.stderr
    assert "step 30" in r.stderr
    assert (out / "latest").read_text().strip() == "ckpt-30"
    steps = [int(line.split(",")[0]) for line in (out / "log.csv").read_text().splitlines()[1:]]
    assert steps == sorted(steps) and steps[-1] == 30 and 10 in steps  # the first run's rows are kept
    cfg = json.loads((out / "config.json").read_text())["run_config"]
    assert cfg["data"]["name"] == "moons" and cfg["train"]["steps"] == 30
    # resuming cannot change the run's recipe; starting over needs --force
    assert_one_line_error(invoke(["train", "--out", str(out), "--resume", "--coupling", "ot"]), "--resume")
    assert_one_line_error(invoke(["train", "--data", "moons", "--out", str(out)]), "already holds a run")


def test_corrupt_checkpoint_is_one_line(run_dir, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(run_dir, bad)
    ckpt = bad / (bad / "latest").read_text().strip()
    for f in ckpt.glob("*.safetensors"):
        f.write_bytes(b"\x00garbage" * 10)
    r = invoke(["sample", str(bad), "--out", str(tmp_path / "x.npy")])
    assert_one_line_error(r, str(bad))
    r = invoke(["eval", str(bad), "--json"])
    assert_one_line_error(r)


def test_config_for_another_model_is_one_line(run_dir, tmp_path):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(run_dir, other)
    doc = json.loads((other / "config.json").read_text())
    doc["run_config"]["model"]["hidden"] = 48
    (other / "config.json").write_text(json.dumps(doc))
    assert_one_line_error(invoke(["sample", str(other), "--out", str(tmp_path / "x.npy")]), "cannot load")
    (other / "config.json").write_text("{broken")
    assert_one_line_error(invoke(["sample", str(other), "--out", str(tmp_path / "x.npy")]), "corrupt")


@pytest.mark.parametrize(
    "args, words",
    [
        (["train", "--data", "cifar99", "--out", "{tmp}/a"], ["unknown data set", "cifar99"]),
        (["train", "--method", "magic", "--out", "{tmp}/a"], ["unknown method", "magic"]),
        (["train", "--coupling", "otx", "--out", "{tmp}/a"], ["unknown coupling", "otx"]),
        (["train", "--steps", "many", "--out", "{tmp}/a"], ["--steps"]),
        (["train", "--out", "{tmp}/a", "--set", "train.stepz=3"], ["stepz"]),
        (["train", "--out", "{tmp}/a", "--config", "{tmp}/none.yaml"], ["not found"]),
        (["sample", "{tmp}/missing", "--out", "{tmp}/x.npy"], ["run folder not found"]),
        (["eval", "{tmp}/missing", "--nfe", "1,x"], ["--nfe"]),
        (["train", "--bogus"], ["--bogus"]),
        (["frobnicate"], ["frobnicate"]),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, args, words):
    r = invoke([a.replace("{tmp}", str(tmp_path)) for a in args])
    assert_one_line_error(r, *words)


def test_sample_rejects_bad_options(run_dir, tmp_path):
    assert_one_line_error(invoke(["sample", str(run_dir), "--out", str(tmp_path / "x.txt")]), ".npy")
    assert_one_line_error(
        invoke(["sample", str(run_dir), "--label", "3", "--out", str(tmp_path / "x.npy")]), "unconditional"
    )
    assert_one_line_error(
        invoke(["sample", str(run_dir), "--solver", "heun", "--nfe", "1", "--out", str(tmp_path / "x.npy")]),
        "too small",
    )


def test_debug_shows_the_traceback(tmp_path):
    from fewflow import FewflowError

    with pytest.raises(FewflowError):
        invoke(["--debug", "sample", str(tmp_path / "missing"), "--out", str(tmp_path / "x.npy")])


def test_train_from_config_file_with_flag_override(tmp_path):
    import yaml

    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "data": {"name": "8gaussians"},
                "model": {"hidden": 16, "depth": 1},
                "objective": {"coupling": "ot"},
                "train": {"steps": 5},
            }
        )
    )
    out = tmp_path / "g"
    r = invoke(
        [
            "train",
            "--config",
            str(cfg),
            "--out",
            str(out),
            "--steps",
            "8",
            "--n",
            "500",
            "--batch-size",
            "64",
            "--no-progress",
        ]
    )
    assert r.exit_code == 0, r.stderr
    rc = json.loads((out / "config.json").read_text())["run_config"]
    assert rc["data"]["name"] == "8gaussians" and rc["objective"]["coupling"] == "ot"
    assert rc["model"]["hidden"] == 16 and rc["model"]["type"] == "MLP"  # merged onto the data-set defaults
    assert rc["train"]["steps"] == 8  # the flag wins over the file


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path):
    out = tmp_path / "demo"
    r = invoke(["demo", "--quick", "--out", str(out), "--steps", "60", "--n-eval", "300"])
    assert r.exit_code == 0, r.stderr
    assert r.stdout.strip() == str(out / "report.md")
    report = (out / "report.md").read_text()
    assert "two-sample floor" in report and "NFE" in report and "x the floor" in report
    m = json.loads((out / "metrics.json").read_text())
    rows = m["checkerboard"]["results"]
    assert {(row["solver"], row["nfe"]) for row in rows} == {
        ("euler", 1),
        ("euler", 2),
        ("euler", 4),
        ("euler", 8),
        ("euler", 100),
        ("heun", 2),
        ("heun", 4),
        ("heun", 8),
        ("heun", 100),
    }
    assert m["checkerboard_check"]["ratio"] == pytest.approx(
        m["checkerboard_check"]["euler_nfe100_sliced_w2"] / m["checkerboard"]["floor"]["sliced_w2"]
    )
    for png in ("checkerboard_samples.png", "checkerboard_trajectories.png", "checkerboard_sw2_vs_nfe.png",
                "checkerboard_fewstep.png"):
        assert (out / png).stat().st_size > 1000, png
    assert "[1/3] checkerboard: train CFM" in r.stderr
    # the few-step stage: a reflowed student evaluated at NFE 1, 2, 4 beside the teacher
    fs = m["checkerboard_reflow"]
    assert {(r_["solver"], r_["nfe"]) for r_ in fs["results"]} == {("euler", 1), ("euler", 2), ("euler", 4)}
    assert "Few-step" in (out / "report.md").read_text()
