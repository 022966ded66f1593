"""Mechanics of the MF-RAE recipe: CMT on teacher trajectories, MFD with finite differences, MFT."""

from __future__ import annotations

import pytest
import torch
from fewstep_helpers import FixedTime, flow_map_mlp, gaussian_flow

from fewflow import FewflowError
from fewflow.models import MLP
from fewflow.objectives.cfm import CFMLoss
from fewflow.objectives.meanflow import flow_map_jvp
from fewflow.objectives.mfrae import (
    ConsistencyMidTrainingLoss,
    MeanFlowBootstrapLoss,
    MeanFlowDistillationLoss,
    finite_difference_du_ds,
    init_from_teacher,
)
from fewflow.paths import AffinePath, LinearSchedule
from fewflow.solvers import solve


def _times(gen, b=32):
    a = torch.rand(b, generator=gen, dtype=torch.float64) * 0.9 + 0.05
    c = torch.rand(b, generator=gen, dtype=torch.float64) * 0.9 + 0.05
    return torch.minimum(a, c), torch.maximum(a, c)


# ------------------------------------------------------------------------------------------------ CMT


def test_cmt_on_exact_flow_map_trajectories_is_zero(gen):
    flow = gaussian_flow()
    exact = flow.as_flow_map_model()
    times = torch.linspace(0, 1, 9, dtype=torch.float64)
    x0 = torch.randn(16, 3, generator=gen, dtype=torch.float64)
    traj = torch.stack([flow.flow_map(x0, 0.0, float(t)) for t in times])
    cmt = ConsistencyMidTrainingLoss(teacher=flow, pairs_per_trajectory=6)
    out = cmt.loss_on_trajectory(exact, traj, times, generator=gen)
    assert float(out.loss) < 1e-20
    assert out.diagnostics["pairs"] == 96


def test_cmt_targets_are_the_teacher_discrete_flow_map(gen):
    """With Euler trajectories, the target of a neighbouring pair (i, i+1) is the teacher velocity at x_i."""
    flow = gaussian_flow()
    cmt = ConsistencyMidTrainingLoss(teacher=flow, steps=8)
    x0 = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    traj, times = cmt.trajectories(x0)
    assert traj.shape == (9, 4, 3) and torch.equal(traj[0], x0)
    rows, i = torch.tensor([0, 1, 2, 3]), torch.tensor([0, 3, 5, 7])
    seen = {}

    def probe(x, s, t):
        seen["x"], seen["s"], seen["t"] = x, s, t
        return torch.zeros_like(x)

    probe.is_flow_map = True
    out = cmt.loss_on_trajectory(probe, traj, times, pairs=(rows, i, i + 1))
    expected = flow.velocity(traj[i, rows], times[i])
    torch.testing.assert_close(out.loss, expected.pow(2).mean())
    torch.testing.assert_close(seen["s"], times[i])
    torch.testing.assert_close(seen["t"], times[i + 1])
    # random pairs always have i < j
    out = cmt.loss_on_trajectory(probe, traj, times, generator=gen)
    assert bool((seen["s"] < seen["t"]).all())
    with pytest.raises(FewflowError, match="i < j"):
        cmt.loss_on_trajectory(probe, traj, times, pairs=(rows, i, i))


def test_cmt_full_call_backprops(gen):
    flow = gaussian_flow()
    model = flow_map_mlp()
    out = ConsistencyMidTrainingLoss(teacher=flow, steps=4, pairs_per_trajectory=2)(
        model, torch.randn(8, 3, generator=gen, dtype=torch.float64), generator=gen
    )
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())


# ---------------------------------------------------------------------------------- finite differences


def test_fd_derivative_matches_jvp(gen):
    model = flow_map_mlp()
    s, t = _times(gen)
    x = torch.randn(32, 3, generator=gen, dtype=torch.float64)
    v = torch.randn(32, 3, generator=gen, dtype=torch.float64)
    _, du_jvp = flow_map_jvp(model, x, s, t, v, 1.0, 0.0)
    errs = [float((finite_difference_du_ds(model, x, s, t, v, d) - du_jvp).abs().max()) for d in (2e-3, 1e-3)]
    assert errs[0] < 1e-2 * float(du_jvp.abs().max())
    assert errs[0] / errs[1] == pytest.approx(4.0, rel=0.1)  # central difference: O(delta^2)
    # at the ends of [0, 1] the stencil is clipped (one-sided) and stays finite and close
    s0, t1 = torch.zeros(32, dtype=torch.float64), torch.ones(32, dtype=torch.float64)
    _, du0 = flow_map_jvp(model, x, s0, t1, v, 1.0, 0.0)
    assert float((finite_difference_du_ds(model, x, s0, t1, v, 1e-4) - du0).abs().max()) < 1e-2


