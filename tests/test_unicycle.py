"""The unicycle environment: closed-form dynamics, the nominal planner, gain switches and metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fewflow._validate import FewflowError
from fewflow.control.envs import make_env
from fewflow.control.envs.unicycle import (
    Unicycle,
    body_frame_error,
    figure8_track,
    intended_action,
    recovery_steps,
    tracking_metrics,
    unicycle_step,
)


def _circle_position(v: float, w: float, th0: float, t: float) -> np.ndarray:
    """Closed form of a constant-command unicycle from the origin: a circle of radius v / w whose centre
    lies at distance v / w to the left of the start (independent of the step-wise formula)."""
    r = v / w
    centre = np.array([-r * math.sin(th0), r * math.cos(th0)])
    phi = th0 + w * t - math.pi / 2
    return centre + r * np.array([math.cos(phi), math.sin(phi)])


def test_constant_command_follows_the_closed_form_circle():
    v, w, th0, dt = 0.8, 0.7, 0.3, 0.2
    s = np.array([0.0, 0.0, th0])
    for k in range(1, 31):
        s = unicycle_step(s, np.array([v, w]), dt)
        np.testing.assert_allclose(s[:2], _circle_position(v, w, th0, k * dt), atol=1e-10)
        assert s[2] == pytest.approx(th0 + w * k * dt)


def test_straight_line_limit_and_gains_scale_the_command():
    s = np.array([1.0, -2.0, 0.5])
    out = unicycle_step(s, np.array([0.6, 0.0]), 0.2)
    ref = [1.0 + 0.12 * math.cos(0.5), -2.0 + 0.12 * math.sin(0.5), 0.5]
    np.testing.assert_allclose(out, ref, atol=1e-12)
    # gains (g_v, g_w) act like the scaled command under the nominal model
    a, g = np.array([0.5, 0.4]), np.array([1.6, -1.3])
    np.testing.assert_allclose(unicycle_step(s, a, 0.2, g), unicycle_step(s, a * g, 0.2), atol=1e-12)
    # batched states and commands broadcast
    batch = unicycle_step(np.zeros((4, 3)), np.array([[0.5, 0.1]] * 4), 0.2)
    assert batch.shape == (4, 3)


def test_intended_action_reproduces_the_planned_motion_under_changed_gains():
    rng = np.random.default_rng(0)
    g, b = np.array([2.0, 2.5]), np.array([0.05, -0.1])
    s = np.column_stack([rng.normal(size=(50, 2)), rng.uniform(-3, 3, 50)])
    plan = rng.uniform([-0.4, -0.5], [0.4, 0.5], size=(50, 2))  # small enough to stay unclipped
    a_int = intended_action(plan, g, b)
    np.testing.assert_allclose(unicycle_step(s, a_int, 0.2, g, b), unicycle_step(s, plan, 0.2), atol=1e-12)
    err = body_frame_error(s, unicycle_step(s, plan, 0.2, g, b), unicycle_step(s, plan, 0.2))
    assert np.abs(err).max() > 0.01
    # the body-frame error does not depend on where the robot is (rigid-motion invariance)
    err0 = body_frame_error(np.zeros_like(s), unicycle_step(np.zeros_like(s), plan, 0.2, g, b),
                            unicycle_step(np.zeros_like(s), plan, 0.2))
    s_rot = s.copy()
    s_rot[:, 2] = 0.0
    err_rot = body_frame_error(s_rot, unicycle_step(s_rot, plan, 0.2, g, b), unicycle_step(s_rot, plan, 0.2))
    np.testing.assert_allclose(err0, err_rot, atol=1e-12)
    with pytest.raises(FewflowError, match="non-zero"):
        intended_action(plan, (0.0, 1.0))


def test_planner_tracks_the_figure8_under_nominal_gains():
    env = make_env("unicycle", laps=1)
    assert isinstance(env, Unicycle) and env.obs_dim == 6 and env.act_dim == 2
    obs = env.reset(seed=0)
    expert = env.expert()
    errs, done, info = [], False, {}
    while not done:
        obs, reward, done, info = env.step(expert(obs))
        errs.append(info["cross_track"])
        assert reward == pytest.approx(-info["cross_track"])
    m = tracking_metrics(env, errs)
    assert info["success"] and m.lap and m.reached == m.n_waypoints
    assert m.cte_mean < 0.08 and max(errs) < 0.25
    assert m.steps < 80  # about one lap at close to full speed


def test_gain_switch_hurts_the_nominal_planner_and_is_measured():
    env = make_env("unicycle", laps=1, switch_step=15, switch_gains=(1.0, -1.0))
    obs = env.reset(seed=0)
    assert env.actuators()[0].tolist() == [1.0, 1.0]
    expert = env.expert()
    errs, done, info = [], False, {}
    while not done:
        obs, _, done, info = env.step(expert(obs))
        errs.append(info["cross_track"])
    assert info["gains"] == [1.0, -1.0]
    m = tracking_metrics(env, errs)
    assert m.recovery > 5 and m.reached < m.n_waypoints


def test_recovery_steps_and_track():
    e = [0.0, 0.3, 0.0, 0.5, 0.1, 0.4, 0.0, 0.0]
    assert recovery_steps(e, 2) == 4  # last exceedance at index 5 -> 5 - 2 + 1
    assert recovery_steps(e, 6) == 0
    way, dense = figure8_track(40)
    assert way.shape == (40, 2) and dense.shape[1] == 2
    gaps = np.linalg.norm(np.diff(way, axis=0), axis=1)
    assert gaps.std() / gaps.mean() < 0.02  # equal arc length


def test_bad_inputs_raise():
    env = make_env("unicycle")
    env.reset(seed=0)
    with pytest.raises(FewflowError):
        env.step(np.array([np.nan, 0.0]))
    with pytest.raises(FewflowError):
        env.step(np.zeros(3))
    with pytest.raises(FewflowError):
        make_env("unicycle", switch_gains=(1.0,))
    with pytest.raises(FewflowError):
        unicycle_step(np.zeros(2), np.zeros(2))
    assert env.render().shape == (160, 240, 3)
