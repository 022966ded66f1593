"""``fewflow upsample``: PUFM++ point-cloud upsampling with a trained ``pufm`` run (``fewflow fetch meshes``
downloads the real meshes).

Point-cloud files: ``.ply`` (ASCII or binary little-endian; vertices), ``.npy`` (``(N, 3)``) and ``.xyz``
/ ``.txt`` (whitespace-separated rows, the first three columns). The command is collected in
:data:`COMMANDS` for the ``fewflow`` group.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import click

from fewflow._validate import FewflowError

__all__ = ["COMMANDS", "read_cloud", "upsample_cmd", "write_cloud"]

CLOUD_SUFFIXES = (".ply", ".npy", ".xyz", ".txt")


def read_cloud(path: str | Path) -> Any:
    """A point cloud ``(N, 3)`` float32 tensor from ``.ply``, ``.npy``, ``.xyz`` or ``.txt``."""
    import numpy as np
    import torch

    p = Path(path)
    if not p.is_file():
        raise FewflowError(f"no such file: {p}")
    suffix = p.suffix.lower()
    if suffix not in CLOUD_SUFFIXES:
        raise FewflowError(f"cannot read {p}: point clouds are {', '.join(CLOUD_SUFFIXES)} files")
    if suffix == ".ply":
        from fewflow.points.ply import read_ply

        return read_ply(p)
    try:
        a = np.load(p, allow_pickle=False) if suffix == ".npy" else np.loadtxt(p, ndmin=2)
    except (OSError, ValueError) as exc:
        raise FewflowError(f"cannot read {p}: {str(exc).splitlines()[0]}") from None
    if a.ndim != 2 or a.shape[1] < 3 or a.shape[0] == 0:
        raise FewflowError(f"{p} has shape {tuple(a.shape)}: expected a non-empty (N, 3) point cloud")
    x = torch.from_numpy(np.ascontiguousarray(a[:, :3], dtype=np.float32))
    if not bool(torch.isfinite(x).all()):
        raise FewflowError(f"{p} holds non-finite coordinates")
    return x


def write_cloud(path: str | Path, x: Any) -> Path:
    """Write ``(N, 3)`` as ``.ply`` (binary), ``.npy`` or ``.xyz`` / ``.txt``, atomically."""
    import numpy as np

    from fewflow._io import atomic_path

    p = Path(path)
    suffix = p.suffix.lower()
    if suffix == ".ply":
        from fewflow.points.ply import write_ply

        return write_ply(p, x)
    if suffix not in CLOUD_SUFFIXES:
        raise FewflowError(f"cannot write {p}: choose a .ply, .npy, .xyz or .txt output")
    a = x.detach().cpu().numpy()
    with atomic_path(p) as tmp:
        with open(tmp, "wb") as fh:
            if suffix == ".npy":
                np.save(fh, a)
            else:
                np.savetxt(fh, a, fmt="%.7g")
    return p


@click.command("upsample")
@click.argument("run_dir", type=click.Path())
@click.option("--input", "input_path", type=click.Path(dir_okay=False), required=True,
              help="The sparse point cloud (.ply, .npy, .xyz).")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), required=True,
              help="Where to write the dense cloud (.ply, .npy, .xyz).")
@click.option("--ratio", type=int, default=None,
              help="Upsampling ratio: the run's (default) or a power of it (16 = 4 x 4, applied twice).")
@click.option("--steps", type=int, default=None,
              help="Uniform sampling steps instead of the run's fitted adaptive schedule.")
@click.option("--manifold", type=float, default=None,
              help="On-manifold step length (default: the run's, 0.01; 0 disables it).")
@click.option("--no-merge", is_flag=True, help="Do not merge the input points back after each step.")
def upsample_cmd(run_dir: str, input_path: str, out_path: str, ratio: int | None, steps: int | None,
                 manifold: float | None, no_merge: bool) -> None:
    """Upsample a point cloud with a trained PUFM++ run (fewflow train --method pufm)."""
    import torch

    from fewflow.objectives.pufm import pufm_upsample, run_schedule
    from fewflow.runs import load_run

    model, cfg = load_run(run_dir)
    if cfg.method_name != "pufm":
        raise FewflowError(f"{run_dir} is a {cfg.method_name!r} run; fewflow upsample needs a pufm run")
    m = cfg.method
    base = int(m.get("ratio", 4))
    r = base if ratio is None else int(ratio)
    times = round(math.log(r) / math.log(base)) if r > 1 else 0
    if r < 2 or base**times != r:
        raise FewflowError(f"--ratio must be the run's ratio {base} or a power of it, got {r}")
    if steps is not None and steps < 1:
        raise FewflowError(f"--steps must be >= 1, got {steps}")
    sched = steps if steps is not None else run_schedule(model, int(m.get("steps", 6)))
    eta = float(m.get("manifold", 0.01)) if manifold is None else float(manifold)
    if eta < 0:
        raise FewflowError(f"--manifold must be >= 0, got {eta}")
    x = read_cloud(input_path)
    if x.shape[0] < 2 * base:
        raise FewflowError(f"{input_path} has {x.shape[0]} points; upsampling x{base} needs at least "
                           f"{2 * base}")
    p = next(model.parameters())
    x = x.to(p.device, p.dtype)
    with torch.no_grad():
        for _ in range(times):
            x = pufm_upsample(model, x, base, schedule=sched, manifold=eta, merge_input=not no_merge)
    write_cloud(out_path, x.float().cpu())
    click.echo(f"wrote {out_path}: {x.shape[0]} points (x{r} of {input_path})")


COMMANDS = [upsample_cmd]
