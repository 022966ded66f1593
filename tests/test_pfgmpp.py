"""PFGM++: the D-augmented kernel against its closed forms, the D -> inf limit (EDM exactly), the heavy-
tailed prior, a trained denoiser against the optimal one, and the CLI."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fewflow._validate import FewflowError
from fewflow.objectives.pfgmpp import (
    DenoiserInTime,
    PFGMPPDenoiser,
    PFGMPPLoss,
    PFGMPPSampler,
    edm_preconditioning,
    pfgmpp_sample,
    sampler_steps,
)
from fewflow.paths.pfgmpp import (
    as_aug_dim,
    perturb,
    prior_from_gaussian,
    radius_logpdf,
    sample_prior,
    sample_radius,
    sigma_of_t,
    t_of_sigma,
)

torch.set_num_threads(1)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------- the kernel


def test_radius_moments_and_cdf_match_the_beta_prime_law():
    special = pytest.importorskip("scipy.special")
    N, D, sigma = 8, 16.0, 0.7
    R = sample_radius(torch.full((200_000,), sigma, dtype=torch.float64), N, D, generator=_gen(1))
    r2 = sigma**2 * D
    # E R^2 = r^2 E[BetaPrime(N/2, D/2)] = r^2 (N/2) / (D/2 - 1)
    assert float((R**2).mean()) == pytest.approx(r2 * (N / 2) / (D / 2 - 1), rel=0.02)
    # CDF: P(R <= q) = I_{q^2 / (q^2 + r^2)}(N/2, D/2)
    qs = torch.quantile(R, torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.float64))
    emp = torch.tensor([float((R <= q).double().mean()) for q in qs])
    exact = torch.tensor([special.betainc(N / 2, D / 2, float(q**2 / (q**2 + r2))) for q in qs])
    assert torch.allclose(emp, exact.to(emp.dtype), atol=0.005)
    # the log-density integrates to 1 and its derivative of the closed-form CDF agrees
    grid = torch.linspace(1e-4, 30.0, 200_001, dtype=torch.float64)
    dens = radius_logpdf(grid, sigma, N, D).exp()
    assert float(torch.trapezoid(dens, grid)) == pytest.approx(1.0, abs=1e-4)
    q = 2.0
    h = 1e-5
    cdf = [special.betainc(N / 2, D / 2, (v * v) / (v * v + r2)) for v in (q - h, q + h)]
    assert float(radius_logpdf(torch.tensor(q), sigma, N, D).exp()) == pytest.approx(
        (cdf[1] - cdf[0]) / (2 * h), rel=1e-5)


def test_perturbed_samples_have_student_t_variance_and_uniform_directions():
    y = torch.randn(40_000, 4, generator=_gen(2))
    y_copy = y.clone()
    sigma, D = 0.5, 10.0
    x, noise = perturb(y, torch.full((40_000,), sigma), D, generator=_gen(3))
    assert torch.equal(y, y_copy)  # inputs untouched
    assert torch.allclose(x, y + noise)
    var = noise.var(0)
    assert torch.allclose(var, torch.full((4,), sigma**2 * D / (D - 2)), rtol=0.05)
    u = noise / noise.norm(dim=1, keepdim=True)
    assert u.mean(0).abs().max() < 0.02
    assert torch.allclose((u**2).mean(0), torch.full((4,), 0.25), atol=0.01)


def test_large_D_recovers_the_gaussian_kernel_and_inf_is_exact():
    n, N, sigma = 100_000, 3, 1.3
    y = torch.zeros(n, N, dtype=torch.float64)
    _, noise = perturb(y, torch.full((n,), sigma, dtype=torch.float64), 1e6, generator=_gen(4))
    z = noise / sigma
    assert torch.allclose(z.var(0), torch.ones(N, dtype=torch.float64), rtol=0.02)
    kurt = (z**4).mean(0) / (z**2).mean(0) ** 2
    assert torch.allclose(kurt, torch.full((N,), 3.0, dtype=torch.float64), atol=0.1)
    # D = inf draws exactly sigma * N(0, I) with the same generator (EDM's noise)
    _, n_inf = perturb(y[:10], torch.full((10,), sigma, dtype=torch.float64), math.inf, generator=_gen(5))
    assert torch.equal(n_inf, sigma * torch.randn(10, N, generator=_gen(5), dtype=torch.float64))
    assert as_aug_dim("inf") == math.inf


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), "many", True])
def test_non_positive_D_is_refused(bad):
    with pytest.raises(FewflowError, match="D"):
        as_aug_dim(bad)
    with pytest.raises(FewflowError):
        PFGMPPLoss(D=bad)
    with pytest.raises(FewflowError):
        perturb(torch.zeros(2, 3), torch.ones(2), bad)


def test_prior_is_heavy_tailed_for_small_D():
    N, n = 16, 100_000
    small = sample_prior(n, (N,), 1.0, 8.0, generator=_gen(6), dtype=torch.float64)
    gauss = sample_prior(n, (N,), 1.0, math.inf, generator=_gen(7), dtype=torch.float64)

    def excess_kurtosis(x):
        return float(((x**4).mean() / (x**2).mean() ** 2) - 3.0)

    # a coordinate of a Student-t with D degrees has excess kurtosis 6 / (D - 4) = 1.5 for D = 8
    assert excess_kurtosis(small) > 0.9
    assert abs(excess_kurtosis(gauss)) < 0.1
    # the sampler's prior (scale mixture of the Gaussian source) has the same radius law
    mixed = prior_from_gaussian(torch.randn(n, N, generator=_gen(8), dtype=torch.float64), 1.0, 8.0,
                                generator=_gen(9))
    p = torch.tensor([0.1, 0.5, 0.9, 0.99], dtype=torch.float64)
    q_mixed, q_small = torch.quantile(mixed.norm(dim=1), p), torch.quantile(small.norm(dim=1), p)
    assert torch.allclose(q_mixed, q_small, rtol=0.03)


def test_time_map_is_the_karras_grid():
    t = torch.linspace(0, 1, 18, dtype=torch.float64)
    s = sigma_of_t(t)
    i = torch.arange(18, dtype=torch.float64)
    karras = (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert torch.allclose(s, karras, rtol=1e-12)
    assert torch.allclose(t_of_sigma(s), t, atol=1e-12)
    with pytest.raises(FewflowError):
        sigma_of_t(t, sigma_min=1.0, sigma_max=0.5)


# ------------------------------------------------------------------------------------- D = inf is EDM


class _GaussDenoiser(torch.nn.Module):
    """The exact denoiser of data N(m, s^2 I) under Gaussian noise: (s^2 x + sigma^2 m) / (s^2 + sigma^2)."""

    def __init__(self, m: torch.Tensor, s: float) -> None:
        super().__init__()
        self.m, self.s = m, s
        self.calls = 0

    def forward(self, x, sigma, **cond):
        self.calls += 1
        s2 = sigma.view(-1, *([1] * (x.dim() - 1))) ** 2
        return (self.s**2 * x + s2 * self.m) / (self.s**2 + s2)


def _edm_heun(net, latents, num_steps, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """Karras et al. (2022) Algorithm 1, written out independently (float64)."""
    idx = torch.arange(num_steps, dtype=torch.float64)
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    ts = (a + idx / (num_steps - 1) * (b - a)) ** rho
    ts = torch.cat([ts, torch.zeros(1, dtype=torch.float64)])
    x = latents * ts[0]
    for i in range(num_steps):
        tc, tn = ts[i], ts[i + 1]
        d = (x - net(x, tc.expand(x.shape[0]))) / tc
        xn = x + (tn - tc) * d
        if i < num_steps - 1:
            d2 = (xn - net(xn, tn.expand(x.shape[0]))) / tn
            xn = x + (tn - tc) * (0.5 * d + 0.5 * d2)
        x = xn
    return x


def test_D_inf_sampler_equals_edm_heun_and_counts_2K_plus_1_evaluations():
    z = torch.randn(64, 2, generator=_gen(10), dtype=torch.float64)
    z_copy = z.clone()
    net = _GaussDenoiser(torch.tensor([1.0, -2.0], dtype=torch.float64), 0.3)
    ours = pfgmpp_sample(net, z, nfe=35, D="inf")
    assert net.calls == 35 and sampler_steps(35) == 17
    assert torch.equal(z, z_copy)
    ref = _edm_heun(net, z, 18)
    assert torch.allclose(ours, ref, atol=1e-9, rtol=1e-9)
    # and it samples the data law: N(m, s^2 I)
    z = torch.randn(20_000, 2, generator=_gen(11), dtype=torch.float64)
    x = pfgmpp_sample(net, z, nfe=101, D="inf")  # fine enough that the discretisation error is < 2 %
    assert torch.allclose(x.mean(0), net.m, atol=0.02)
    assert torch.allclose(x.std(0), torch.full((2,), 0.3, dtype=torch.float64), rtol=0.03)


def test_D_inf_loss_equals_edm_loss():
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 3).double()

    class Backbone(torch.nn.Module):
        def forward(self, x, c_noise):
            return lin(x) * (1 + c_noise[:, None])

    net = PFGMPPDenoiser(Backbone(), sigma_data=0.5)
    y = torch.randn(32, 3, generator=_gen(12), dtype=torch.float64)
    out = PFGMPPLoss(D=math.inf)(net, y, generator=_gen(13))
    g = _gen(13)  # EDM: ln sigma ~ N(-1.2, 1.2^2), n ~ sigma N(0, I), weight (s^2 + sd^2) / (s sd)^2
    sigma = (torch.randn(32, generator=g, dtype=torch.float64) * 1.2 - 1.2).exp()
    n = torch.randn(32, 3, generator=g, dtype=torch.float64) * sigma[:, None]
    c_skip, c_out, c_in, c_noise = edm_preconditioning(sigma, 0.5)
    x = y + n
    den = c_skip[:, None] * x + c_out[:, None] * lin(c_in[:, None] * x) * (1 + c_noise[:, None])
    w = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    ref = (w * ((den - y) ** 2).mean(1)).mean()
    assert torch.allclose(out.loss, ref, rtol=1e-12)


def test_sampler_noise_options_are_reproducible_and_change_samples():
    net = _GaussDenoiser(torch.zeros(4, dtype=torch.float64), 0.5)
    z = torch.randn(256, 4, generator=_gen(14), dtype=torch.float64)
    base = pfgmpp_sample(net, z, nfe=9, D=16, generator=_gen(15))
    again = pfgmpp_sample(net, z, nfe=9, D=16, generator=_gen(15))
    noisy = pfgmpp_sample(net, z, nfe=9, D=16, alpha=0.2, generator=_gen(15))
    churn = pfgmpp_sample(net, z, nfe=9, D=16, S_churn=10.0, generator=_gen(15))
    assert torch.equal(base, again)
    assert not torch.allclose(base, noisy) and not torch.allclose(base, churn)
    with pytest.raises(FewflowError):
        PFGMPPSampler(0)
    with pytest.raises(FewflowError):
        PFGMPPSampler(3, alpha=-1.0)


# ----------------------------------------------------------------------- trained vs optimal denoiser


def _optimal_denoiser(x, sigma, m, s, D, n_w=20_000):
    """E[y | x] for y ~ N(m, s^2 I_N) and the PFGM++ kernel (a Student-t, i.e. a Gaussian scale mixture
    with variance tau^2 = sigma^2 D / W, W ~ chi^2_D): a Monte-Carlo average over W of the Gaussian
    posterior means, weighted by the marginal likelihood N(x; m, (s^2 + tau^2) I)."""
    N = x.shape[1]
    w = torch.distributions.Chi2(torch.tensor(float(D), dtype=torch.float64)).sample((n_w,))
    tau2 = sigma**2 * D / w  # (n_w,)
    v = s**2 + tau2
    d2 = ((x - m) ** 2).sum(1)  # (B,)
    logp = -0.5 * N * v.log()[None, :] - 0.5 * d2[:, None] / v[None, :]
    p = torch.softmax(logp, dim=1)  # (B, n_w)
    coef = (s**2 / v)[None, :]  # posterior mean = m + s^2 / v (x - m)
    return m + (p * coef).sum(1, keepdim=True) * (x - m)


def test_trained_denoiser_matches_the_optimal_one_on_gaussian_data():
    from fewflow.models import MLP

    torch.manual_seed(0)
    m, s, D = torch.tensor([0.5, -0.5]), 0.4, 4.0
    net = PFGMPPDenoiser(MLP(2, hidden=64, depth=2), sigma_data=0.5)
    loss = PFGMPPLoss(D=D, P_mean=0.0, P_std=0.7)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    g = _gen(16)
    for _ in range(500):
        y = m + s * torch.randn(256, 2, generator=g)
        out = loss(net, y, generator=g)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    torch.manual_seed(1)
    x = m + 1.0 * torch.randn(200, 2, generator=g)
    for sigma in (0.5, 1.0, 2.0):
        with torch.no_grad():
            got = net(x, torch.full((200,), sigma)).double()
        opt_d = _optimal_denoiser(x.double(), sigma, m.double(), s, D)
        gauss = m.double() + s**2 / (s**2 + sigma**2) * (x.double() - m.double())
        err = float((got - opt_d).norm(dim=1).mean())
        assert err < 0.1, (sigma, err)
        if sigma == 0.5:  # there the heavy-tailed optimum is far from the Gaussian one; training finds it
            assert err < 0.5 * float((got - gauss).norm(dim=1).mean()), sigma


# ------------------------------------------------------------------------------------------------ the CLI


def test_cli_train_and_sample_on_moons(tmp_path):
    from cli_helpers import assert_one_line_error, invoke

    out = tmp_path / "r"
    r = invoke(["train", "--data", "moons", "--method", "pfgmpp", "--steps", "20", "--out", out,
                "--n", "2000", "--batch-size", "64", "--no-progress", "--set", "method.hidden=32",
                "--set", "method.depth=2",
                "--set", "method.D=inf", "--set", "train.ckpt_every=0", "--set", "train.log_every=0"])
    assert r.exit_code == 0, r.output + r.stderr
    r = invoke(["sample", out, "--n", "32", "--nfe", "7", "--out", tmp_path / "s.npy"])
    assert r.exit_code == 0, r.output + r.stderr
    x = np.load(tmp_path / "s.npy")
    assert x.shape == (32, 2) and np.isfinite(x).all()
    r = invoke(["train", "--data", "moons", "--method", "pfgmpp", "--steps", "2", "--out", tmp_path / "bad",
                "--set", "method.D=0", "--no-progress"])
    assert_one_line_error(r, "D")


def test_denoiser_in_time_maps_t_to_sigma():
    net = _GaussDenoiser(torch.zeros(2, dtype=torch.float64), 1.0)
    f = DenoiserInTime(net)
    x = torch.ones(3, 2, dtype=torch.float64)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    assert torch.allclose(f(x, t), net(x, sigma_of_t(t)))
