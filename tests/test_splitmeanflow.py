"""Mechanics of the SplitMeanFlow objective (fewflow time: t = 0 noise, t = 1 data)."""

from __future__ import annotations

import pytest
import torch
from fewstep_helpers import gaussian_flow, train_on

from fewflow import FewflowError
from fewflow.models import MLP
from fewflow.objectives.cfm import CFMLoss
from fewflow.objectives.splitmeanflow import SplitMeanFlowLoss, splitmeanflow_target
from fewflow.paths import AffinePath, CosineSchedule, LinearSchedule


def _times(gen: torch.Generator, b: int):
    a = torch.rand(b, generator=gen, dtype=torch.float64)
    c = torch.rand(b, generator=gen, dtype=torch.float64)
    return torch.minimum(a, c), torch.maximum(a, c), torch.rand(b, generator=gen, dtype=torch.float64)


def _flow_map_mlp(**kw) -> MLP:
    torch.manual_seed(0)
    model = MLP(3, hidden=32, depth=2, flow_map=True, time_features="fourier", num_frequencies=3, **kw)
    with torch.no_grad():  # randomise the zero-initialised conditioning so u depends on (s, t)
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.double()


def test_interval_splitting_identity_is_exact_for_the_gaussian_flow_map(gen):
    flow = gaussian_flow()
    model = flow.as_flow_map_model()
    x = torch.randn(256, 3, generator=gen, dtype=torch.float64) * 2
    s, t, lam = _times(gen, 256)
    tgt = splitmeanflow_target(model, x, s, t, lam)
    torch.testing.assert_close(tgt, flow.average_velocity(x, s, t), rtol=1e-12, atol=1e-12)
    # the same identity in its un-normalised form: (t-s) u(s,t) = (r-s) u(s,r) + (t-r) u(x_r, r, t)
    r = s + lam * (t - s)
    x_r = flow.flow_map(x, s, r)
    lhs = (t - s)[:, None] * flow.average_velocity(x, s, t)
    rhs = (r - s)[:, None] * flow.average_velocity(x, s, r)
    rhs = rhs + (t - r)[:, None] * flow.average_velocity(x_r, r, t)
    torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=1e-12)


def test_loss_vanishes_at_the_exact_solution_and_not_elsewhere(gen):
    flow = gaussian_flow()
    exact = flow.as_flow_map_model()
    x1 = flow.sample(128, generator=gen)
    x0 = torch.randn(128, 3, generator=gen, dtype=torch.float64)
    s, t, lam = _times(gen, 128)
    t[:32] = s[:32]  # boundary rows
    loss = SplitMeanFlowLoss(teacher=flow.velocity)  # boundary velocity = exact marginal velocity
    out = loss.loss_at(exact, x0, x1, s, t, lam)
    assert float(out.loss) < 1e-20
    assert out.diagnostics["frac_boundary"] == pytest.approx(0.25)

    class Scaled:
        """A flow map that is not self-consistent: the exact one, bent by a time-dependent factor."""

        is_flow_map = True

        def __call__(self, x, s, t):
            return flow.average_velocity(x, s, t) * (1 + 0.3 * (t - s)[:, None])

    bad = loss.loss_at(Scaled(), x0, x1, s, t, lam)
    assert bad.diagnostics["mse_consistency"] > 4e-3  # measured 9.5e-3
    # without a teacher the boundary rows carry the conditional-velocity variance, the consistency rows do not
    plain = SplitMeanFlowLoss().loss_at(exact, x0, x1, s, t, lam)
    assert plain.diagnostics["mse_consistency"] < 1e-20 < plain.diagnostics["mse_boundary"]


