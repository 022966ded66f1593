"""Receding-horizon rollouts, their metrics and GIFs, and the ``demos`` / ``rollout`` commands."""

from __future__ import annotations

import json

import numpy as np
import pytest
from cli_helpers import assert_one_line_error
from click.testing import CliRunner

from fewflow._validate import FewflowError
from fewflow.cli.control import COMMANDS
from fewflow.cli.main import FewflowGroup, cli
from fewflow.control.rollout import EVAL_SEED_OFFSET, ExpertChunkPolicy, rollout, save_gif

GROUP = cli if "rollout" in cli.commands else FewflowGroup(
    "fewflow", commands={**cli.commands, **{c.name: c for c in COMMANDS}})


def run(args: list):
    return CliRunner().invoke(GROUP, [str(a) for a in args], catch_exceptions=False)


class Recorder:
    """A chunk policy that steers straight up and records what it was shown."""

    def __init__(self, act_horizon: int = 5) -> None:
        self.act_horizon = act_horizon
        self.seen: list[np.ndarray] = []
        self.resets = 0

    def reset(self, env) -> None:
        self.resets += 1

    def __call__(self, obs_hist: np.ndarray) -> np.ndarray:
        self.seen.append(np.array(obs_hist))
        return np.tile([0.0, 1.0], (self.act_horizon, 1))


def test_expert_rollout_succeeds_with_latency():
    res = rollout("nav2d", ExpertChunkPolicy(1), episodes=10, obs_horizon=2, exec_horizon=1, progress=False)
    assert res.success_rate >= 0.9
    assert res.latency_ms["mean"] > 0 and np.isfinite(res.latency_ms["p95"])
    assert res.latency_ms["n"] == sum(res.steps)  # one call per executed action
    assert [len(t) for t in res.trajectories] == [s + 1 for s in res.steps]
    m = res.metrics()
    json.dumps(m)
    assert m["episodes"] == 10 and m["success_rate"] == res.success_rate


def test_receding_horizon_calls_and_history_padding():
    pol = Recorder(act_horizon=5)
    res = rollout("nav2d", pol, episodes=2, obs_horizon=3, exec_horizon=4, seed=1, progress=False,
                  max_steps=10)
    assert pol.resets == 2 and res.steps == [10, 10]
    assert len(pol.seen) == 2 * 3  # ceil(10 / 4) chunks per episode
    first = pol.seen[0]
    assert first.shape == (3, 2) and np.all(first == first[0])  # the first observation, repeated
    from fewflow.control.envs import make_env

    np.testing.assert_allclose(first[0], make_env("nav2d").reset(seed=EVAL_SEED_OFFSET + 1))
    # the second call sees the observations after actions 2, 3 and 4 of the first chunk
    np.testing.assert_allclose(pol.seen[1], res.trajectories[0][2:5])
    assert not any(res.successes)  # straight up runs into the wall


def test_policy_errors():
    with pytest.raises(FewflowError, match=r"shape \(act_horizon, 2\)"):
        rollout("nav2d", lambda o: np.zeros((4, 3)), episodes=1, progress=False)
    with pytest.raises(FewflowError, match="non-finite"):
        rollout("nav2d", lambda o: np.full((4, 2), np.nan), episodes=1, progress=False)
    with pytest.raises(FewflowError, match="exec_horizon"):
        rollout("nav2d", lambda o: np.zeros((4, 2)), episodes=1, exec_horizon=0, progress=False)
    with pytest.raises(FewflowError, match="callable"):
        rollout("nav2d", "policy", episodes=1, progress=False)


def test_frames_and_gif(tmp_path):
    from PIL import Image

    res = rollout("nav2d", ExpertChunkPolicy(4), episodes=2, exec_horizon=4, record_episodes=1,
                  progress=False)
    assert len(res.frames) == 1 and len(res.frames[0]) == res.steps[0] + 1
    path = save_gif(res.frames, tmp_path / "a.gif", fps=20)
    with Image.open(path) as im:
        assert im.n_frames >= 2 and im.size == (256, 256)
    with pytest.raises(FewflowError, match="no frames"):
        save_gif([], tmp_path / "b.gif")


def test_cli_demos_and_expert_rollout(tmp_path):
    r = run(["demos", "nav2d", "--n", 4, "--out", tmp_path / "d.npz", "--env-set", "n_corridors=2",
             "--no-progress"])
    assert r.exit_code == 0, r.output
    from fewflow.control.demos import load_demos

    d = load_demos(tmp_path / "d.npz")
    assert d.n_episodes == 4 and d.env_kwargs == {"n_corridors": 2}
    r = run(["rollout", "expert", "--env", "nav2d", "--episodes", 3, "--exec-horizon", 1, "--gif", 1,
             "--out", tmp_path / "ev", "--no-progress"])
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["success_rate"] >= 2 / 3 and m["latency_ms"]["mean"] > 0 and len(m["rewards"]) == 3
    assert (tmp_path / "ev" / "rollout.gif").stat().st_size > 0


def test_cli_errors_are_one_line(tmp_path):
    assert_one_line_error(run(["demos", "nav3d", "--out", tmp_path / "d.npz", "--no-progress"]),
                          "unknown environment")
    assert_one_line_error(run(["rollout", "expert", "--out", tmp_path / "e", "--no-progress"]), "--env")
    assert_one_line_error(run(["rollout", tmp_path / "nothing", "--out", tmp_path / "e", "--no-progress"]),
                          "not a policy run")


def test_cli_rollout_of_a_trained_policy(tmp_path):
    policy = pytest.importorskip("fewflow.control.policy")
    from fewflow.control.demos import collect_demos

    run_dir = policy.train_policy(collect_demos("nav2d", 4, seed=0), tmp_path / "run", "cfm", obs_horizon=2,
                                  act_horizon=4, hidden=32, depth=2, steps=10, batch_size=32,
                                  progress=False)
    r = run(["rollout", run_dir, "--episodes", 2, "--nfe", 2, "--out", tmp_path / "ev", "--no-progress"])
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["env"] == "nav2d" and m["obs_horizon"] == 2 and len(m["successes"]) == 2
    assert m["latency_ms"]["mean"] > 0
    assert_one_line_error(run(["rollout", run_dir, "--exec-horizon", 9, "--out", tmp_path / "e2",
                               "--no-progress"]), "exceeds")
