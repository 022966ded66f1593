"""``fewflow restore`` / ``fewflow edit`` end to end on a tiny digits prior trained by ``fewflow train``.

Solvers are looked up in the registry; a stand-in restoration solver (the pseudo-inverse) and a stand-in
editing solver registered here keep the command tests independent of any one solver, and the registered
FLAIR / FlowOpt run when present."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from cli_helpers import assert_one_line_error, invoke
from click.testing import CliRunner
from PIL import Image

from fewflow.cli.main import FewflowGroup, cli
from fewflow.cli.restore import COMMANDS, read_images
from fewflow.inverse import InverseResult, InverseSpec, get_inverse, register_inverse
from fewflow.inverse.base import _REGISTRY

torch.set_num_threads(1)


@dataclass
class _PinvConfig:
    blend: float = 1.0


def _pinv_solve(model, meas, cfg, *, generator=None, **cond) -> InverseResult:
    try:
        x = meas.op.pinv(meas.y)
    except Exception:
        x = meas.op.adjoint(meas.y)
    return InverseResult(x=cfg.blend * x, nfe=0, meta={"cond": sorted(cond)})


def _edit_solve(model, meas, cfg, *, generator=None, target_cond=None, **cond) -> InverseResult:
    assert target_cond is not None and "y" in cond
    return InverseResult(x=0.5 * meas.y, nfe=1, meta={"to": int(target_cond["y"][0])})


for _spec in (
    InverseSpec("test_pinv", "pinv", "-", "pseudo-inverse stand-in", _PinvConfig, _pinv_solve),
    InverseSpec("test_edit", "edit", "-", "editing stand-in", _PinvConfig, _edit_solve, tasks=("edit",)),
):
    if _spec.name not in _REGISTRY:
        register_inverse(_spec)

GROUP = cli if "restore" in cli.commands else FewflowGroup(
    "fewflow", commands={**cli.commands, **{c.name: c for c in COMMANDS}}
)


def run(args: list):
    """``fewflow ARGS`` in-process: ``cli_helpers.invoke`` once the commands are in the ``fewflow`` group."""
    if GROUP is cli:
        return invoke(args)
    return CliRunner().invoke(GROUP, [str(a) for a in args], catch_exceptions=False)


def one_line_error(result, *words: str) -> None:
    assert_one_line_error(result, *words)


@pytest.fixture(scope="module")
def prior(tmp_path_factory):
    out = tmp_path_factory.mktemp("prior") / "run"
    r = run(["train", "--data", "digits", "--steps", 20, "--batch-size", 64, "--set", "model.hidden=64",
             "--set", "model.depth=2", "--threads", 1, "--no-progress", "--out", out])
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from fewflow.data import load_dataset

    d = load_dataset("digits", split="test")
    folder = tmp_path_factory.mktemp("imgs")
    np.save(folder / "batch.npy", d.x[:3].numpy())
    np.save(folder / "one.npy", d.x[0, 0].numpy())  # (H, W)
    Image.fromarray(((d.x[1, 0].numpy() + 1) * 127.5).round().astype(np.uint8)).save(folder / "one.png")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(folder / "big.png")
    np.save(folder / "low.npy", torch.nn.functional.avg_pool2d(d.x[:2], 2).numpy())  # (2, 1, 4, 4)
    return folder, d


def test_read_images_png_and_npy(digits) -> None:
    folder, d = digits
    png = read_images(folder / "one.png", 1)
    assert png.shape == (1, 1, 8, 8) and png.dtype == torch.float32
    assert torch.allclose(png, d.x[1:2], atol=1 / 127.5)  # 8-bit quantisation only
    assert torch.equal(read_images(folder / "one.npy", 1), d.x[:1])
    assert read_images(folder / "batch.npy", 1).shape == (3, 1, 8, 8)


def test_restore_with_truth_writes_everything(prior, digits, tmp_path) -> None:
    folder, d = digits
    before = (folder / "batch.npy").read_bytes()
    out = tmp_path / "r"
    r = run(["restore", prior, "--task", "sr2", "--truth", folder / "batch.npy", "--method", "test_pinv",
             "--sigma", 0, "--out", out])
    assert r.exit_code == 0, r.output
    assert (folder / "batch.npy").read_bytes() == before  # input untouched
    m = json.loads((out / "metrics.json").read_text())
    x = np.load(out / "restored.npy")
    assert x.shape == (3, 1, 8, 8)
    for name in ("restored_000.png", "restored_002.png", "side_by_side.png"):
        assert (out / name).stat().st_size > 50
    # the pseudo-inverse of noiseless average pooling is consistent: zero residual, floor 0
    assert m["residual_mean"] == pytest.approx(0.0, abs=1e-5) and m["noise_floor"] == 0.0
    assert m["m"] == 16 and m["task"] == "sr2" and m["solver"] == "test_pinv" and m["images"] == 3
    # PSNR / SSIM in the report are those of the written images against the truth
    mse = ((torch.from_numpy(x) - d.x[:3]) ** 2).flatten(1).mean(1)
    assert m["psnr"] == pytest.approx((10 * torch.log10(4 / mse)).tolist(), rel=1e-4)
    assert all(-1 <= s <= 1 for s in m["ssim"])
    assert m["solver_meta"] == {} and m["condition"] == "null class"  # conditional prior, null label
    assert m["solver_config"] == {"blend": 1.0}


def test_restore_input_is_the_measurement(prior, digits, tmp_path) -> None:
    folder, _ = digits
    out = tmp_path / "lr"
    r = run(["restore", prior, "--task", "sr2", "--input", folder / "low.npy", "--method", "test_pinv",
             "--sigma", 0.05, "--set", "blend=0.5", "--out", out])
    assert r.exit_code == 0, r.output
    m = json.loads((out / "metrics.json").read_text())
    low = torch.from_numpy(np.load(folder / "low.npy"))
    # x = 0.5 * pinv(y) -> A x = 0.5 y, residual 0.5 ||y||
    assert m["residual"] == pytest.approx((0.5 * low.flatten(1).norm(dim=1)).tolist(), rel=1e-5)
    assert m["noise_floor"] == pytest.approx(0.05 * 4) and "psnr" not in m
    assert m["solver_config"] == {"blend": 0.5} and m["measurement_from"] == "input"
    # an inpainting input is a full-size image; a png works as well
    r = run(["restore", prior, "--task", "inpaint", "--input", folder / "one.png", "--method", "test_pinv",
             "--out", tmp_path / "inp"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "inp" / "restored.png").is_file()


def test_restore_user_errors(prior, digits, tmp_path) -> None:
    folder, _ = digits
    out = tmp_path / "e"
    one_line_error(run(["restore", prior, "--task", "inpaint", "--input", folder / "big.png", "--method",
                        "test_pinv", "--out", out]), "10x10", "8x8")
    # sr2 expects the 4x4 low-resolution image as the measurement
    one_line_error(run(["restore", prior, "--task", "sr2", "--input", folder / "batch.npy", "--method",
                        "test_pinv", "--out", out]), "4x4")
    one_line_error(run(["restore", prior, "--task", "sr2", "--truth", folder / "batch.npy", "--sigma", -0.1,
                        "--method", "test_pinv", "--out", out]), "--sigma")
    one_line_error(run(["restore", prior, "--task", "sr2", "--truth", folder / "batch.npy", "--method",
                        "test_pinv", "--set", "blnd=2", "--out", out]), "blend")
    one_line_error(run(["restore", prior, "--task", "sr2", "--truth", folder / "batch.npy", "--method",
                        "test_pinv", "--set", "blend=abc", "--out", out]), "number")
    one_line_error(run(["restore", prior, "--task", "sr2", "--truth", folder / "batch.npy", "--method",
                        "test_edit", "--out", out]), "test_pinv")
    one_line_error(run(["restore", prior, "--task", "sr2", "--method", "test_pinv", "--out", out]), "--truth")
    one_line_error(run(["restore", prior, "--task", "sr2", "--truth", folder / "batch.npy", "--label", 12,
                        "--method", "test_pinv", "--out", out]), "--label")
    one_line_error(run(["restore", tmp_path / "nope", "--task", "sr2", "--truth", folder / "batch.npy",
                        "--method", "test_pinv", "--out", out]))
    assert not (out / "metrics.json").exists()


def test_edit_command(prior, digits, tmp_path) -> None:
    folder, _ = digits
    before = (folder / "one.png").read_bytes()
    out = tmp_path / "ed"
    r = run(["edit", prior, "--input", folder / "one.png", "--to-class", 8, "--from-class", 3, "--method",
             "test_edit", "--out", out])
    assert r.exit_code == 0, r.output
    assert (folder / "one.png").read_bytes() == before
    m = json.loads((out / "metrics.json").read_text())
    x_in = read_images(folder / "one.png", 1)
    assert np.allclose(np.load(out / "edited.npy"), 0.5 * x_in.numpy())
    assert m["mse_to_input_mean"] == pytest.approx(float((0.25 * x_in**2).mean()), rel=1e-5)
    assert m["from_class"] == [3] and m["to_class"] == 8 and m["from_class_source"] == "given"
    assert 0.0 <= m["p_target_before"] <= 1.0 and 0.0 <= m["p_target_after"] <= 1.0
    assert (out / "side_by_side.png").stat().st_size > 50
    one_line_error(run(["edit", prior, "--input", folder / "one.png", "--to-class", 10, "--method",
                        "test_edit", "--out", out]), "--to-class")
    one_line_error(run(["edit", prior, "--input", folder / "big.png", "--to-class", 1, "--method",
                        "test_edit", "--out", out]), "8x8")


def _registered(name: str) -> bool:
    try:
        get_inverse(name)
        return True
    except Exception:
        return False


@pytest.mark.parametrize("method,sets", [("flair", ["steps=6"]), ("flowopt", ["iterations=2"]),
                                         ("dps", ["steps=6"])])
def test_registered_solvers_through_the_cli(prior, digits, tmp_path, method, sets) -> None:
    if not _registered(method):
        pytest.skip(f"solver {method} not available")
    from fewflow.cli.restore import _solver_config

    spec = get_inverse(method)
    sets = [s for s in sets if s.split("=")[0] in spec.config.__dataclass_fields__]
    folder, _ = digits
    args = ["restore", prior, "--task", "inpaint", "--truth", folder / "batch.npy", "--method", method,
            "--out", tmp_path / method]
    for s in sets:
        args += ["--set", s]
    _solver_config(spec, tuple(sets))
    r = run(args)
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / method / "metrics.json").read_text())
    assert math.isfinite(m["psnr_mean"]) and m["nfe"] > 0 and math.isfinite(m["residual_mean"])


def test_flowopt_edit_through_the_cli(prior, digits, tmp_path) -> None:
    if not _registered("flowopt"):
        pytest.skip("solver flowopt not available")
    folder, _ = digits
    out = tmp_path / "fo"
    # no --from-class: the digits classifier names the input's class
    r = run(["edit", prior, "--input", folder / "one.npy", "--to-class", 8, "--set", "iterations=2", "--set",
             "steps=6", "--out", out])
    assert r.exit_code == 0, r.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["from_class_source"] == "classifier" and m["solver"] == "flowopt"
    assert m["solver_config"]["iterations"] == 2 and m["nfe"] > 0
    assert np.load(out / "edited.npy").shape == (1, 1, 8, 8) and math.isfinite(m["mse_to_input_mean"])
