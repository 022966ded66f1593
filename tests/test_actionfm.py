"""Action Flow Matching: offline pairs, the learned planned -> intended correction, online fine-tuning."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fewflow._validate import FewflowError
from fewflow.control.actionfm import (
    CONTEXT_DIM,
    GainFitter,
    action_pairs,
    context_features,
    run_episode,
    train_action_flow,
)
from fewflow.control.envs import make_env
from fewflow.control.envs.unicycle import ACTION_HIGH, body_frame_error, unicycle_step

torch.set_num_threads(1)
GAINS = (2.0, 1.6)


def test_action_pairs_follow_the_closed_form():
    d = action_pairs(500, [GAINS, (1.0, -1.0)], nominal_share=0.3, seed=1)
    assert d["plan"].shape == (500, 2) and d["intended"].shape == (500, 2)
    assert d["c"].shape == (500, CONTEXT_DIM)
    plan, inten, g = d["plan"] * ACTION_HIGH, d["intended"] * ACTION_HIGH, d["gains"]
    np.testing.assert_allclose(inten, np.clip(plan / g, -ACTION_HIGH, ACTION_HIGH), rtol=1e-5, atol=1e-5)
    nominal = np.all(g == 1.0, axis=1)
    assert 0.2 < nominal.mean() < 0.4
    np.testing.assert_allclose(d["c"][nominal, 2:], 0.0, atol=1e-6)  # no model error under nominal gains
    assert np.abs(d["c"][~nominal, 2:]).max() > 0.1
    with pytest.raises(FewflowError):
        action_pairs(10, [(0.0, 1.0)])
    with pytest.raises(FewflowError):
        action_pairs(0, [GAINS])


@pytest.mark.slow
def test_learned_correction_reduces_one_step_prediction_error():
    """Tiny flow on one gain change: executing flow(a_plan) under the changed actuators lands much closer
    to the nominal model's prediction of a_plan than executing a_plan itself."""
    flow = train_action_flow(action_pairs(3000, [GAINS], seed=0), steps=800, hidden=32, depth=2, lr=3e-3)
    rng = np.random.default_rng(5)
    n = 200
    s = np.column_stack([rng.normal(size=(n, 2)), rng.uniform(-3, 3, n)])
    plan = rng.uniform(-0.8, 0.8, size=(n, 2)) * ACTION_HIGH
    probe = np.array([0.7, 0.9])
    err = body_frame_error(np.zeros(3), unicycle_step(np.zeros(3), probe, 0.2, GAINS),
                           unicycle_step(np.zeros(3), probe, 0.2))
    c = np.repeat(context_features(probe, err, 0.2)[None], n, 0)
    target = unicycle_step(s, plan, 0.2)
    raw = np.linalg.norm(unicycle_step(s, plan, 0.2, GAINS) - target, axis=1).mean()
    corrected = np.linalg.norm(unicycle_step(s, flow(plan, c), 0.2, GAINS) - target, axis=1).mean()
    assert corrected < 0.3 * raw
    # the context matters: under a nominal context (zero model error) the flow moves the plan less
    c0 = np.repeat(context_features(probe, np.zeros(3), 0.2)[None], n, 0)
    assert np.abs(flow(plan, c0) - plan).mean() < 0.7 * np.abs(flow(plan, c) - plan).mean()
    with pytest.raises(FewflowError):
        flow(plan, c[:, :3])
    with pytest.raises(FewflowError):
        flow(np.full((1, 2), np.nan), c[:1])


def test_gain_fitter_recovers_the_true_actuators():
    rng = np.random.default_rng(0)
    fit = GainFitter(0.2, window=10, iters=30, lr=0.05)
    true_g, true_b = np.array([1.5, 0.7]), np.array([0.05, -0.1])
    s = np.zeros(3)
    for _ in range(15):
        a = rng.uniform([-1, -1.5], [1, 1.5])
        s1 = unicycle_step(s, a, 0.2, true_g, true_b)
        fit.update(s, a, s1)
        s = s1
    np.testing.assert_allclose(fit.gains, true_g, atol=0.05)
    np.testing.assert_allclose(fit.bias, true_b, atol=0.05)


def test_run_episode_modes_and_errors():
    env = make_env("unicycle", laps=1, switch_step=10, switch_gains=(2.0, 1.0), max_steps=40)
    res = run_episode(env, "none", seed=0)
    assert res.mode == "none" and len(res.cross_track) == res.metrics["steps"] == len(res.plan_error)
    assert res.states.shape == (res.metrics["steps"] + 1, 3)
    # before the switch the nominal planner's motion is exactly the planned one
    assert max(res.plan_error[:10]) < 1e-9 and max(res.plan_error[10:]) > 0.05
    with pytest.raises(FewflowError, match="mode"):
        run_episode(env, "oracle")
    with pytest.raises(FewflowError, match="flow"):
        run_episode(env, "actionfm")
    with pytest.raises(FewflowError, match="empty"):
        train_action_flow({"plan": np.zeros((0, 2)), "intended": np.zeros((0, 2)), "c": np.zeros((0, 5))})
