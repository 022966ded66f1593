"""Reproducibility: two fresh ``fewflow train`` processes give bitwise-identical weights on CPU, and the
trainer's prefetched OT pairs are a fixed function of the seed (not of thread timing or worker count),
survive a kill + resume bit for bit, and follow the same distribution as the objective's own pairing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from fewflow.couplings import CouplingResult, ExactOTCoupling, SinkhornCoupling
from fewflow.objectives.cfm import CFMLoss
from fewflow.paths import AffinePath
from fewflow.train import TrainConfig, Trainer, load_checkpoint
from fewflow.train.batches import EpochSampler
from fewflow.train.trainer import derive_seed


def _train(out: Path, *extra: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "fewflow.cli.main", "train", "--data", "moons", "--steps", "30",
           "--seed", "3", "--out", str(out), "--no-progress", "--n", "1000", "--batch-size", "64",
           "--set", "model.hidden=32", "--set", "model.depth=2", "--set", "train.ckpt_every=10",
           "--set", "train.device=cpu", "--threads", "1", *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("coupling", ["independent", "ot"])
def test_two_fresh_cli_runs_end_with_bitwise_identical_weights(tmp_path, coupling):
    """``ot`` goes through the trainer's background pair threads."""
    runs = [tmp_path / "a", tmp_path / "b"]
    for run in runs:
        _train(run, "--coupling", coupling)
    latest = [(run / "latest").read_text().strip() for run in runs]
    assert latest == ["ckpt-30", "ckpt-30"]
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = ((run / "ckpt-30" / name).read_bytes() for run in runs)
        assert a == b, name


# ------------------------------------------------------------------------------------ prefetched OT pairs
class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 32), nn.SiLU(), nn.Linear(32, 2))
        self.num_classes = None

    def forward(self, x, t, **cond):
        return self.net(torch.cat([x, t[:, None]], dim=1))


class _Recording(CFMLoss):
    """CFM that records the pairs it trains on (prefetched: ``result_loss``; its own: ``pair_loss``)."""

    def __init__(self, coupling) -> None:
        super().__init__(AffinePath("linear"), coupling=coupling)
        self.prefetched: list[CouplingResult] = []
        self.own = 0

    def result_loss(self, model, result, **kw):
        self.prefetched.append(result)
        return super().result_loss(model, result, **kw)

    def __call__(self, model, x1, **kw):
        self.own += 1
        return super().__call__(model, x1, **kw)


def _data() -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    return torch.cat([torch.randn(150, 2, generator=g) * 0.3 + 2, torch.randn(150, 2, generator=g) * 0.3 - 2])


def _cfg(**kw) -> TrainConfig:
    base = dict(steps=12, batch_size=32, lr=3e-3, progress=False, log_every=1, ckpt_every=0, device="cpu",
                seed=11, ema_decay=0.9)
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("coupling", [ExactOTCoupling(), SinkhornCoupling(reg=0.1)])
@pytest.mark.parametrize("workers", [1, 3])
def test_prefetched_pairs_are_a_fixed_function_of_the_seed(coupling, workers):
    data = _data()
    obj = _Recording(coupling)
    torch.manual_seed(0)
    Trainer(_Net(), obj, data, _cfg(prefetch_workers=workers)).fit()
    assert obj.own == 0 and len(obj.prefetched) == 12  # the trainer handed over prefetched pairs

    # the same pairs computed synchronously: the batch order, x0 from the stream's generator, the coupling's
    # randomness from a generator seeded by the batch index (see fewflow.train.trainer's docstring)
    sampler = EpochSampler(data.shape[0], 32, 11)
    stream = derive_seed(11, 3, 0, 0)
    g = torch.Generator().manual_seed(stream)
    for n, got in enumerate(obj.prefetched):
        x1 = data[sampler.next_indices()]
        x0 = torch.randn(x1.shape, generator=g)
        want = coupling(x0, x1, generator=torch.Generator().manual_seed((stream * 1_000_003 + n + 1) % 2**63))
        assert torch.equal(got.x1, want.x1) and torch.equal(got.x0, want.x0), n


def test_prefetched_run_resumes_bit_identically(tmp_path):
    class Crash(RuntimeError):
        pass

    cfg = _cfg(steps=20, ckpt_every=5, keep_last=0)
    torch.manual_seed(0)
    ref = Trainer(_Net(), _Recording(ExactOTCoupling()), _data(), cfg, out_dir=tmp_path / "ref")
    ref.fit()

    class Crashing(_Recording):
        def result_loss(self, model, result, **kw):
            if len(self.prefetched) == 13:
                raise Crash("killed")
            return super().result_loss(model, result, **kw)

    torch.manual_seed(0)
    with pytest.raises(Crash):
        Trainer(_Net(), Crashing(ExactOTCoupling()), _data(), cfg, out_dir=tmp_path / "run").fit()
    assert load_checkpoint(tmp_path / "run").step == 10
    torch.manual_seed(99)
    resumed = Trainer(_Net(), _Recording(ExactOTCoupling()), _data(), cfg, out_dir=tmp_path / "run")
    assert resumed.fit(resume=True).step == 20
    for (k, a), b in zip(ref.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    for a, b in zip(ref.ema_model.state_dict().values(), resumed.ema_model.state_dict().values()):
        assert torch.equal(a, b)


def test_prefetched_and_own_pairs_agree_in_distribution():
    """With ``prefetch_workers=0`` the objective couples each batch itself from the trainer's generator: not
    the same draws (the module docstring of fewflow.train.trainer says why), the same law of pairs. Both
    see the same x1 batches; x0 is standard normal; the OT cost ratio matches."""
    data = _data()
    runs = {}
    for workers in (0, 1):
        obj = _Recording(ExactOTCoupling())
        torch.manual_seed(0)
        res = Trainer(_Net(), obj, data, _cfg(steps=150, prefetch_workers=workers)).fit()
        runs[workers] = (obj, res)
    own, prefetched = runs[0][0], runs[1][0]
    assert own.own == 150 and not own.prefetched and prefetched.own == 0
    x0 = torch.cat([r.x0 for r in prefetched.prefetched])
    assert abs(float(x0.mean())) < 0.05 and abs(float(x0.std()) - 1.0) < 0.05
    hist = {w: res.history for w, (_, res) in runs.items()}
    ratio = {w: sum(r["ot_cost_ratio"] for r in h) / len(h) for w, h in hist.items()}
    assert ratio[1] == pytest.approx(ratio[0], rel=0.1)
    assert ratio[0] < 0.5  # both really are OT pairs (independent pairs: ratio 1)
    loss = {w: sum(r["loss"] for r in h[-50:]) / 50 for w, h in hist.items()}
    assert loss[1] == pytest.approx(loss[0], rel=0.25)
