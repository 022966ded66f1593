"""FLAIR and the DPS baseline against exact Gaussian posteriors; calibration against a closed form."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from fewflow._validate import FewflowError
from fewflow.analytic import GaussianFlow
from fewflow.inverse import get_inverse, list_inverse
from fewflow.inverse.dps import DPSConfig
from fewflow.inverse.dps import solve as dps_solve
from fewflow.inverse.flair import FlairConfig, calibrate, crw_weights, solve
from fewflow.inverse.operators import AvgPoolSR, Mask, Measurement, measure
from fewflow.paths import LinearSchedule

torch.set_num_threads(1)
D, SIGMA, B = 16, 0.05, 512
DOCS = Path(__file__).resolve().parents[1] / "docs" / "methods"


def _prior(seed: int = 0, shift: float = 0.0) -> tuple[GaussianFlow, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(D, D, generator=g, dtype=torch.float64) / 4
    cov = a @ a.T + 0.05 * torch.eye(D, dtype=torch.float64)
    mean = torch.randn(D, generator=g, dtype=torch.float64) * 0.5 + shift
    return GaussianFlow(mean, cov, LinearSchedule()), mean, cov


def _posterior_mean(mean, cov, obs, y, sigma):
    """Exact E[x | y] for x ~ N(mean, cov), y = x[obs] + sigma n."""
    s_oo = cov[obs][:, obs] + sigma**2 * torch.eye(int(obs.sum()), dtype=cov.dtype)
    return mean + (y - mean[obs]) @ torch.linalg.solve(s_oo, cov[obs, :])


@pytest.fixture(scope="module")
def problem():
    """One measurement of the even coordinates, replicated over a batch of B independent runs."""
    prior, mean, cov = _prior()
    g = torch.Generator().manual_seed(1)
    obs = torch.zeros(D, dtype=torch.bool)
    obs[::2] = True
    op = Mask(obs)
    one = measure(prior.sample(1, generator=g), op, SIGMA, generator=g)
    meas = Measurement(one.y.expand(B, -1).clone(), op, SIGMA)
    post = _posterior_mean(mean, cov, obs, one.y[0], SIGMA)
    curve = calibrate(prior, prior.sample(2000, generator=g), generator=g)
    return prior, mean, cov, obs, meas, post, curve


def test_calibrate_matches_closed_form():
    s2, c = 0.36, 0.3
    prior = GaussianFlow(torch.full((4,), 0.5), torch.full((4,), s2), LinearSchedule())
    x = prior.sample(4000, generator=torch.Generator().manual_seed(0))
    t = torch.linspace(0, 1, 11)
    exact = s2 / (t**2 * s2 + (1 - t) ** 2)  # irreducible v-MSE per dim of an exact prior
    got = calibrate(prior, x, bins=11, generator=torch.Generator().manual_seed(1))
    assert got.shape == (11,) and got.dtype == x.dtype
    assert torch.allclose(got, exact, rtol=0.06)
    biased = calibrate(lambda z, tt: prior(z, tt) + c, x, bins=11, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(biased - got, torch.full((11,), c * c), atol=0.03)  # + c^2 from a constant bias
    w = crw_weights(got)
    assert abs(float(w.mean()) - 1.0) < 1e-6
    assert torch.allclose(w * got, (w * got)[0].expand(11), rtol=1e-5)  # w proportional to 1 / mse


def test_flair_mean_approaches_exact_posterior_mean(problem):
    prior, mean, cov, obs, meas, post, curve = problem
    y0 = meas.y.clone()
    res = solve(prior, meas, FlairConfig(), generator=torch.Generator().manual_seed(2), calibration=curve)
    assert torch.equal(meas.y, y0) and res.nfe == 50 and len(res.history) == 50
    est = res.x.mean(0)
    prior_gap = float(((mean - post)[~obs] ** 2).mean())
    err_missing = float(((est - post)[~obs] ** 2).mean())
    err_obs = float(((est - post)[obs] ** 2).mean())
    assert err_missing < 0.08 * prior_gap, (err_missing, prior_gap)
    assert err_obs < 0.1 * SIGMA**2
    again = solve(prior, meas, FlairConfig(), generator=torch.Generator().manual_seed(2), calibration=curve)
    assert torch.equal(again.x, res.x)


def test_hdc_reaches_noise_floor_and_ablation_does_not(problem):
    prior, _, _, _, meas, _, curve = problem
    floor = SIGMA * meas.m**0.5
    cfg = FlairConfig(lr_data=0.5, data_steps=50)
    res = solve(prior, meas, cfg, generator=torch.Generator().manual_seed(3), calibration=curve)
    r = meas.residual(res.x)
    assert float(r.max()) <= floor * 1.001  # every sample stopped at or below the floor...
    assert float(r.mean()) > 0.4 * floor  # ...without fitting the noise to zero (early stop)
    assert min(h["data_steps"] for h in res.history) < 50
    soft = solve(prior, meas, dataclasses.replace(cfg, hdc=False), generator=torch.Generator().manual_seed(3),
                 calibration=curve)
    assert float(meas.residual(soft.x).mean()) > 3 * floor


def test_dps_approaches_exact_posterior_mean(problem):
    prior, mean, _, obs, meas, post, curve = problem
    res = dps_solve(prior, meas, DPSConfig(), generator=torch.Generator().manual_seed(4))
    assert res.nfe == 300
    est = res.x.mean(0)
    prior_gap = float(((mean - post)[~obs] ** 2).mean())
    err = float(((est - post)[~obs] ** 2).mean())
    assert err < 0.4 * prior_gap
    flair = solve(prior, meas, FlairConfig(), generator=torch.Generator().manual_seed(2), calibration=curve)
    assert float(((flair.x.mean(0) - post)[~obs] ** 2).mean()) < err  # FLAIR's mean is the less biased
    floor = SIGMA * meas.m**0.5
    assert 0.5 * floor < float(meas.residual(res.x).mean()) < 2 * floor
    free = dps_solve(prior, meas, DPSConfig(zeta=0.0), generator=torch.Generator().manual_seed(4))
    assert float(meas.residual(free.x).mean()) > 5 * floor  # no guidance: plain prior samples


def test_latent_prior_through_decode(problem):
    """A prior on z with x = Q z (Q orthogonal): FLAIR in latent space still targets E[x | y]."""
    _, mean, cov, obs, meas, post, _ = problem
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(5), dtype=torch.float64))
    latent = GaussianFlow(q.T @ mean, q.T @ cov @ q, LinearSchedule())
    res = solve(latent, meas, FlairConfig(crw=False), generator=torch.Generator().manual_seed(6),
                encode=lambda x: x @ q, decode=lambda z: z @ q.T)
    assert res.z is not None and torch.allclose(res.x, res.z @ q.T)
    gap = float(((mean - post)[~obs] ** 2).mean())
    assert float(((res.x.mean(0) - post)[~obs] ** 2).mean()) < 0.05 * gap


def test_images_super_resolution():
    """Image-shaped prior (B, 1, 4, 4) with x2 average pooling: FLAIR's mean lands near E[x | y], far
    closer than the pseudo-inverse (nearest upsampling)."""
    prior, mean, cov = _prior(7)
    op = AvgPoolSR(2)
    x = prior.sample(1, generator=torch.Generator().manual_seed(8)).reshape(1, 1, 4, 4)
    one = measure(x, op, SIGMA, generator=torch.Generator().manual_seed(9))
    meas = Measurement(one.y.expand(256, -1, -1, -1).clone(), op, SIGMA)
    a = op(torch.eye(D, dtype=torch.float64).reshape(D, 1, 4, 4)).reshape(D, 4).T  # (4, 16) matrix of A
    s_yy = a @ cov @ a.T + SIGMA**2 * torch.eye(4, dtype=torch.float64)
    post = mean + (one.y.reshape(4) - a @ mean) @ torch.linalg.solve(s_yy, a @ cov)
    cfg = FlairConfig.for_task("sr2", crw=False)
    res = solve(prior, meas, cfg, generator=torch.Generator().manual_seed(1))
    assert res.x.shape == (256, 1, 4, 4)
    err = float(((res.x.reshape(256, D).mean(0) - post) ** 2).mean())
    base = float(((op.pinv(one.y).reshape(D) - post) ** 2).mean())
    assert err < 0.1 * base, (err, base)


def test_registry_lists_both_solvers():
    names = {s.name for s in list_inverse("restore")}
    assert {"flair", "dps"} <= names
    flair, dps = get_inverse("flair"), get_inverse("dps")
    assert flair.config is FlairConfig and dps.config is DPSConfig
    assert flair.solve is solve and dps.solve is dps_solve
    assert "2506.02680" in flair.paper and "2209.14687" in dps.paper
    assert (DOCS / f"{flair.docs}.md").exists() and (DOCS / f"{dps.docs}.md").exists()
    with pytest.raises(FewflowError, match="unknown inverse solver"):
        get_inverse("flairr")


def test_defaults_and_for_task():
    cfg = FlairConfig()
    assert (cfg.steps, cfg.t_min, cfg.lr_reg, cfg.lr_data, cfg.data_steps) == (50, 0.18, 1.0, 0.1, 15)
    assert (cfg.early_stop, cfg.reg_weight, cfg.dta, cfg.hdc, cfg.crw) == (1e-4, 0.5, True, True, True)
    assert FlairConfig.for_task("sr4").lr_data == 1.6 and FlairConfig.for_task("inpaint").lr_data == 0.1
    assert dataclasses.replace(cfg, dta=False).dta is False


def test_errors(problem):
    prior, _, _, _, meas, _, curve = problem
    with pytest.raises(FewflowError, match="calibrate"):
        solve(prior, meas, FlairConfig())
    with pytest.raises(FewflowError, match="Measurement"):
        solve(prior, meas.y, FlairConfig(crw=False))
    with pytest.raises(FewflowError, match="1-D"):
        solve(prior, meas, FlairConfig(), calibration=curve[None])
    with pytest.raises(FewflowError, match="t_min"):
        FlairConfig(t_min=1.0)
    with pytest.raises(FewflowError, match="lr_data"):
        FlairConfig(lr_data=-1)
    with pytest.raises(FewflowError, match="steps"):
        FlairConfig(steps=0)
    with pytest.raises(FewflowError, match="true or false"):
        FlairConfig(dta="yes")
    with pytest.raises(FewflowError, match="zeta"):
        DPSConfig(zeta=-1.0)
    with pytest.raises(FewflowError, match="FlairConfig"):
        solve(prior, meas, DPSConfig())
    with pytest.raises(FewflowError, match="bins"):
        calibrate(prior, torch.zeros(4, D), bins=1)
    with pytest.raises(FewflowError, match="non-finite"):
        calibrate(prior, torch.full((4, D), float("nan")))
    with pytest.raises(FewflowError, match="diverged"):
        solve(prior, meas, FlairConfig(crw=False, lr_data=1e6))
