"""Runs written by the Python ``Trainer`` are read by ``fewflow sample`` and ``fewflow eval``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from fewflow import FewflowError
from fewflow.cli.main import cli
from fewflow.data import Dataset, load_dataset
from fewflow.models import MLP
from fewflow.objectives import CFMLoss
from fewflow.paths import AffinePath, LinearSchedule
from fewflow.runs import load_run, run_config_for
from fewflow.train import TrainConfig, Trainer


def _train(model, data, out, **kw):
    cfg = TrainConfig(steps=20, batch_size=32, lr=3e-3, progress=False, ckpt_every=0, log_every=10)
    loss = CFMLoss(AffinePath(LinearSchedule()), **kw.pop("loss", {}))
    res = Trainer(model, loss, data, cfg, out_dir=out, **kw).fit()
    assert res.stopped_reason == "completed"
    return json.loads((out / "config.json").read_text())["run_config"]


def _cli(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def _error(result) -> str:
    err = result.stderr.strip()
    assert result.exit_code == 2 and err.startswith("error: ") and len(err.splitlines()) == 1, err
    return err


def test_default_trainer_run_samples_and_says_why_it_cannot_eval(tmp_path):
    run = tmp_path / "run"
    rc = _train(MLP(2, hidden=16, depth=2), load_dataset("moons", n=256), run)
    assert rc["meta"]["shape"] == [2] and rc["meta"]["conditional"] is False
    r = _cli("sample", run, "--nfe", 2, "--n", 16, "--out", tmp_path / "s.npy")
    assert r.exit_code == 0, r.output
    x = np.load(tmp_path / "s.npy")
    assert x.shape == (16, 2) and np.isfinite(x).all()
    err = _error(_cli("eval", run, "--nfe", 2, "--n", 100))
    assert "held in memory" in err and "run_config_for" in err


def test_run_config_for_makes_eval_work_and_keeps_user_units(tmp_path):
    rng = np.random.default_rng(0)
    csv = tmp_path / "m.csv"
    np.savetxt(csv, np.c_[20 + rng.normal(size=300), 1000 + 5 * rng.normal(size=300)], delimiter=",")
    data = load_dataset(str(csv))  # normalised; the run records how, so samples come back in these units
    model = MLP(2, hidden=16, depth=2)
    run = tmp_path / "run"
    rc = _train(model, data, run, run_config=run_config_for(model, data))
    assert rc["data"]["kind"] == "csv" and rc["data"]["sha256"] and rc["method"]["name"] == "cfm"
    r = _cli("sample", run, "--nfe", 2, "--n", 200, "--out", tmp_path / "s.npy")
    assert r.exit_code == 0, r.output
    assert abs(np.load(tmp_path / "s.npy")[:, 1].mean() - 1000) < 50  # user units, not normalised
    r = _cli("eval", run, "--nfe", 2, "--n", 100, "--json")
    assert r.exit_code == 0, r.output + r.stderr
    assert json.loads(r.stdout)["results"][0]["nfe"] == 2


def test_conditioned_trainer_runs_sample_with_labels_and_cond(tmp_path):
    x = torch.randn(128, 2)
    labelled = Dataset(x, torch.arange(128) % 3, "blobs", num_classes=3)
    run = tmp_path / "labels"
    rc = _train(MLP(2, hidden=16, depth=2, num_classes=3), labelled, run,
                loss={"label_dropout": 0.1, "num_classes": 3})
    assert rc["meta"]["conditional"] and rc["meta"]["num_classes"] == 3
    r = _cli("sample", run, "--nfe", 2, "--n", 8, "--label", 2, "--cfg", 2, "--out", tmp_path / "y.npy")
    assert r.exit_code == 0, r.output

    with_c = Dataset(x, None, "arcs", c=x[:, :1] * 2)  # a continuous condition c, one value per sample
    run = tmp_path / "cond"
    rc = _train(MLP(2, hidden=16, depth=2, cond_dim=1), with_c, run)
    assert rc["meta"]["cond_shape"] == [1]
    np.save(tmp_path / "c.npy", np.full((8, 1), 0.5, dtype=np.float32))
    r = _cli("sample", run, "--nfe", 2, "--n", 8, "--cond", tmp_path / "c.npy", "--out", tmp_path / "c8.npy")
    assert r.exit_code == 0, r.output
    model, cfg = load_run(run)
    assert cfg.data.kind == "memory" and cfg.meta["cond_shape"] == [1]


class Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x, t, y=None):
        return self.lin(torch.cat([x, t[:, None]], 1))


def test_custom_network_without_config_is_one_clear_error(tmp_path):
    run = tmp_path / "run"
    _train(Custom(), torch.randn(64, 2), run)
    err = _error(_cli("sample", run, "--out", tmp_path / "s.npy"))
    assert "test_python_runs:Custom" in err and "cannot rebuild" in err and "config" in err
    with pytest.raises(FewflowError, match="cannot record network"):
        run_config_for(Custom(), torch.randn(64, 2))


def test_a_dataloader_run_records_the_sample_shape_once_it_has_seen_a_batch(tmp_path):
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(TensorDataset(torch.randn(64, 3, dtype=torch.float64)), batch_size=16)
    run = tmp_path / "run"
    rc = _train(MLP(3, hidden=16, depth=2), loader, run)
    assert rc["meta"]["shape"] == [3]
    r = _cli("sample", run, "--nfe", 2, "--n", 4, "--out", tmp_path / "s.npy")
    assert r.exit_code == 0, r.output
    assert np.load(tmp_path / "s.npy").shape == (4, 3)
