"""Grids, steppers, the shared loop, SDE and adaptive solves (fewflow.solvers)."""

from __future__ import annotations

import math

import pytest
import torch

from fewflow import FewflowError
from fewflow.analytic import GaussianFlow
from fewflow.paths import LinearSchedule, VPSchedule
from fewflow.solvers import (
    RK4,
    Euler,
    EulerMaruyama,
    Heun,
    Midpoint,
    SolveResult,
    as_grid,
    edm_grid,
    get_stepper,
    logsnr_grid,
    shifted_grid,
    solve,
    solve_adaptive,
    uniform_grid,
)

F64 = torch.float64
M = torch.tensor([1.0, -2.0], dtype=F64)
S = torch.tensor([[1.0, 0.6], [0.6, 0.5]], dtype=F64)


class CountingModel:
    """A velocity model that counts its calls and records the times it sees."""

    def __init__(self, fn):
        self.fn, self.calls, self.seen = fn, 0, []

    def __call__(self, x, t, **kw):
        self.calls += 1
        self.seen.append((t.shape, t.dtype, t.device))
        return self.fn(x, t)


# ----------------------------------------------------------------------------- grids
def test_uniform_and_as_grid():
    g = uniform_grid(4)
    assert g.dtype == F64 and g.device.type == "cpu"
    assert torch.equal(g, torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=F64))
    r = uniform_grid(4, 1.0, 0.0)
    assert torch.equal(r, g.flip(0))
    assert torch.equal(as_grid([0.0, 0.3, 1.0]), torch.tensor([0.0, 0.3, 1.0], dtype=F64))
    for bad, msg in [([0.0, 1.2], r"\[0, 1\]"), ([0.0, 0.5, 0.4, 1.0], "monotone"), ([0.5], "at least 2"),
                     ([0.0, math.nan], "non-finite"), ([0.2, 0.2], "monotone")]:
        with pytest.raises(FewflowError, match=msg):
            as_grid(bad)
    with pytest.raises(FewflowError):
        uniform_grid(0)
    with pytest.raises(FewflowError):
        uniform_grid(3, 0.0, 1.5)


def test_shifted_grid():
    assert torch.allclose(shifted_grid(8, 1.0), uniform_grid(8), atol=1e-15)
    g = shifted_grid(8, 3.0)
    u = uniform_grid(8)
    sig = 1 - u
    assert torch.allclose(1 - g, 3 * sig / (1 + 2 * sig), atol=1e-15)
    assert g[0] == 0.0 and g[-1] == 1.0 and bool((g[1:] > g[:-1]).all())
    assert bool((g[1:-1] < u[1:-1]).all())  # shift > 1 spends more steps near the noise end
    assert torch.allclose(shifted_grid(8, 3.0, 1.0, 0.0), g.flip(0), atol=1e-15)
    with pytest.raises(FewflowError, match="shift"):
        shifted_grid(4, -1.0)


def test_edm_grid():
    n, rho = 10, 7.0
    g = edm_grid(n, rho=rho)
    assert g.numel() == n + 1 and g[-1] == 1.0
    assert math.isclose(float(g[0]), 1 / 81, rel_tol=1e-12)
    assert bool((g[1:] > g[:-1]).all())
    sig = (1 - g[:-1]) / g[:-1]  # EDM noise levels recovered from t = 1 / (1 + sigma)
    assert math.isclose(float(sig[-1]), 0.002, rel_tol=1e-9)
    root = sig ** (1 / rho)  # Karras: sigma^(1/rho) is linear in the index
    assert torch.allclose(root[1:] - root[:-1], (root[1] - root[0]).expand(n - 1), atol=1e-10)
    z = edm_grid(n, start_at_zero=True)
    assert z.numel() == n + 1 and z[0] == 0.0 and z[-1] == 1.0 and math.isclose(float(z[1]), 1 / 81)


def test_logsnr_grid():
    sch = LinearSchedule()
    n = 6
    g = logsnr_grid(n, sch, clip=1e-3)
    assert g.numel() == n + 1 and g[0] == 0.0 and g[-1] == 1.0
    inner = g[1:-1]
    lam = 2 * torch.log(inner / (1 - inner))
    clip = torch.tensor([1e-3, 1 - 1e-3], dtype=F64)
    ends = 2 * torch.log(clip / (1 - clip))
    expect = torch.linspace(float(ends[0]), float(ends[1]), n + 1, dtype=F64)[1:-1]
    assert torch.allclose(lam, expect, atol=1e-8)
    vp = logsnr_grid(5, VPSchedule(), 0.0, 0.99)
    assert vp[-1] == 0.99 and bool((vp[1:] > vp[:-1]).all())
    assert torch.allclose(logsnr_grid(5, sch, 1.0, 0.0), logsnr_grid(5, sch).flip(0))


