"""``fewflow flow``: training-free optical flow of a video (ReynoldsFlow or Horn-Schunck)."""

from __future__ import annotations

from pathlib import Path

import click

__all__ = ["COMMANDS"]


@click.command("flow")
@click.argument("frames", type=click.Path(exists=True, dir_okay=False))
@click.option("--method", type=click.Choice(["reynolds", "horn_schunck"]), default="reynolds",
              show_default=True,
              help="reynolds: ReynoldsFlow (continuity equation); horn_schunck: brightness constancy.")
@click.option("--out", "out", type=click.Path(dir_okay=False), required=True,
              help="Forward flows (T-1, 2, H, W) as .npy: channels (dx, dy) in pixels from frame t to t+1.")
@click.option("--plus", "plus", type=click.Path(dir_okay=False), default=None,
              help="Also write the ReynoldsFlow+ encoding (T-1, 3, H, W) in [0, 1] as .npy.")
@click.option("--alpha", type=float, default=0.05, show_default=True, help="Horn–Schunck smoothness.")
@click.option("--iters", type=int, default=200, show_default=True, help="Horn–Schunck Jacobi iterations.")
@click.option("--threads", type=int, default=None, help="torch.set_num_threads (default: leave as is).")
def flow_cmd(frames: str, method: str, out: str, plus: str | None, alpha: float, iters: int,
             threads: int | None) -> None:
    """Optical flow of a video FRAMES.npy shaped (T, C, H, W) or (T, H, W), T >= 2 (training-free)."""
    import numpy as np
    import torch

    from fewflow._io import atomic_path
    from fewflow._validate import FewflowError
    from fewflow.cli.main import _say, _threads
    from fewflow.motion import horn_schunck, reynolds_flow, reynolds_plus

    _threads(threads)
    try:
        video = np.load(frames, allow_pickle=False)
    except ValueError as e:
        raise FewflowError(f"cannot read {frames} as a .npy array: {e}") from None
    if video.ndim == 3:
        video = video[:, None]
    if video.ndim != 4 or video.shape[0] < 2:
        raise FewflowError(f"{frames} must hold frames shaped (T, C, H, W) or (T, H, W) with T >= 2, "
                           f"got {video.shape}")
    x = torch.from_numpy(np.asarray(video, dtype=np.float32))
    f0, f1 = x[:-1], x[1:]
    if method == "horn_schunck":
        if plus:
            raise FewflowError("--plus needs --method reynolds")
        flow, res = horn_schunck(f0, f1, alpha=alpha, n_iter=iters), None
    else:
        res = reynolds_flow(f0, f1, alpha=alpha, n_iter=iters)
        flow = res.flow
    for path, arr in ((out, flow), (plus, reynolds_plus(f0, f1, result=res) if plus else None)):
        if arr is None:
            continue
        with atomic_path(Path(path)) as tmp, open(tmp, "wb") as fh:
            np.save(fh, arr.numpy())
        _say(f"wrote {path} {tuple(arr.shape)}")


COMMANDS = [flow_cmd]
