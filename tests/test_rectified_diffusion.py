"""Mechanics of Rectified Diffusion: pair targets in the teacher parameterisation, first-order sampler."""

from __future__ import annotations

import pytest
import torch
from fewstep_helpers import FixedTime

from fewflow import FewflowError
from fewflow.analytic import GaussianFlow
from fewflow.models import MLP
from fewflow.objectives.cfm import CFMLoss
from fewflow.objectives.rectified_diffusion import (
    FirstOrderStep,
    RectifiedDiffusionLoss,
    pair_target,
    rectified_diffusion_pairs,
)
from fewflow.objectives.time_samplers import UniformTime
from fewflow.paths import AffinePath, CosineSchedule, LinearSchedule, VPSchedule
from fewflow.solvers import solve


def _pairs(gen, b=32):
    x0 = torch.randn(b, 3, generator=gen, dtype=torch.float64)
    x1 = torch.randn(b, 3, generator=gen, dtype=torch.float64) + 2.0
    t = torch.rand(b, generator=gen, dtype=torch.float64) * 0.9 + 0.05
    return x0, x1, t


@pytest.mark.parametrize("schedule", [CosineSchedule(), VPSchedule(), LinearSchedule()])
@pytest.mark.parametrize("prediction", ["epsilon", "x1", "velocity"])
def test_pair_target_converts_to_the_reflow_velocity(gen, schedule, prediction):
    """The retraining target in any parameterisation, converted to velocity, is the path velocity of the
    pair (x1 - x0, reflow's target, on the linear path)."""
    path = AffinePath(schedule)
    x0, x1, t = _pairs(gen)
    x_t = path.sample(x0, x1, t).x_t
    tgt = pair_target(path, prediction, x0, x1, t)
    src = "x0" if prediction == "epsilon" else prediction
    vel = path.convert(tgt, x_t, t, src, "velocity")
    torch.testing.assert_close(vel, path.sample(x0, x1, t).velocity, rtol=1e-9, atol=1e-9)
    if isinstance(schedule, LinearSchedule):
        torch.testing.assert_close(vel, x1 - x0, rtol=1e-9, atol=1e-9)


def test_velocity_mse_on_linear_path_is_reflow_cfm(gen):
    torch.manual_seed(0)
    model = MLP(3, hidden=16, depth=2).double()
    x0, x1, t = _pairs(gen)
    rd = RectifiedDiffusionLoss(
        AffinePath(LinearSchedule()), prediction="velocity", loss="mse", space="prediction"
    )
    out = rd.pair_loss(model, x0, x1, t=t)
    ref = CFMLoss(AffinePath(LinearSchedule()), time_sampler=FixedTime(t)).pair_loss(model, x0, x1)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-12, atol=1e-14)
    # the trainer's batch dict {"x1", "x0"} reaches the same loss through __call__
    rd2 = RectifiedDiffusionLoss(
        AffinePath(LinearSchedule()),
        prediction="velocity",
        loss="mse",
        space="prediction",
        time_sampler=FixedTime(t),
    )
    torch.testing.assert_close(rd2(model, x1, x0=x0).loss, ref.loss, rtol=1e-12, atol=1e-14)


def test_huber_loss_in_data_space(gen):
    path = AffinePath(CosineSchedule())
    x0, x1, t = _pairs(gen)
    pred = torch.randn(32, 3, generator=gen, dtype=torch.float64)
    rd = RectifiedDiffusionLoss(path, prediction="epsilon", huber_c=1e-3)
    out = rd.pair_loss(lambda x, tt: pred, x0, x1, t=t)
    a, s = CosineSchedule().alpha(t)[:, None], CosineSchedule().sigma(t)[:, None]
    x_t = a * x1 + s * x0
    err = (x_t - s * pred) / a - x1  # x1_hat of an epsilon model
    torch.testing.assert_close(out.loss, (torch.sqrt(err**2 + 1e-6) - 1e-3).mean())
    # the exact pair prediction has zero loss in both spaces
    assert float(rd.pair_loss(lambda x, tt: x0, x0, x1, t=t).loss) < 1e-12
    rd_p = RectifiedDiffusionLoss(path, prediction="epsilon", space="prediction")
    assert float(rd_p.pair_loss(lambda x, tt: x0, x0, x1, t=t).loss) < 1e-12


@pytest.mark.parametrize("prediction", ["epsilon", "x1"])
def test_one_first_order_step_from_the_pair_line_lands_on_x1(gen, prediction):
    """Every x_t of a pair lies on its DDIM line: one step with the pair's constant target reaches x1."""
    path = AffinePath(CosineSchedule())
    x0, x1, t = _pairs(gen)
    x_t = path.sample(x0, x1, t).x_t

    def oracle(x, tt):
        return pair_target(path, prediction, x0, x1, tt)

    res = solve(oracle, x_t, grid=[0.3, 0.6, 1.0], stepper=FirstOrderStep(path, prediction))
    # non-uniform start times: step each row from its own t via the stepper directly
    x_next = FirstOrderStep(path, prediction).step(oracle, x_t, t, torch.ones_like(t))
    torch.testing.assert_close(x_next, x1, rtol=1e-9, atol=1e-9)
    assert res.nfe == 2


