"""Mechanics of consistency distillation / training and shortcut models in flow-map form (fewflow time)."""

from __future__ import annotations

import pytest
import torch
from fewstep_helpers import FixedTime, flow_map_mlp, gaussian_flow

from fewflow import FewflowError
from fewflow.models import MLP
from fewflow.objectives.cfm import CFMLoss
from fewflow.objectives.consistency import ConsistencyLoss, ShortcutLoss, consistency_target, shortcut_target
from fewflow.paths import AffinePath, LinearSchedule


def _pairs(gen, b=32):
    x0 = torch.randn(b, 3, generator=gen, dtype=torch.float64)
    x1 = torch.randn(b, 3, generator=gen, dtype=torch.float64) + 2.0
    t = torch.rand(b, generator=gen, dtype=torch.float64)
    return x0, x1, t


def _assert_equals_cfm(out, model, x0, x1, t):
    g = torch.autograd.grad(out.loss, list(model.parameters()))
    ref = CFMLoss(AffinePath(LinearSchedule()), time_sampler=FixedTime(t)).pair_loss(
        lambda x, tt: model(x, tt, tt), x0, x1
    )
    g_ref = torch.autograd.grad(ref.loss, list(model.parameters()))
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-12, atol=1e-14)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# -------------------------------------------------------------------------- s = t / d = 0 is plain CFM


def test_consistency_s_equal_t_is_cfm(gen):
    model = flow_map_mlp()
    x0, x1, t = _pairs(gen)
    out = ConsistencyLoss(delta=0.1).loss_at(model, x0, x1, t, t)
    _assert_equals_cfm(out, model, x0, x1, t)


def test_consistency_distillation_s_equal_t_regresses_the_teacher(gen):
    flow = gaussian_flow()
    model = flow_map_mlp()
    x0, x1, t = _pairs(gen)
    out = ConsistencyLoss(teacher=flow, delta=0.1).loss_at(model, x0, x1, t, t)
    x_t = t[:, None] * x1 + (1 - t[:, None]) * x0
    ref = (model(x_t, t, t) - flow.velocity(x_t, t)).pow(2).mean()
    torch.testing.assert_close(out.loss, ref, rtol=1e-12, atol=1e-14)


def test_shortcut_d_zero_is_cfm(gen):
    model = flow_map_mlp()
    x0, x1, t = _pairs(gen)
    out = ShortcutLoss().loss_at(model, x0, x1, t, torch.zeros_like(t))
    _assert_equals_cfm(out, model, x0, x1, t)


# -------------------------------------------------------- exact flow map + exact teacher: target = prediction


@pytest.mark.parametrize("stepper,order", [("euler", 2), ("heun", 3)])
def test_consistency_distillation_target_of_exact_flow_map(gen, stepper, order):
    """u_tgt - u = (local error of one teacher step) / (t - s): O(delta^(k+1)) for an order-k step."""
    flow = gaussian_flow()
    exact = flow.as_flow_map_model()
    x = flow.sample(64, t=0.2, generator=gen)
    s = torch.full((64,), 0.2, dtype=torch.float64)
    errs = []
    for end in (1.0, 0.8):
        t = torch.full((64,), end, dtype=torch.float64)
        u = exact(x, s, t)
        for delta in (0.02, 0.01):
            tgt, _, _ = consistency_target(exact, x, s, t, delta, teacher=flow, stepper=stepper)
            errs.append(float((tgt - u).abs().max()))
    for e_big, e_small in ((errs[0], errs[1]), (errs[2], errs[3])):
        assert e_small < 1e-3
        assert e_big / e_small == pytest.approx(2.0**order, rel=0.15)


def test_consistency_training_target_formula(gen):
    """Independent computation of the straight-path consistency target, incl. the last interval."""
    model = flow_map_mlp()
    x0, x1, _ = _pairs(gen, 8)
    s = torch.tensor([0.0, 0.1, 0.3, 0.5, 0.7, 0.85, 0.95, 0.99], dtype=torch.float64)
    t = torch.tensor([1.0, 1.0, 0.6, 1.0, 0.9, 0.9, 1.0, 1.0], dtype=torch.float64)
    delta = 0.1
    x_s = s[:, None] * x1 + (1 - s[:, None]) * x0
    tgt, _, _ = consistency_target(model, x_s, s, t, delta, velocity=x1 - x0)
    for i in range(8):
        s2 = min(float(s[i]) + delta, float(t[i]))
        x2 = s2 * x1[i : i + 1] + (1 - s2) * x0[i : i + 1]
        carry = model(x2, torch.tensor([s2], dtype=torch.float64), t[i : i + 1]) if s2 < float(t[i]) else 0.0
        exp = ((x2 - x_s[i : i + 1]) + (float(t[i]) - s2) * carry) / float(t[i] - s[i])
        torch.testing.assert_close(tgt[i : i + 1], exp.detach(), rtol=1e-10, atol=1e-12)
    assert not tgt.requires_grad
    # rows whose consistency step reaches the end are pure flow matching
    torch.testing.assert_close(tgt[6:], (x1 - x0)[6:])


def test_consistency_loss_backprops_only_through_the_online_branch(gen):
    model = flow_map_mlp()
    x0, x1, t = _pairs(gen)
    s = t * 0.5
    out = ConsistencyLoss(delta=0.05, velocity_weight=0.3).loss_at(model, x0, x1, s, torch.ones_like(s))
    # gradient equals that of the same loss with a frozen copy providing the targets
    frozen = flow_map_mlp()
    ref = ConsistencyLoss(delta=0.05, velocity_weight=0.3, target_model=frozen).loss_at(
        model, x0, x1, s, torch.ones_like(s)
    )
    torch.testing.assert_close(out.loss, ref.loss)
    g = torch.autograd.grad(out.loss, list(model.parameters()))
    g_ref = torch.autograd.grad(ref.loss, list(model.parameters()))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b)
    assert out.diagnostics["velocity_consistency"] > 0


