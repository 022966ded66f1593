"""The docs' code runs: the complete method of docs/adding-a-method.md registers, trains and samples."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import torch

from fewflow.methods import registry

DOC = Path(__file__).resolve().parents[1] / "docs" / "adding-a-method.md"


def test_adding_a_method_example_trains_and_samples(tmp_path):
    code = DOC.read_text().split("```python\n")[1].split("```")[0]
    mod = types.ModuleType("fewflow.objectives.huber_cfm")
    sys.modules[mod.__name__] = mod  # dataclasses resolve annotations through the module
    try:
        exec(compile(code, str(DOC), "exec"), mod.__dict__)
        spec = registry.get_method("huber_cfm")
        assert spec.make_config({"c": "1e-2"}).c == 0.01
        from fewflow.config import default_config
        from fewflow.runs import load_run, train_run
        from fewflow.sampling import generate

        cfg = default_config("moons", method="huber_cfm").replace(
            {"train.steps": 10, "train.batch_size": 64, "model.hidden": 32, "train.progress": False,
             "train.ckpt_every": 0, "data.n": 1000}
        )
        res = train_run(cfg, tmp_path / "run", figures=False)
        assert res.stopped_reason == "completed"
        model, cfg = load_run(tmp_path / "run")
        x = generate(model, cfg, 16, nfe=2, generator=torch.Generator().manual_seed(0)).x
        assert x.shape == (16, 2) and torch.isfinite(x).all()
    finally:
        registry._REGISTRY.pop("huber_cfm", None)
        sys.modules.pop(mod.__name__, None)
