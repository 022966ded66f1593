"""Demonstrations: collection, .npz round trip, chunking with edge padding, [-1, 1] normalisation."""

from __future__ import annotations

import numpy as np
import pytest

from fewflow._validate import FewflowError
from fewflow.control.demos import (
    Demos,
    chunk_dataset,
    collect_demos,
    demos_dataset,
    load_demos,
    normalize,
    save_demos,
    unnormalize,
)


def _toy() -> Demos:
    """Two episodes (3 and 2 steps); obs = (10 * step, episode), act = (step, -step)."""
    obs = np.array([[0, 0], [10, 0], [20, 0], [0, 1], [10, 1]], dtype=np.float32)
    act = np.array([[0, 0], [1, -1], [2, -2], [0, 0], [1, -1]], dtype=np.float32)
    return Demos(obs, act, np.array([0, 0, 0, 1, 1]), np.array([True, False]), "nav2d")


def test_collect_demos_shapes_and_success():
    d = collect_demos("nav2d", 6, seed=3)
    assert d.obs.dtype == np.float32 and d.act.dtype == np.float32 and d.episode.dtype == np.int64
    assert d.obs.shape[1] == 2 and d.act.shape == d.obs.shape and d.n_episodes == 6
    assert np.all(np.diff(d.episode) >= 0) and set(d.episode.tolist()) == set(range(6))
    assert d.success.all()
    assert np.abs(d.act).max() <= 1.0
    # episode e starts from reset(seed + e)
    from fewflow.control.envs import make_env

    env = make_env("nav2d")
    np.testing.assert_allclose(d.obs[d.episode == 2][0], env.reset(seed=5), rtol=0, atol=1e-6)
    e2 = collect_demos("nav2d", 6, seed=3)
    np.testing.assert_array_equal(d.act, e2.act)


def test_save_load_round_trip(tmp_path):
    d = collect_demos("nav2d", 3, seed=0, n_corridors=2)
    path = save_demos(d, tmp_path / "d.npz")
    with np.load(path, allow_pickle=False) as z:  # plain arrays only
        assert {"obs", "act", "episode", "success", "env"} <= set(z.files)
    back = load_demos(path)
    for k in ("obs", "act", "episode", "success"):
        np.testing.assert_array_equal(getattr(back, k), getattr(d, k))
    assert back.env == "nav2d" and back.env_kwargs == {"n_corridors": 2}


def test_load_and_save_errors(tmp_path):
    with pytest.raises(FewflowError, match="no such"):
        load_demos(tmp_path / "missing.npz")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(FewflowError, match="cannot read"):
        load_demos(bad)
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(FewflowError, match="missing"):
        load_demos(tmp_path / "other.npz")
    with pytest.raises(FewflowError, match=".npz"):
        save_demos(_toy(), tmp_path / "d.npy")


def test_demos_validation():
    d = _toy()
    with pytest.raises(FewflowError, match="same number of rows"):
        Demos(d.obs, d.act[:3], d.episode, d.success, "nav2d")
    with pytest.raises(FewflowError, match="one entry per episode"):
        Demos(d.obs, d.act, d.episode, d.success[:1], "nav2d")
    with pytest.raises(FewflowError, match="non-finite"):
        Demos(np.full_like(d.obs, np.nan), d.act, d.episode, d.success, "nav2d")
    with pytest.raises(FewflowError, match="non-decreasing"):
        Demos(d.obs, d.act, d.episode[::-1], d.success, "nav2d")
    with pytest.raises(FewflowError, match="positive integer"):
        collect_demos("nav2d", 0)


def test_chunk_padding_exact():
    d = _toy()
    obs_before = d.obs.copy()
    cond, actions, stats = chunk_dataset(d, obs_horizon=2, act_horizon=3)
    assert cond.shape == (5, 4) and actions.shape == (5, 6) and cond.dtype == np.float32
    np.testing.assert_array_equal(d.obs, obs_before)  # inputs untouched
    raw_c = unnormalize(cond.reshape(5, 2, 2), stats["obs_min"], stats["obs_max"])
    raw_a = unnormalize(actions.reshape(5, 3, 2), stats["act_min"], stats["act_max"])
    # episode 0: obs history repeats the first observation; actions repeat the last one at the end
    np.testing.assert_allclose(raw_c[0], [[0, 0], [0, 0]], atol=1e-5)
    np.testing.assert_allclose(raw_c[2], [[10, 0], [20, 0]], atol=1e-5)
    np.testing.assert_allclose(raw_a[0], [[0, 0], [1, -1], [2, -2]], atol=1e-5)
    np.testing.assert_allclose(raw_a[1], [[1, -1], [2, -2], [2, -2]], atol=1e-5)
    np.testing.assert_allclose(raw_a[2], [[2, -2]] * 3, atol=1e-5)
    # episode 1 never borrows from episode 0
    np.testing.assert_allclose(raw_c[3], [[0, 1], [0, 1]], atol=1e-5)
    np.testing.assert_allclose(raw_a[4], [[1, -1]] * 3, atol=1e-5)
    # min-max: every coordinate (over all chunk positions) spans exactly [-1, 1]
    for arr in (cond, actions):
        per_coord = arr.reshape(-1, 2)
        np.testing.assert_allclose(per_coord.min(0), [-1, -1])
        np.testing.assert_allclose(per_coord.max(0), [1, 1])
    np.testing.assert_array_equal(stats["obs_min"], [0, 0])
    np.testing.assert_array_equal(stats["obs_max"], [20, 1])


def test_chunk_successful_only_and_errors():
    cond, actions, _ = chunk_dataset(_toy(), 1, 1, successful_only=True)
    assert len(cond) == 3  # only episode 0 succeeded
    with pytest.raises(FewflowError, match="act_horizon"):
        chunk_dataset(_toy(), 2, 0)
    fail = _toy()
    fail.success[:] = False
    with pytest.raises(FewflowError, match="no successful"):
        chunk_dataset(fail, successful_only=True)


def test_normalize_closed_form_and_constant_coordinate():
    lo, hi = np.array([0.0, 5.0, -2.0]), np.array([10.0, 5.0, 2.0])
    x = np.array([[0.0, 5.0, -2.0], [10.0, 5.0, 2.0], [2.5, 5.0, 0.0]])
    y = normalize(x, lo, hi)
    np.testing.assert_allclose(y, [[-1, 0, -1], [1, 0, 1], [-0.5, 0, 0]])
    np.testing.assert_allclose(unnormalize(y, lo, hi), x)
    with pytest.raises(FewflowError, match="last axis"):
        normalize(np.zeros((2, 2)), lo, hi)


def test_demos_dataset_is_a_conditional_dataset():
    ds = demos_dataset(collect_demos("nav2d", 2, seed=0), obs_horizon=2, act_horizon=4)
    assert ds.x.shape[1] == 8 and ds.c.shape == (ds.x.shape[0], 4)
    assert ds.meta["obs_horizon"] == 2 and len(ds.meta["act_min"]) == 2 and ds.meta["env"] == "nav2d"
    assert float(ds.x.abs().max()) <= 1.0 + 1e-6
