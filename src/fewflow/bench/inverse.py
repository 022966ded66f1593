"""``fewflow bench inverse``: inverse problems and editing with a trained flow prior, on digits / MNIST.

One class-conditional flow-matching prior (fewflow's ``cfm`` with label dropout 0.1, an MLP on the
flattened image; trained once by :func:`fewflow.runs.train_run` and cached as a run folder) serves every
solver of :mod:`fewflow.inverse`. Restoration runs unconditionally (the null class). Everything is
measured on held-out images (the test split); every result row is cached as JSON as soon as it finishes,
so a rerun resumes. Nothing here implements a solver or a metric.

Rows:

* **restoration** (inpainting with the bottom half hidden, x2 super-resolution by average pooling; noise
  ``sigma = 0.05``): FLAIR (Erbach et al., "Solving Inverse Problems with FLAIR", arXiv 2506.02680; the
  authors' settings, the data-term rate scaled to the operator by ``FlairConfig.for_task``) and its
  ablations without DTA / CRW / HDC, DPS (Chung et al., "Diffusion Posterior Sampling for General Noisy
  Inverse Problems", arXiv 2209.14687) with its default steps and with FLAIR's NFE, and FlowOpt's
  restoration; PSNR / SSIM to the truth, the data
  residual ``||A(x) - y||`` beside the noise floor ``sigma sqrt(m)``, the digit classifier's agreement with
  the true label, the diversity over seeds (mean per-pixel standard deviation across seeds), wall time and
  network evaluations;
* **inversion** (FlowOpt, Ronai, Kulikov & Michaeli, "FlowOpt: Fast Optimization Through Whole Flow
  Processes for Training-Free Editing", arXiv 2510.22010): reconstruction MSE of FlowOpt against plain ODE
  inversion given the same number of network evaluations (the extra budget goes to finer inversion steps);
* **step size**: FlowOpt with ``eta`` in ``{0.25, 0.5, 1, 2, 4} x eta_max`` (the estimated bound of
  :func:`fewflow.inverse.flowopt.estimate_step_bound`);
* **editing**: held-out "3"s edited to class "8": the classifier's probability of "8" before and after,
  and the MSE to the input of the edit against that of a fresh sample of class 8 from the same sampler.

The claims (``check_claims``) are computed from these numbers and written with the tables to
``inverse.{md,json,png}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fewflow._validate import FewflowError
from fewflow.bench.common import add_common_args, atomic_write_json, default_cache_dir, format_table, json_key

__all__ = ["InverseBenchConfig", "SIZES", "check_claims", "main", "run"]

VERSION = 1
TASKS = ("inpaint", "sr2")
SOLVERS = ("flair", "flair_no_dta", "flair_no_crw", "flair_no_hdc", "dps", "dps_equal_nfe", "flowopt")
ETA_MULTS = (0.25, 0.5, 1.0, 2.0, 4.0)
SIGMA = 0.05

# prior network / training, images, seeds and solver settings per mode
SIZES: dict[str, dict[str, Any]] = {
    "smoke": {
        "dataset": "digits",
        "hidden": 128,
        "depth": 2,
        "steps": 300,
        "batch": 128,
        "lr": 2e-3,
        "n_images": 4,
        "seeds": 2,
        "flair": {"steps": 8, "data_steps": 5},
        "dps": {"steps": 8},
        "flowopt": {"iterations": 4, "steps": 6},
        "flowopt_edit": {"steps": 8, "iterations": 3},
        "sweep_iters": 4,
        "invert_iters": 4,
        "n_edit": 2,
        "calib": 64,
    },
    "quick": {
        "dataset": "digits",
        "hidden": 256,
        "depth": 3,
        "steps": 2500,
        "batch": 128,
        "lr": 1e-3,
        "n_images": 64,
        "seeds": 3,
        "flair": {},
        "dps": {},
        "flowopt": {"iterations": 10},
        "sweep_iters": 10,
        "invert_iters": 10,
        "n_edit": 16,
        "calib": 256,
    },
    "full": {
        "dataset": "mnist",
        "hidden": 1024,
        "depth": 4,
        "steps": 8000,
        "batch": 128,
        "lr": 5e-4,
        "n_images": 64,
        "seeds": 4,
        "flair": {},
        "dps": {},
        "flowopt": {},
        "sweep_iters": 30,
        "invert_iters": 30,
        "n_edit": 32,
        "calib": 256,
    },
}
FULL_DIGITS = {"hidden": 512, "depth": 4, "steps": 5000}  # full mode when MNIST is not fetched


@dataclass
class InverseBenchConfig:
    """What to run: ``mode`` (sizes in :data:`SIZES`), the data set (default: the mode's), the seed, the
    cache folder (``<bench cache>/inverse``) and the output folder (``None``: no files)."""

    mode: str = "quick"
    dataset: str | None = None
    seed: int = 0
    cache_dir: Path | None = None
    out_dir: Path | None = None
    verbose: bool = True
    sizes: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in SIZES:
            raise FewflowError(f"unknown mode {self.mode!r}: smoke, quick or full")
        self.sizes = {**SIZES[self.mode], **self.sizes}
        if self.dataset is not None:
            if self.dataset not in ("digits", "mnist"):
                raise FewflowError(
                    f"inverse benchmark data set must be digits or mnist, got {self.dataset!r}"
                )
            self.sizes["dataset"] = self.dataset


def _log(cfg: InverseBenchConfig, msg: str) -> None:
    if cfg.verbose:
        print(f"[inverse] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------- prior


def _mnist_available() -> bool:
    from fewflow.data import load_dataset

    try:
        load_dataset("mnist", split="test")
        return True
    except (FewflowError, FileNotFoundError, OSError):
        return False


def _prior(cfg: InverseBenchConfig, cache: Path) -> tuple[Any, Any, str]:
    """The class-conditional CFM prior (trained once, cached as a run folder under ``cache``)."""
    from fewflow.config import default_config
    from fewflow.runs import load_run, train_run

    s = cfg.sizes
    key = json_key(
        {
            "v": VERSION,
            "data": s["dataset"],
            "hidden": s["hidden"],
            "depth": s["depth"],
            "steps": s["steps"],
            "batch": s["batch"],
            "lr": s["lr"],
            "seed": cfg.seed,
        }
    )
    folder = cache / s["dataset"] / f"prior-{key}"
    try:
        model, rc = load_run(folder, device="cpu")
        _log(cfg, f"prior cached in {folder}")
        return model.requires_grad_(False), rc, key
    except FewflowError:
        pass
    rc = default_config(s["dataset"]).replace(
        {
            "model": {"type": "MLP", "hidden": s["hidden"], "depth": s["depth"]},
            "train.steps": s["steps"],
            "train.batch_size": s["batch"],
            "train.lr": s["lr"],
            "train.progress": False,
            "train.ckpt_every": 0,
            "train.device": "cpu",
            "seed": cfg.seed,
        }
    )
    _log(cfg, f"training the prior on {s['dataset']} ({s['steps']} steps) -> {folder}")
    t0 = time.perf_counter()
    train_run(rc, folder, figures=False)
    _log(cfg, f"prior trained in {time.perf_counter() - t0:.1f} s")
    model, rc = load_run(folder, device="cpu")
    return model.requires_grad_(False), rc, key


# ---------------------------------------------------------------------------------------------- rows


def _cached_row(path: Path, compute: Any) -> dict[str, Any]:
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            pass
    row = compute()
    atomic_write_json(path, row)
    return row


def _replace(cfg_obj: Any, values: dict[str, Any]) -> Any:
    names = {f.name for f in dataclasses.fields(cfg_obj)}
    return dataclasses.replace(cfg_obj, **{k: v for k, v in values.items() if k in names})


def _solver_setup(name: str, sizes: dict[str, Any], task: str) -> tuple[Any, Any]:
    from fewflow.inverse import get_inverse

    if name == "dps_equal_nfe":  # DPS with FLAIR's budget: a DPS step costs 3 (forward + backward)
        _, flair_cfg = _solver_setup("flair", sizes, task)
        spec = get_inverse("dps")
        return spec, _replace(spec.config(), {**sizes.get("dps", {}), "steps": max(1, flair_cfg.steps // 3)})
    base = "flair" if name.startswith("flair") else name
    spec = get_inverse(base)
    for_task = getattr(spec.config, "for_task", None)  # FLAIR's data-term rate scales with the operator
    scfg = _replace(for_task(task) if for_task is not None else spec.config(), sizes.get(base, {}))
    if name.startswith("flair_no_"):
        scfg = dataclasses.replace(scfg, **{name.removeprefix("flair_no_"): False})
    return spec, scfg


def _restore_row(ctx: dict[str, Any], task: str, name: str) -> dict[str, Any]:
    from fewflow.inverse.operators import make_operator, measure
    from fewflow.metrics.features import classifier_predict
    from fewflow.metrics.image import psnr, ssim

    model, x, labels, shape = ctx["model"], ctx["x"], ctx["labels"], ctx["shape"]
    spec, scfg = _solver_setup(name, ctx["sizes"], task)
    op = make_operator(task, shape, **({"mask": "half"} if task == "inpaint" else {}))
    meas = measure(x, op, SIGMA, generator=torch.Generator().manual_seed(ctx["seed"] + 17))
    cond = {"y": torch.full((x.shape[0],), ctx["null"], dtype=torch.long)}
    kw: dict[str, Any] = {}
    if spec.name == "flair" and getattr(scfg, "crw", False):
        kw["calibration"] = ctx["calibration"]
    outs, nfe, wall = [], 0, 0.0
    for s in range(ctx["sizes"]["seeds"]):
        g = torch.Generator().manual_seed(1000 * ctx["seed"] + s)
        t0 = time.perf_counter()
        res = spec.solve(model, meas, scfg, generator=g, **cond, **kw)
        wall += time.perf_counter() - t0
        outs.append(res.x.detach())
        nfe = int(res.nfe)
    xs = torch.stack(outs)  # (S, B, ...)
    finite = bool(torch.isfinite(xs).all())
    xs = torch.nan_to_num(xs, nan=0.0, posinf=1.0, neginf=-1.0)
    p = torch.stack([psnr(o, x) for o in xs]).clamp(max=100.0)
    q = torch.stack([ssim(o, x) for o in xs])
    r = torch.stack([meas.residual(o) for o in xs])
    agree = torch.stack([(classifier_predict(o, ctx["dataset"]) == labels).double() for o in xs])
    floor = SIGMA * math.sqrt(meas.m)
    return {
        "task": task,
        "solver": name,
        "psnr": float(p.mean()),
        "ssim": float(q.mean()),
        "residual": float(r.mean()),
        "noise_floor": floor,
        "residual_over_floor": float(r.mean()) / floor,
        "agreement": float(agree.mean()),
        "diversity": float(xs.std(0).mean()) if xs.shape[0] > 1 else 0.0,
        "nfe": nfe,
        "wall_s": wall / xs.shape[0],
        "finite": finite,
        "seeds": int(xs.shape[0]),
        "images": int(x.shape[0]),
        "settings": {k: v for k, v in dataclasses.asdict(scfg).items() if isinstance(v, (bool, int, float))},
    }


def _mse(a: Tensor, b: Tensor) -> float:
    return float((a - b).double().pow(2).flatten(1).mean(1).mean())


def _scalar(v: Any) -> float:
    """A float from a solver's meta entry (a number, or a per-row list: its mean)."""
    if isinstance(v, (list, tuple)):
        vals = [float(a) for a in v]
        return sum(vals) / len(vals) if vals else float("nan")
    if torch.is_tensor(v):
        return float(v.double().mean())
    return float(v) if v is not None else float("nan")


def _invert_row(ctx: dict[str, Any]) -> dict[str, Any]:
    """FlowOpt inversion vs ODE inversion at the same NFE (the label of each image as its condition)."""
    from fewflow.inverse import get_inverse
    from fewflow.inverse.operators import Identity, Measurement

    model, x, labels = ctx["model"], ctx["x"], ctx["labels"]
    meas = Measurement(y=x, op=Identity(), sigma=0.0)
    cond = {"y": labels}
    fo = get_inverse("flowopt")
    fcfg = _replace(fo.config(), {"iterations": ctx["sizes"]["invert_iters"], "tol": 0.0})
    t0 = time.perf_counter()
    res = fo.solve(model, meas, fcfg, generator=torch.Generator().manual_seed(ctx["seed"]), **cond)
    wall_fo = time.perf_counter() - t0
    steps = int(res.meta.get("steps", 10))
    oi = get_inverse("ode_inversion")
    ocfg = _replace(oi.config(), {"steps": max(1, int(res.nfe) - steps), "sample_steps": steps})
    t0 = time.perf_counter()
    base = oi.solve(model, meas, ocfg, **cond)
    wall_ode = time.perf_counter() - t0
    same = _replace(oi.config(), {"steps": steps, "sample_steps": steps})
    plain = oi.solve(model, meas, same, **cond)
    curve = [[h.get("nfe", float("nan")), 2.0 * h["loss"] / x[0].numel()] for h in res.history]
    return {
        "flowopt_mse": _mse(res.x, x),
        "flowopt_nfe": int(res.nfe),
        "flowopt_wall_s": wall_fo,
        "ode_mse": _mse(base.x, x),
        "ode_nfe": int(base.nfe),
        "ode_wall_s": wall_ode,
        "ode_plain_mse": _mse(plain.x, x),
        "ode_plain_nfe": int(plain.nfe),
        "eta": _scalar(res.meta.get("eta")),
        "curve": curve,
        "images": int(x.shape[0]),
    }


def _sweep_row(ctx: dict[str, Any]) -> dict[str, Any]:
    """FlowOpt inversion with eta = multiple x the estimated bound eta_max."""
    from fewflow.inverse import get_inverse
    from fewflow.inverse.flowopt import estimate_step_bound, resolve_settings, sampler_map
    from fewflow.inverse.inversion import ode_invert
    from fewflow.inverse.operators import Identity, Measurement

    model, x, labels = ctx["model"], ctx["x"], ctx["labels"]
    fo = get_inverse("flowopt")
    base_cfg = _replace(fo.config(), {"iterations": ctx["sizes"]["sweep_iters"], "tol": 0.0})
    s = resolve_settings(base_cfg, "invert")
    cond = {"y": labels}
    with torch.no_grad():
        z0 = ode_invert(model, x, s["steps"], n_max=s["n_max"], **cond)
        f = sampler_map(model, s["steps"], s["n_max"], cond=cond)
        lip, eta_max = estimate_step_bound(
            f, z0, probes=4, power_iters=3, generator=torch.Generator().manual_seed(ctx["seed"] + 5)
        )
    if not (eta_max > 0 and math.isfinite(eta_max)):
        eta_max = 1.0 / max(lip, 1e-12)
    runs = {}
    for mult in ETA_MULTS:
        cfg_m = dataclasses.replace(base_cfg, eta=mult * eta_max)
        res = fo.solve(model, Measurement(y=x, op=Identity(), sigma=0.0), cfg_m, z_init=z0, **cond)
        mses = [2.0 * h["loss"] / x[0].numel() for h in res.history]
        diverged = res.meta.get("stop") == "diverged" or not all(math.isfinite(m) for m in mses)
        final = mses[-1] if mses and not diverged else float("inf")
        runs[str(mult)] = {
            "eta": mult * eta_max,
            "mse": mses,
            "final": final if math.isfinite(final) else 1e30,
            "converged": bool(not diverged and final < 0.5 * mses[0]),
            "diverged": bool(diverged),
        }
    return {"L_hat": lip, "eta_max": eta_max, "runs": runs, "iterations": ctx["sizes"]["sweep_iters"]}


def _edit_row(ctx: dict[str, Any]) -> dict[str, Any]:
    """Held-out 3s edited to 8 with FlowOpt; a fresh class-8 sample from the same sampler for reference."""
    from fewflow.inverse import get_inverse
    from fewflow.inverse.flowopt import resolve_settings, sampler_map
    from fewflow.inverse.operators import Identity, Measurement
    from fewflow.metrics.features import get_feature_classifier

    model, src_cls, tgt_cls = ctx["model"], 3, 8
    pool_x, pool_y = ctx["pool_x"], ctx["pool_y"]
    x = pool_x[pool_y == src_cls][: ctx["sizes"]["n_edit"]]
    b = x.shape[0]
    fo = get_inverse("flowopt")
    fcfg = _replace(fo.config(), ctx["sizes"].get("flowopt_edit", {}))
    src = torch.full((b,), src_cls, dtype=torch.long)
    tgt = torch.full((b,), tgt_cls, dtype=torch.long)
    t0 = time.perf_counter()
    res = fo.solve(
        model,
        Measurement(y=x, op=Identity(), sigma=0.0),
        fcfg,
        generator=torch.Generator().manual_seed(ctx["seed"]),
        y=src,
        target_cond={"y": tgt},
    )
    wall = time.perf_counter() - t0
    s = resolve_settings(fcfg, "edit")
    with torch.no_grad():
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(ctx["seed"] + 99))
        fresh = sampler_map(model, s["steps"], s["steps"], cond={"y": tgt})(z)
        clf = get_feature_classifier(ctx["dataset"])

        def prob(a: Tensor) -> float:
            return float(torch.softmax(clf(a.float()), 1)[:, tgt_cls].mean())

        out = {
            "p_before": prob(x),
            "p_after": prob(res.x),
            "p_fresh": prob(fresh),
            "mse_edit": _mse(res.x, x),
            "mse_fresh": _mse(fresh, x),
            "nfe": int(res.nfe),
            "wall_s": wall,
            "images": int(b),
            "from": src_cls,
            "to": tgt_cls,
        }
        out["p_curve"] = [prob(it) for it in res.iterates] if res.iterates else []
    return out


