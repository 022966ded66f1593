"""GaussianFlow: exact velocity / score / density / flow map of N(0, I) -> N(m, S) (fewflow.analytic)."""

from __future__ import annotations

import math

import pytest
import torch

from fewflow import FewflowError
from fewflow.analytic import GaussianFlow
from fewflow.paths import LinearSchedule, VPSchedule

M = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
S = torch.tensor([[1.0, 0.6, 0.1], [0.6, 0.5, -0.2], [0.1, -0.2, 0.8]], dtype=torch.float64)
SCHEDULES = {"linear": LinearSchedule(), "vp": VPSchedule()}


@pytest.fixture(params=["linear", "vp"])
def flow(request) -> GaussianFlow:
    return GaussianFlow(M, S, SCHEDULES[request.param])


def _x(n: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 1.5


def test_flow_map_identity_and_composition(flow):
    x = _x()
    assert torch.allclose(flow.flow_map(x, 0.3, 0.3), x, atol=1e-12)
    direct = flow.flow_map(x, 0.1, 0.9)
    two = flow.flow_map(flow.flow_map(x, 0.1, 0.4), 0.4, 0.9)
    assert torch.allclose(direct, two, atol=1e-10)
    back = flow.flow_map(direct, 0.9, 0.1)
    assert torch.allclose(back, x, atol=1e-10)


def test_velocity_is_time_derivative_of_flow_map(flow):
    """d/dt X_{s->t}(x) = v(X_{s->t}(x), t), with the derivative from forward-mode autograd."""
    x = _x()
    s = 0.2
    for t in (0.2, 0.5, 0.8):
        tt = torch.full((x.shape[0],), t, dtype=torch.float64)
        xt, dxdt = torch.func.jvp(lambda r: flow.flow_map(x, s, r), (tt,), (torch.ones_like(tt),))
        assert torch.allclose(dxdt, flow.velocity(xt, tt), atol=1e-9, rtol=1e-9)


def test_flow_map_pushes_marginal_exactly(flow):
    """The flow map is affine x -> A x + c with A Sigma_s A^T = Sigma_t and A mu_s + c = mu_t."""
    s, t = 0.15, 0.85
    c = flow.flow_map(torch.zeros(1, 3, dtype=torch.float64), s, t)[0]
    a = torch.func.jacrev(lambda z: flow.flow_map(z[None], s, t)[0])(torch.zeros(3, dtype=torch.float64))
    mu_s, cov_s = flow.marginal(s)
    mu_t, cov_t = flow.marginal(t)
    assert torch.allclose(a @ cov_s @ a.T, cov_t, atol=1e-10)
    assert torch.allclose(a @ mu_s + c, mu_t, atol=1e-10)


def test_velocity_is_conditional_expectation_by_regression():
    """v(x, t) = E[d_alpha x1 + d_sigma x0 | x_t = x]: least-squares regression of the target on x_t."""
    sch = LinearSchedule()
    flow = GaussianFlow(M, S, sch)
    g = torch.Generator().manual_seed(3)
    n, t = 200_000, 0.6
    x0 = torch.randn(n, 3, generator=g, dtype=torch.float64)
    x1 = M + torch.randn(n, 3, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(S).T
    tt = torch.full((n,), t, dtype=torch.float64)
    xt = sch.alpha(tt)[:, None] * x1 + sch.sigma(tt)[:, None] * x0
    target = sch.d_alpha(tt)[:, None] * x1 + sch.d_sigma(tt)[:, None] * x0
    design = torch.cat([xt, torch.ones(n, 1, dtype=torch.float64)], 1)
    coef = torch.linalg.lstsq(design, target).solution  # target ~ xt @ W + b
    zero = torch.zeros(3, dtype=torch.float64)
    jac = torch.func.jacrev(lambda z: flow.velocity(z[None], t)[0])(zero)  # v(x) = jac @ x + v(0)
    assert torch.allclose(coef[:3], jac.T, atol=1e-2)
    assert torch.allclose(coef[3], flow.velocity(zero[None], t)[0], atol=1e-2)


def test_log_prob_and_score_against_torch_distributions(flow):
    x = _x()
    for t in (0.0, 0.4, 1.0):
        mu, cov = flow.marginal(t)
        ref = torch.distributions.MultivariateNormal(mu, covariance_matrix=cov).log_prob(x)
        assert torch.allclose(flow.log_prob(x, t), ref, atol=1e-9)
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(flow.log_prob(xg, 0.7).sum(), xg)
    assert torch.allclose(flow.score(x, 0.7), grad, atol=1e-10)


def test_continuity_equation(flow):
    """d/dt log p_t + v . grad log p_t + div v = 0, with finite differences in t and autograd divergence."""
    x = _x()
    for t in (0.1, 0.5, 0.9):
        h = 1e-5
        dlogp = (flow.log_prob(x, t + h) - flow.log_prob(x, t - h)) / (2 * h)
        xg = x.clone().requires_grad_(True)
        v = flow.velocity(xg, t)
        div = sum(torch.autograd.grad(v[:, i].sum(), xg, retain_graph=True)[0][:, i] for i in range(3))
        assert torch.allclose(div, flow.divergence(x, t), atol=1e-9)
        residual = dlogp + (v.detach() * flow.score(x, t)).sum(1) + div
        assert residual.abs().max() < 1e-5


def test_average_velocity(flow):
    x = _x()
    s = torch.full((x.shape[0],), 0.3, dtype=torch.float64)
    t = torch.linspace(0.3, 0.95, x.shape[0], dtype=torch.float64)  # includes t == s
    u = flow.average_velocity(x, s, t)
    assert torch.allclose(u[0], flow.velocity(x[:1], 0.3)[0], atol=1e-12)
    expect = (flow.flow_map(x[1:], s[1:], t[1:]) - x[1:]) / (t[1:] - s[1:])[:, None]
    assert torch.allclose(u[1:], expect, atol=1e-8)
    # a tiny jump: the average velocity tends to the instantaneous one
    u_small = flow.average_velocity(x, 0.3, 0.3 + 1e-9)
    assert torch.allclose(u_small, flow.velocity(x, 0.3), atol=1e-6)
    model = flow.as_flow_map_model()
    assert model.is_flow_map and torch.equal(model(x, s, t), u)


def test_sample_moments_and_dtype():
    flow = GaussianFlow(M.float(), S.float(), LinearSchedule())
    x = flow.sample(20_000, 1.0, generator=torch.Generator().manual_seed(0))
    assert x.dtype == torch.float32 and x.shape == (20_000, 3)
    assert torch.allclose(x.mean(0).double(), M, atol=0.05)
    assert torch.allclose(torch.cov(x.T).double(), S, atol=0.05)
    x0 = flow.sample(20_000, 0.0, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(torch.cov(x0.T).double(), torch.eye(3, dtype=torch.float64), atol=0.05)
    v = flow.velocity(x[:5], torch.full((5,), 0.5))
    assert v.dtype == torch.float32 and v.device == x.device
    v64 = flow.velocity(x[:5].double(), 0.5)
    assert v64.dtype == torch.float64
    assert torch.allclose(v.double(), v64, atol=1e-5)


def test_diagonal_cov_and_image_shape():
    var = torch.tensor([0.5, 2.0, 1.0, 0.1])
    mean = torch.tensor([0.0, 1.0, -1.0, 3.0])
    flow = GaussianFlow(mean, var, LinearSchedule())
    x = torch.randn(5, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    v = flow.velocity(x, 0.4)
    assert v.shape == x.shape
    # closed form per coordinate for the linear path: v = m + (t lam - (1 - t)) / Sigma_t (x - t m)
    t = 0.4
    sig = t**2 * var + (1 - t) ** 2
    ref = mean + (t * var - (1 - t)) / sig * (x.reshape(5, 4) - t * mean)
    assert torch.allclose(v.reshape(5, 4), ref, atol=1e-6)
    # per eigenvalue: x_t - alpha_t m = sqrt(Sigma_t / Sigma_s) (x_s - alpha_s m)
    s = 0.2
    ref_map = t * mean + torch.sqrt(sig / (s**2 * var + (1 - s) ** 2)) * (x.reshape(5, 4) - s * mean)
    assert torch.allclose(flow.flow_map(x, s, t).reshape(5, 4), ref_map, atol=1e-6)


def test_bad_input():
    sch = LinearSchedule()
    with pytest.raises(FewflowError, match="symmetric"):
        GaussianFlow(torch.zeros(2), torch.tensor([[1.0, 0.5], [0.0, 1.0]]), sch)
    with pytest.raises(FewflowError, match="positive semi-definite"):
        GaussianFlow(torch.zeros(2), torch.tensor([[1.0, 2.0], [2.0, 1.0]]), sch)
    with pytest.raises(FewflowError, match="shape"):
        GaussianFlow(torch.zeros(3), torch.eye(2), sch)
    with pytest.raises(FewflowError, match="schedule"):
        GaussianFlow(torch.zeros(2), torch.eye(2), object())
    with pytest.raises(FewflowError, match="non-finite"):
        GaussianFlow(torch.tensor([math.nan, 0.0]), torch.eye(2), sch)
    flow = GaussianFlow(torch.zeros(2), torch.eye(2), sch)
    with pytest.raises(FewflowError, match="features"):
        flow.velocity(torch.zeros(4, 3), 0.5)
