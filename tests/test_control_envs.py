"""Control environments: geometry, dynamics, scripted experts (success >= 90 %), errors."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from fewflow._validate import FewflowError
from fewflow.control.envs import ENVS, ControlEnv, make_env, register_env
from fewflow.control.envs.nav2d import Nav2D


def _expert_episodes(env: ControlEnv, seeds) -> tuple[list[bool], list[np.ndarray]]:
    succ, paths = [], []
    for s in seeds:
        obs = env.reset(seed=s)
        ex = env.expert()
        traj, done, info = [obs], False, {}
        while not done:
            obs, r, done, info = env.step(ex(obs))
            assert np.isfinite(r)
            traj.append(obs)
        succ.append(bool(info["success"]))
        paths.append(np.stack(traj))
    return succ, paths


def test_registry_names_and_errors():
    assert {"nav2d", "pusht", "reach", "unicycle"} <= set(ENVS)
    with pytest.raises(FewflowError, match="unknown environment 'nav3d'"):
        make_env("nav3d")
    with pytest.raises(FewflowError, match="nav2d"):
        make_env("nav2d", n_corridor=2)  # misspelt setting: one clear line
    with pytest.raises(FewflowError, match="n_corridors"):
        make_env("nav2d", n_corridors=0)


def test_register_env_custom():
    class Tiny(Nav2D):
        name = "tiny-test-env"

    register_env("tiny-test-env", lambda **kw: Tiny(n_corridors=1, **kw))
    env = make_env("tiny-test-env")
    assert isinstance(env, Tiny) and len(env.corridors) == 1 and "tiny-test-env" in ENVS


def test_nav2d_geometry():
    env = Nav2D(n_corridors=3, corridor_width=0.3)
    np.testing.assert_allclose(env.corridors, [-0.6, 0.0, 0.6])
    pts = np.array([[0.3, 0.0], [0.0, 0.0], [-0.6, 0.05], [0.9, -0.05], [0.0, 0.5], [1.5, 0.0]])
    np.testing.assert_array_equal(env.collides(pts), [True, False, False, True, False, False])
    np.testing.assert_array_equal(env.drivable(pts), [False, True, True, False, True, False])
    assert env.collides(pts.reshape(2, 3, 2)).shape == (2, 3)
    # free length of the wall line equals the corridors' total width
    xs = np.linspace(-1, 1, 20001)
    free = ~env.collides(np.stack([xs, np.zeros_like(xs)], 1))
    assert abs(free.mean() * 2 - 3 * 0.3) < 1e-3
    with pytest.raises(FewflowError, match=r"\(\.\.\., 2\)"):
        env.collides(np.zeros((4, 3)))


def test_nav2d_dynamics_wall_blocks_and_slides():
    env = Nav2D(n_corridors=2)  # corridors at x = -0.6, 0.6: the wall is solid at x = 0
    obs = env.reset(seed=0)
    assert env.drivable(obs) and env.start[0] <= obs[0] <= env.start[2]
    hit = False
    for _ in range(40):
        obs, _, done, info = env.step(np.array([0.0, 1.0]))
        hit |= info["collision"]
        assert env.drivable(obs)
    assert hit and obs[1] < -env.wall_half and not info["success"]
    # an out-of-range command is clipped to the unit box: one step moves at most speed * dt * sqrt(2)
    p0 = env.pos.copy()
    env.step(np.array([-5.0, 0.0]))
    np.testing.assert_allclose(env.pos - p0, [-env.speed * env.dt, 0.0], atol=1e-12)


def test_nav2d_expert_succeeds_and_is_multimodal():
    env = make_env("nav2d")
    succ, paths = _expert_episodes(env, range(30))
    assert np.mean(succ) >= 0.9
    modes = np.bincount([env.corridor_of(p) for p in paths], minlength=3)
    assert (modes >= 5).all(), modes  # all three corridors are used (expected 10 each)
    for p in paths:
        assert env.drivable(p).all()


def test_nav2d_seed_reproducible():
    env = make_env("nav2d")
    _, a = _expert_episodes(env, [7])
    _, b = _expert_episodes(env, [7])
    np.testing.assert_array_equal(a[0], b[0])


def test_nav2d_render_is_rgb():
    env = make_env("nav2d")
    env.reset(seed=0)
    img = env.render()
    assert img.shape == (256, 256, 3) and img.dtype == np.uint8 and img.min() < 200


def test_action_and_observation_errors():
    env = make_env("nav2d")
    env.reset(seed=0)
    with pytest.raises(FewflowError, match=r"action must have shape \(2,\), got \(3,\)"):
        env.step(np.zeros(3))
    with pytest.raises(FewflowError, match="non-finite"):
        env.step(np.array([np.nan, 0.0]))
    ex = env.expert()
    with pytest.raises(FewflowError, match=r"observation must have shape \(2,\)"):
        ex(np.zeros(5))
    with pytest.raises(FewflowError, match="seed"):
        env.reset(seed=-1)
    a = np.array([[0.5, 0.5]])
    env.step(a)  # a (1, act_dim) batch is accepted and not modified
    np.testing.assert_array_equal(a, [[0.5, 0.5]])


def test_reach_ik_matches_forward_kinematics():
    pytest.importorskip("mujoco")
    from fewflow.control.envs.reach import L1, L2, reach_ik

    rng = np.random.default_rng(0)
    for _ in range(50):
        r, phi = rng.uniform(0.02, 0.2), rng.uniform(-np.pi, np.pi)
        target = np.array([r * np.cos(phi), r * np.sin(phi)])
        q0, q1 = reach_ik(target, rng.uniform(-3, 3))
        tip = [L1 * np.cos(q0) + L2 * np.cos(q0 + q1), L1 * np.sin(q0) + L2 * np.sin(q0 + q1)]
        np.testing.assert_allclose(tip, target, atol=1e-9)


def test_reach_expert_and_observation_geometry():
    pytest.importorskip("mujoco")
    from fewflow.control.envs.reach import L1, L2

    env = make_env("reach")
    obs = env.reset(seed=3)
    assert obs.shape == (10,)
    # the fingertip the simulator reports is the forward kinematics of the joint angles in the observation
    q = np.arctan2(obs[2:4], obs[0:2])
    tip = [L1 * np.cos(q[0]) + L2 * np.cos(q.sum()), L1 * np.sin(q[0]) + L2 * np.sin(q.sum())]
    np.testing.assert_allclose(tip, obs[4:6] + obs[8:10], atol=1e-6)
    succ, paths = _expert_episodes(env, range(20))
    assert np.mean(succ) >= 0.9
    assert np.linalg.norm(paths[0][-1][8:10]) <= env.tolerance
    # without control the arm does not reach the target
    env.reset(seed=3)
    for _ in range(env.max_steps):
        obs, _, done, info = env.step(np.zeros(2))
        if done:
            break
    assert not info["success"]


def test_pusht_outline_matches_simulator_and_expert_succeeds():
    pytest.importorskip("gym_pusht")
    from gym_pusht.envs.pusht import pymunk_to_shapely
    from shapely.geometry import Polygon

    from fewflow.control.envs.pusht import T_OUTLINE, _rot

    env = make_env("pusht")
    obs = env.reset(seed=0)
    assert obs.shape == (5,)
    sim = pymunk_to_shapely(env._env.block, env._env.block.shapes)
    mine = Polygon(obs[2:4] + T_OUTLINE @ _rot(obs[4]).T)
    assert abs(mine.area - 6300.0) < 1e-6
    assert sim.symmetric_difference(mine).area < 1.0  # the expert's model of the T is the simulator's
    succ, _ = _expert_episodes(env, range(10))
    assert np.mean(succ) >= 0.9, succ
    assert env.coverage > 0.95


def test_missing_package_names_the_extra(monkeypatch):
    from fewflow.control.envs import pusht, reach  # noqa: F401 - imported modules stay importable

    monkeypatch.setitem(sys.modules, "gym_pusht.envs.pusht", None)
    with pytest.raises(FewflowError, match=r"pip install 'fewflow\[control\]'"):
        make_env("pusht")
    monkeypatch.setitem(sys.modules, "mujoco", None)
    with pytest.raises(FewflowError, match=r"pip install 'fewflow\[control\]'"):
        make_env("reach")
