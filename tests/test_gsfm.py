"""GSFM and linear simplex FM: the Gumbel-softmax interpolant's limits and velocity, the CE denoiser's
posterior on a two-state case with a closed form, the simplex sampler, and unigram recovery on a Markov
chain."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fewflow import FewflowError
from fewflow.methods import get_method
from fewflow.models.sequence import SequenceDenoiser
from fewflow.objectives.gsfm import GSFMConfig, GSFMLoss, SimplexEuler, TokenProbabilities, sample_gsfm
from fewflow.objectives.simplex_fm import SimplexFMLoss, sample_simplex_fm
from fewflow.paths.simplex import (
    dirichlet_source,
    gumbel_conditional_velocity,
    gumbel_interpolant,
    gumbel_marginal_velocity,
    linear_simplex_interpolant,
    linear_simplex_velocity,
    project_simplex,
)
from fewflow.solvers import solve

torch.set_num_threads(1)

K, L = 4, 8
P = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.1, 0.7, 0.1, 0.1], [0.05, 0.05, 0.1, 0.8], [0.4, 0.3, 0.2, 0.1]])
PI0 = torch.tensor([0.4, 0.3, 0.2, 0.1])


def markov(n: int, g: torch.Generator) -> torch.Tensor:
    idx = torch.empty(n, L, dtype=torch.long)
    idx[:, 0] = torch.multinomial(PI0, n, replacement=True, generator=g)
    for pos in range(1, L):
        idx[:, pos] = torch.multinomial(P[idx[:, pos - 1]], 1, generator=g)[:, 0]
    return F.one_hot(idx, K).float()


def fit(loss, data, steps: int, g: torch.Generator, length=L, states=K, width=64, depth=2, lr=2e-3):
    torch.manual_seed(0)
    net = SequenceDenoiser(length, states, width=width, depth=depth, heads=4)
    opt = torch.optim.AdamW(net.parameters(), lr=lr)
    for _ in range(steps):
        b = data[torch.randint(0, len(data), (128,), generator=g)]
        out = loss(net, b, generator=g)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    return net.eval()


def kl(p: torch.Tensor, q: torch.Tensor) -> float:
    return float((p * (p / q.clamp_min(1e-6)).log()).sum())


def test_interpolant_limits():
    g = torch.Generator().manual_seed(0)
    x1 = F.one_hot(torch.randint(0, K, (256, L), generator=g), K).double()
    noise = -torch.log(-torch.log(torch.rand(x1.shape, generator=g, dtype=torch.float64)))
    x0 = gumbel_interpolant(x1, torch.zeros(256), gumbel=noise)  # tau_max = 10: near the centre
    assert (x0 - 1 / K).abs().mean() < 0.02
    assert torch.allclose(x0.sum(-1), torch.ones(256, L, dtype=torch.float64))
    # tau -> 0 (lam = 12: tau(1) = 6e-5): the vertex argmax(e_k + g / beta); with g = 0 the target itself
    x1_end = gumbel_interpolant(x1, torch.ones(256), lam=12.0, gumbel=noise)
    vertex = F.one_hot((x1 + noise / 2.0).argmax(-1), K).double()
    assert ((x1_end - vertex).abs().amax(-1) < 1e-3).double().mean() > 0.99  # all but near-ties
    clean = gumbel_interpolant(x1, torch.ones(256), lam=12.0, gumbel=torch.zeros_like(x1))
    assert (clean - x1).abs().max() < 1e-12
    # beta controls how often the noise beats the margin: P(argmax = k) = e^beta / (e^beta + K - 1)
    big = F.one_hot(torch.zeros(20000, 1, dtype=torch.long), K).double()
    hit = gumbel_interpolant(big, torch.ones(20000), generator=g).argmax(-1).eq(0).double().mean()
    assert abs(float(hit) - math.e**2 / (math.e**2 + K - 1)) < 0.015


def test_conditional_velocity_is_the_time_derivative():
    g = torch.Generator().manual_seed(1)
    x1 = F.one_hot(torch.randint(0, K, (16, L), generator=g), K).double()
    t = torch.rand(16, dtype=torch.float64, generator=g)

    def path(tt):
        return gumbel_interpolant(x1, tt, gumbel=torch.zeros_like(x1))

    x_t, dx = torch.func.jvp(path, (t,), (torch.ones_like(t),))
    u = gumbel_conditional_velocity(x_t, x1, t)
    torch.testing.assert_close(u, dx, atol=1e-12, rtol=1e-10)
    assert u.sum(-1).abs().max() < 1e-12
    # the marginal velocity is the p-weighted mixture of the conditional ones
    p = torch.softmax(torch.randn(16, L, K, generator=g, dtype=torch.float64), -1)
    vertices = [F.one_hot(torch.full((16, L), k), K).double() for k in range(K)]
    mix = sum(p[..., k:k + 1] * gumbel_conditional_velocity(x_t, vertices[k], t) for k in range(K))
    torch.testing.assert_close(gumbel_marginal_velocity(x_t, p, t), mix)
    # the temperature floor caps the rate lambda / tau
    fast = gumbel_marginal_velocity(x_t, p, torch.ones(16, dtype=torch.float64), lam=12.0, tau_min=0.5)
    ref = gumbel_marginal_velocity(x_t, p, torch.zeros(16, dtype=torch.float64), tau_max=0.5, lam=12.0)
    torch.testing.assert_close(fast, ref)


def test_linear_simplex_path_and_velocity():
    g = torch.Generator().manual_seed(2)
    x1 = F.one_hot(torch.randint(0, K, (4096, 1), generator=g), K).double()
    x0 = dirichlet_source(x1, g)
    assert (x0 >= 0).all() and torch.allclose(x0.sum(-1), torch.ones(4096, 1, dtype=torch.float64))
    # Dirichlet(1): each coordinate is Beta(1, K - 1), mean 1/K, variance (K - 1) / (K^2 (K + 1))
    assert abs(float(x0[..., 0].var()) - (K - 1) / (K**2 * (K + 1))) < 0.004
    t = 0.99 * torch.rand(4096, dtype=torch.float64, generator=g)  # 1 - t above the floor t_eps
    xt = linear_simplex_interpolant(x0, x1, t)
    torch.testing.assert_close(linear_simplex_velocity(xt, x1, t), x1 - x0)


def test_project_simplex():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(500, 6, generator=g, dtype=torch.float64)
    x_copy = x.clone()
    for method in ("clamp", "euclidean"):
        y = project_simplex(x, method)
        assert (y >= 0).all() and torch.allclose(y.sum(-1), torch.ones(500, dtype=torch.float64))
        on = torch.softmax(x, -1)
        torch.testing.assert_close(project_simplex(on, method), on)  # identity on the simplex
    assert torch.equal(x, x_copy)
    # the Euclidean projection is max(x - theta, 0) with theta found by bisection on sum = 1
    lo, hi = x.min(-1).values - 1, x.max(-1).values
    for _ in range(200):
        mid = (lo + hi) / 2
        s = (x - mid[:, None]).clamp_min(0).sum(-1)
        lo, hi = torch.where(s > 1, mid, lo), torch.where(s > 1, hi, mid)
    ref = (x - lo[:, None]).clamp_min(0)
    torch.testing.assert_close(project_simplex(x, "euclidean"), ref, atol=1e-9, rtol=0)
    with pytest.raises(FewflowError, match="unknown projection"):
        project_simplex(x, "nearest")


def _logistic_pdf(u: torch.Tensor) -> torch.Tensor:
    return torch.exp(-u) / (1 + torch.exp(-u)) ** 2


def test_ce_denoiser_matches_the_two_state_posterior():
    """K = 2, L = 1, P(state 0) = 0.3. The logit gap of x_t is d = (z0 - z1) / tau with
    z0 - z1 = +-1 + Lambda / beta and Lambda = g0 - g1 ~ Logistic(0, 1), so by Bayes
    p(e_0 | x_t) = pi f(beta (tau d - 1)) / (pi f(beta (tau d - 1)) + (1 - pi) f(beta (tau d + 1)))."""
    g = torch.Generator().manual_seed(4)
    pi, beta = 0.3, 2.0
    idx = (torch.rand(20000, 1, generator=g) > pi).long()
    data = F.one_hot(idx, 2).float()
    loss = GSFMLoss()
    net = fit(loss, data, 400, g, length=1, states=2, width=32, depth=1, lr=3e-3)
    test = data[:2000]
    t = torch.rand(2000, generator=g)
    xt = loss.noisy(test, t, g)
    p0 = _two_state_posterior(pi, beta)(xt, t)[..., 0]
    with torch.no_grad():
        p_net = torch.softmax(net(xt, t), -1)
    err = (p_net[..., 0] - p0).abs().mean()
    prior_err = (pi - p0).abs().mean()  # a denoiser that ignores x_t
    assert err < 0.03 and err < 0.2 * prior_err, (float(err), float(prior_err))
    exact = torch.stack([p0, 1 - p0], -1)
    v_net = gumbel_marginal_velocity(xt, p_net, t)
    v_exact = gumbel_marginal_velocity(xt, exact, t)
    assert (v_net - v_exact).norm() / v_exact.norm() < 0.1


def _two_state_posterior(pi: float, beta: float):
    def model(x, t):
        tau = 10.0 * torch.exp(-3.0 * t)[:, None]
        d = (x[..., 0].log() - x[..., 1].log()) * tau
        a, b = pi * _logistic_pdf(beta * (d - 1)), (1 - pi) * _logistic_pdf(beta * (d + 1))
        p0 = a / (a + b)
        return torch.stack([p0, 1 - p0], -1)

    return model


def test_eq12_flow_with_the_exact_posterior_is_mode_seeking():
    """Start from the interpolant's true t = 0 marginal, integrate Eq. 12 with the exact posterior, draw the
    token from p at the end: a marginal-preserving flow would return P(state 0) = pi. GSFM's velocity (the
    noise-free path's, Eq. 13) is not the noisy path's, and the minority state loses mass; less so with more
    Gumbel noise (smaller beta). Measured (20000 draws, pi = 0.3): 0.17 at beta = 2, 0.28 at beta = 0.5."""
    pi, n = 0.3, 20000
    out = {}
    for beta in (2.0, 0.5):
        g = torch.Generator().manual_seed(6)
        k = (torch.rand(n, 1, generator=g) > pi).long()
        x0 = gumbel_interpolant(F.one_hot(k, 2).double(), torch.zeros(n, dtype=torch.float64), beta=beta,
                                generator=g)
        st = SimplexEuler(100, beta=beta, final="sample", generator=g)
        res = solve(_two_state_posterior(pi, beta), x0, steps=100, stepper=st)
        out[beta] = float(res.x[..., 0].mean())
    assert out[2.0] < pi - 0.08 and abs(out[0.5] - pi) < 0.04, out


def test_sampler_stays_on_the_simplex():
    torch.manual_seed(5)
    net = SequenceDenoiser(L, K, width=32, depth=1, heads=2)
    torch.nn.init.normal_(net.out.weight, std=3.0)  # confident random predictions
    seen = []

    def guidance(x, t):  # a strong push off the simplex's positive orthant
        v = torch.zeros_like(x)
        v[..., 0] = 30.0
        return v - v.mean(-1, keepdim=True)

    st = SimplexEuler(8, lam=8.0, tau_min=0.01, guidance=guidance, from_gaussian=True)
    z = torch.randn(64, L, K, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        res = solve(TokenProbabilities(net), z, steps=8, stepper=st,
                    callback=lambda i, t, x: seen.append(x.clone()))
    assert len(seen) == 8 and res.nfe == 8
    for x in seen:
        assert (x >= 0).all() and torch.allclose(x.sum(-1), torch.ones(64, L), atol=1e-5)
    assert torch.equal(res.x, F.one_hot(res.x.argmax(-1), K).float())  # one-hot read-out at the end
    x, tok = sample_gsfm(net, 16, L, K, 5, trajectory=True, generator=torch.Generator().manual_seed(1))
    assert x.shape == (6, 16, L, K) and tok.shape == (16, L)
    assert (x >= 0).all() and torch.allclose(x.sum(-1), torch.ones(6, 16, L), atol=1e-5)


def test_registry_sampling_plan_draws_one_hot_sequences():
    spec = get_method("gsfm")
    cfg = spec.make_config({"width": 32, "depth": 1})
    net = spec.make_model(cfg, {"shape": [L, K]})
    plan = spec.sampling(net, cfg, nfe=6, path=None, teacher=None, meta={"shape": [L, K]})
    assert isinstance(plan.stepper, SimplexEuler) and plan.stepper.steps == 6
    with torch.no_grad():
        res = solve(plan.model, torch.randn(10, L, K), steps=6, stepper=plan.stepper)
    assert torch.equal(res.x.sum(-1), torch.ones(10, L)) and set(res.x.unique().tolist()) <= {0.0, 1.0}
    with pytest.raises(FewflowError, match="sequence"):
        spec.make_model(cfg, {"shape": [2]})
    with pytest.raises(FewflowError, match=r"\(B, L, K\)"):
        GSFMLoss()(net, torch.randn(4, 2))


def test_gsfm_and_simplex_fm_recover_the_unigram_distribution():
    g = torch.Generator().manual_seed(0)
    data = markov(4000, g)
    uni = data.mean((0, 1))
    net = fit(GSFMLoss(), data, 400, g)
    x, tok = sample_gsfm(net, 1000, L, K, 20, cfg=GSFMConfig(), generator=torch.Generator().manual_seed(1))
    assert torch.equal(F.one_hot(tok, K).float(), x)
    kl_gsfm = kl(uni, x.mean((0, 1)))
    assert kl_gsfm < 0.3, kl_gsfm  # measured 0.14 (an untrained denoiser: every token 0, KL > 3)
    net_lin = fit(SimplexFMLoss(), data, 300, g)
    x_lin, _ = sample_simplex_fm(net_lin, 1000, L, K, 20, generator=torch.Generator().manual_seed(1))
    kl_lin = kl(uni, x_lin.mean((0, 1)))
    assert kl_lin < 0.03, kl_lin  # measured 0.006
