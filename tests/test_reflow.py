"""Reflow pair generation (sharded safetensors, resumable) and streaming."""

from __future__ import annotations

import json

import pytest
import torch

from fewflow import FewflowError
from fewflow.analytic import GaussianFlow
from fewflow.couplings.reflow import ReflowPairs, generate_reflow_pairs, read_manifest, shard_name
from fewflow.models import MLP
from fewflow.objectives.cfm import CFMLoss
from fewflow.paths import AffinePath, LinearSchedule
from fewflow.solvers import solve
from fewflow.sources import GaussianSource


def _teacher(num_classes: int | None = None) -> MLP:
    torch.manual_seed(0)
    model = MLP(2, hidden=16, depth=1, num_classes=num_classes)
    with torch.no_grad():  # a non-trivial, label-dependent velocity field
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.eval()


def _labels(m: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {"y": torch.randint(0, 3, (m,), generator=gen)}


def test_pairs_keep_their_noise_and_labels(tmp_path):
    teacher = _teacher(num_classes=3)
    man = generate_reflow_pairs(teacher, GaussianSource(2), 50, tmp_path, steps=8, batch_size=16,
                                shard_size=20, cond_fn=_labels, seed=3)
    assert man["complete"] and man["written"] == 50 and [r["count"] for r in man["shards"]] == [20, 20, 10]
    assert man["teacher_steps"] == 8 and man["x_shape"] == [2] and man["cond"]["y"]["dtype"] == "int64"
    assert sorted(p.name for p in tmp_path.iterdir()) == [MANIFEST_NAME, *(shard_name(i) for i in range(3))]
    pairs = ReflowPairs(tmp_path, batch_size=7, generator=torch.Generator().manual_seed(0))
    seen = 0
    for x0, x1, y in pairs:
        again = solve(teacher, x0, steps=8, cond={"y": y}).x
        torch.testing.assert_close(x1, again)
        seen += x0.shape[0]
    assert seen == 50 and len(pairs) == 50 and pairs.num_batches == 8
    # the noise differs between shards and the labels were used (pairs with another label differ)
    x0a, x1a, ya = next(iter(ReflowPairs(tmp_path, batch_size=50, shuffle=False, buffer_shards=3)))
    assert torch.unique(x0a, dim=0).shape[0] == 50
    other = solve(teacher, x0a, steps=8, cond={"y": (ya + 1) % 3}).x
    assert (other - x1a).abs().max() > 1e-3


MANIFEST_NAME = "manifest.json"


def test_exact_teacher_gives_exact_flow_map_pairs(tmp_path):
    """With the analytic Gaussian velocity and a fine RK4 solve, x1 is the exact flow map of x0."""
    flow = GaussianFlow(torch.tensor([2.0, -1.0]), torch.tensor([0.5, 0.2]), LinearSchedule())
    generate_reflow_pairs(flow, GaussianSource(2), 64, tmp_path, steps=50, stepper="rk4", shard_size=64,
                          dtype=torch.float64)
    x0, x1, y = next(iter(ReflowPairs(tmp_path, batch_size=64)))
    assert y is None and x0.dtype == torch.float64
    torch.testing.assert_close(x1, flow.flow_map(x0, 0.0, 1.0), rtol=1e-8, atol=1e-8)


def test_interrupted_generation_resumes_to_identical_shards(tmp_path):
    teacher = _teacher()
    ref_dir, dir_ = tmp_path / "ref", tmp_path / "run"
    kw = dict(steps=4, batch_size=8, shard_size=10, seed=7)
    generate_reflow_pairs(teacher, GaussianSource(2), 45, ref_dir, **kw)

    # 1) stop cleanly after 2 shards
    man = generate_reflow_pairs(teacher, GaussianSource(2), 45, dir_, max_shards=2, **kw)
    assert not man["complete"] and len(man["shards"]) == 2
    with pytest.raises(FewflowError, match="incomplete"):
        ReflowPairs(dir_)
    assert len(ReflowPairs(dir_, allow_incomplete=True)) == 20

    # 2) crash in the middle of shard 3 (the teacher raises), leaving a partial temporary file behind
    calls = {"n": 0}

    class Crashing(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = teacher

        def forward(self, x, t):
            calls["n"] += 1
            if calls["n"] > 11:  # a shard is 2 solves x 4 steps = 8 calls: crash inside shard 3
                raise RuntimeError("simulated crash")
            return self.inner(x, t)

    (dir_ / (shard_name(2) + ".tmp")).write_bytes(b"half a shard")
    with pytest.raises(RuntimeError, match="simulated crash"):
        generate_reflow_pairs(Crashing(), GaussianSource(2), 45, dir_, **kw)
    assert len(read_manifest(dir_)["shards"]) == 3  # shard 2 finished, shard 3 did not

    # 3) resume: finishes, removes the stray temporary file, and reproduces the uninterrupted shards
    man = generate_reflow_pairs(teacher, GaussianSource(2), 45, dir_, **kw)
    assert man["complete"] and not list(dir_.glob("*.tmp"))
    ref = read_manifest(ref_dir)
    assert [r["sha256"] for r in man["shards"]] == [r["sha256"] for r in ref["shards"]]

    # other settings for an existing folder are refused
    with pytest.raises(FewflowError, match="different settings"):
        generate_reflow_pairs(teacher, GaussianSource(2), 45, dir_, **{**kw, "steps": 5})


def test_corrupted_shard_is_detected(tmp_path):
    generate_reflow_pairs(_teacher(), GaussianSource(2), 30, tmp_path, steps=2, shard_size=10)
    path = tmp_path / shard_name(1)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # flip bits inside the tensor payload
    path.write_bytes(bytes(data))
    with pytest.raises(FewflowError, match=r"pairs-00001.*corrupted"):
        list(ReflowPairs(tmp_path, batch_size=10, shuffle=False))
    with pytest.raises(FewflowError, match="corrupted"):  # resuming checks the existing shards too
        generate_reflow_pairs(_teacher(), GaussianSource(2), 30, tmp_path, steps=2, shard_size=10)
    # a missing shard names itself
    path.unlink()
    with pytest.raises(FewflowError, match="missing"):
        ReflowPairs(tmp_path, shuffle=False).load_shard(1)


def test_streaming_is_a_shuffled_permutation_one_buffer_at_a_time(tmp_path, monkeypatch):
    generate_reflow_pairs(_teacher(), GaussianSource(2), 95, tmp_path, steps=2, shard_size=20, seed=1)
    pairs = ReflowPairs(tmp_path, batch_size=16, generator=torch.Generator().manual_seed(0), buffer_shards=2)
    loaded: list[int] = []
    orig = ReflowPairs.load_shard

    def spy(self, i):
        loaded.append(i)
        return orig(self, i)

    monkeypatch.setattr(ReflowPairs, "load_shard", spy)
    all_x0 = []
    max_live = 0
    for x0, _, _ in pairs:
        all_x0.append(x0)
        max_live = max(max_live, len(loaded))
    assert sorted(loaded) == [0, 1, 2, 3, 4]
    got = torch.cat(all_x0)
    plain = torch.cat([orig(pairs, i)["x0"] for i in range(5)])
    assert got.shape == plain.shape
    # same multiset of rows, different order
    key = lambda a: a[torch.argsort(a[:, 0])]  # noqa: E731
    torch.testing.assert_close(key(got), key(plain))
    assert not torch.equal(got, plain)
    # shuffling is reproducible from the generator; drop_last drops the 95 % 16 tail
    g0 = torch.Generator().manual_seed(0)
    again_it = ReflowPairs(tmp_path, batch_size=16, generator=g0, buffer_shards=2)
    again = torch.cat([b[0] for b in again_it])
    torch.testing.assert_close(got, again)
    sizes = [b[0].shape[0] for b in ReflowPairs(tmp_path, batch_size=16, drop_last=True)]
    assert sizes == [16] * 5


def test_batches_feed_cfm_pair_loss(tmp_path):
    teacher = _teacher(num_classes=3)
    generate_reflow_pairs(teacher, GaussianSource(2), 32, tmp_path, steps=2, shard_size=32, cond_fn=_labels)
    student = MLP(2, hidden=16, depth=1, num_classes=3)
    cfm = CFMLoss(AffinePath(LinearSchedule()))
    x0, x1, y = next(iter(ReflowPairs(tmp_path, batch_size=32)))
    out = cfm.pair_loss(student, x0, x1, y=y, generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    assert torch.isfinite(out.loss)


def test_manifest_and_bad_inputs(tmp_path):
    with pytest.raises(FewflowError, match="manifest"):
        ReflowPairs(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(FewflowError, match="not a reflow manifest"):
        read_manifest(tmp_path)
    for bad in ({"n": 0}, {"n": 10, "shard_size": 0}, {"n": 10, "steps": -1}):
        kw = {"n": 10, **bad}
        n = kw.pop("n")
        with pytest.raises(FewflowError):
            generate_reflow_pairs(_teacher(), GaussianSource(2), n, tmp_path / "x", **kw)
    with pytest.raises(FewflowError, match="source"):
        generate_reflow_pairs(_teacher(), object(), 4, tmp_path / "y")
    with pytest.raises(FewflowError, match="rows"):
        generate_reflow_pairs(_teacher(3), GaussianSource(2), 4, tmp_path / "z",
                              cond_fn=lambda m, g: {"y": torch.zeros(m + 1, dtype=torch.long)})
