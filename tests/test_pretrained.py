"""Pretrained folders: export a run, load it back, sample the same, refuse corrupt or foreign folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_helpers import assert_one_line_error, invoke
from click.testing import CliRunner

from fewflow import FewflowError
from fewflow.cli.export import export_cmd
from fewflow.cli.main import FewflowGroup, cli
from fewflow.config import default_config
from fewflow.methods import get_method
from fewflow.pretrained import (
    CARD_FILE,
    CONFIG_FILE,
    FORMAT,
    WEIGHTS_FILE,
    _check_exportable,
    from_pretrained,
    is_pretrained,
    save_pretrained,
)
from fewflow.runs import load_run
from fewflow.sampling import generate

TINY = ["--no-progress", "--set", "model.hidden=32", "--set", "model.depth=2", "--threads", "1"]


def _group() -> FewflowGroup:
    """The fewflow group with ``export`` (whether or not the package wires it already)."""
    group = FewflowGroup("fewflow")
    for cmd in cli.commands.values():
        group.add_command(cmd)
    group.add_command(export_cmd)
    return group


def export(args: list):
    return CliRunner().invoke(_group(), ["export", *[str(a) for a in args]], catch_exceptions=False)


@pytest.fixture(scope="module")
def moons_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("moons") / "run"
    r = invoke(["train", "--data", "moons", "--steps", "20", "--out", str(run), "--set", "model.hidden=32",
                "--set", "model.depth=2", "--n", "2000", "--no-progress"])
    assert r.exit_code == 0, r.output + r.stderr
    return run


@pytest.fixture(scope="module")
def moons_export(moons_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "moons"
    r = export([moons_run, out, "--eval", "1,2", "--eval-n", "200"])
    assert r.exit_code == 0, r.output + r.stderr
    return out


def _samples(model, cfg, **kw) -> torch.Tensor:
    return generate(model, cfg, 64, generator=torch.Generator().manual_seed(7), **kw).x


def test_folder_layout_and_config(moons_export):
    assert sorted(p.name for p in moons_export.iterdir()) == sorted([WEIGHTS_FILE, CONFIG_FILE, CARD_FILE])
    doc = json.loads((moons_export / CONFIG_FILE).read_text())
    assert doc["format"] == FORMAT and doc["fewflow_version"]
    assert doc["method"]["name"] == "cfm" and doc["model"]["hidden"] == 32
    assert doc["meta"]["shape"] == [2] and "sampler" in doc
    assert doc["weights"]["which"] == "ema"
    assert is_pretrained(moons_export)


def test_same_samples_as_the_run(moons_run, moons_export):
    m1, c1 = load_run(moons_run)
    m2, c2 = from_pretrained(moons_export)
    assert not m2.training
    assert torch.equal(_samples(m1, c1), _samples(m2, c2))
    assert torch.equal(_samples(m1, c1, nfe=4), _samples(m2, c2, nfe=4))


def test_model_weights_export(moons_run, tmp_path):
    out = save_pretrained(moons_run, tmp_path / "raw", which="model")
    m1, c1 = load_run(moons_run, which="model")
    m2, c2 = from_pretrained(out)
    assert torch.equal(_samples(m1, c1, nfe=2), _samples(m2, c2, nfe=2))
    save_pretrained(moons_run, out, which="ema")  # a pretrained folder is replaced whole
    assert json.loads((out / CONFIG_FILE).read_text())["weights"]["which"] == "ema"


def test_model_card(moons_export):
    card = (moons_export / CARD_FILE).read_text()
    assert card.startswith("---\nlibrary_name: fewflow\ntags:\n- flow-matching\n- fewflow\n")
    assert card.count("\n---\n") == 1
    spec = get_method("cfm")
    assert spec.label in card and spec.paper in card and "moons" in card
    assert f"NFE {spec.sampler.nfe}" in card
    assert "## Metrics" in card and "| solver | NFE |" in card and "| euler | 2 |" in card


def _one_line(e: pytest.ExceptionInfo, *words: str) -> None:
    msg = str(e.value)
    assert len(msg.splitlines()) == 1, msg
    for w in words:
        assert w in msg, (w, msg)


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_corrupt_weights_are_one_error(moons_export, tmp_path):
    bad = _copy(moons_export, tmp_path / "flip")
    data = bytearray((bad / WEIGHTS_FILE).read_bytes())
    data[-3] ^= 0xFF
    (bad / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(FewflowError) as e:
        from_pretrained(bad)
    _one_line(e, "corrupt", WEIGHTS_FILE)
    short = _copy(moons_export, tmp_path / "short")
    doc = json.loads((short / CONFIG_FILE).read_text())
    del doc["weights"]["sha256"]  # no checksum: the parser still catches a truncated file
    (short / CONFIG_FILE).write_text(json.dumps(doc))
    (short / WEIGHTS_FILE).write_bytes((moons_export / WEIGHTS_FILE).read_bytes()[:100])
    with pytest.raises(FewflowError) as e:
        from_pretrained(short)
    _one_line(e, WEIGHTS_FILE)
    (short / WEIGHTS_FILE).unlink()
    with pytest.raises(FewflowError) as e:
        from_pretrained(short)
    _one_line(e, "missing")


def test_edited_or_foreign_config_is_one_error(moons_export, moons_run, tmp_path):
    other = _copy(moons_export, tmp_path / "other")
    doc = json.loads((other / CONFIG_FILE).read_text())
    doc["model"]["hidden"] = 64
    (other / CONFIG_FILE).write_text(json.dumps(doc))
    with pytest.raises(FewflowError) as e:
        from_pretrained(other)
    _one_line(e, "does not match")
    doc["format"] = "something-else"
    (other / CONFIG_FILE).write_text(json.dumps(doc))
    with pytest.raises(FewflowError) as e:
        from_pretrained(other)
    _one_line(e, FORMAT)
    (other / CONFIG_FILE).write_text("{not json")
    with pytest.raises(FewflowError) as e:
        from_pretrained(other)
    _one_line(e, "does not parse")
    with pytest.raises(FewflowError) as e:  # a run folder is not a pretrained folder
        from_pretrained(moons_run)
    _one_line(e, "load_run")
    with pytest.raises(FewflowError) as e:
        from_pretrained(tmp_path / "nowhere")
    _one_line(e, "not found")


def test_export_refuses_to_overwrite_other_folders(moons_run, tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    assert_one_line_error(export([moons_run, busy]), "not a fewflow pretrained folder")
    assert (busy / "notes.txt").read_text() == "keep me"
    assert_one_line_error(export([moons_run, moons_run]), "run folder itself")
    assert_one_line_error(export([tmp_path / "missing", tmp_path / "out"]), "not found")
    assert_one_line_error(export([moons_run, tmp_path / "out", "--eval", "0"]), "--eval")
    assert not (tmp_path / "out").exists()


def test_latent_and_teacher_runs_are_refused(tmp_path):
    cfg = default_config("moons")
    cfg.meta = {"shape": [2], "latent": {"ae_run": "/ae"}}
    with pytest.raises(FewflowError) as e:
        _check_exportable(cfg, tmp_path)
    _one_line(e, "latent", "not exportable")


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("digits") / "run"
    r = invoke(["train", "--data", "digits", "--steps", "5", "--batch-size", "32", "--out", str(run), *TINY,
                "--set", "train.ckpt_every=0", "--set", "train.log_every=0"])
    assert r.exit_code == 0, r.output + r.stderr
    return run


def test_class_conditional_digits_round_trip(digits_run, tmp_path):
    out = save_pretrained(digits_run, tmp_path / "digits")
    m1, c1 = load_run(digits_run)
    m2, c2 = from_pretrained(out, device="cpu")
    assert c2.meta["conditional"] and c2.meta["num_classes"] == 10
    label = torch.arange(64) % 10
    assert torch.equal(_samples(m1, c1, nfe=2, label=label), _samples(m2, c2, nfe=2, label=label))
    card = (out / CARD_FILE).read_text()
    assert "10 classes (class-conditional)" in card and "digits" in card


def test_load_run_and_the_cli_read_a_pretrained_folder(moons_run, moons_export, tmp_path):
    """`load_run` (so `fewflow sample` and `fewflow eval`) accepts an exported folder as it is."""
    m1, c1 = load_run(moons_run)
    m2, c2 = load_run(moons_export)
    assert torch.equal(_samples(m1, c1, nfe=4), _samples(m2, c2, nfe=4))
    from cli_helpers import invoke

    r = invoke(["sample", str(moons_export), "--n", "16", "--nfe", "4", "--out", str(tmp_path / "s.npy")])
    assert r.exit_code == 0, r.output + r.stderr