def test_first_order_step_is_euler_on_the_linear_path(gen):
    torch.manual_seed(0)
    model = MLP(3, hidden=16, depth=2).double()
    x0 = torch.randn(8, 3, generator=gen, dtype=torch.float64)
    a = solve(model, x0, steps=3, stepper=FirstOrderStep(AffinePath(LinearSchedule()), "velocity")).x
    b = solve(model, x0, steps=3, stepper="euler").x
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_ddim_with_exact_teacher_converges_to_the_flow_map(gen):
    """First-order sampler with the exact epsilon prediction of a Gaussian flow on the VP path: error O(h)."""
    path = AffinePath(VPSchedule())
    flow = GaussianFlow(
        torch.tensor([1.0, -0.5, 0.3], dtype=torch.float64),
        torch.tensor([0.5, 0.2, 1.0], dtype=torch.float64),
        VPSchedule(),
    )

    def eps_model(x, t):
        return path.convert(flow.velocity(x, t), x, t, "velocity", "x0")

    x0 = torch.randn(64, 3, generator=gen, dtype=torch.float64)
    exact = flow.flow_map(x0, 0.0, 1.0)
    errs = []
    for steps in (20, 40):
        _, x1 = rectified_diffusion_pairs(eps_model, path, x0, prediction="epsilon", steps=steps)
        errs.append(float((x1 - exact).abs().max()))
    assert errs[1] < 0.2
    assert errs[0] / errs[1] == pytest.approx(2.0, rel=0.1)

    # DDIM does not depend on the parameterisation of an exact model (alpha_0 > 0 on the VP path)
    def x1_model(x, t):
        return path.convert(flow.velocity(x, t), x, t, "velocity", "x1")

    _, x1_a = rectified_diffusion_pairs(x1_model, path, x0, prediction="x1", steps=40)
    torch.testing.assert_close(x1_a, x1, rtol=1e-8, atol=1e-8)


def test_bad_inputs_raise(gen):
    path = AffinePath(CosineSchedule())
    with pytest.raises(FewflowError, match="prediction"):
        RectifiedDiffusionLoss(path, prediction="score")
    with pytest.raises(FewflowError, match="AffinePath"):
        RectifiedDiffusionLoss("cosine")
    with pytest.raises(FewflowError, match="x0="):
        RectifiedDiffusionLoss(path)(lambda x, t: x, torch.randn(4, 3))
    with pytest.raises(FewflowError, match="loss"):
        RectifiedDiffusionLoss(path, loss="l1")


@pytest.mark.slow
def test_rectified_diffusion_one_step_beats_teacher():
    """x1-prediction teacher on the cosine path; retrain on its first-order pairs in the same
    parameterisation; one first-order step of the student is far better than one of the teacher."""
    from fewflow.data import load_dataset
    from fewflow.metrics import sliced_wasserstein

    data = load_dataset("moons", n=4000, seed=0).x.float()
    test = load_dataset("moons", n=2000, seed=1).x.float()
    path = AffinePath(CosineSchedule())

    def train(model, step_fn, steps, lr):
        g = torch.Generator().manual_seed(1)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        for _ in range(steps):
            loss = step_fn(g)
            opt.zero_grad()
            loss.backward()
            opt.step()

    torch.manual_seed(0)
    teacher = MLP(2, hidden=64, depth=2, time_features="fourier", num_frequencies=3)

    def teacher_step(g):  # x1-prediction diffusion teacher: regress x1 from x_t
        x1 = data[torch.randint(0, 4000, (256,), generator=g)]
        x0 = torch.randn(x1.shape, generator=g)
        t = torch.rand(256, generator=g)
        return (teacher(path.sample(x0, x1, t).x_t, t) - x1).pow(2).mean()

    train(teacher, teacher_step, 600, 3e-3)
    teacher.requires_grad_(False)
    noise = torch.randn(4000, 2, generator=torch.Generator().manual_seed(2))
    x0p, x1p = rectified_diffusion_pairs(teacher, path, noise, prediction="x1", steps=32)
    student = MLP(2, hidden=64, depth=2, time_features="fourier", num_frequencies=3)
    student.load_state_dict(teacher.state_dict())
    student.requires_grad_(True)
    rd = RectifiedDiffusionLoss(path, prediction="x1", time_sampler=UniformTime(0.0, 1.0))

    def student_step(g):
        idx = torch.randint(0, 4000, (256,), generator=g)
        return rd(student, x1p[idx], x0=x0p[idx], generator=g).loss

    train(student, student_step, 500, 1e-3)
    z = torch.randn(2000, 2, generator=torch.Generator().manual_seed(5))

    def swd(x):
        return sliced_wasserstein(x, test, generator=torch.Generator().manual_seed(1))

    w_teacher = swd(solve(teacher, z, steps=1, stepper=rd.sampler()).x)
    w_student = swd(solve(student, z, steps=1, stepper=rd.sampler()).x)
    assert w_student * 3 < w_teacher, (w_student, w_teacher)
