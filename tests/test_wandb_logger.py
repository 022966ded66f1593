"""``train.logger``: Weights & Biases next to the CSV logs, offline by default and with the same keys as
TensorBoard (``train/<column of log.csv>``); a missing package is one clear error. A stand-in ``wandb``
module records the calls, so the test needs neither the package nor the network."""

from __future__ import annotations

import csv
import sys
import types

from cli_helpers import assert_one_line_error, invoke

TINY = ["--data", "moons", "--steps", "20", "--n", "1000", "--batch-size", "64", "--no-progress",
        "--set", "model.hidden=32", "--set", "model.depth=2", "--set", "train.log_every=5"]


def _fake_wandb(calls: dict) -> types.ModuleType:
    mod = types.ModuleType("wandb")

    class Run:
        def log(self, values, step):
            calls["log"].append((step, dict(values)))

        def finish(self):
            calls["finished"] += 1

    def init(**kw):
        calls["init"].append(kw)
        return Run()

    mod.init = init
    return mod


def test_wandb_logs_every_csv_metric_under_the_tensorboard_key(tmp_path, monkeypatch):
    calls = {"init": [], "log": [], "finished": 0}
    monkeypatch.setitem(sys.modules, "wandb", _fake_wandb(calls))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    out = tmp_path / "run"
    r = invoke(["train", *TINY, "--logger", "wandb", "--out", str(out)])
    assert r.exit_code == 0, r.output + r.stderr
    (init,) = calls["init"]
    assert init["mode"] == "offline" and init["dir"] == str(out) and init["config"]["method"]["name"] == "cfm"
    assert calls["finished"] == 1
    rows = list(csv.DictReader((out / "log.csv").open()))
    logged = dict(calls["log"])
    assert [int(r["step"]) for r in rows] == sorted(logged)
    for row in rows:
        values = logged[int(row["step"])]
        numeric = {k for k, v in row.items() if k != "step" and v not in ("", None)}
        assert {f"train/{k}" for k in numeric} == set(values)
        assert abs(values["train/loss"] - float(row["loss"])) < 1e-9


def test_missing_wandb_and_bad_logger_are_one_line_errors(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    r = invoke(["train", *TINY, "--logger", "wandb", "--out", str(tmp_path / "a")])
    assert_one_line_error(r, "fewflow[wandb]")
    r = invoke(["train", *TINY, "--set", "train.logger=mlflow", "--out", str(tmp_path / "b")])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert r.stderr.strip().splitlines()[-1].startswith("error: unknown logger 'mlflow'")