# ----------------------------------------------------------------------------- orders
def _linear_ode():
    """dx/dt = (1 + t) A x, exact solution x(1) = expm(1.5 A) x(0)."""
    a = torch.tensor([[-0.5, 2.0], [-2.0, -0.3]], dtype=F64)

    def v(x, t):
        return (1 + t)[:, None] * (x @ a.T)

    x0 = torch.tensor([[1.0, 0.5], [-0.3, 2.0]], dtype=F64)
    exact = x0 @ torch.linalg.matrix_exp(1.5 * a).T
    return v, x0, exact


@pytest.mark.parametrize("name,order", [("euler", 1), ("midpoint", 2), ("heun", 2), ("rk4", 4)])
def test_convergence_order(name, order):
    v, x0, exact = _linear_ode()
    ns = [8, 16, 32, 64]
    errs = [float((solve(v, x0, steps=n, stepper=name).x - exact).abs().max()) for n in ns]
    slope = -torch.linalg.lstsq(
        torch.stack([torch.log(torch.tensor(ns, dtype=F64)), torch.ones(4, dtype=F64)], 1),
        torch.log(torch.tensor(errs, dtype=F64))[:, None],
    ).solution[0, 0]
    assert abs(float(slope) - order) < 0.3, (name, errs, float(slope))


# ----------------------------------------------------------------------------- Gaussian closed forms
STEPS = {"euler": 400, "midpoint": 40, "heun": 40, "rk4": 16}


def _moment_tol(cov: torch.Tensor, n: int, k: float = 4.0):
    var = cov.diagonal()
    mean_tol = k * torch.sqrt(var / n)
    cov_tol = k * torch.sqrt((var[:, None] * var[None, :] + cov**2) / n)
    return mean_tol, cov_tol


def _check_moments(x: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> None:
    mt, ct = _moment_tol(cov, x.shape[0])
    assert bool(((x.mean(0) - mean).abs() < mt).all()), (x.mean(0), mean)
    assert bool(((torch.cov(x.T) - cov).abs() < ct).all()), (torch.cov(x.T), cov)


@pytest.mark.parametrize("schedule", ["linear", "vp"])
@pytest.mark.parametrize("name", ["euler", "midpoint", "heun", "rk4", "adaptive"])
def test_gaussian_flow_maps_noise_to_data(schedule, name):
    sch = LinearSchedule() if schedule == "linear" else VPSchedule()
    t1 = 1.0 if schedule == "linear" else 0.999  # the VP velocity is singular exactly at t = 1
    flow = GaussianFlow(M, S, sch)
    n = 4000
    x0 = flow.sample(n, 0.0, generator=torch.Generator().manual_seed(0))
    if name == "adaptive":
        res = solve_adaptive(flow, x0, 0.0, t1, rtol=1e-7, atol=1e-7)
    else:
        res = solve(flow, x0, steps=STEPS[name], stepper=name, t1=t1)
    mean, cov = flow.marginal(t1)
    _check_moments(res.x, mean, cov)
    # pointwise against the exact flow map (much tighter than the moment check)
    # measured max errors (linear / vp): euler 1.3e-2 / 4.8e-3, midpoint 1.0e-5 / 1.5e-3,
    # heun 7.3e-4 / 6.9e-3, rk4 1.4e-6 / 4.4e-4, adaptive 3.5e-7 / 2.4e-7
    tol = {
        "linear": {"euler": 2e-2, "midpoint": 5e-5, "heun": 2e-3, "rk4": 5e-6, "adaptive": 2e-6},
        "vp": {"euler": 1e-2, "midpoint": 4e-3, "heun": 1.5e-2, "rk4": 1e-3, "adaptive": 2e-6},
    }[schedule][name]
    assert float((res.x - flow.flow_map(x0, 0.0, t1)).abs().max()) < tol


def test_flow_map_one_step_is_exact():
    flow = GaussianFlow(M, S, LinearSchedule())
    x0 = flow.sample(64, 0.0, generator=torch.Generator().manual_seed(1))
    u = flow.as_flow_map_model()
    res = solve(u, x0, steps=1)  # auto flow-map stepping (is_flow_map = True)
    assert res.nfe == 1
    assert torch.allclose(res.x, flow.flow_map(x0, 0.0, 1.0), atol=1e-12)
    # a plain function with the explicit stepper name; 3 jumps compose exactly too
    res3 = solve(lambda x, s, t: flow.average_velocity(x, s, t), x0, grid=[0.0, 0.2, 0.7, 1.0],
                 stepper="flowmap")
    assert res3.nfe == 3 and torch.allclose(res3.x, res.x, atol=1e-12)
    # with a velocity stepper a flow-map model is used through u(x, t, t)
    heun_map = solve(u, x0, steps=20, stepper="heun")
    heun_vel = solve(flow, x0, steps=20, stepper="heun")
    assert torch.allclose(heun_map.x, heun_vel.x, atol=1e-12)


def test_inversion_round_trip():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2)).double()

    def v(x, t):
        return net(torch.cat([x, t[:, None]], 1))

    x0 = torch.randn(32, 2, dtype=F64, generator=torch.Generator().manual_seed(2))
    fwd = solve(v, x0, steps=40, stepper="rk4")
    back = solve(v, fwd.x, grid=uniform_grid(40, 1.0, 0.0), stepper="rk4")
    assert float((fwd.x - x0).abs().max()) > 0.1  # it moved
    assert torch.allclose(back.x, x0, atol=1e-8)
    ad = solve_adaptive(v, fwd.x, 1.0, 0.0, rtol=1e-9, atol=1e-9)
    assert torch.allclose(ad.x, x0, atol=1e-6)


