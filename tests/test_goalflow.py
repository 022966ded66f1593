"""GoalFlow on nav2d: plan chunks, goal vocabulary, goal scoring on hand cases, 1-step samples, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fewflow._validate import FewflowError
from fewflow.control.demos import collect_demos
from fewflow.control.envs import make_env
from fewflow.control.goalflow import (
    GoalFlowConfig,
    fit_goalflow,
    goal_scores,
    goal_vocabulary,
    min_ade_fde,
    offroad_rate,
    plan_chunks,
)

torch.set_num_threads(1)


def test_goal_inside_an_obstacle_scores_lower():
    env = make_env("nav2d", n_corridors=2)
    goals = np.array([[0.0, 0.0], [0.6, 0.5], [-0.6, 0.5]])  # (0, 0) lies in the wall between corridors
    dac = torch.as_tensor(env.drivable(goals), dtype=torch.float32)
    assert dac.tolist() == [0.0, 1.0, 1.0]
    im = torch.tensor([5.0, 0.0, 0.0])  # the imitation head prefers the wall goal ...
    s = goal_scores(im, dac)
    assert int(s.argmax()) != 0  # ... but compliance wins
    # closed form: S = 0.1 log softmax(S_im) + 3 log clip(dac, 1e-3, 1 - 1e-3)
    ref = 0.1 * torch.log_softmax(im, 0) + 3.0 * torch.log(torch.tensor([1e-3, 1 - 1e-3, 1 - 1e-3]))
    torch.testing.assert_close(s, ref)
    # with equal compliance the imitation score decides
    s2 = goal_scores(torch.tensor([0.0, 2.0, 1.0]), torch.ones(3))
    assert s2.argsort(descending=True).tolist() == [1, 2, 0]
    with pytest.raises(FewflowError):
        goal_scores(torch.zeros(3), torch.ones(2))
    with pytest.raises(FewflowError):
        goal_scores(torch.tensor([0.0, float("nan")]), torch.ones(2))


def test_vocabulary_offroad_and_min_ade_on_hand_cases():
    pts = np.concatenate([np.random.default_rng(0).normal(c, 0.01, size=(50, 2)) for c in ([-0.6, 0.4],
                                                                                         [0.6, 0.4])])
    v = goal_vocabulary(pts, 2)
    np.testing.assert_allclose(np.sort(v[:, 0]), [-0.6, 0.6], atol=0.01)
    with pytest.raises(FewflowError):
        goal_vocabulary(pts, 0)
    with pytest.raises(FewflowError):
        goal_vocabulary(np.full((3, 2), np.nan), 1)
    env = make_env("nav2d", n_corridors=2)
    start = np.array([0.0, -0.5])
    through_wall = np.linspace([0.0, -0.4], [0.0, 0.4], 8)[None]  # straight up through the wall
    via_corridor = np.concatenate([np.linspace([0.3, -0.4], [0.6, -0.2], 3),
                                   np.linspace([0.6, 0.0], [0.6, 0.4], 5)])[None]
    assert offroad_rate(env, start, through_wall) == 1.0
    assert offroad_rate(env, start, via_corridor) == 0.0
    assert offroad_rate(env, start, np.concatenate([through_wall, via_corridor])) == 0.5
    truth = via_corridor[0]
    ade, fde = min_ade_fde(np.stack([truth + 0.1, truth + np.array([0.0, 0.3])]), truth)
    assert ade == pytest.approx(np.sqrt(0.02)) and fde == pytest.approx(np.sqrt(0.02))
    with pytest.raises(FewflowError):
        min_ade_fde(truth, truth)


@pytest.mark.slow
def test_goalflow_one_step_samples_and_errors():
    demos = collect_demos("nav2d", 20, seed=0, n_corridors=2)
    env = make_env("nav2d", n_corridors=2)
    pos, plans = plan_chunks(demos, horizon=8, stride=3)
    assert pos.shape[0] == plans.shape[0] == len(demos.obs) and plans.shape[1:] == (8, 2)
    np.testing.assert_allclose(plans[0, 0], demos.obs[3], atol=1e-6)
    cfg = GoalFlowConfig(vocab=12, hidden=32, depth=2, steps=300, anchors=4)
    gf = fit_goalflow(env, pos, plans, cfg, seed=0)
    assert gf.vocab.shape == (12, 2) and gf.dac.shape == (12,)
    out, goals = gf.sample(pos[0], 3, seed=1)
    assert out.shape == (3, 8, 2) and goals.shape == (3, 2) and np.isfinite(out).all()
    assert len({tuple(g) for g in goals}) == 3  # distinct vocabulary entries
    # a plan ends near the goal it was selected for (the flow is goal-conditioned and the draw nearest wins)
    assert np.linalg.norm(out[:, -1] - goals, axis=1).mean() < 0.5
    plain = gf.sample_plain(pos[0], 5, seed=1)
    assert plain.shape == (5, 8, 2) and np.isfinite(plain).all()
    with pytest.raises(FewflowError):
        gf.sample(np.array([np.nan, 0.0]))
    with pytest.raises(FewflowError):
        fit_goalflow(env, pos[:5], plans[:4], cfg)
    with pytest.raises(FewflowError):
        fit_goalflow(env, pos[:0], plans[:0], cfg)
    with pytest.raises(FewflowError):
        plan_chunks(demos, horizon=0)