def test_all_boundary_rows_is_exactly_cfm(gen):
    model = _flow_map_mlp()
    x0 = torch.randn(32, 3, generator=gen, dtype=torch.float64)
    x1 = torch.randn(32, 3, generator=gen, dtype=torch.float64) + 1.0
    t = torch.rand(32, generator=gen, dtype=torch.float64)
    lam = torch.rand(32, dtype=torch.float64)
    out = SplitMeanFlowLoss(reduction="mean").loss_at(model, x0, x1, t, t, lam)

    class Fixed:
        def sample(self, n, *, device=None, dtype=None, generator=None):
            return t.to(device=device, dtype=dtype)

    ref = CFMLoss(AffinePath(LinearSchedule()), time_sampler=Fixed()).pair_loss(
        lambda x, tt: model(x, tt, tt), x0, x1
    )
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-12, atol=1e-14)
    g1 = torch.autograd.grad(out.loss, list(model.parameters()))
    g2 = torch.autograd.grad(ref.loss, list(model.parameters()))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_target_is_detached_and_matches_a_manual_computation(gen):
    model = _flow_map_mlp()
    x0 = torch.randn(16, 3, generator=gen, dtype=torch.float64)
    x1 = torch.randn(16, 3, generator=gen, dtype=torch.float64)
    s, t, lam = _times(gen, 16)
    teacher = _flow_map_mlp()  # any velocity field: use u(x, t, t) of another net

    def teacher_v(x, tt):
        return teacher(x, tt, tt) * 0.5

    out = SplitMeanFlowLoss(teacher=teacher_v).loss_at(model, x0, x1, s, t, lam)
    grads = torch.autograd.grad(out.loss, list(model.parameters()))
    with torch.no_grad():
        xs = s[:, None] * x1 + (1 - s[:, None]) * x0
        r = s + lam * (t - s)
        u1 = model(xs, s, r)
        u2 = model(xs + (r - s)[:, None] * u1, r, t)
        tgt = lam[:, None] * u1 + (1 - lam[:, None]) * u2
    pred = model(xs, s, t)
    manual = (pred - tgt).pow(2).sum(1).mean()
    torch.testing.assert_close(out.loss, manual)
    for a, b in zip(grads, torch.autograd.grad(manual, list(model.parameters()))):
        torch.testing.assert_close(a, b)
    # boundary rows use the teacher's velocity, not x1 - x0
    s2 = s.clone()
    out_b = SplitMeanFlowLoss(teacher=teacher_v).loss_at(model, x0, x1, s2, s2, lam)
    with torch.no_grad():
        xb = s2[:, None] * x1 + (1 - s2[:, None]) * x0
        ref = (model(xb, s2, s2) - teacher_v(xb, s2)).pow(2).sum(1).mean()
    torch.testing.assert_close(out_b.loss.detach(), ref)


def test_full_call_with_labels(gen):
    torch.manual_seed(0)
    model = MLP(2, hidden=16, depth=1, flow_map=True, num_classes=3)
    x1 = torch.randn(20, 2, generator=gen)
    y = torch.randint(0, 3, (20,), generator=gen)
    loss = SplitMeanFlowLoss(boundary_fraction=0.5, label_dropout=0.2, num_classes=3)
    out = loss(model, x1, generator=gen, y=y)
    out.loss.backward()
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    assert out.diagnostics["frac_boundary"] == pytest.approx(0.5)
    s, t, lam = loss.sample_times(20, x1, generator=gen)
    assert int((s == t).sum()) == 10 and bool((s <= t).all()) and bool(((lam >= 0) & (lam <= 1)).all())


def test_bad_inputs_raise(gen):
    with pytest.raises(FewflowError, match="anchor"):
        SplitMeanFlowLoss(boundary_fraction=0.0)
    with pytest.raises(FewflowError, match="linear path"):
        SplitMeanFlowLoss(path=AffinePath(CosineSchedule()))
    with pytest.raises(FewflowError, match="flow-map"):
        SplitMeanFlowLoss()(MLP(2, hidden=8, depth=1), torch.randn(4, 2))
    with pytest.raises(FewflowError, match="teacher"):
        SplitMeanFlowLoss(teacher=3)
    model = MLP(2, hidden=8, depth=1, flow_map=True)
    with pytest.raises(FewflowError, match="s <= t"):
        SplitMeanFlowLoss().loss_at(model, torch.randn(2, 2), torch.randn(2, 2), torch.tensor([0.9, 0.1]),
                                    torch.tensor([0.1, 0.2]), torch.rand(2))


@pytest.mark.slow
def test_two_step_splitmeanflow_beats_two_step_cfm_euler_on_moons():
    from fewflow.data import load_dataset
    from fewflow.metrics.distances import sliced_wasserstein

    data = load_dataset("moons", n=4000, seed=0).x.float()
    test = load_dataset("moons", n=2000, seed=1).x.float()
    x0 = torch.randn(2000, 2, generator=torch.Generator().manual_seed(5))

    def train(model, objective, steps=500):
        return train_on(model, objective, data, steps)

    def swd(a):
        return sliced_wasserstein(a, test, generator=torch.Generator().manual_seed(1))

    torch.manual_seed(0)
    cfm = train(MLP(2, hidden=64, depth=2), CFMLoss(AffinePath(LinearSchedule())))
    torch.manual_seed(0)
    smf = train(MLP(2, hidden=64, depth=2, flow_map=True, time_features="fourier", num_frequencies=3),
                SplitMeanFlowLoss())
    z, h, o = torch.zeros(2000), torch.full((2000,), 0.5), torch.ones(2000)
    with torch.no_grad():
        xe = x0 + 0.5 * cfm(x0, z)
        w_cfm = swd(xe + 0.5 * cfm(xe, h))  # 2-step Euler
        xm = x0 + 0.5 * smf(x0, z, h)
        w_smf = swd(xm + 0.5 * smf(xm, h, o))  # 2-NFE flow map
    # measured 0.13 vs 0.68; x0 itself (an untrained, zero-output flow map) scores 0.59
    assert w_smf * 3 < w_cfm, (w_smf, w_cfm)
    assert w_smf < 0.25, (w_smf, w_cfm)