def test_mfd_target_of_exact_flow_map_and_teacher(gen):
    flow = gaussian_flow()
    exact = flow.as_flow_map_model()
    s, t = _times(gen, 64)
    x = flow.sample(64, t=0.5, generator=gen)
    mfd = MeanFlowDistillationLoss(teacher=flow, delta=5e-3)
    v = flow.velocity(x, s)
    tgt = mfd.target(exact, x, s, t, v, {})
    u = exact(x, s, t)
    err = float((tgt - u).abs().max())
    assert err < 1e-4
    tgt2 = MeanFlowDistillationLoss(teacher=flow, delta=2.5e-3).target(exact, x, s, t, v, {})
    assert err / float((tgt2 - u).abs().max()) == pytest.approx(4.0, rel=0.1)


def test_mft_s_equal_t_is_cfm_and_mfd_regresses_the_teacher(gen):
    model = flow_map_mlp()
    x0 = torch.randn(32, 3, generator=gen, dtype=torch.float64)
    x1 = torch.randn(32, 3, generator=gen, dtype=torch.float64) + 2.0
    t = torch.rand(32, generator=gen, dtype=torch.float64)
    out = MeanFlowBootstrapLoss(adaptive_p=0.0, square=False, reduction="mean").loss_at(model, x0, x1, t, t)
    ref = CFMLoss(AffinePath(LinearSchedule()), time_sampler=FixedTime(t)).pair_loss(
        lambda x, tt: model(x, tt, tt), x0, x1
    )
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-12, atol=1e-14)
    g = torch.autograd.grad(out.loss, list(model.parameters()))
    g_ref = torch.autograd.grad(ref.loss, list(model.parameters()))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)

    flow = gaussian_flow()
    x_t = t[:, None] * x1 + (1 - t[:, None]) * x0
    per = (model(x_t, t, t) - flow.velocity(x_t, t)).pow(2).sum(1)
    # the code's weighting squares the per-sample loss: mean L^2 / sg(L^2 + c)^p
    out = MeanFlowDistillationLoss(teacher=flow).loss_at(model, x0, x1, t, t)
    torch.testing.assert_close(out.loss, (per**2 / (per.detach() ** 2 + 1e-3)).mean())


def test_mfd_sample_times_ratio_and_shift(gen):
    x1 = torch.randn(64, 2, generator=gen)
    s, t = MeanFlowDistillationLoss(teacher=lambda x, t: x).sample_times(64, x1, gen)
    assert int((s != t).sum()) == 16 and bool((s <= t).all())
    s2, t2 = MeanFlowDistillationLoss(teacher=lambda x, t: x, shift=6.93, ratio=1.0).sample_times(
        4096, x1, gen
    )
    # shift > 1 moves times toward the noise (t = 0): unshifted sorted uniforms have means 1/3 and 2/3
    assert float(s2.mean()) < 0.2 and float(t2.mean()) < 0.45


class _FixedPairs:
    """A TimePairSampler stub returning fixed sorted pairs (s, t)."""

    def __init__(self, s, t):
        self.s, self.t = torch.tensor(s), torch.tensor(t)

    def sample(self, n, *, device=None, dtype=None, generator=None):
        return self.s.to(device=device, dtype=dtype), self.t.to(device=device, dtype=dtype)


