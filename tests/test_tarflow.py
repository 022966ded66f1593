"""TARFlow: exact log-determinant, invertibility, Jacobi = sequential inversion, causality, bits/dim in
closed form, and the paper's effects at tiny scale on digits (likelihood training, Bayes classification,
score denoising), plus the video mode's causality across frames."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from fewflow._validate import FewflowError
from fewflow.data import load_dataset
from fewflow.data.clips import moving_digit_clips
from fewflow.models.tarflow import TARFlow, TokenDenoiser
from fewflow.objectives.tarflow import (
    TARFlowLoss,
    bayes_classify,
    bits_per_dim,
    detect_bin_width,
    jacobi_sample,
    log_likelihood,
    sample,
    sequential_sample,
)

torch.set_num_threads(1)


def _random_flow(shape=(1, 4, 4), video=False, classes=3, blocks=3, seed=0) -> TARFlow:
    """A tiny float64 flow with all weights random (the zero-initialised output layer too)."""
    torch.manual_seed(seed)
    m = TARFlow(shape, patch=2, width=16, layers=1, blocks=blocks, heads=2, num_classes=classes,
                video=video).double()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.3)
    return m


def test_logdet_equals_autograd_jacobian():
    m = _random_flow()
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    _, logdet = m(x, y)
    for i in range(3):
        jac = torch.autograd.functional.jacobian(
            lambda v, i=i: m(v.reshape(1, 1, 4, 4), y[i:i + 1])[0].reshape(-1), x[i].reshape(-1))
        sign, ld = torch.linalg.slogdet(jac)
        assert float(sign) > 0
        assert float(ld) == pytest.approx(float(logdet[i].detach()), abs=1e-10)
    # log_prob is the change of variables with a standard normal prior
    z, _ = m(x, y)
    ref = torch.distributions.Normal(0.0, 1.0).log_prob(z).flatten(1).sum(1) + logdet
    torch.testing.assert_close(log_likelihood(m, x, y), ref)


def test_inverse_of_forward_and_jacobi_equals_sequential():
    m = _random_flow()
    x = torch.randn(4, 1, 4, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0])
    x_in = x.clone()
    z, _ = m(x, y)
    xs, st_s = m.inverse(z, y, method="sequential")
    torch.testing.assert_close(xs, x, atol=1e-10, rtol=0)
    xj, st_j = m.inverse(z, y, method="jacobi", threshold=0.0)
    torch.testing.assert_close(xj, x, atol=1e-10, rtol=0)
    assert st_s.total == 3 * 3 and max(st_j.iterations) <= 4  # T - 1 calls vs <= T sweeps per block
    torch.testing.assert_close(x, x_in)  # inputs untouched
    # chunked Jacobi is exact too
    xc, _ = m.inverse(z, y, method="jacobi", threshold=0.0, chunk=2)
    torch.testing.assert_close(xc, x, atol=1e-10, rtol=0)


def test_per_token_guidance_is_the_guided_fixed_point():
    """With guidance g the inverse solves x_i = z_i exp(a~_i) + b~_i, a~ = a + g (a - a_null) (same for b),
    sequentially and by Jacobi alike; g = 0 is the plain inverse."""
    m = _random_flow(blocks=1)
    z = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    xs, _ = m.inverse(z, y, method="sequential", guidance=1.5)
    xj, _ = m.inverse(z, y, method="jacobi", threshold=0.0, guidance=1.5)
    torch.testing.assert_close(xs, xj, atol=1e-10, rtol=0)
    blk = m.blocks[0]
    h = m.tokenize(xs)
    a, b = blk._params_ordered(h, y)
    an, bn = blk._params_ordered(h, torch.full_like(y, 3))
    rhs = m.tokenize(z) * torch.exp(a + 1.5 * (a - an)) + b + 1.5 * (b - bn)
    torch.testing.assert_close(h, rhs, atol=1e-10, rtol=0)
    x0, _ = m.inverse(z, y, method="sequential")
    torch.testing.assert_close(m.inverse(z, y, method="sequential", guidance=0.0)[0], x0)
    assert float((x0 - xs).abs().max()) > 1e-3


def test_jacobi_needs_fewer_sweeps_than_tokens_on_a_mild_flow():
    """With a near-identity flow (small a, b), Jacobi meets the threshold in far fewer sweeps than the
    T - 1 sequential steps per block and agrees with the sequential samples to tolerance."""
    torch.manual_seed(1)
    m = TARFlow((1, 8, 8), patch=1, width=16, layers=1, blocks=2, heads=2)
    with torch.no_grad():
        for blk in m.blocks:
            blk.proj_out.weight.normal_(0.0, 0.02)
    g = torch.Generator().manual_seed(0)
    res_j = jacobi_sample(m, 8, threshold=1e-8, denoise="none", generator=g)
    res_s = sequential_sample(m, z=res_j.z, denoise="none")
    torch.testing.assert_close(res_j.x, res_s.x, atol=1e-4, rtol=0)
    assert res_s.stats.total == 2 * 63
    assert res_j.stats.total < res_s.stats.total / 3, res_j.stats.iterations


def test_block_causality():
    """z_j of a block does not change when token i > j (in the block's order) changes; it does for j = i."""
    m = _random_flow(blocks=2)
    h = torch.randn(2, 4, 4, dtype=torch.float64)
    y = torch.tensor([0, 1])
    for blk in m.blocks:
        order = blk.perm.tolist()
        z0, _ = blk(h, y)
        for pos in range(4):
            h2 = h.clone()
            h2[:, order[pos]] += 1.0
            z1, _ = blk(h2, y)
            diff = (z1 - z0).detach().abs().amax(dim=(0, 2))
            assert float(diff[order[:pos]].detach().sum()) == 0.0
            assert float(diff[order[pos]]) > 0.0


def test_video_mode_is_causal_across_frames():
    m = _random_flow(shape=(3, 1, 4, 4), video=True, classes=None, blocks=3)
    x = torch.randn(2, 3, 1, 4, 4, dtype=torch.float64)
    z, _ = m(x)
    for f in range(3):
        x2 = x.clone()
        x2[:, f] += 0.5
        z2, _ = m(x2)
        d = (z2 - z).detach().abs().flatten(2).amax(dim=(0, 2))
        assert float(d[:f].sum()) == 0.0 and float(d[f]) > 0
    # frame-by-frame Jacobi (chunk = one frame's tokens) inverts exactly
    xr, st = m.inverse(z, method="jacobi", chunk=4, threshold=0.0)
    torch.testing.assert_close(xr, x, atol=1e-10, rtol=0)
    clips, labels = moving_digit_clips(5, frames=4, seed=3)
    assert clips.shape == (5, 4, 1, 16, 16) and labels.shape == (5,)
    again, _ = moving_digit_clips(5, frames=4, seed=3)
    torch.testing.assert_close(clips, again)
    # each frame holds the digit's pixels (one 8x8 window) and the digit moves
    assert float((clips[:, 0] > -1).sum()) > 0 and not torch.equal(clips[:, 0], clips[:, 1])


def test_identity_flow_bits_per_dim_closed_form():
    """A fresh flow is the identity (zero-initialised output): bits/dim of x is -log N(x; 0, I)/(D log 2)."""
    m = TARFlow((1, 8, 8), patch=2, width=16, layers=1, blocks=2, heads=2)
    x = torch.randn(5, 1, 8, 8)
    ref = (0.5 * x.flatten(1).pow(2).mean(1) + 0.5 * math.log(2 * math.pi)) / math.log(2)
    torch.testing.assert_close(bits_per_dim(m, x), ref)
    # the discretisation offset: - log2(Delta)
    torch.testing.assert_close(bits_per_dim(m, x, bin_width=0.125), ref + 3.0)
    # expected value over a standard normal = (1 + log 2 pi) / (2 log 2)
    big = torch.randn(4000, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    expected = (1 + math.log(2 * math.pi)) / (2 * math.log(2))
    assert float(bits_per_dim(m, big).detach().mean()) == pytest.approx(expected, abs=0.01)


def test_identity_flow_denoising_is_tweedie():
    """With density N(0, I) for the noisy data (clean ~ N(0, (1 - s^2) I), noise s), Tweedie's step is
    x (1 - s^2) and it lowers the mean squared error from s^2 to (1 - s^2) s^2."""
    m = TARFlow((1, 8, 8), patch=2, width=16, layers=1, blocks=2, heads=2)
    s = 0.5
    g = torch.Generator().manual_seed(0)
    clean = math.sqrt(1 - s * s) * torch.randn(2000, 1, 8, 8, generator=g)
    noisy = clean + s * torch.randn(clean.shape, generator=g)
    den = m.denoise(noisy, s)
    torch.testing.assert_close(den, noisy * (1 - s * s))
    assert float((den - clean).pow(2).mean()) == pytest.approx((1 - s * s) * s * s, rel=0.03)
    assert float((noisy - clean).pow(2).mean()) == pytest.approx(s * s, rel=0.03)


@pytest.fixture(scope="module")
def trained():
    """A tiny class-conditional TARFlow trained 200 steps on digits (a few seconds)."""
    torch.manual_seed(0)
    d = load_dataset("digits")
    flow = TARFlow((1, 8, 8), patch=2, width=32, layers=1, blocks=4, heads=2, num_classes=10)
    loss = TARFlowLoss(noise_sigma=0.1, bin_width=detect_bin_width(d.x))
    opt = torch.optim.AdamW(flow.parameters(), lr=2e-3, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(0)
    te = load_dataset("digits", split="test")
    xe = loss.augment(te.x, torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = float(bits_per_dim(flow, xe, te.y, bin_width=loss.bin_width).mean())
    for _ in range(200):
        i = torch.randint(0, d.x.shape[0], (96,), generator=g)
        out = loss(flow, d.x[i], y=d.y[i], generator=g)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    with torch.no_grad():
        after = float(bits_per_dim(flow, xe, te.y, bin_width=loss.bin_width).mean())
    return flow, loss, te, xe, before, after


def test_training_lowers_bits_per_dim(trained):
    flow, loss, *_, before, after = trained
    assert loss.bin_width == 0.125
    assert before > 4.5  # the identity flow on digits: about 4.8 bits/dim
    assert after < before - 1.0, (before, after)


def test_bayes_classifier_beats_chance(trained):
    flow, _, te, xe, *_ = trained
    acc = float((bayes_classify(flow, xe) == te.y).float().mean())
    assert acc > 0.4, acc  # chance: 0.1


def test_score_denoising_moves_noisy_digits_towards_clean(trained):
    flow, loss, te, *_ = trained
    s = loss.noise_sigma
    g = torch.Generator().manual_seed(2)
    clean = te.x[:200]
    noisy = clean + s * torch.randn(clean.shape, generator=g)
    den = flow.denoise(noisy, s, te.y[:200])
    assert float((den - clean).pow(2).mean()) < 0.9 * float((noisy - clean).pow(2).mean())


def test_sampling_runs_and_is_finite(trained):
    flow, *_ = trained
    y = torch.arange(10)
    res = sample(flow, 10, y=y, temperature=0.9, sigma=0.1, generator=torch.Generator().manual_seed(0))
    assert res.x.shape == (10, 1, 8, 8) and bool(torch.isfinite(res.x).all())
    assert res.stats.wall_s > 0 and len(res.stats.iterations) == 4


def test_learned_denoiser_learns_the_flow_score(trained):
    """Flow-score matching: a denoiser trained (flow frozen) on sigma grad(-log p) of the noisy data gets
    close to the autograd score step and, like it, moves noisy digits towards the clean ones."""
    flow0, loss0, te, *_ = trained
    flow = copy.deepcopy(flow0)
    torch.manual_seed(0)
    flow.denoiser = TokenDenoiser(flow.tokens, flow.token_dim, 32, 1, 2, num_classes=10)
    loss = TARFlowLoss(noise_sigma=loss0.noise_sigma, bin_width=loss0.bin_width, learn_denoiser=True)
    opt = torch.optim.Adam(flow.denoiser.parameters(), lr=5e-3)
    d = load_dataset("digits")
    g = torch.Generator().manual_seed(0)
    for _ in range(100):
        i = torch.randint(0, d.x.shape[0], (64,), generator=g)
        out = loss(flow, d.x[i], y=d.y[i], generator=g)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    s = loss.noise_sigma
    clean, y = te.x[:200], te.y[:200]
    noisy = clean + s * torch.randn(clean.shape, generator=torch.Generator().manual_seed(3))
    exact = flow.denoise(noisy, s, y)
    learned = flow.denoise_learned(noisy, s, y)
    rel = float((learned - exact).pow(2).sum() / (exact - noisy).pow(2).sum())
    assert rel < 0.7, rel  # 1.0 before training (zero-initialised output)
    assert float((learned - clean).pow(2).mean()) < float((noisy - clean).pow(2).mean())


def test_bad_settings_raise_one_line_errors():
    with pytest.raises(FewflowError, match="patch size 3 does not divide"):
        TARFlow((1, 8, 8), patch=3)
    with pytest.raises(FewflowError, match="blocks must be"):
        TARFlow((1, 8, 8), blocks=0)
    m = TARFlow((1, 8, 8), width=16, heads=2, layers=1, blocks=1)
    with pytest.raises(FewflowError, match="temperature"):
        sample(m, 2, temperature=0.0)
    with pytest.raises(FewflowError, match="temperature"):
        sample(m, 2, temperature=-1.0)
    with pytest.raises(FewflowError, match="expects inputs of shape"):
        m(torch.zeros(2, 1, 4, 4))
    with pytest.raises(FewflowError, match="inverse method"):
        m.inverse(torch.zeros(1, 1, 8, 8), method="newton")