def test_shortcut_target_of_exact_flow_map(gen):
    flow = gaussian_flow()
    exact = flow.as_flow_map_model()
    x = flow.sample(32, t=0.25, generator=gen)
    s = torch.full((32,), 0.25, dtype=torch.float64)
    d = torch.full((32,), 0.125, dtype=torch.float64)
    tgt = shortcut_target(exact, x, s, d, min_step=1 / 128)
    torch.testing.assert_close(tgt, exact(x, s, s + 2 * d), rtol=1e-10, atol=1e-12)
    # at the smallest level the half steps use the instantaneous velocity (two Euler steps)
    dm = torch.full((32,), 1 / 128, dtype=torch.float64)
    tgt_min = shortcut_target(exact, x, s, dm, min_step=1 / 128)
    v1 = flow.velocity(x, s)
    v2 = flow.velocity(x + dm[:, None] * v1, s + dm)
    torch.testing.assert_close(tgt_min, 0.5 * (v1 + v2))
    # ... which is first order in the step: the error halves with the step
    e1 = (tgt_min - exact(x, s, s + 2 * dm)).abs().max()
    e2 = (shortcut_target(exact, x, s, dm / 2, min_step=1 / 256) - exact(x, s, s + dm)).abs().max()
    assert float(e1 / e2) == pytest.approx(2.0, rel=0.1)


def test_shortcut_time_sampling(gen):
    loss = ShortcutLoss(min_step=1 / 16, bootstrap_fraction=0.5)
    x1 = torch.randn(64, 2, generator=gen)
    s, d = loss.sample_times(64, x1, generator=gen)
    boot = d > 0
    assert int(boot.sum()) == 32 and bool((d[32:] == 0).all())
    big = 2 * d[boot]
    assert set(big.tolist()) == {1.0, 0.5, 0.25, 0.125}  # 2d = 2^-k, k = 0..log2(16) - 1
    assert bool((torch.remainder(s[boot], big) == 0).all())  # s on the 2d grid
    assert bool((s[boot] + big <= 1).all())


def test_bad_inputs_raise(gen):
    model = flow_map_mlp()
    with pytest.raises(FewflowError, match="delta"):
        ConsistencyLoss(delta=0.0)
    with pytest.raises(FewflowError, match="velocity stepper"):
        ConsistencyLoss(teacher=lambda x, t: x, teacher_stepper="flowmap")
    with pytest.raises(FewflowError, match="min_step"):
        ShortcutLoss(min_step=0.3)
    with pytest.raises(FewflowError, match="linear path"):
        ShortcutLoss(path=AffinePath("cosine"))
    with pytest.raises(FewflowError, match="s <= t"):
        ConsistencyLoss().loss_at(
            model, *_pairs(gen, 4)[:2], torch.full((4,), 0.9).double(), torch.full((4,), 0.1).double()
        )
    with pytest.raises(FewflowError, match="flow-map"):
        ConsistencyLoss()(MLP(3, hidden=8, depth=1), torch.randn(4, 3))


# ------------------------------------------------------------------------------------ small-scale training


def _moons_teacher():
    from fewflow.data import load_dataset

    data = load_dataset("moons", n=4000, seed=0).x.float()
    torch.manual_seed(0)
    teacher = MLP(2, hidden=64, depth=2, time_features="fourier", num_frequencies=3)
    _train(teacher, CFMLoss(AffinePath(LinearSchedule())), data, 600, lr=3e-3)
    return teacher.requires_grad_(False), data


def _train(model, objective, data, steps, lr=1e-3, batch=256):
    g = torch.Generator().manual_seed(1)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        out = objective(model, data[torch.randint(0, data.shape[0], (batch,), generator=g)], generator=g)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    return model


@pytest.mark.slow
def test_consistency_distillation_and_shortcut_beat_teacher_one_step_euler():
    from fewflow.data import load_dataset
    from fewflow.metrics import sliced_wasserstein
    from fewflow.solvers import solve

    teacher, data = _moons_teacher()
    test = load_dataset("moons", n=2000, seed=1).x.float()
    z = torch.randn(2000, 2, generator=torch.Generator().manual_seed(5))

    def swd(x):
        return sliced_wasserstein(x, test, generator=torch.Generator().manual_seed(1))

    w_teacher = swd(solve(teacher, z, steps=1).x)
    torch.manual_seed(0)
    cd = MLP(2, hidden=64, depth=2, flow_map=True, time_features="fourier", num_frequencies=3)
    _train(cd, ConsistencyLoss(teacher=teacher, delta=1 / 16, teacher_stepper="euler"), data, 400, lr=2e-3)
    torch.manual_seed(0)
    sc = MLP(2, hidden=64, depth=2, flow_map=True, time_features="fourier", num_frequencies=3)
    _train(sc, ShortcutLoss(min_step=1 / 16), data, 500, lr=2e-3)
    w_cd = swd(solve(cd, z, steps=1).x)
    w_sc = swd(solve(sc, z, steps=2).x)
    assert w_cd * 3 < w_teacher, (w_cd, w_teacher)
    assert w_sc * 3 < w_teacher, (w_sc, w_teacher)
