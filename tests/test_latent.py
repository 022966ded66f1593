"""Latent flow matching: the autoencoder method, ``fewflow train --latent AE_RUN`` and decoding samples."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import assert_one_line_error, invoke
from click.testing import CliRunner

from fewflow import FewflowError
from fewflow.cli.main import cli
from fewflow.config import default_config
from fewflow.data import load_dataset
from fewflow.models.autoencoder import ConvAutoencoder, build_autoencoder, gaussian_kl
from fewflow.objectives.autoencoder import AutoencoderLoss

TINY = ["--no-progress", "--set", "train.ckpt_every=0", "--set", "train.log_every=0", "--batch-size", "64"]


@pytest.fixture(scope="module")
def ae_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ae") / "ae"
    r = invoke(["train", "--data", "digits", "--method", "autoencoder", "--steps", "20", "--out", out, *TINY,
                "--set", "method.width=8"])
    assert r.exit_code == 0, r.output + r.stderr
    return out


@pytest.fixture(scope="module")
def latent_run(ae_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lfm") / "lfm"
    r = invoke(["train", "--data", "digits", "--latent", ae_run, "--steps", "5", "--out", out, *TINY,
                "--set", "model.hidden=32", "--set", "model.depth=2"])
    assert r.exit_code == 0, r.output + r.stderr
    return out


def test_autoencoder_reconstructs_digits():
    torch.manual_seed(0)
    x = load_dataset("digits").x
    ae = ConvAutoencoder(1, 8, channels=16, latent_channels=2, downsample=1)
    assert ae.latent_shape == (2, 4, 4)
    loss = AutoencoderLoss()
    opt = torch.optim.Adam(ae.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(100):
        idx = torch.randint(0, x.shape[0], (128,), generator=gen)
        out = loss(ae, x[idx])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    with torch.no_grad():
        mse = float((ae(x).recon - x).pow(2).mean())
    var = float(x.var(0).mean())  # per-pixel variance: the MSE of predicting the mean image
    assert mse < 0.25 * var, (mse, var)  # a quarter of the variance: the codes carry the digits


def test_vae_kl_matches_closed_form_and_enters_the_loss():
    g = torch.Generator().manual_seed(1)
    mean, logvar = torch.randn(5, 3, 2, 2, generator=g), torch.randn(5, 3, 2, 2, generator=g)
    q = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    ref = torch.distributions.kl_divergence(q, p).flatten(1).sum(1)
    torch.testing.assert_close(gaussian_kl(mean, logvar), ref)
    torch.testing.assert_close(gaussian_kl(torch.zeros(2, 4), torch.zeros(2, 4)), torch.zeros(2))
    # the loss is MSE + beta KL / P with the same posterior draw
    vae = build_autoencoder((1, 8, 8), width=8, variational=True)
    x = torch.randn(6, 1, 8, 8, generator=g)
    beta = 0.5
    out = AutoencoderLoss(beta=beta)(vae, x, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        o = vae(x, sample=True, generator=torch.Generator().manual_seed(3))
        want = ((o.recon - x).pow(2).flatten(1).mean(1) + beta * gaussian_kl(o.mean, o.logvar) / 64).mean()
    torch.testing.assert_close(out.loss.detach(), want)
    assert out.diagnostics["kl"] > 0
    with pytest.raises(FewflowError, match="beta"):
        AutoencoderLoss(beta=-1.0)


def test_latent_scale_makes_latents_unit_variance(ae_run):
    from fewflow.runs import latent_data, load_run

    cfg = default_config("digits")
    cfg.latent = str(ae_run)
    data = load_dataset("digits")
    before = data.x.clone()
    lat, rec = latent_data(cfg, data)
    assert torch.equal(data.x, before)  # the data set is not modified
    assert lat.x.shape[1:] == (1, 4, 4) and rec["shape"] == [1, 4, 4] and rec["data_shape"] == [1, 8, 8]
    assert abs(float(lat.x.std()) - 1.0) < 1e-4
    ae, _ = load_run(ae_run)
    with torch.no_grad():
        raw = ae.encode_mean(data.x)
    np.testing.assert_allclose(rec["scale"], 1.0 / float(raw.double().std()), rtol=1e-5)
    assert torch.equal(lat.y, data.y)


def test_train_latent_and_sample_decoded_images(latent_run, ae_run, tmp_path):
    cfg = json.loads((latent_run / "config.json").read_text())["run_config"]
    lat = cfg["meta"]["latent"]
    assert cfg["meta"]["shape"] == [1, 4, 4] and lat["ae_run"] == str(Path(ae_run).resolve())
    assert len(lat["ae_sha256"]) == 64 and lat["scale"] > 0
    r = invoke(["sample", latent_run, "--n", "12", "--nfe", "4", "--out", tmp_path / "s.npy"])
    assert r.exit_code == 0, r.output + r.stderr
    x = np.load(tmp_path / "s.npy")
    assert x.shape == (12, 1, 8, 8) and np.isfinite(x).all()
    # decoding is D(z / s): the same as calling the decoder by hand on the latent samples
    from fewflow.runs import load_run
    from fewflow.sampling import generate

    model, rc = load_run(latent_run)
    z = generate(model, rc, 12, nfe=4, generator=torch.Generator().manual_seed(0), decode=False).x
    ae, _ = load_run(ae_run)
    with torch.no_grad():
        want = ae.decode(z / lat["scale"])
    np.testing.assert_allclose(x, want.numpy(), atol=1e-5)
    r = invoke(["sample", latent_run, "--n", "16", "--nfe", "2", "--out", tmp_path / "s.png"])
    assert r.exit_code == 0 and (tmp_path / "s.png").stat().st_size > 0


def test_latent_input_errors(ae_run, latent_run, tmp_path):
    moons_ae = tmp_path / "moons_ae"
    r = invoke(["train", "--data", "moons", "--method", "autoencoder", "--steps", "2", "--n", "256",
                "--out", moons_ae, *TINY])
    assert r.exit_code == 0, r.output + r.stderr
    run = CliRunner().invoke(cli, ["train", "--data", "digits", "--latent", str(moons_ae), "--steps", "2",
                                   "--out", str(tmp_path / "a"), *TINY])
    assert_one_line_error(run, "shape (2,)", "(1, 8, 8)")
    run = CliRunner().invoke(cli, ["train", "--data", "digits", "--latent", str(latent_run), "--steps", "2",
                                   "--out", str(tmp_path / "b"), *TINY])
    assert_one_line_error(run, "not an autoencoder run")
    run = CliRunner().invoke(cli, ["train", "--data", "digits", "--latent", str(ae_run), "--method",
                                   "autoencoder", "--steps", "2", "--out", str(tmp_path / "c"), *TINY])
    assert_one_line_error(run, "drop --latent")


def test_changed_autoencoder_is_refused(ae_run, latent_run, tmp_path):
    import shutil

    from fewflow.runs import load_run
    from fewflow.sampling import generate

    copy = tmp_path / "ae_copy"
    shutil.copytree(ae_run, copy)
    model, rc = load_run(latent_run)
    rc.meta["latent"] = {**rc.meta["latent"], "ae_run": str(copy), "ae_sha256": "0" * 64}
    with pytest.raises(FewflowError, match="has changed"):
        generate(model, rc, 4, nfe=2)


def test_latent_run_samples_in_a_fresh_process_without_data(latent_run, tmp_path):
    code = (
        "import sys, torch, fewflow.data as d\n"
        "def boom(*a, **k): raise RuntimeError('data loaded')\n"
        "d.load_dataset = boom\n"
        "from fewflow.runs import load_run\n"
        "from fewflow.sampling import generate\n"
        "m, cfg = load_run(sys.argv[1])\n"
        "x = generate(m, cfg, 5, nfe=3, generator=torch.Generator().manual_seed(0)).x\n"
        "print(tuple(x.shape), bool(torch.isfinite(x).all()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(latent_run)], capture_output=True, text=True,
                         timeout=120, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("(5, 1, 8, 8) True")
