"""FlowTurbo: NFE counts, pseudo-corrector order, refiner mechanics and objective, trained 2-D comparison."""

from __future__ import annotations

import math

import pytest
import torch

from fewflow import FewflowError
from fewflow.analytic import GaussianFlow
from fewflow.objectives.flowturbo_refiner import FlowTurboRefinerLoss
from fewflow.paths import LinearSchedule
from fewflow.solvers import solve
from fewflow.solvers.flowturbo import (
    FlowTurboCarry,
    FlowTurboRefiner,
    FlowTurboStepper,
    flowturbo_sample,
)


def _field() -> GaussianFlow:
    # linear (time-varying) ODE with an exact flow map
    return GaussianFlow(torch.tensor([1.0, -2.0]), torch.tensor([0.05, 3.0]), LinearSchedule())


class Recorder:
    """Counts calls and records the (x, t) each call sees."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, x, t, **kw):
        self.calls.append((x.clone(), t.clone()))
        return self.fn(x, t)


def _reference_pseudo_corrector(v, x, n_heun, n_pseudo):
    """The block recursion, written independently: Heun steps pass on the velocity at the predicted
    point, pseudo-corrector steps reuse it as their first velocity."""
    n = n_heun + n_pseudo
    ts = torch.linspace(0, 1, n + 1, dtype=torch.float64)
    cache = None
    for i in range(n):
        dt = float(ts[i + 1] - ts[i])
        t, tn = ts[i].expand(x.shape[0]).to(x.dtype), ts[i + 1].expand(x.shape[0]).to(x.dtype)
        d = v(x, t) if (i < n_heun or cache is None) else cache
        x_pred = x + dt * d
        d2 = v(x_pred, tn)
        x = x + 0.5 * dt * (d + d2)
        cache = d2
    return x


def test_one_predictor_evaluation_per_pseudo_step(gen):
    field = _field()
    x0 = torch.randn(64, 2, generator=gen, dtype=torch.float64)
    for n_heun, n_pseudo in ((1, 5), (2, 3), (0, 4), (3, 0)):
        rec = Recorder(field)
        res = flowturbo_sample(rec, x0, n_heun=n_heun, n_pseudo=n_pseudo)
        expected = 2 * n_heun + n_pseudo + (1 if n_heun == 0 else 0)
        assert res.nfe_predictor == len(rec.calls) == expected
        assert FlowTurboStepper(n_heun, n_pseudo).predictor_nfe() == expected
        assert res.nfe_refiner == 0
        ref = _reference_pseudo_corrector(field, x0, n_heun, n_pseudo)
        assert torch.allclose(res.x, ref, rtol=1e-12, atol=1e-12)
    # in a pseudo step the predictor is evaluated only at the predicted point, never at x_i itself
    rec = Recorder(field)
    res = flowturbo_sample(rec, x0, n_heun=1, n_pseudo=3, trajectory=True)
    times = [float(t[0]) for _, t in rec.calls]
    assert times == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    for k, (x_seen, _) in enumerate(rec.calls[2:], start=2):
        assert not torch.allclose(x_seen, res.trajectory[k - 1])  # not the corrected state x_{i+1}


def test_pseudo_corrector_second_order_beats_euler(gen):
    field = _field()
    x0 = torch.randn(256, 2, generator=gen, dtype=torch.float64)
    exact = field.flow_map(x0, 0.0, 1.0)
    errs = {}
    for n in (8, 16, 32):
        pc = flowturbo_sample(field, x0, n_heun=1, n_pseudo=n - 1)
        errs[n] = float((pc.x - exact).norm(dim=1).mean())
        euler = solve(field, x0, steps=pc.nfe_predictor)  # equal NFE: n + 1 Euler steps
        e_euler = float((euler.x - exact).norm(dim=1).mean())
        assert errs[n] < 0.2 * e_euler, (n, errs[n], e_euler)
    for a, b in ((8, 16), (16, 32)):
        order = math.log2(errs[a] / errs[b])
        assert 1.7 < order < 2.5, (a, b, order)


def test_refiner_steps_mechanics(gen):
    field = _field()
    x0 = torch.randn(32, 2, generator=gen, dtype=torch.float64)
    # an exact refiner (the true velocity increment) turns refiner steps into Heun steps
    exact_refiner = Recorder(lambda x, t: field(x, t))

    def oracle(x, t, v_prev):
        return exact_refiner(x, t) - v_prev

    rec = Recorder(field)
    res = flowturbo_sample(rec, x0, n_heun=2, n_pseudo=0, n_refine=3, refiner=oracle)
    heun = solve(field, x0, steps=5, stepper="heun")
    assert torch.allclose(res.x, heun.x, rtol=1e-12, atol=1e-12)
    assert res.nfe_predictor == len(rec.calls) == 4 and res.nfe_refiner == 6 == len(exact_refiner.calls)
    # a zero refiner keeps the last velocity: the refiner steps move in a straight line
    res0 = flowturbo_sample(field, x0, n_heun=1, n_pseudo=0, n_refine=2, refiner=lambda x, t, v: 0 * v,
                            trajectory=True)
    tr = res0.trajectory
    assert torch.allclose(tr[3] - tr[2], tr[2] - tr[1], atol=1e-12)


def test_second_refiner_call_is_conditioned_on_the_refined_velocity(gen):
    """Refiner block: d = c + r(x_i, t_i, c), x~ = x_i + h d, d' = d + r(x~, t_{i+1}, d). The second call
    sees the velocity d that moved x_i to x~ -- exactly the refiner objective's r(x + dt v, t + dt, v) --
    and its increment is added to that same d (the d_i / d_{i+1} recursion of the released integrators.py).
    Conditioning it on the stale c instead (as models_assemble.py does) breaks the increment's meaning."""
    field = _field()
    x0 = torch.randn(64, 2, generator=gen, dtype=torch.float64)
    seen = []

    def oracle(x, t, v_prev):  # the exact increment the objective trains: v(x, t) - v_prev
        seen.append(v_prev.clone())
        return field(x, t) - v_prev

    res = flowturbo_sample(field, x0, n_heun=2, n_pseudo=0, n_refine=3, refiner=oracle, trajectory=True)
    # calls come in pairs (first, second) per refiner step; the second sees d = c + r(x_i, t_i, c) = v(x_i)
    tr, ts = res.trajectory, res.times
    for k in range(3):
        i = 2 + k
        torch.testing.assert_close(seen[2 * k + 1], field(tr[i], ts[i].expand(64)))
    exact = field.flow_map(x0, 0.0, 1.0)
    heun = solve(field, x0, steps=5, stepper="heun").x
    torch.testing.assert_close(res.x, heun, rtol=1e-12, atol=1e-12)  # oracle refiner steps = Heun steps

    # the stale-conditioned variant, written out: same oracle, second call fed the old c
    grid = torch.linspace(0, 0.4, 3, dtype=torch.float64)
    heun2 = solve(field, x0, grid=grid, stepper=FlowTurboStepper(2, 0))
    x, c = heun2.x, heun2.carry.v_cache
    for i in range(2, 5):
        t, tn = (torch.full((64,), k / 5, dtype=torch.float64) for k in (i, i + 1))
        d = c + (field(x, t) - c)
        d2 = d + (field(x + 0.2 * d, tn) - c)
        x, c = x + 0.1 * (d + d2), d
    err_ours = float((res.x - exact).norm(dim=1).mean())
    err_stale = float((x - exact).norm(dim=1).mean())
    assert err_stale > 2 * err_ours, (err_ours, err_stale)  # measured 0.083 vs 0.032 (Heun's own error)


