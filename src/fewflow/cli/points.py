"""Point-cloud commands: ``fewflow upsample`` (PUFM++ upsampling with a trained ``pufm`` run), ``fewflow
scoop`` (train SCOOP scene flow on synthetic pairs) and ``fewflow sceneflow`` (the flow between two clouds);
``fewflow fetch meshes`` downloads the real meshes.

Point-cloud files: ``.ply`` (ASCII or binary little-endian; vertices), ``.npy`` (``(N, 3)``) and ``.xyz``
/ ``.txt`` (whitespace-separated rows, the first three columns). The commands are collected in
:data:`COMMANDS` for the ``fewflow`` group.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import click

from fewflow._validate import FewflowError

__all__ = ["COMMANDS", "read_cloud", "sceneflow_cmd", "scoop_cmd", "upsample_cmd", "write_cloud"]

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


@click.command("scoop")
@click.option("--out", type=click.Path(file_okay=False), required=True,
              help="Folder for the model (model.safetensors + config.json).")
@click.option("--pairs", "n_pairs", type=int, default=96, show_default=True,
              help="Synthetic training pairs (spheres, tori, superquadrics under rigid + RBF motion).")
@click.option("--test-pairs", type=int, default=12, show_default=True, help="Held-out pairs scored after.")
@click.option("--points", type=int, default=256, show_default=True, help="Points per cloud.")
@click.option("--set", "sets", multiple=True, metavar="FIELD=VALUE",
              help="A ScoopConfig field (repeatable), e.g. --set epochs=20 --set channels=16. "
                   "cross_recon_k defaults to points / 32 (the paper's 64 of 2048).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the pairs and the init.")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:1 ...")
@click.option("--threads", type=int, default=None, help="torch.set_num_threads (default: leave as is).")
def scoop_cmd(out: str, n_pairs: int, test_pairs: int, points: int, sets: tuple[str, ...], seed: int,
              device: str, threads: int | None) -> None:
    """Train SCOOP scene flow (arXiv 2211.14020) self-supervised on synthetic pairs, then print EPE3D,
    Acc-strict, Acc-relax and outliers of nearest-neighbour flow, SCOOP alone and SCOOP + refinement on
    held-out pairs.

    \b
    Examples:
      fewflow scoop --out runs/scoop --set epochs=20 --set channels=16 --set graph_k=16 --set smooth_k=16
      fewflow sceneflow runs/scoop a.ply b.ply --out flow.npy
    """
    import json as _json

    from fewflow._validate import parse_value
    from fewflow.cli.main import _device, _parse_sets, _say, _threads
    from fewflow.points.sceneflow import make_pairs, nn_flow, scene_flow_metrics
    from fewflow.points.scoop import ScoopConfig, estimate_flow, save_scoop, train_scoop

    _threads(threads)
    fields = {k: parse_value(v) for k, v in _parse_sets(sets).items()}
    fields.setdefault("cross_recon_k", max(1, points // 32))  # the paper's 64 of 2048 points
    cfg = ScoopConfig.from_dict(fields)
    dev = _device(device)
    train = make_pairs(n_pairs, n_points=points, seed=1000 + seed)
    test = make_pairs(test_pairs, n_points=points, seed=2000 + seed)
    net = train_scoop(cfg, train, seed=seed, device=dev)
    save_scoop(net, out)
    res = {"nn": scene_flow_metrics(nn_flow(test.source, test.target), test.flow)}
    est = estimate_flow(net, test.source, test.target)
    res["scoop"] = scene_flow_metrics(est.flow0, test.flow)
    res["scoop+refine"] = scene_flow_metrics(est.flow, test.flow)
    click.echo(_json.dumps(res, indent=1))
    _say(f"wrote {out}")


@click.command("sceneflow")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("source", type=click.Path(exists=True, dir_okay=False))
@click.argument("target", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", type=click.Path(dir_okay=False), required=True,
              help="Flow of the source points (.npy).")
@click.option("--no-refine", is_flag=True, help="SCOOP's correspondence flow only (no run-time refinement).")
@click.option("--refine-steps", type=int, default=None, help="Refinement steps (default: the model's).")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:1 ...")
def sceneflow_cmd(model_dir: str, source: str, target: str, out: str, no_refine: bool,
                  refine_steps: int | None, device: str) -> None:
    """Scene flow from SOURCE to TARGET (.ply or .npy clouds (N, 3)) with a model of `fewflow scoop`;
    writes the (N, 3) flow of the source points."""
    import dataclasses

    import numpy as np

    from fewflow._io import atomic_path
    from fewflow.cli.main import _device, _say
    from fewflow.points.scoop import estimate_flow, load_scoop

    if not out.endswith(".npy"):
        raise click.BadParameter(f"output must end in .npy, got {out!r}", param_hint="--out")
    net = load_scoop(model_dir, device=_device(device))
    cfg = net.config if refine_steps is None else dataclasses.replace(net.config, refine_steps=refine_steps)
    est = estimate_flow(net, read_cloud(source).float(), read_cloud(target).float(), refine=not no_refine,
                        cfg=cfg)
    with atomic_path(out) as tmp, open(tmp, "wb") as fh:
        np.save(fh, est.flow.cpu().numpy())
    _say(f"wrote {out} ({est.flow.shape[0]} points, mean |flow| {float(est.flow.norm(dim=-1).mean()):.4g})")


COMMANDS = [upsample_cmd, scoop_cmd, sceneflow_cmd]
