"""Conservativity diagnostics (fewflow.metrics.diagnostics) and the gradient-field model
(fewflow.models.conservative), checked against closed forms."""

from __future__ import annotations

import json
import math

import pytest
import torch
from cli_helpers import invoke

from fewflow._validate import FewflowError
from fewflow.analytic import GaussianFlow
from fewflow.metrics.diagnostics import (
    field_diagnostics,
    format_diagnostics,
    hutchinson_asymmetry,
    jacobian,
    jacobian_asymmetry,
    loop_circulation,
    matrix_asymmetry,
    path_curvature,
    random_planes,
)
from fewflow.models import MLP
from fewflow.models.conservative import ConservativeMLP
from fewflow.paths import LinearSchedule

torch.set_num_threads(1)
F64 = torch.float64


def _linear(a: torch.Tensor, b: torch.Tensor | None = None):
    def field(x, t):
        out = x.reshape(x.shape[0], -1) @ a.T
        return (out if b is None else out + b).reshape(x.shape)

    return field


def _gaussian(d: int = 4, seed: int = 0) -> GaussianFlow:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(d, d, generator=g, dtype=F64)
    cov = q @ q.T / d + 0.1 * torch.eye(d, dtype=F64)  # full (non-diagonal) covariance
    return GaussianFlow(torch.randn(d, generator=g, dtype=F64), cov, LinearSchedule())


def test_gaussian_velocity_and_score_are_gradient_fields():
    # the marginal velocity d_alpha m + Q diag(k) Q^T (x - alpha m) has a symmetric Jacobian (N(0, I) source)
    flow = _gaussian()
    x = flow.sample(16, t=0.4, generator=torch.Generator().manual_seed(1))
    for t in (0.1, 0.4, 0.9):
        jac = jacobian(flow, x, t)
        k_mat = jac[0]
        assert torch.allclose(jac, k_mat.expand_as(jac), atol=1e-12)  # affine: one matrix for all x
        assert float(jacobian_asymmetry(flow, x, t).max()) < 1e-12
        assert float(jacobian_asymmetry(flow.score, x, t).max()) < 1e-12
        circ = loop_circulation(flow, x, t, 0.3, generator=torch.Generator().manual_seed(2))
        assert float(circ["normalised"].abs().max()) < 1e-12
    # and the Jacobian is the closed form (d_alpha alpha S + d_sigma sigma I) Sigma_t^{-1} (linear path)
    t = 0.4
    _, sig = flow.marginal(t)
    closed = ((1 * t) * flow.cov.double() + (-1) * (1 - t) * torch.eye(4, dtype=F64)) @ torch.linalg.inv(sig)
    assert torch.allclose(jacobian(flow, x, t)[0], closed, atol=1e-10)


