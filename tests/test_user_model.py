"""The user's own network: ``--model module:Class`` (and a class in Python) is imported, constructed with
``--set model.KEY=VALUE`` plus the data-dependent arguments it names, checked on a test batch, recorded in
the run config and rebuilt by ``load_run`` / ``fewflow sample``; every failure is one line and exit 2."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import assert_one_line_error, invoke

SMALL = ["--batch-size", "16", "--no-progress", "--set", "train.ckpt_every=0"]

NETS = '''
import math

import torch
from torch import nn


class Net(nn.Module):
    """v(x, t, y=None) for samples of any shape: an MLP on [x, t] (labels ignored)."""

    def __init__(self, shape, width=32):
        super().__init__()
        self.width = width
        dim = math.prod(shape)
        self.net = nn.Sequential(nn.Linear(dim + 1, width), nn.SiLU(), nn.Linear(width, dim))

    def forward(self, x, t, y=None):
        return self.net(torch.cat([x.flatten(1), t[:, None]], dim=1)).view_as(x)


class LabelNet(Net):
    """Class-conditional: a label embedding added to the output."""

    def __init__(self, shape, num_classes, width=32):
        super().__init__(shape, width)
        self.num_classes = num_classes
        self.emb = nn.Embedding(num_classes + 1, math.prod(shape))

    def forward(self, x, t, y=None):
        out = super().forward(x, t)
        if y is not None:
            out = out + self.emb(y).view_as(x)
        return out


class WrongShape(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(1, 1)

    def forward(self, x, t, y=None):
        return x.flatten(1)[:, :1]


class NoArgs(nn.Module):
    def forward(self, x, t, y=None):
        return x


NOT_A_CLASS = 3
'''






@pytest.fixture
def nets(tmp_path, monkeypatch) -> str:
    pkg = tmp_path / "code" / "yourtestpkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(NETS)
    monkeypatch.syspath_prepend(str(tmp_path / "code"))
    yield "yourtestpkg.nets"
    for name in [m for m in sys.modules if m.startswith("yourtestpkg")]:
        del sys.modules[name]


@pytest.fixture
def image_folder(tmp_path) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for k, cls in enumerate(("a", "b")):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(5):
            arr = rng.integers(0, 100 + 100 * k, size=(8, 8, 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / "imgs" / cls / f"{i}.png")
    return tmp_path / "imgs"


def test_user_model_trains_samples_and_is_rebuilt(nets, image_folder, tmp_path):
    from fewflow.runs import load_run

    run = tmp_path / "r"
    r = invoke(["train", "--data", image_folder, "--model", f"{nets}:Net", "--set", "model.width=16",
                "--steps", 20, "--out", run, *SMALL])
    assert r.exit_code == 0, r.output + r.stderr
    model_cfg = json.loads((run / "config.json").read_text())["run_config"]["model"]
    assert model_cfg == {"type": f"{nets}:Net", "width": 16, "shape": [3, 8, 8]}
    r = invoke(["sample", run, "--nfe", 2, "--n", 8, "--out", tmp_path / "s.png"])
    assert r.exit_code == 0, r.output + r.stderr
    model, cfg = load_run(run)
    assert type(model).__name__ == "Net" and model.width == 16 and not model.training


def test_conditional_user_model_gets_num_classes(nets, image_folder, tmp_path):
    run = tmp_path / "r"
    r = invoke(["train", "--data", image_folder, "--model", f"{nets}:LabelNet", "--conditional",
                "--label-dropout", "0.1", "--steps", 10, "--out", run, *SMALL])
    assert r.exit_code == 0, r.output + r.stderr
    model_cfg = json.loads((run / "config.json").read_text())["run_config"]["model"]
    assert model_cfg["num_classes"] == 2 and model_cfg["shape"] == [3, 8, 8]
    r = invoke(["sample", run, "--nfe", 2, "--n", 4, "--label", 1, "--out", tmp_path / "s.npy"])
    assert r.exit_code == 0, r.output + r.stderr


def test_python_api_takes_the_class_itself(nets, tmp_path):
    import importlib

    from fewflow.config import default_config
    from fewflow.runs import load_run, train_run
    from fewflow.sampling import generate

    net_cls = importlib.import_module(nets).Net
    cfg = default_config("moons")
    cfg.model = {"type": net_cls, "width": 8}
    cfg = cfg.replace({"train.steps": 5, "train.batch_size": 32, "train.progress": False,
                       "train.ckpt_every": 0, "data.n": 200})
    assert cfg.model["type"] == f"{nets}:Net"
    train_run(cfg, tmp_path / "r", figures=False)
    model, cfg = load_run(tmp_path / "r")
    x = generate(model, cfg, 16, nfe=2, generator=torch.Generator().manual_seed(0)).x
    assert x.shape == (16, 2) and torch.isfinite(x).all()


@pytest.mark.parametrize(
    "model, sets, words",
    [
        ("nosuchpkg_q.nets:Net", [], ["cannot import model class", "no module named 'nosuchpkg_q'"]),
        ("{nets}:Missing", [], ["has no 'Missing'"]),
        ("{nets}:NOT_A_CLASS", [], ["not a torch.nn.Module class"]),
        ("{nets}:Net", ["--set", "model.depth=3"], ["cannot construct model", "depth"]),
        ("{nets}:WrongShape", [], ["must return a velocity shaped like x", "(2, 3, 8, 8)"]),
        ("{nets}:NoArgs", [], ["has no trainable parameters"]),
        ("{nets}:Net:x", [], ["must read module:name"]),
    ],
)
def test_bad_user_model_is_one_line_and_exit_2(nets, image_folder, tmp_path, model, sets, words):
    args = ["train", "--data", image_folder, "--model", model.replace("{nets}", nets), *sets,
            "--steps", 2, "--out", tmp_path / "r", *SMALL]
    assert_one_line_error(invoke(args), *words)
    assert not (tmp_path / "r" / "config.json").exists()


def test_sample_names_a_model_that_cannot_be_imported_any_more(nets, image_folder, tmp_path):
    run = tmp_path / "r"
    r = invoke(["train", "--data", image_folder, "--model", f"{nets}:Net", "--steps", 2, "--out", run,
                *SMALL])
    assert r.exit_code == 0, r.output + r.stderr
    doc = json.loads((run / "config.json").read_text())
    doc["run_config"]["model"]["type"] = "yourtestpkg.gone:Net"
    (run / "config.json").write_text(json.dumps(doc))
    assert_one_line_error(invoke(["sample", run, "--n", 2, "--out", tmp_path / "s.npy"]),
                          "cannot import model class", "yourtestpkg.gone")
