"""FlowOpt (arXiv 2510.22010), ODE inversion and gradient descent through the sampler, on analytic priors.

A Gaussian-to-Gaussian flow has an exact linear velocity, so its Euler sampler is an affine map
``f(z) = M z + b`` whose ``M`` we read off column by column; a Gaussian mixture in 2-D has a closed-form
(nonlinear) marginal velocity; two Gaussian classes give a class-conditional prior for editing.
"""

from __future__ import annotations

import math

import pytest
import torch

from fewflow._validate import FewflowError
from fewflow.analytic import GaussianFlow
from fewflow.inverse import get_inverse, list_inverse
from fewflow.inverse.flowopt import FlowOptConfig, estimate_step_bound, flowopt_iterate, sampler_map
from fewflow.inverse.inversion import ODEInversionConfig, SamplerGDConfig, ode_invert
from fewflow.inverse.operators import Mask, measure
from fewflow.paths import LinearSchedule

torch.set_num_threads(1)
F64 = torch.float64


class GMMVelocity:
    """Exact marginal velocity of ``N(0, I) -> sum_k w_k N(m_k, s^2 I)`` on ``x_t = t x1 + (1 - t) x0``:
    per component ``v_k = m_k + (t s^2 - (1 - t)) / var_t (x - t m_k)`` with ``var_t = t^2 s^2 + (1 - t)^2``,
    mixed with the posterior weights ``p(k | x_t)``."""

    def __init__(self, means: torch.Tensor, std: float) -> None:
        self.m, self.s = means, std

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **_: object) -> torch.Tensor:
        m = self.m.to(x)
        tt = t[:, None]
        var = tt * tt * self.s**2 + (1 - tt) ** 2
        d = x[:, None, :] - tt[:, None, :] * m[None]
        logp = -0.5 * (d**2).sum(-1) / var - 0.5 * x.shape[1] * torch.log(var)
        p = torch.softmax(logp, 1)
        vk = m[None] + ((tt * self.s**2 - (1 - tt)) / var)[:, None, :] * d
        return (p[:, :, None] * vk).sum(1)

    def sample(self, n: int, g: torch.Generator) -> torch.Tensor:
        k = torch.randint(len(self.m), (n,), generator=g)
        return self.m[k] + self.s * torch.randn(n, self.m.shape[1], generator=g, dtype=self.m.dtype)


class TwoClass:
    """Class-conditional prior: class ``k`` is ``N(mean_k, s^2 I)``, each with its exact Gaussian flow."""

    def __init__(self, means: torch.Tensor, std: float) -> None:
        self.means, self.std = means, std
        self.flows = [GaussianFlow(m, torch.full_like(m, std**2), LinearSchedule()) for m in means]

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        v = torch.stack([fl(x, t) for fl in self.flows])  # (K, B, D)
        return v[y, torch.arange(x.shape[0])]

    def posterior(self, x: torch.Tensor, k: int) -> torch.Tensor:
        logp = torch.stack([-0.5 * ((x - m) ** 2).sum(1) / self.std**2 for m in self.means], 1)
        return torch.softmax(logp, 1)[:, k]


def _gaussian_prior(d: int = 4) -> GaussianFlow:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(d, d, generator=g, dtype=F64)
    cov = a @ a.T / d + 0.1 * torch.eye(d, dtype=F64)
    return GaussianFlow(torch.randn(d, generator=g, dtype=F64), cov, LinearSchedule())


def _affine_matrix(f, d: int) -> torch.Tensor:
    b = f(torch.zeros(1, d, dtype=F64))
    return (f(torch.eye(d, dtype=F64)) - b).T  # column j = M e_j


def _ring(std: float = 0.15) -> GMMVelocity:
    ang = torch.arange(8, dtype=F64) * 2 * math.pi / 8
    return GMMVelocity(torch.stack([2 * ang.cos(), 2 * ang.sin()], 1), std)