def test_rotation_is_maximally_asymmetric_with_unit_circulation():
    rot = torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=F64)
    x = torch.randn(10, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(jacobian_asymmetry(_linear(rot), x, 0.5), torch.full((10,), 2.0, dtype=F64))
    e1, e2 = (torch.eye(2, dtype=F64)[i].repeat(10, 1) for i in (0, 1))
    r = 0.25
    out = loop_circulation(_linear(rot, torch.tensor([3.0, -1.0], dtype=F64)), x, 0.5, r, planes=(e1, e2))
    assert torch.allclose(out["circulation"], torch.full((10,), 2 * math.pi * r * r, dtype=F64))  # curl 2
    assert torch.allclose(out["curl"], torch.full((10,), 2.0, dtype=F64))
    assert torch.allclose(out["normalised"], torch.ones(10, dtype=F64))
    flipped = loop_circulation(_linear(rot), x, 0.5, r, planes=(e2, e1))  # clockwise: the sign flips
    assert torch.allclose(flipped["normalised"], -torch.ones(10, dtype=F64))


def test_circulation_matches_stokes_for_linear_and_quadratic_fields():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(5, 5, generator=g, dtype=F64)
    x = torch.randn(7, 5, generator=g, dtype=F64)
    u, w = random_planes(7, 5, generator=g, dtype=F64)
    assert torch.allclose((u * w).sum(1), torch.zeros(7, dtype=F64), atol=1e-12)
    r = torch.rand(7, generator=g, dtype=F64) + 0.1
    out = loop_circulation(_linear(a), x, 0.0, r, planes=(u, w), n_points=16)
    closed = math.pi * r**2 * torch.einsum("bi,ij,bj->b", w, a - a.T, u)
    assert torch.allclose(out["circulation"], closed, atol=1e-12)
    # v = (0, x_1^2): curl 2 x_1, so the circulation is 2 c_1 pi r^2 around a circle centred at c (exact)
    def quad(z, t):
        return torch.stack([torch.zeros_like(z[:, 0]), z[:, 0] ** 2], dim=1)

    c = torch.randn(6, 2, generator=g, dtype=F64)
    e1, e2 = torch.eye(2, dtype=F64)[0].repeat(6, 1), torch.eye(2, dtype=F64)[1].repeat(6, 1)
    out = loop_circulation(quad, c, 0.0, 0.3, planes=(e1, e2), n_points=8)
    assert torch.allclose(out["circulation"], 2 * c[:, 0] * math.pi * 0.09, atol=1e-12)


def test_hutchinson_is_unbiased_against_the_exact_jacobian():
    torch.manual_seed(0)
    net = MLP(6, hidden=16, depth=1).double()
    x = torch.randn(3, 6, dtype=F64)
    jac = jacobian(net, x, 0.3)
    exact_asym = (jac - jac.transpose(1, 2)).flatten(1).pow(2).sum(1)
    exact_jac = jac.flatten(1).pow(2).sum(1)
    reps = 4000  # one probe on each of many copies of the batch: independent single-probe estimates
    xs = x.repeat(reps, 1)
    for dist in ("gaussian", "rademacher"):
        est = hutchinson_asymmetry(net, xs, 0.3, probes=1, distribution=dist,
                                   generator=torch.Generator().manual_seed(5))
        for key, exact in (("asym_sq", exact_asym), ("jac_sq", exact_jac)):
            samples = est[key].reshape(reps, 3)
            mean, se = samples.mean(0), samples.std(0) / math.sqrt(reps)
            assert bool(((mean - exact).abs() < 4 * se + 1e-12).all()), (dist, key, mean, exact, se)
    ratio = hutchinson_asymmetry(net, x, 0.3, probes=400, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(ratio["asymmetry"], matrix_asymmetry(jac), rtol=0.15)


def test_conservative_model_is_symmetric_to_float_precision():
    torch.manual_seed(0)
    model = ConservativeMLP((3,), hidden=16, depth=2).double()
    with torch.no_grad():  # give the quadratic term a non-zero weight
        model.quad.bias.fill_(0.7)
    x = torch.randn(8, 3, dtype=F64)
    t = torch.rand(8, dtype=F64)
    jac = jacobian(model, x, t)
    assert float(matrix_asymmetry(jac).max()) < 1e-12
    assert float(jac.abs().max()) > 1e-3
    hess = torch.autograd.functional.hessian(lambda z: model.potential(z[None], t[:1])[0], x[0])
    assert torch.allclose(jac[0], hess, atol=1e-12)  # J of grad phi = Hessian of phi
    assert float(hutchinson_asymmetry(model, x, t, probes=4)["asymmetry"].max()) < 1e-7
    assert float(loop_circulation(model, x, t, 0.2)["normalised"].abs().max()) < 1e-9
    # the same architecture without the constraint is not a gradient field
    free = MLP(3, hidden=16, depth=2).double()
    assert float(jacobian_asymmetry(free, x, t).mean()) > 0.1


def test_conservative_model_trains_under_autograd_and_no_grad():
    torch.manual_seed(0)
    model = ConservativeMLP((1, 2, 2), hidden=8, depth=1, num_classes=3)
    x, t, y = torch.randn(4, 1, 2, 2), torch.rand(4), torch.tensor([0, 1, 2, 3])
    model(x, t, y=y).pow(2).sum().backward()  # double backward through grad_x phi into the weights
    assert all(p.grad is not None for p in model.inp.parameters())
    with torch.no_grad():
        v = model(x, t, y=y)
    assert v.shape == x.shape and bool(torch.isfinite(v).all())
    assert torch.equal(x, x.clone())  # input untouched
    with pytest.raises(FewflowError, match="flow-map"):
        ConservativeMLP((2,), flow_map=True)


def test_path_curvature_closed_form_and_field_diagnostics():
    straight = torch.linspace(0, 1, 9)[:, None, None] * torch.tensor([[1.0, 2.0]])
    assert path_curvature(straight, torch.linspace(0, 1, 9)) < 1e-6
    theta = torch.linspace(0, math.pi, 9, dtype=F64)  # half circle: 7 turns of pi / 8 over unit time
    arc = torch.stack([theta.cos(), theta.sin()], dim=1)[:, None, :]
    assert path_curvature(arc, torch.linspace(0, 1, 9)) == pytest.approx(7 * math.pi / 8, rel=1e-9)

    flow = _gaussian(d=3)
    g = torch.Generator().manual_seed(0)
    diag = field_diagnostics(flow, (3,), ts=(0.2, 0.8), n=16, generator=g, x0=torch.randn(16, 3, dtype=F64),
                             steps=16)
    assert diag["jacobian"] == "exact" and diag["asymmetry"] < 1e-12 and diag["circulation"] < 1e-12
    assert [r["t"] for r in diag["per_t"]] == [0.2, 0.8]
    json.dumps(diag)
    assert "field diagnostics" in format_diagnostics(diag)
    # a rotation added to the exact velocity: the paths still move, the field is no longer a gradient
    rot = torch.zeros(3, 3, dtype=F64)
    rot[0, 1], rot[1, 0] = -1.0, 1.0

    def twisted(x, t):
        return flow(x, t) + x @ rot.T

    hut = field_diagnostics(twisted, (3,), ts=(0.5,), n=16, x0=torch.randn(16, 3, dtype=F64), steps=8,
                            exact_max_dim=2, probes=64, generator=g)
    assert hut["jacobian"] == "hutchinson" and hut["asymmetry"] > 0.5 and hut["circulation"] > 0.1
    with pytest.raises(FewflowError, match="ts"):
        field_diagnostics(flow, (3,), ts=(1.5,))
    with pytest.raises(FewflowError, match="2 dimensions"):
        loop_circulation(lambda z, t: z, torch.zeros(2, 1), 0.5, 0.1)


def test_eval_diagnostics_prints_the_block(tmp_path):
    run = tmp_path / "run"
    res = invoke(["train", "--data", "moons", "--method", "cfm", "--model",
                  "fewflow.models.conservative:ConservativeMLP", "--set", "model.hidden=16", "--steps", "5",
                  "--batch-size", "16", "--no-progress", "--set", "train.ckpt_every=0", "--out", run])
    assert res.exit_code == 0, res.output
    res = invoke(["eval", run, "--nfe", "2", "--n", "64", "--diagnostics"])
    assert res.exit_code == 0, res.output
    assert "field diagnostics (D = 2" in res.output and "Jacobian asymmetry" in res.output
    res = invoke(["eval", run, "--nfe", "2", "--n", "64", "--diagnostics", "--json"])
    report = json.loads(res.output.strip().splitlines()[-1])
    assert report["diagnostics"]["asymmetry"] < 1e-5  # the gradient-field model
    assert len(report["diagnostics"]["per_t"]) == 5
    res = invoke(["eval", run, "--nfe", "2", "--n", "64", "--json"])
    assert "diagnostics" not in json.loads(res.output.strip().splitlines()[-1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_diagnostics_on_cuda():
    model = ConservativeMLP((2,), hidden=8, depth=1).cuda()
    diag = field_diagnostics(model, (2,), ts=(0.5,), n=8, generator=torch.Generator(device="cuda"))
    assert diag["asymmetry"] < 1e-4


def test_mixture_velocity_is_the_exact_gradient_field():
    from fewflow.metrics.diagnostics import MixtureVelocity

    g = torch.Generator().manual_seed(4)
    # one component: the Gaussian flow's closed form
    mu = torch.randn(1, 3, generator=g, dtype=F64)
    one = MixtureVelocity(mu, std=0.5)
    flow = GaussianFlow(mu[0], torch.full((3,), 0.25, dtype=F64), LinearSchedule())
    x = torch.randn(5, 3, generator=g, dtype=F64)
    for t in (0.0, 0.3, 0.8):
        assert torch.allclose(one(x, t), flow(x, t), atol=1e-12)
        assert torch.allclose(one.score(x, t), flow.score(x, t), atol=1e-12)
    # several components: v = (x + (1 - t) grad log p_t) / t, with the score from autograd of log p_t
    mix = MixtureVelocity(torch.randn(4, 3, generator=g, dtype=F64), std=0.2)
    t = 0.6

    def log_p(z):
        var = t**2 * 0.04 + (1 - t) ** 2
        d2 = (z[None] - t * mix.means).pow(2).sum(1)
        return torch.logsumexp(-d2 / (2 * var), 0)

    auto = torch.stack([torch.autograd.functional.jacobian(log_p, xi) for xi in x])
    assert torch.allclose(mix.score(x, t), auto, atol=1e-12)
    assert torch.allclose(mix(x, t), (x + (1 - t) * auto) / t, atol=1e-12)
    assert float(jacobian_asymmetry(mix, x, t).max()) < 1e-12