# ----------------------------------------------------------------------------- SDE
@pytest.mark.parametrize("eps", [0.5, "decaying"])
def test_euler_maruyama_reaches_target(eps):
    """dX = [v + eps s] dt + sqrt(2 eps) dW with the exact score keeps the marginals p_t."""
    flow = GaussianFlow(M, S, LinearSchedule())
    eps_fn = (lambda t: 0.5 * torch.ones_like(t)) if eps == 0.5 else (lambda t: 0.8 * (1 - t))

    def drift(x, t):
        return flow.velocity(x, t) + eps_fn(t)[:, None] * flow.score(x, t)

    diffusion = 1.0 if eps == 0.5 else (lambda t: torch.sqrt(2 * eps_fn(t)))
    n = 4000
    x0 = flow.sample(n, 0.0, generator=torch.Generator().manual_seed(0))
    res = solve(drift, x0, steps=200, stepper=EulerMaruyama(diffusion),
                generator=torch.Generator().manual_seed(1))
    assert res.nfe == 200
    _check_moments(res.x, *flow.marginal(1.0))
    ode = flow.flow_map(x0, 0.0, 1.0)
    assert float((res.x - ode).pow(2).sum(1).mean()) > 0.5  # genuinely stochastic paths (measured 1.4-1.5)
    again = solve(drift, x0, steps=200, stepper=EulerMaruyama(diffusion),
                  generator=torch.Generator().manual_seed(1))
    assert torch.equal(again.x, res.x)  # reproducible from the generator


def test_euler_maruyama_last_step_noise():
    zero = lambda x, t: torch.zeros_like(x)  # noqa: E731
    x0 = torch.zeros(4000, 1, dtype=F64)
    clean = solve(zero, x0, steps=1, stepper=EulerMaruyama(1.0), generator=torch.Generator().manual_seed(0))
    assert torch.equal(clean.x, x0)
    noisy = solve(zero, x0, steps=4, stepper=EulerMaruyama(1.0, noise_last=True),
                  generator=torch.Generator().manual_seed(0))
    # 4 increments of variance 1/4 (measured 1.06; without the last-step noise: 0.79)
    assert abs(float(noisy.x.var()) - 1.0) < 0.12


# ----------------------------------------------------------------------------- loop bookkeeping
@pytest.mark.parametrize(
    "stepper,per_step",
    [("euler", 1), ("midpoint", 2), ("heun", 2), ("rk4", 4), (Heun(euler_last=True), None)],
)
def test_nfe_counts(stepper, per_step):
    model = CountingModel(lambda x, t: -x)
    res = solve(model, torch.ones(3, 2), steps=5, stepper=stepper)
    expect = 5 * per_step if per_step is not None else 4 * 2 + 1
    assert res.nfe == expect == model.calls
    assert get_stepper(stepper).nfe_per_step in (1, 2, 4)


