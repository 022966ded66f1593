"""The control commands end to end: demos -> policy train -> rollout, and their one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from fewflow.cli.main import cli

torch.set_num_threads(1)


@pytest.mark.slow
def test_demos_policy_train_rollout(tmp_path):
    run = CliRunner().invoke
    r = run(cli, ["demos", "nav2d", "--n", "6", "--out", str(tmp_path / "d.npz"), "--no-progress"])
    assert r.exit_code == 0, r.output + r.stderr
    r = run(cli, ["policy", "train", str(tmp_path / "d.npz"), "--method", "mp1", "--steps", "5",
                  "--batch-size", "16", "--hidden", "16", "--depth", "1", "--out", str(tmp_path / "pol"),
                  "--set", "method.dispersive=infonce_l2", "--no-progress"])
    assert r.exit_code == 0, r.output + r.stderr
    r = run(cli, ["rollout", str(tmp_path / "pol"), "--episodes", "2", "--out", str(tmp_path / "ev")])
    assert r.exit_code == 0, r.output + r.stderr
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert 0.0 <= m["success_rate"] <= 1.0 and m["latency_ms"]["mean"] > 0


def test_policy_train_refuses_other_settings(tmp_path):
    r = CliRunner().invoke(cli, ["policy", "train", str(tmp_path / "none.npz"), "--out", str(tmp_path / "p"),
                                 "--set", "train.lr=1"])
    assert r.exit_code == 2 and r.stderr.startswith("error: ")