def test_registered() -> None:
    names = {s.name: s for s in list_inverse()}
    assert names["flowopt"].tasks == ("invert", "edit", "restore")
    assert names["ode_inversion"].tasks == ("invert",)
    assert set(names["sampler_gd"].tasks) == {"invert", "restore"}
    assert {s.name for s in list_inverse("edit")} >= {"flowopt"}


def test_step_bound_recovers_lipschitz_of_known_affine_map() -> None:
    # symmetric M with eigenvalues 0.3 .. 2.5: L = 2.5, the contraction bound is 2 / L
    g = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=F64))
    m = q @ torch.diag(torch.tensor([0.3, 0.7, 1.0, 1.4, 2.0, 2.5], dtype=F64)) @ q.T
    b = torch.randn(6, generator=g, dtype=F64)
    z = torch.randn(5, 6, generator=g, dtype=F64)
    lip, eta_max = estimate_step_bound(lambda u: u @ m.T + b, z, probes=3, power_iters=8,
                                       generator=torch.Generator().manual_seed(1))
    assert lip == pytest.approx(2.5, rel=0.02)
    assert eta_max == pytest.approx(2 / 2.5, rel=0.02)
    # a non-symmetric map with a rotation part: <d, J d> <= 0 for some d -> no contracting step
    rot = torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=F64)
    _, eta_rot = estimate_step_bound(lambda u: u @ rot.T, torch.randn(2, 2, dtype=F64), probes=2)
    assert eta_rot == 0.0