def test_mfd_boundary_rows_sit_at_the_start_time(gen):
    """The code sorts r < t (noise at t = 1) and sets r = t: boundary rows take its noise-side time, which
    is fewflow's start s (the smaller draw), not the end t."""
    x1 = torch.randn(4, 2, generator=gen)
    sampler = _FixedPairs([0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8])
    s, t = MeanFlowDistillationLoss(teacher=lambda x, t: x, time_sampler=sampler).sample_times(4, x1, gen)
    torch.testing.assert_close(s, torch.tensor([0.1, 0.2, 0.3, 0.4]))
    torch.testing.assert_close(t, torch.tensor([0.5, 0.2, 0.3, 0.4]))  # row 0 keeps s < t (ratio 1/4)
    # with two uniform draws the boundary time is their minimum: mean 1/3 (the end would give 2/3)
    x1 = torch.randn(40000, 2, generator=gen)
    s, t = MeanFlowBootstrapLoss().sample_times(40000, x1, gen)
    b = s == t
    assert int((~b).sum()) == 10000
    assert float(s[b].mean()) == pytest.approx(1 / 3, abs=0.01)
    assert float(t[~b].mean()) == pytest.approx(2 / 3, abs=0.01)


def test_init_from_teacher_reproduces_teacher_velocity(gen):
    teacher = MLP(3, hidden=16, depth=2, time_features="fourier", num_frequencies=3)
    student = MLP(3, hidden=16, depth=2, time_features="fourier", num_frequencies=3, flow_map=True)
    info = init_from_teacher(student, teacher, zero=("cond.h_embed.mlp.2",))
    assert any(n.startswith("cond.h_embed") for n in info["new"]) and info["zeroed"]
    x = torch.randn(8, 3, generator=gen)
    s, t = torch.rand(8, generator=gen), torch.rand(8, generator=gen)
    torch.testing.assert_close(student(x, s, t), teacher(x, t))
    with pytest.raises(FewflowError, match="copied nothing"):
        init_from_teacher(student, torch.nn.Linear(2, 2))


def test_bad_inputs_raise():
    with pytest.raises(FewflowError, match="teacher"):
        MeanFlowDistillationLoss(teacher=3)
    with pytest.raises(FewflowError, match="no teacher"):
        MeanFlowBootstrapLoss(teacher=lambda x, t: x)
    with pytest.raises(FewflowError, match="delta"):
        MeanFlowDistillationLoss(teacher=lambda x, t: x, delta=0.0)
    with pytest.raises(FewflowError, match="steps"):
        ConsistencyMidTrainingLoss(teacher=lambda x, t: x, steps=0)
    with pytest.raises(FewflowError, match="linear path"):
        MeanFlowBootstrapLoss(path=AffinePath("cosine"))


# ------------------------------------------------------------------------------------ small-scale training


def _train(model, objective, data, steps, lr=1e-3, batch=256):
    g = torch.Generator().manual_seed(1)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        out = objective(model, data[torch.randint(0, data.shape[0], (batch,), generator=g)], generator=g)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    return model


@pytest.mark.slow
def test_cmt_then_mfd_one_step_beats_teacher_euler():
    from fewflow.data import load_dataset
    from fewflow.metrics import sliced_wasserstein

    data = load_dataset("moons", n=4000, seed=0).x.float()
    test = load_dataset("moons", n=2000, seed=1).x.float()
    z = torch.randn(2000, 2, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(0)
    teacher = MLP(2, hidden=64, depth=2, time_features="fourier", num_frequencies=3)
    _train(teacher, CFMLoss(AffinePath(LinearSchedule())), data, 600, lr=3e-3)
    teacher.requires_grad_(False)
    student = MLP(2, hidden=64, depth=2, flow_map=True, time_features="fourier", num_frequencies=3)
    init_from_teacher(student, teacher, zero=("cond.h_embed.mlp.2",))
    _train(
        student,
        ConsistencyMidTrainingLoss(teacher, steps=8, pairs_per_trajectory=2),
        data[:64],
        300,
        lr=1e-3,
        batch=64,
    )
    _train(student, MeanFlowDistillationLoss(teacher, ratio=0.5, adaptive_p=0.0), data, 300, lr=1e-3)

    def swd(x):
        return sliced_wasserstein(x, test, generator=torch.Generator().manual_seed(1))

    w_teacher = swd(solve(teacher, z, steps=1).x)
    w1, w2 = swd(solve(student, z, steps=1).x), swd(solve(student, z, steps=2).x)
    assert min(w1, w2) * 3 < w_teacher, (w1, w2, w_teacher)
