"""Flow policies from demonstrations: the chunked data, policy.json, loading a run as a chunk policy
(shapes, normalisation round trip, the fast sampler equals fewflow.sampling.generate), and error lines."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fewflow import FewflowError
from fewflow.control.demos import Demos, chunk_dataset, collect_demos
from fewflow.control.policy import (
    POLICY_DATA,
    POLICY_FILE,
    demos_dataset,
    policy_from_run,
    read_policy_info,
    train_policy,
    write_policy_data,
)
from fewflow.control.rollout import rollout
from fewflow.models.policy import ActionChunkNet
from fewflow.sampling import generate


@pytest.fixture(scope="module")
def demos() -> Demos:
    return collect_demos("nav2d", 4, seed=0)


@pytest.fixture(scope="module", params=["mp1", "cfm"])
def run(request: pytest.FixtureRequest, demos: Demos, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp(f"policy-{request.param}")
    train_policy(demos, out, request.param, obs_horizon=2, act_horizon=4, steps=5, batch_size=32, hidden=32,
                 depth=2, progress=False)
    return out


def test_demos_dataset_shapes(demos: Demos) -> None:
    ds = demos_dataset(demos, obs_horizon=2, act_horizon=4)
    n = len(demos.obs)
    assert ds.x.shape == (n, 4 * demos.act_dim) and ds.c.shape == (n, 2 * demos.obs_dim)
    assert float(ds.x.abs().max()) <= 1.0 + 1e-6 and float(ds.c.abs().max()) <= 1.0 + 1e-6


def test_policy_files(demos: Demos, tmp_path) -> None:
    path = write_policy_data(demos, tmp_path, 2, 4)
    assert path.name == POLICY_DATA
    with np.load(path) as z:
        cond, actions, stats = chunk_dataset(demos, 2, 4)
        assert np.array_equal(z["x"], actions) and np.array_equal(z["c"], cond)
    info = read_policy_info(tmp_path)
    assert info["env"] == "nav2d" and info["obs_horizon"] == 2 and info["act_horizon"] == 4
    np.testing.assert_allclose(info["stats"]["act_max"], stats["act_max"], rtol=1e-6)
    stamp = path.stat().st_mtime_ns
    write_policy_data(demos, tmp_path, 2, 4)  # same data: the file (and its sha256) is left alone
    assert path.stat().st_mtime_ns == stamp
    bad = json.loads((tmp_path / POLICY_FILE).read_text())
    bad["stats"]["obs_min"] = [0.0]
    (tmp_path / POLICY_FILE).write_text(json.dumps(bad))
    with pytest.raises(FewflowError, match="statistics"):
        read_policy_info(tmp_path)
    with pytest.raises(FewflowError, match="not a policy run"):
        read_policy_info(tmp_path / "nowhere")


def test_policy_shapes_and_units(run, demos: Demos) -> None:
    pol = policy_from_run(run, seed=1)
    assert isinstance(pol.model, ActionChunkNet)
    obs = demos.obs[:2]
    a = pol(obs)
    assert a.shape == (4, 2) and a.dtype == np.float64
    # actions come back in the demonstrations' units, inside their range (clipped chunk)
    lo, hi = demos.act.min(0), demos.act.max(0)
    assert np.all(a >= lo - 1e-6) and np.all(a <= hi + 1e-6)
    assert pol(obs.reshape(-1)).shape == (4, 2)  # a flattened history is accepted
    batch = pol.sample(np.stack([obs, obs, obs]))
    assert batch.shape == (3, 4, 2)
    assert len(pol.latency_ms) == 2 and all(v > 0 for v in pol.latency_ms)


def test_policy_equals_generate(run, demos: Demos) -> None:
    """The policy's cached sampler is fewflow.sampling.generate: same x0, same chunk."""
    pol = policy_from_run(run, nfe=2)
    obs = demos.obs[3:5]
    x0 = torch.randn(1, 8, generator=torch.Generator().manual_seed(0))
    a = pol.sample(obs[None], x0=x0)[0]
    c = (obs - (pol.stats["obs_min"] + pol.stats["obs_max"]) / 2) * 2 / (
        pol.stats["obs_max"] - pol.stats["obs_min"])
    cond = torch.tensor(c.reshape(1, -1), dtype=torch.float32)
    ref = generate(pol.model, pol.cfg, 1, nfe=2, x0=x0, cond=cond)
    want = np.clip(ref.x.numpy().reshape(4, 2), -1, 1)
    back = (a - (pol.stats["act_min"] + pol.stats["act_max"]) / 2) * 2 / (
        pol.stats["act_max"] - pol.stats["act_min"])  # normalisation round trip
    np.testing.assert_allclose(back, want, atol=1e-5)


def test_policy_rolls_out(run) -> None:
    pol = policy_from_run(run)
    res = rollout("nav2d", pol, episodes=1, obs_horizon=2, exec_horizon=4, progress=False, max_steps=12)
    assert res.steps[0] == 12 and np.isfinite(res.latency_ms["mean"])


def test_policy_errors(run) -> None:
    pol = policy_from_run(run)
    with pytest.raises(FewflowError, match=r"observation history must have shape \(2, 2\)"):
        pol(np.zeros((2, 3)))
    with pytest.raises(FewflowError, match=r"observation history must have shape"):
        pol(np.zeros(5))
    with pytest.raises(FewflowError, match="non-finite"):
        pol(np.full((2, 2), np.nan))
    with pytest.raises(FewflowError, match="sample\\(\\) for a batch"):
        pol(np.zeros((3, 2, 2)))
    with pytest.raises(FewflowError, match="nfe"):
        policy_from_run(run, nfe=0)
    obs = np.zeros((2, 2))
    kept = obs.copy()
    pol(obs)
    assert np.array_equal(obs, kept)
