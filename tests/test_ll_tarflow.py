"""The TARFlow likelihood benchmark part in smoke mode: the claims' format, finite numbers, and a cached
rerun that returns the same rows."""

from __future__ import annotations

import math

import pytest
import torch

from fewflow.bench.ll_tarflow import part

torch.set_num_threads(1)


@pytest.mark.slow
def test_smoke_part(tmp_path):
    out = part("smoke", tmp_path, seed=0, verbose=False)
    assert set(out) == {"rows", "claims", "lines"}
    assert len(out["rows"]) == 2 and out["rows"][0]["dataset"] == "digits"
    row, video = out["rows"]
    for key in ("bpd", "bpd_identity", "bpd_diag_gauss", "bayes_acc", "fd_raw", "fd_denoised",
                "jacobi_max_diff", "seq_wall_s", "jacobi_wall_s"):
        assert math.isfinite(row[key]), key
    # the identity flow's bits/dim of N(0, I) data have a closed form; digits are far from N(0, I)
    assert row["bpd_identity"] > row["bpd_diag_gauss"] > 0
    assert row["seq_evals"] == 2 * 15  # 2 blocks x (16 tokens - 1)
    assert 0 < row["jacobi_evals"] <= 2 * 16
    assert 0.0 <= row["bayes_acc"] <= 1.0
    # the video mode: 2 frames of 16 tokens; token by token is 2 blocks x 31 evaluations
    assert video["kind"] == "video" and video["tokens"] == 32 and video["seq_evals"] == 2 * 31
    for key in ("bpd", "bpd_diag_gauss", "jacobi_max_diff", "frame_jacobi_max_diff"):
        assert math.isfinite(video[key]), key
    assert 0 < video["jacobi_evals"] <= 2 * 32 and 0 < video["frame_jacobi_evals"] <= 2 * 32
    assert len(out["claims"]) >= 5
    for c in out["claims"]:
        assert set(c) == {"claim", "dataset", "met", "value"}
        assert isinstance(c["met"], bool) and c["claim"] and c["value"]
    assert out["lines"][0].startswith("## ") and any(line.startswith("| data") for line in out["lines"])
    again = part("smoke", tmp_path, seed=0, verbose=False)  # cached: instant and identical
    assert again["rows"] == out["rows"]
