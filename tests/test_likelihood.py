"""Log-likelihood by the instantaneous change of variables (fewflow.solvers.likelihood)."""

from __future__ import annotations

import math

import pytest
import torch

from fewflow import FewflowError
from fewflow.analytic import GaussianFlow
from fewflow.paths import LinearSchedule
from fewflow.solvers import solve, uniform_grid
from fewflow.solvers.likelihood import divergence_exact, divergence_hutchinson, log_likelihood

F64 = torch.float64
M = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
S = torch.tensor([[1.0, 0.6, 0.1], [0.6, 0.5, -0.2], [0.1, -0.2, 0.8]], dtype=F64)


def std_normal_log_prob(x: torch.Tensor) -> torch.Tensor:
    x = x.flatten(1)
    return -0.5 * (x * x).sum(1) - 0.5 * x.shape[1] * math.log(2 * math.pi)


class StdNormal:
    def log_prob(self, x):
        return std_normal_log_prob(x)


@pytest.fixture
def flow() -> GaussianFlow:
    return GaussianFlow(M, S, LinearSchedule())


def test_exact_divergence_matches_gaussian_density(flow):
    x1 = flow.sample(64, 1.0, generator=torch.Generator().manual_seed(0)) * 1.3  # include some tail points
    ref = flow.log_prob(x1, 1.0)
    lp = log_likelihood(flow, x1, std_normal_log_prob, steps=20, stepper="rk4")
    assert lp.shape == (64,) and lp.dtype == F64
    assert float((lp - ref).abs().max()) < 3e-4  # measured 1.3e-4 (Heun at 20 steps: 0.32)
    # a source object with .log_prob and the adaptive solver give the same answer
    lp_ad = log_likelihood(flow, x1, StdNormal(), stepper="adaptive", rtol=1e-8, atol=1e-8)
    assert float((lp_ad - ref).abs().max()) < 1e-6  # measured 1.8e-7
    # the sign matters: the wrong sign of the divergence term would be off by 2 * int div v dt
    lp0 = std_normal_log_prob(flow.flow_map(x1, 1.0, 0.0))
    wrong = lp0 - (lp - lp0)
    assert float((wrong - ref).abs().min()) > 1.0  # measured 3.1


def test_float32_and_image_shape():
    var = torch.tensor([0.5, 2.0, 1.0, 0.3])
    flow = GaussianFlow(torch.tensor([0.0, 1.0, -1.0, 0.5]), var, LinearSchedule())
    x1 = flow.sample(8, 1.0, generator=torch.Generator().manual_seed(0)).reshape(8, 1, 2, 2)

    def img_model(x, t):
        return flow.velocity(x.reshape(8, 4), t).reshape(x.shape)

    lp = log_likelihood(img_model, x1, std_normal_log_prob, steps=20)
    assert lp.dtype == torch.float32 and lp.shape == (8,)
    assert torch.allclose(lp, flow.log_prob(x1.reshape(8, 4), 1.0), atol=2e-5)  # measured 1e-6


def test_nonlinear_flow_against_jacobian_determinant():
    """Nonlinear velocity: compare with log p0(x0) - log|det dX_{0->1}/dx0| of the discrete solver map."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2)).double()

    def v(x, t):
        return net(torch.cat([x, t[:, None]], 1))

    x1 = torch.randn(6, 2, dtype=F64, generator=torch.Generator().manual_seed(1))
    lp = log_likelihood(v, x1, std_normal_log_prob, steps=40, stepper="rk4")
    x0 = solve(v, x1, grid=uniform_grid(40, 1.0, 0.0), stepper="rk4").x
    ref = []
    for i in range(6):
        def fwd(z):
            return solve(v, z[None], steps=40, stepper="rk4", grad=True).x[0]

        jac = torch.autograd.functional.jacobian(fwd, x0[i])
        ref.append(std_normal_log_prob(x0[i : i + 1])[0] - torch.linalg.slogdet(jac).logabsdet)
    assert torch.allclose(lp, torch.stack(ref), atol=1e-5)


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased(flow, probe):
    x1 = flow.sample(1, 1.0, generator=torch.Generator().manual_seed(3)).expand(400, 3).contiguous()
    exact = log_likelihood(flow, x1[:1], std_normal_log_prob, steps=10)
    est = log_likelihood(flow, x1, std_normal_log_prob, steps=10, divergence="hutchinson", probe=probe,
                         generator=torch.Generator().manual_seed(4))
    se = est.std() / math.sqrt(est.numel())
    assert float(est.std()) > 1e-3  # genuinely random (the Jacobian is not diagonal)
    assert abs(float(est.mean() - exact[0])) < 3 * float(se)
    more = log_likelihood(flow, x1, std_normal_log_prob, steps=10, divergence="hutchinson", probe=probe,
                          n_probes=8, generator=torch.Generator().manual_seed(4))
    # more probes, less variance: 8 probes cut the std by ~sqrt(8) (measured ratio 0.33-0.34)
    assert float(more.std()) < 0.5 * float(est.std())
    assert abs(float(more.mean() - exact[0])) < 3 * float(more.std()) / math.sqrt(more.numel())


def test_divergence_helpers():
    a = torch.tensor([[1.0, 2.0], [0.5, -3.0]], dtype=F64)
    x = torch.randn(4, 2, dtype=F64).requires_grad_(True)
    v = torch.tanh(x) @ a.T
    jac_diag = (1 - torch.tanh(x.detach()) ** 2) * a.diagonal()
    assert torch.allclose(divergence_exact(v, x), jac_diag.sum(1))
    eye = torch.eye(2, dtype=F64)[:, None, :].expand(2, 4, 2)  # probes e_1, e_2: the exact trace / 2
    assert torch.allclose(divergence_hutchinson(v, x, eye), jac_diag.sum(1) / 2)


def test_bad_input(flow):
    x1 = flow.sample(2, 1.0)
    with pytest.raises(FewflowError, match="divergence"):
        log_likelihood(flow, x1, std_normal_log_prob, divergence="skilling")
    with pytest.raises(FewflowError, match="x1"):
        log_likelihood(flow, torch.full((2, 3), math.nan, dtype=F64), std_normal_log_prob)
    with pytest.raises(FewflowError, match="source"):
        log_likelihood(flow, x1, 3.0)
    with pytest.raises(FewflowError, match="probe"):
        log_likelihood(flow, x1, std_normal_log_prob, divergence="hutchinson", probe="uniform")