def test_adaptive_nfe_counted():
    model = CountingModel(lambda x, t: -x)
    res = solve_adaptive(model, torch.ones(3, 2, dtype=F64), rtol=1e-8, atol=1e-8)
    assert res.nfe == model.calls > 6
    assert torch.allclose(res.x, torch.full((3, 2), math.exp(-1.0), dtype=F64), atol=1e-7)


def test_trajectory_callback_dtype():
    model = CountingModel(lambda x, t: -x * t[:, None])
    calls = []
    x0 = torch.randn(4, 3, dtype=F64)
    res = solve(model, x0, steps=6, stepper="midpoint", trajectory=True, progress=True,
                callback=lambda i, t, x: calls.append((i, t, x.shape)))
    assert isinstance(res, SolveResult)
    assert res.trajectory.shape == (7, 4, 3) and res.trajectory.dtype == F64
    assert torch.equal(res.trajectory[0], x0) and torch.equal(res.trajectory[-1], res.x)
    assert [c[0] for c in calls] == list(range(6))
    assert [c[1] for c in calls] == pytest.approx(uniform_grid(6)[1:].tolist())
    assert res.x.dtype == F64 and res.x.device == x0.device and not res.x.requires_grad
    assert all(s == (torch.Size([4]), F64, x0.device) for s in model.seen)
    assert torch.equal(res.times, uniform_grid(6))
    # exact solution of dx/dt = -t x is x0 exp(-1/2)
    assert torch.allclose(res.x, x0 * math.exp(-0.5), atol=5e-3)
    r32 = solve(model, x0.float(), steps=3)
    assert r32.x.dtype == torch.float32 and model.seen[-1][1] == torch.float32


def test_grad_through_solver():
    flow = GaussianFlow(M, S, LinearSchedule())
    x0 = torch.randn(5, 2, dtype=F64, requires_grad=True)
    res = solve(flow, x0, steps=10, stepper="rk4", grad=True, trajectory=True)
    assert res.trajectory.shape == (11, 5, 2)
    res.x.sum().backward()
    # the exact map is affine: d x1 / d x0 = A, so the gradient of the sum is A^T 1 for every sample
    a = torch.func.jacrev(lambda z: flow.flow_map(z[None], 0.0, 1.0)[0])(torch.zeros(2, dtype=F64))
    assert torch.allclose(x0.grad, (a.T @ torch.ones(2, dtype=F64)).expand(5, 2), atol=1e-4)


def test_cond_is_forwarded():
    seen = {}

    def model(x, t, y=None, scale=1.0):
        seen["y"], seen["scale"] = y, scale
        return torch.zeros_like(x)

    y = torch.tensor([1, 2])
    solve(model, torch.zeros(2, 2), steps=1, cond={"y": y, "scale": 3.0})
    assert seen["y"] is y and seen["scale"] == 3.0


def test_bad_input():
    v = lambda x, t: -x  # noqa: E731
    x = torch.ones(2, 2)
    with pytest.raises(FewflowError, match="x0"):
        solve(v, torch.tensor([[math.nan, 0.0]]), steps=2)
    with pytest.raises(FewflowError, match=r"\[0, 1\]"):
        solve(v, x, grid=[0.0, 0.5, 1.5])
    with pytest.raises(FewflowError, match="monotone"):
        solve(v, x, grid=[0.0, 0.7, 0.5, 1.0])
    with pytest.raises(FewflowError, match="unknown stepper"):
        solve(v, x, steps=2, stepper="rk45-magic")
    with pytest.raises(FewflowError, match="grid= or steps="):
        solve(v, x)
    with pytest.raises(FewflowError, match="disagrees"):
        solve(v, x, grid=[0.0, 1.0], steps=3)
    with pytest.raises(FewflowError, match="batched"):
        solve(v, torch.ones(3), steps=2)
    with pytest.raises(FewflowError, match="non-negative"):
        EulerMaruyama(-1.0)
    with pytest.raises(FewflowError, match="x0"):
        solve_adaptive(v, torch.tensor([[math.inf]]))
    assert isinstance(get_stepper("rk4"), RK4) and isinstance(get_stepper("euler"), Euler)
    assert isinstance(get_stepper("midpoint"), Midpoint)
