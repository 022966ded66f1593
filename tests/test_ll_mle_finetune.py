"""The MLE fine-tuning benchmark part runs in smoke mode, reports finite numbers and well-formed claims, and
a rerun reads its cache."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch

from fewflow.bench.ll_mle_finetune import NFES, TASKS, make_task, part


def test_tasks_are_conditional_and_the_policy_is_bimodal():
    x, c = make_task("circle", 2000, 0)
    assert x.shape == (2000, 2) and c.shape == (2000, 1)
    theta = c[:, 0] * math.pi  # x is 2 (cos, sin) of the condition, up to noise 0.05
    resid = x - 2 * torch.stack([theta.cos(), theta.sin()], 1)
    assert float(resid.std()) == pytest.approx(0.05, rel=0.1)
    a, o = make_task("policy", 4000, 0)
    assert a.shape == (4000, 2) and o.shape == (4000, 4)
    mu = torch.stack([torch.sin(math.pi * o[:, 0]) + 0.5 * o[:, 1],
                      torch.cos(math.pi * o[:, 2]) * o[:, 3]], 1)
    d = (a - mu)[:, 0]  # the first coordinate sits at +-0.8 from the mean of the two modes
    assert float((d.abs() - 0.8).abs().mean()) < 0.06 and 0.4 < float((d > 0).float().mean()) < 0.6


@pytest.mark.slow
def test_smoke_part(tmp_path):
    out = part("smoke", tmp_path, seed=0, verbose=False)
    rows = out["rows"]
    assert {r["task"] for r in rows} == set(TASKS)
    assert len(rows) == len(TASKS) * 3 * len(NFES)
    for r in rows:
        for k in ("recon", "swd", "swd_floor", "stiffness"):
            assert math.isfinite(r[k]) and r[k] >= 0, (k, r)
    json.dumps(rows)
    assert len(out["claims"]) == 8
    for c in out["claims"]:
        assert set(c) == {"claim", "dataset", "met", "value"}
        assert isinstance(c["met"], bool) and c["dataset"] in TASKS and c["value"]
    assert out["lines"][0].startswith("## ") and any(line.startswith("| task") for line in out["lines"])
    t0 = time.perf_counter()
    again = part("smoke", tmp_path, seed=0, verbose=False)  # cached rows: no training, no evaluation
    assert time.perf_counter() - t0 < 2.0
    assert again["rows"] == rows
