"""``fewflow scoop`` trains and scores; ``fewflow sceneflow`` reads two clouds and writes the flow."""

from __future__ import annotations

import json

import numpy as np
import torch
from click.testing import CliRunner

from fewflow.cli.main import cli
from fewflow.points import write_ply

torch.set_num_threads(1)


def test_scoop_then_sceneflow(tmp_path):
    run = CliRunner().invoke
    r = run(cli, ["scoop", "--out", str(tmp_path / "m"), "--pairs", "2", "--test-pairs", "1",
                  "--points", "64", "--set", "epochs=1", "--set", "channels=8", "--set", "graph_k=8",
                  "--set", "smooth_k=8", "--set", "refine_steps=5", "--device", "cpu"])
    assert r.exit_code == 0, r.output + r.stderr
    scores = json.loads(r.stdout)
    assert set(scores) == {"nn", "scoop", "scoop+refine"}
    assert all(np.isfinite(v["epe3d"]) for v in scores.values())
    g = torch.Generator().manual_seed(0)
    a = torch.randn(64, 3, generator=g)
    write_ply(tmp_path / "a.ply", a)
    write_ply(tmp_path / "b.ply", a + torch.tensor([0.1, 0.0, 0.0]))
    r = run(cli, ["sceneflow", str(tmp_path / "m"), str(tmp_path / "a.ply"), str(tmp_path / "b.ply"),
                  "--out", str(tmp_path / "f.npy"), "--device", "cpu"])
    assert r.exit_code == 0, r.output + r.stderr
    flow = np.load(tmp_path / "f.npy")
    assert flow.shape == (64, 3) and np.isfinite(flow).all()


def test_scoop_unknown_field_is_one_line(tmp_path):
    r = CliRunner().invoke(cli, ["scoop", "--out", str(tmp_path / "m"), "--set", "epoch=1"])
    assert r.exit_code == 2 and "epochs" in r.stderr