def test_stepper_state_and_errors(gen):
    field = _field()
    x0 = torch.randn(4, 2, generator=gen, dtype=torch.float64)
    seq = FlowTurboStepper(1, 2)
    out = solve(field, x0, steps=3, stepper=seq)
    assert out.carry.index == 3 and out.nfe == 4
    # the stepper holds no per-solve state: a second solve with the same object gives the same result
    again = solve(field, x0, steps=3, stepper=seq)
    assert torch.equal(out.x, again.x) and again.nfe == 4
    with pytest.raises(FewflowError, match="past its end"):
        solve(field, x0, steps=4, stepper=seq)
    # explicit carry, step by step
    t = torch.zeros(4, dtype=torch.float64)
    x1, c1 = seq.step_carry(field, x0, t, t + 1 / 3, FlowTurboCarry())
    assert c1.index == 1 and c1.v_cache is not None
    with pytest.raises(FewflowError, match="refiner"):
        FlowTurboStepper(1, 1, 2)
    with pytest.raises(FewflowError, match="previous velocity"):
        FlowTurboStepper(0, 0, 2, refiner=lambda x, t, v: v)
    with pytest.raises(FewflowError, match="n_pseudo"):
        FlowTurboStepper(1, -1)


def test_compile_flag_matches_eager(gen):
    if not hasattr(torch, "compile"):
        pytest.skip("torch.compile unavailable")
    field = _field()
    x0 = torch.randn(8, 2, generator=gen, dtype=torch.float64)
    plain = flowturbo_sample(field, x0, n_heun=1, n_pseudo=2)
    compiled = flowturbo_sample(field, x0, n_heun=1, n_pseudo=2, compile="eager")
    assert torch.allclose(plain.x, compiled.x) and compiled.nfe_predictor == plain.nfe_predictor