def test_step_bound_on_gaussian_euler_sampler() -> None:
    flow = _gaussian_prior()
    f = sampler_map(flow, 10)
    m = _affine_matrix(f, 4)
    assert torch.allclose(m, m.T, atol=1e-10)  # same eigenbasis every step: symmetric
    lip_true = float(torch.linalg.matrix_norm(m, 2))
    z = torch.randn(3, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    z_before = z.clone()
    g = torch.Generator().manual_seed(2)
    lip, eta_max = estimate_step_bound(f, z, probes=2, power_iters=6, generator=g)
    assert torch.equal(z, z_before)
    assert lip == pytest.approx(lip_true, rel=0.02)
    assert eta_max == pytest.approx(2 / lip_true, rel=0.02)


def test_flowopt_converges_below_two_over_L_and_diverges_above() -> None:
    flow = _gaussian_prior()
    f = sampler_map(flow, 10)
    m = _affine_matrix(f, 4)
    lip = float(torch.linalg.matrix_norm(m, 2))
    g = torch.Generator().manual_seed(5)
    x = flow.sample(8, generator=g)
    z0 = torch.randn(8, 4, generator=g, dtype=F64)
    final = {}
    for factor in (0.5, 0.9, 1.1, 1.3):
        _, _, hist, _, stop = flowopt_iterate(f, z0, x, factor * 2 / lip, 60, keep_iterates=False)
        final[factor] = hist[-1]["residual"] / hist[0]["residual"]
        assert stop == "iterations"
    assert final[0.5] < 1e-4 and final[0.9] < 1e-4
    assert final[1.1] > 1e2 and final[1.3] > 1e6
    # the linear error recursion e_{k+1} = (I - eta M) e_k holds exactly
    eta = 0.7 / lip
    _, _, _, its, _ = flowopt_iterate(f, z0, x, eta, 3)
    e0 = its[0] - x
    e3 = e0 @ torch.linalg.matrix_power(torch.eye(4, dtype=F64) - eta * m, 3).T
    assert torch.allclose(its[3] - x, e3, atol=1e-10)


def test_flowopt_inversion_default_eta_on_gaussian() -> None:
    flow = _gaussian_prior()
    x = flow.sample(6, generator=torch.Generator().manual_seed(7))
    x_before = x.clone()
    res = get_inverse("flowopt").solve(flow, x, FlowOptConfig(), generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, x_before)
    assert res.meta["stop"] == "tol" and res.history[-1]["rel_residual"] <= 1e-3
    assert res.nfe == res.history[-1]["nfe"] and len(res.iterates) == len(res.history)
    # the latent reproduces the image through the 10-step sampler; plain ODE inversion does not
    f = sampler_map(flow, 10)
    assert torch.allclose(f(res.z), res.x, atol=1e-12)
    mse_flowopt = float(((res.x - x) ** 2).mean())
    mse_ode = float(((f(ode_invert(flow, x, 10)) - x) ** 2).mean())
    assert mse_flowopt < 1e-3 * mse_ode


def test_flowopt_beats_ode_inversion_and_sampler_gd_at_equal_nfe_on_gmm() -> None:
    gmm = _ring()
    x = gmm.sample(64, torch.Generator().manual_seed(0))
    cfg = FlowOptConfig(tol=0.0)
    res = get_inverse("flowopt").solve(gmm, x, cfg, generator=torch.Generator().manual_seed(1))
    nfe = res.nfe
    ode = get_inverse("ode_inversion").solve(gmm, x, ODEInversionConfig(steps=nfe - 10, sample_steps=10))
    gd = get_inverse("sampler_gd").solve(gmm, x, SamplerGDConfig(nfe_budget=nfe))
    assert ode.nfe == nfe and gd.nfe <= nfe
    mse = {k: float(((r.x - x) ** 2).mean()) for k, r in (("flowopt", res), ("ode", ode), ("gd", gd))}
    print(f"GMM inversion MSE at {nfe} NFE: {mse}")
    assert mse["flowopt"] < 0.1 * mse["ode"]
    assert mse["flowopt"] < 0.1 * mse["gd"]
    losses = [h["loss"] for h in res.history]
    assert losses[-1] < 0.01 * losses[0]


def test_editing_moves_towards_target_class_and_stays_close() -> None:
    prior = TwoClass(torch.tensor([[-2.0, 0.0], [2.0, 0.0]], dtype=F64), 0.5)
    g = torch.Generator().manual_seed(0)
    x = torch.tensor([-2.0, 0.0], dtype=F64) + 0.5 * torch.randn(64, 2, generator=g, dtype=F64)
    src, tgt = torch.zeros(64, dtype=torch.long), torch.ones(64, dtype=torch.long)
    spec = get_inverse("flowopt")
    res = spec.solve(prior, x, FlowOptConfig(), generator=g, y=src, target_cond={"y": tgt})
    no_opt = spec.solve(prior, x, FlowOptConfig(iterations=0), generator=g, y=src, target_cond={"y": tgt})
    fresh = torch.tensor([2.0, 0.0], dtype=F64) + 0.5 * torch.randn(64, 2, generator=g, dtype=F64)
    dist = {k: float((v - x).norm(dim=1).mean()) for k, v in (("flowopt", res.x), ("no_opt", no_opt.x),
                                                             ("fresh", fresh))}
    post = {k: float(prior.posterior(v, 1).mean()) for k, v in (("input", x), ("flowopt", res.x))}
    print(f"editing distance to input {dist}, P(target) {post}")
    assert res.meta["task"] == "edit" and res.meta["n_max"] == 12 and res.meta["iterations"] == 8
    assert post["input"] < 0.01 and post["flowopt"] > 0.7
    assert dist["flowopt"] < dist["no_opt"] < dist["fresh"]
    steps = [float((it - x).norm(dim=1).mean()) for it in res.iterates]
    assert all(b <= a + 1e-12 for a, b in zip(steps, steps[1:]))


def test_restore_inpainting_reduces_measurement_residual() -> None:
    gmm = GMMVelocity(torch.tensor([[1.0, 1, 1, 1], [-1, -1, -1, -1]], dtype=F64), 0.5)
    x = gmm.sample(16, torch.Generator().manual_seed(2)).reshape(16, 1, 2, 2)
    op = Mask(torch.tensor([[1.0, 0.0], [0.0, 1.0]])[None])

    def model(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return gmm(z.reshape(z.shape[0], 4), t).reshape(z.shape)

    meas = measure(x, op, 0.0)
    res = get_inverse("flowopt").solve(model, meas, FlowOptConfig(),
                                       generator=torch.Generator().manual_seed(0))
    assert res.meta["task"] == "restore" and res.x.shape == x.shape
    assert res.history[-1]["residual"] < 0.1 * res.history[0]["residual"]
    gd = get_inverse("sampler_gd").solve(model, meas, SamplerGDConfig(iterations=3))
    assert gd.history[-1]["residual"] < gd.history[0]["residual"]
    # the missing pixels follow the observed ones into the right mode
    sign = torch.sign(x.reshape(16, 4)[:, 0])
    assert bool((torch.sign(res.x.reshape(16, 4)[:, 1]) == sign).float().mean() > 0.9)


def test_ode_invert_runs_backwards_and_matches_closed_form() -> None:
    flow = _gaussian_prior()
    x = flow.sample(4, generator=torch.Generator().manual_seed(1))
    z = ode_invert(flow, x, 400)
    exact = flow.flow_map(x, 1.0, 0.0)
    assert torch.allclose(z, exact, atol=5e-2)
    # n_max = 5 of 10 steps: five backward Euler steps x <- x - h v(x, t) from t = 1 down to t = 0.5
    manual = x.clone()
    for i in range(5):
        t = torch.full((4,), 1.0 - i / 10, dtype=F64)
        manual = manual - 0.1 * flow(manual, t)
    assert torch.allclose(ode_invert(flow, x, 10, n_max=5), manual, atol=1e-12)
    assert torch.allclose(ode_invert(flow, x, 400, n_max=200), flow.flow_map(x, 1.0, 0.5), atol=5e-2)


def test_bad_inputs_raise() -> None:
    flow = _gaussian_prior()
    x = flow.sample(2, generator=torch.Generator().manual_seed(0))
    solve = get_inverse("flowopt").solve
    with pytest.raises(FewflowError, match="eta"):
        solve(flow, x, FlowOptConfig(eta=0.0))
    with pytest.raises(FewflowError, match="eta"):
        solve(flow, x, FlowOptConfig(eta=-1.0))
    with pytest.raises(FewflowError, match="iterations"):
        solve(flow, x, FlowOptConfig(iterations=-1))
    with pytest.raises(FewflowError, match="n_max"):
        solve(flow, x, FlowOptConfig(steps=5, n_max=6))
    with pytest.raises(FewflowError, match="z_init"):
        solve(flow, x, FlowOptConfig(), z_init=torch.zeros(2, 3, dtype=F64))
    with pytest.raises(FewflowError, match="batch"):
        solve(flow, x[0], FlowOptConfig())
    with pytest.raises(FewflowError, match="init"):
        solve(flow, x, FlowOptConfig(init="magic"))
    with pytest.raises(FewflowError, match="identity"):
        solve(flow, measure(x.reshape(2, 1, 2, 2), Mask(torch.ones(1, 2, 2)), 0.0), FlowOptConfig(),
              target_cond={"y": torch.zeros(2, dtype=torch.long)})
    with pytest.raises(FewflowError, match="identity"):
        get_inverse("ode_inversion").solve(flow, measure(x.reshape(2, 1, 2, 2), Mask(torch.ones(1, 2, 2)), 0))
    with pytest.raises(FewflowError, match="lr"):
        get_inverse("sampler_gd").solve(flow, x, SamplerGDConfig(lr=0.0))
    with pytest.raises(FewflowError, match="steps"):
        ode_invert(flow, x, 0)
    with pytest.raises(FewflowError, match="probes"):
        estimate_step_bound(lambda u: u, x, probes=0)


def test_float32_network_prior_and_no_weight_gradients() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return net(torch.cat([x, t[:, None]], 1))

    x = torch.randn(5, 2)
    res = get_inverse("flowopt").solve(model, x, FlowOptConfig(iterations=5), generator=torch.Generator())
    gd = get_inverse("sampler_gd").solve(model, x, SamplerGDConfig(iterations=2))
    assert res.x.dtype == torch.float32 and gd.x.dtype == torch.float32
    assert gd.nfe == 10 + 2 * 30 + 10  # inversion + 2 x (forward + backward as 2) + final sample
    assert all(p.grad is None for p in net.parameters())
    assert res.history[-1]["residual"] <= res.history[0]["residual"]
