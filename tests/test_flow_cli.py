"""``fewflow flow``: optical flow of a .npy video from the command line."""

from __future__ import annotations

import numpy as np
import torch
from click.testing import CliRunner

from fewflow.cli.main import cli
from fewflow.motion import endpoint_error, sprite_video


def test_flow_command_writes_flows_close_to_the_truth(tmp_path):
    torch.manual_seed(0)
    video = sprite_video(n_frames=3, size=24, seed=0)
    np.save(tmp_path / "v.npy", video.frames.numpy())
    res = CliRunner().invoke(cli, ["flow", str(tmp_path / "v.npy"), "--out", str(tmp_path / "f.npy"),
                                   "--method", "horn_schunck"])
    assert res.exit_code == 0, res.output
    flow = np.load(tmp_path / "f.npy")
    assert flow.shape == (2, 2, 24, 24)
    err = float(endpoint_error(torch.from_numpy(flow), video.flow_fw))
    zero = float(endpoint_error(torch.zeros_like(video.flow_fw), video.flow_fw))
    assert err < zero  # better than no motion at all


def test_flow_command_refuses_one_frame(tmp_path):
    np.save(tmp_path / "one.npy", np.zeros((1, 3, 8, 8), np.float32))
    res = CliRunner().invoke(cli, ["flow", str(tmp_path / "one.npy"), "--out", str(tmp_path / "f.npy")])
    assert res.exit_code == 2 and "T >= 2" in res.stderr