# -------------------------------------------------------------------------------------------- claims


def check_claims(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The paper claims checked on ``results`` (``{"dataset", "restore": {task: {solver: row}}, "invert",
    "sweep", "edit"}``); each ``{"claim", "dataset", "met", "value"}``."""
    ds = results["dataset"]
    rest = results["restore"]
    claims: list[dict[str, Any]] = []

    def add(claim: str, met: bool, value: float) -> None:
        claims.append({"claim": claim, "dataset": ds, "met": bool(met), "value": float(value)})

    for task, label in (("inpaint", "inpainting"), ("sr2", "x2 super-resolution")):
        rows = rest.get(task, {})
        if "flair" in rows and "dps" in rows:
            d = rows["flair"]["psnr"] - rows["dps"]["psnr"]
            add(f"FLAIR beats DPS on PSNR for {label} (value: PSNR gain, dB)", d > 0, d)
        if "flair" in rows and "dps_equal_nfe" in rows:
            d = rows["flair"]["psnr"] - rows["dps_equal_nfe"]["psnr"]
            add(f"FLAIR beats DPS at FLAIR's NFE on PSNR for {label} (value: PSNR gain, dB)", d > 0, d)
        if "flair" in rows:
            r = rows["flair"]["residual_over_floor"]
            add(
                f"HDC brings FLAIR's residual to the noise floor on {label} (value: residual / "
                "(sigma sqrt(m)), met when <= 1.5)",
                r <= 1.5,
                r,
            )
            for abl in ("dta", "crw", "hdc"):
                key = f"flair_no_{abl}"
                if key in rows:
                    d = rows["flair"]["psnr"] - rows[key]["psnr"]
                    add(
                        f"FLAIR full >= FLAIR without {abl.upper()} on PSNR for {label} (value: gain, dB)",
                        d >= 0,
                        d,
                    )
    inv = results.get("invert")
    if inv:
        add(
            "FlowOpt inversion reaches lower MSE than ODE inversion at equal NFE (value: MSE ratio "
            "FlowOpt / ODE)",
            inv["flowopt_mse"] < inv["ode_mse"],
            inv["flowopt_mse"] / max(inv["ode_mse"], 1e-30),
        )
    sw = results.get("sweep")
    if sw:
        runs = sw["runs"]
        below = all(runs[k]["converged"] for k in runs if float(k) < 1.0)
        far = [runs[k] for k in runs if float(k) >= 4.0]
        above_fails = all(not r["converged"] for r in far)
        largest = max((float(k) for k in runs if runs[k]["converged"]), default=0.0)
        add(
            "FlowOpt converges for eta below the estimated bound eta_max and not at 4 eta_max (value: "
            "largest converging eta / eta_max)",
            below and above_fails,
            largest,
        )
    ed = results.get("edit")
    if ed:
        ok = ed["p_after"] > ed["p_before"] and ed["mse_edit"] < ed["mse_fresh"]
        add(
            "Editing 3 -> 8 raises P(8) and stays closer to the input than a fresh 8 (value: P(8) after)",
            ok,
            ed["p_after"],
        )
    return claims


# ----------------------------------------------------------------------------------------------- run


def run(cfg: InverseBenchConfig) -> dict[str, Any]:
    """Run (or resume) the benchmark; returns ``{"claims", "results", "wall_s", ...}`` and writes
    ``inverse.{md,json,png}`` into ``cfg.out_dir`` when given."""
    from fewflow.data import load_dataset
    from fewflow.inverse.flair import calibrate
    from fewflow.metrics.features import get_feature_classifier

    t_start = time.perf_counter()
    threads = torch.get_num_threads()
    s = cfg.sizes
    note = None
    if s["dataset"] == "mnist" and not _mnist_available():
        note = (
            "MNIST is not fetched (run `fewflow fetch mnist`): the full mode falls back to 8x8 digits "
            "with a larger prior"
        )
        _log(cfg, note)
        s.update(dataset="digits", **FULL_DIGITS)
    cache = Path(cfg.cache_dir) if cfg.cache_dir is not None else default_cache_dir() / "inverse"
    model, rc, pkey = _prior(cfg, cache)
    name = s["dataset"]
    get_feature_classifier(name)  # trained once, before anything is timed
    test = load_dataset(name, split="test")
    assert test.y is not None
    n, nc = s["n_images"], s["calib"]
    if test.x.shape[0] < n + nc:
        nc = max(16, test.x.shape[0] - n)
    g = torch.Generator().manual_seed(cfg.seed + 3)
    perm = torch.randperm(test.x.shape[0], generator=g)
    x, labels = test.x[perm[:n]], test.y[perm[:n]]
    xc = test.x[perm[n : n + nc]]
    null = int(rc.meta["num_classes"])
    rows_key = json_key({"v": VERSION, "seed": cfg.seed, "sizes": s, "lr_data": "for_task"})
    rows_dir = cache / name / f"rows-{pkey}-{rows_key}"
    ctx: dict[str, Any] = {
        "model": model,
        "x": x,
        "labels": labels,
        "shape": tuple(x.shape[1:]),
        "sizes": s,
        "seed": cfg.seed,
        "null": null,
        "dataset": name,
        "pool_x": test.x[perm[n:]],
        "pool_y": test.y[perm[n:]],
    }
    with torch.no_grad():
        ctx["calibration"] = calibrate(
            model,
            xc,
            bins=100,
            generator=torch.Generator().manual_seed(cfg.seed),
            y=torch.full((xc.shape[0],), null, dtype=torch.long),
        )
    results: dict[str, Any] = {
        "dataset": name,
        "prior": {"key": pkey, "hidden": s["hidden"], "depth": s["depth"], "steps": s["steps"]},
        "sigma": SIGMA,
        "note": note,
        "restore": {},
    }
    for task in TASKS:
        results["restore"][task] = {}
        for solver in SOLVERS:
            t0 = time.perf_counter()
            row = _cached_row(
                rows_dir / f"restore-{task}-{solver}.json", lambda t=task, v=solver: _restore_row(ctx, t, v)
            )
            results["restore"][task][solver] = row
            _log(
                cfg,
                f"{task:8s} {solver:14s} PSNR {row['psnr']:6.2f}  SSIM {row['ssim']:.3f}  "
                f"resid/floor {row['residual_over_floor']:.2f}  ({time.perf_counter() - t0:.1f} s)",
            )
    results["invert"] = _cached_row(rows_dir / "invert.json", lambda: _invert_row(ctx))
    _log(
        cfg,
        f"inversion MSE: FlowOpt {results['invert']['flowopt_mse']:.2e} vs ODE "
        f"{results['invert']['ode_mse']:.2e} at NFE {results['invert']['flowopt_nfe']}",
    )
    results["sweep"] = _cached_row(rows_dir / "sweep.json", lambda: _sweep_row(ctx))
    results["edit"] = _cached_row(rows_dir / "edit.json", lambda: _edit_row(ctx))
    _log(cfg, f"edit: P(8) {results['edit']['p_before']:.2f} -> {results['edit']['p_after']:.2f}")
    torch.set_num_threads(threads)
    claims = check_claims(results)
    wall = time.perf_counter() - t_start
    out = {"mode": cfg.mode, "seed": cfg.seed, "wall_s": wall, "claims": claims, "results": results}
    if cfg.out_dir is not None:
        write(out, Path(cfg.out_dir))
    return out


def _report(out: dict[str, Any]) -> list[str]:
    res = out["results"]
    lines = [f"# Inverse problems and editing ({out['mode']} mode, {res['dataset']})", ""]
    if res.get("note"):
        lines += [f"> {res['note']}", ""]
    p = res["prior"]
    lines += [
        f"Prior: class-conditional CFM, MLP {p['hidden']} x {p['depth']}, {p['steps']} steps; restoration "
        f"with the null class; noise sigma = {res['sigma']}. Wall time {out['wall_s']:.0f} s.",
        "",
    ]
    for task, rows in res["restore"].items():
        lines += [f"## Restoration: {task}", ""]
        header = [
            "solver",
            "PSNR",
            "SSIM",
            "residual",
            "floor",
            "resid/floor",
            "agreement",
            "diversity",
            "NFE",
            "wall s",
        ]
        lines.append(
            format_table(
                header,
                [
                    [
                        k,
                        r["psnr"],
                        r["ssim"],
                        r["residual"],
                        r["noise_floor"],
                        r["residual_over_floor"],
                        r["agreement"],
                        r["diversity"],
                        r["nfe"],
                        r["wall_s"],
                    ]
                    for k, r in rows.items()
                ],
            )
        )
        lines.append("")
    inv = res["invert"]
    lines += [
        "## Inversion (equal NFE)",
        "",
        format_table(
            ["method", "MSE", "NFE"],
            [
                ["FlowOpt", inv["flowopt_mse"], inv["flowopt_nfe"]],
                ["ODE inversion (finer steps)", inv["ode_mse"], inv["ode_nfe"]],
                ["ODE inversion (sampler's steps)", inv["ode_plain_mse"], inv["ode_plain_nfe"]],
            ],
        ),
        "",
    ]
    sw = res["sweep"]
    lines += [
        f"## FlowOpt step size (eta_max = {sw['eta_max']:.3g}, L_hat = {sw['L_hat']:.3g})",
        "",
        format_table(
            ["eta / eta_max", "eta", "MSE start", "MSE end", "converged"],
            [
                [float(k), r["eta"], r["mse"][0] if r["mse"] else None, r["final"], r["converged"]]
                for k, r in sw["runs"].items()
            ],
        ),
        "",
    ]
    ed = res["edit"]
    lines += [
        "## Editing 3 -> 8 (FlowOpt)",
        "",
        format_table(
            ["", "P(8)", "MSE to input"],
            [
                ["input", ed["p_before"], 0.0],
                ["edited", ed["p_after"], ed["mse_edit"]],
                ["fresh sample of 8", ed["p_fresh"], ed["mse_fresh"]],
            ],
        ),
        "",
    ]
    lines += [
        "## Claims",
        "",
        format_table(
            ["claim", "data", "met", "value"],
            [[c["claim"], c["dataset"], c["met"], c["value"]] for c in out["claims"]],
        ),
    ]
    return lines


def _plot(out: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = out["results"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    tasks = list(res["restore"])
    solvers = list(res["restore"][tasks[0]])
    w = 0.8 / len(solvers)
    for i, sname in enumerate(solvers):
        ax.bar(
            [j + i * w for j in range(len(tasks))],
            [res["restore"][t][sname]["psnr"] for t in tasks],
            w,
            label=sname,
        )
    ax.set_xticks([j + 0.4 - w / 2 for j in range(len(tasks))], tasks)
    ax.set_ylabel("PSNR (dB)")
    ax.set_title("restoration")
    ax.legend(fontsize=7)
    ax = axes[1]
    for k, r in res["sweep"]["runs"].items():
        ys = [v for v in r["mse"] if math.isfinite(v) and v > 0]
        if ys:
            ax.plot(range(len(ys)), ys, marker="o", ms=3, label=f"{k} x eta_max")
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("MSE to target")
    ax.set_title("FlowOpt step size")
    ax.legend(fontsize=7)
    ax = axes[2]
    inv = res["invert"]
    pts = [(a, b) for a, b in inv["curve"] if math.isfinite(a) and b > 0]
    if pts:
        ax.plot([a for a, _ in pts], [b for _, b in pts], marker="o", ms=3, label="FlowOpt")
    ax.scatter([inv["ode_nfe"]], [inv["ode_mse"]], color="k", marker="s", label="ODE inversion (same NFE)")
    ax.scatter(
        [inv["ode_plain_nfe"]], [inv["ode_plain_mse"]], color="gray", marker="^", label="ODE inversion"
    )
    ax.set_yscale("log")
    ax.set_xlabel("NFE")
    ax.set_ylabel("reconstruction MSE")
    ax.set_title("inversion")
    ax.legend(fontsize=7)
    fig.suptitle(f"fewflow bench inverse ({out['mode']}, {res['dataset']})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(out: dict[str, Any], folder: Path) -> dict[str, Path]:
    """``inverse.md`` (tables and claims), ``inverse.json`` (atomically) and ``inverse.png`` in ``folder``."""
    from fewflow._io import atomic_write_text

    folder.mkdir(parents=True, exist_ok=True)
    paths = {"md": folder / "inverse.md", "json": folder / "inverse.json", "png": folder / "inverse.png"}
    atomic_write_text(paths["md"], "\n".join(_report(out)) + "\n")
    atomic_write_json(paths["json"], out)
    _plot(out, paths["png"])
    return paths


def main(argv: list[str] | None = None) -> int:
    """``fewflow bench inverse [--quick | --full | --smoke] [--datasets digits|mnist] [--seed S] ...``."""
    ap = argparse.ArgumentParser(prog="fewflow bench inverse", description=__doc__.split("\n\n")[0])
    add_common_args(ap, "inverse", "digits, mnist (one)")
    ap.set_defaults(mode="quick")
    a = ap.parse_args(argv)
    ds = None
    if a.datasets:
        names = [d.strip() for d in a.datasets.split(",") if d.strip()]
        if len(names) != 1:
            raise FewflowError(
                "fewflow bench inverse runs one data set: --datasets digits or --datasets mnist"
            )
        ds = names[0]
    cache = Path(a.cache) / "inverse" if a.cache is not None else None
    out = run(
        InverseBenchConfig(
            mode=a.mode, dataset=ds, seed=a.seed, cache_dir=cache, out_dir=Path(a.out), verbose=not a.quiet
        )
    )
    met = sum(c["met"] for c in out["claims"])
    print(f"{met}/{len(out['claims'])} claims met; wall {out['wall_s']:.0f} s -> {a.out}/inverse.md")
    return 0