def test_refiner_net_and_objective(gen):
    field = _field()
    x1 = field.sample(64, generator=gen).to(torch.float64)
    net = FlowTurboRefiner(2, hidden=16, depth=1).double()
    v = torch.randn(64, 2, dtype=torch.float64)
    assert torch.equal(net(x1, 0.3, v), torch.zeros_like(x1))  # zero-initialised output layer
    loss_fn = FlowTurboRefinerLoss(field)
    # a zero refiner scores the baseline; the exact increment scores 0
    zero = loss_fn(lambda x, t, vp: torch.zeros_like(x), x1, generator=torch.Generator().manual_seed(1))
    assert zero.diagnostics["loss"] == pytest.approx(zero.diagnostics["baseline"])
    assert zero.diagnostics["loss"] > 0
    assert 0.0 <= zero.diagnostics["dt"] <= 0.12
    exact = loss_fn(lambda x, t, vp: field(x, t) - vp, x1, generator=torch.Generator().manual_seed(1))
    assert exact.diagnostics["loss"] < 1e-20
    out = loss_fn(net, x1, generator=torch.Generator().manual_seed(1))
    out.loss.backward()
    assert net.out.weight.grad is not None and float(net.out.weight.grad.abs().sum()) > 0
    with pytest.raises(FewflowError, match="max_dt"):
        FlowTurboRefinerLoss(field, max_dt=0.0)
    with pytest.raises(FewflowError, match="features"):
        net(torch.zeros(3, 5, dtype=torch.float64), 0.5, torch.zeros(3, 5, dtype=torch.float64))


def _moons(n: int = 4096) -> torch.Tensor:
    from fewflow.data import load_dataset

    return load_dataset("moons", n=n, seed=0).x.float()


def _train_cfm_moons(steps: int = 250) -> torch.nn.Module:
    """A tiny CFM teacher on moons (a few seconds on one core)."""
    from fewflow.models import MLP
    from fewflow.objectives import CFMLoss
    from fewflow.paths import AffinePath

    torch.manual_seed(0)
    data = _moons()
    model = MLP(2, hidden=64, depth=2)
    loss_fn = CFMLoss(AffinePath("linear"))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        loss = loss_fn(model, data[torch.randint(0, data.shape[0], (128,), generator=g)], generator=g).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval().requires_grad_(False)


@pytest.mark.slow
def test_flowturbo_beats_euler_and_heun_on_trained_model():
    from fewflow.metrics.distances import sliced_wasserstein

    teacher = _train_cfm_moons()
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(2000, 2, generator=g)
    ref = solve(teacher, x0, steps=100).x

    def sw(a):
        return sliced_wasserstein(a, ref, n_proj=128, generator=torch.Generator().manual_seed(0))

    # refiner: 300 short steps on the frozen teacher's velocity increments
    data = _moons()
    refiner = FlowTurboRefiner(2, hidden=64, depth=2)
    loss_fn = FlowTurboRefinerLoss(teacher)
    opt = torch.optim.Adam(refiner.parameters(), lr=2e-3)
    gl = torch.Generator().manual_seed(5)
    for _ in range(300):
        idx = torch.randint(0, data.shape[0], (128,), generator=gl)
        out = loss_fn(refiner, data[idx], generator=gl)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    refiner.eval().requires_grad_(False)

    # equal predictor NFE = 4
    ft = flowturbo_sample(teacher, x0, n_heun=1, n_pseudo=2, n_refine=2, refiner=refiner)
    assert ft.nfe_predictor == 4 and ft.nfe_refiner == 4
    pc = flowturbo_sample(teacher, x0, n_heun=1, n_pseudo=2)
    unrefined = flowturbo_sample(teacher, x0, n_heun=1, n_pseudo=2, n_refine=2,
                                 refiner=lambda x, t, v: torch.zeros_like(x))
    e_euler = sw(solve(teacher, x0, steps=4).x)
    e_heun = sw(solve(teacher, x0, steps=2, stepper="heun").x)
    e_pc, e_ft = sw(pc.x), sw(ft.x)
    assert e_pc < e_heun < e_euler, (e_pc, e_heun, e_euler)
    assert e_ft < 0.6 * e_heun, (e_ft, e_heun)  # measured 0.080 vs 0.21
    e_unref = sw(unrefined.x)
    # the trained refiner beats keeping the last velocity (measured 0.080 vs 0.156)
    assert e_ft < 0.7 * e_unref, (e_ft, e_unref)
