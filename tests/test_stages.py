"""``fewflow.train.train_stages``: a method's stages run in order, each for its share of the steps, with
its batch and learning rate, from the previous stage's EMA weights; a resumed run skips finished stages."""

from __future__ import annotations

import torch

from fewflow.methods import Stage
from fewflow.models import MLP
from fewflow.objectives import CFMLoss
from fewflow.paths import AffinePath
from fewflow.train import TrainConfig, train_stages


def _setup():
    torch.manual_seed(0)
    net = MLP(2, hidden=16, depth=1)
    data = torch.randn(512, 2)
    loss = CFMLoss(AffinePath("linear"))
    tc = TrainConfig(steps=20, batch_size=32, lr=1e-3, progress=False, log_every=0, ckpt_every=0,
                     device="cpu", ema_decay=0.9)
    return net, data, loss, tc


def test_shares_batches_and_learning_rates():
    net, data, loss, tc = _setup()
    stages = [Stage("a", loss, share=0.25, batch_divisor=4, lr_scale=0.5),
              Stage("b", loss, share=0.75, lr=3e-3)]
    _, recs, res = train_stages(net, stages, data, tc)
    assert [(r.stage, r.steps, r.batch_size, r.lr) for r in recs] == [("a", 5, 8, 5e-4), ("b", 15, 32, 3e-3)]
    assert res.stopped_reason == "completed"


def test_next_stage_starts_from_the_ema_weights():
    """The second stage starts where the first ended; with a vanishing lr it keeps those weights."""
    net, data, loss, tc = _setup()
    seen = {}

    def data_after_first(model, batch):
        seen["w"] = [p.detach().clone() for p in model.parameters()]
        return data

    stages = [Stage("a", loss, share=0.5), Stage("b", loss, data=data_after_first, share=0.5, lr=1e-12)]
    model, _, _ = train_stages(net, stages, data, tc)
    for p, q in zip(model.parameters(), seen["w"]):
        torch.testing.assert_close(p, q)


def test_resume_skips_a_finished_stage(tmp_path):
    net, data, loss, tc = _setup()
    calls = []

    def counted(model, batch):
        calls.append(1)
        return data

    stages = [Stage("a", loss, data=counted, share=0.5), Stage("b", loss, share=0.5)]
    _, recs, _ = train_stages(net, stages, data, tc, out_dir=tmp_path / "run")
    assert (tmp_path / "run" / "stages" / "0-a" / "stage.json").is_file()
    assert (tmp_path / "run" / "latest").is_file()
    net2, _, _, _ = _setup()
    _, recs2, res = train_stages(net2, stages, data, tc, out_dir=tmp_path / "run2")
    assert len(calls) == 2
    # a rerun on the first folder with resume: stage a is loaded, not trained again
    net3, _, _, _ = _setup()
    _, recs3, _ = train_stages(net3, stages, data, tc, out_dir=tmp_path / "run", resume=True)
    assert len(calls) == 2 and recs3[0] == recs[0]
