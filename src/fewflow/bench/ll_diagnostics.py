"""Benchmark part: is a learned velocity a gradient field? ("Are We Really Learning the Score Function?
Reinterpreting Diffusion Models Through Wasserstein Gradient Flow Matching", Vuong, McCann, Santos, Lin;
TMLR 2025.)

On a 2-D mixture of 8 Gaussians and on 8x8 digits (unconditional), three velocity fields for the linear path
from ``N(0, I)`` (t = 0) to the data (t = 1):

* ``exact``: the closed-form marginal velocity (:class:`fewflow.metrics.diagnostics.MixtureVelocity`: the
  8-Gaussian mixture itself; for digits the empirical distribution of the training images), a gradient
  field by Tweedie's formula;
* ``mlp``: fewflow's residual MLP trained with ``cfm`` (unconstrained);
* ``grad_phi``: :class:`fewflow.models.conservative.ConservativeMLP` (the same residual blocks computing a
  scalar potential, ``v = grad_x phi``) trained with ``cfm`` for the same steps.

Each row reports :func:`fewflow.metrics.diagnostics.field_diagnostics` (Jacobian asymmetry
``||J - J^T||_F / ||J||_F`` and the normalised circulation around small random planar loops, averaged over
t in {0.1, 0.5, 0.9} on points of the field's own ODE paths) beside sample quality
(:func:`fewflow.evaluate.score`: sliced W2 for 2-D, the digits classifier's Frechet distance for images;
Euler, ``SAMPLE_STEPS`` steps) and its two-sample floor. Runs are trained by :func:`fewflow.runs.train_run`
into ``cache`` (a ``DONE`` marker; a rerun resumes), rows are cached as JSON.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from fewflow._io import atomic_write_json
from fewflow._validate import FewflowError
from fewflow.bench.common import format_table, train_once

__all__ = ["SIZES", "part"]

TITLE = "Is the learned field a gradient? (Vuong et al., TMLR 2025)"
VERSION = 1
CONSERVATIVE = "fewflow.models.conservative:ConservativeMLP"
MODELS = ("exact", "mlp", "grad_phi")
TS = (0.1, 0.5, 0.9)
SAMPLE_STEPS = 50

# per mode: data sets, training steps, network size, evaluation sizes
SIZES: dict[str, dict[str, Any]] = {
    "smoke": {"sets": ("8gaussians",), "steps": 60, "hidden": 32, "depth": 2, "batch": 128, "n_eval": 300,
              "n_diag": 16},
    "quick": {"sets": ("8gaussians", "digits"), "steps": 600, "hidden": 64, "depth": 2, "batch": 256,
              "n_eval": 1000, "n_diag": 32},
    "full": {"sets": ("8gaussians", "digits"), "steps": 2000, "hidden": 128, "depth": 3, "batch": 256,
             "n_eval": 2000, "n_diag": 64},
}

# thresholds fixed before any run (the paper's effect at our scale)
EXACT_MAX = 1e-4      # a gradient field, up to float rounding
CONSERVATIVE_MAX = 1e-4
MLP_MIN = 0.05        # "clearly non-conservative": 5 % of the Jacobian's norm
QUALITY_SLACK = 1.5   # non-conservative errors need not harm samples: MLP within 1.5x of grad-phi's metric


def _say(verbose: bool, msg: str) -> None:
    if verbose:
        print(msg, flush=True)


def _trained(cache: Path, mode: str, data: str, kind: str, seed: int, verbose: bool) -> tuple[Any, Any]:
    """Train (or resume, or load) the ``kind`` network on ``data``; returns ``(ema model, RunConfig)``."""
    from fewflow.config import default_config
    from fewflow.runs import load_run

    size = SIZES[mode]
    root = cache / "runs" / f"{mode}-{data}-{kind}-s{seed}"

    def make() -> Any:
        rc = default_config(data, "cfm")
        rc.model = {"type": "MLP" if kind == "mlp" else CONSERVATIVE, "hidden": size["hidden"],
                    "depth": size["depth"]}
        rc.objective.conditional = False
        rc.objective.label_dropout = 0.0
        if data == "8gaussians":
            rc.data.n = 20_000
        return rc

    train_once(root, make, steps=int(size["steps"]), batch_size=size["batch"], seed=seed,
               say=(lambda m: _say(verbose, m)), label=f"{data}/{kind}")
    return load_run(root)


def _references(data: str, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any]:
    """``(reference, second reference for the floor, the training points of the exact field, its std)``."""
    from fewflow.data import load_dataset

    if data == "8gaussians":
        ref = load_dataset(data, n=n, seed=10_000 + seed).x
        ref2 = load_dataset(data, n=n, seed=10_001 + seed).x
        info = load_dataset(data, n=8, seed=seed).meta or {}
        radius, std = float(info.get("radius", 2.0)), float(info.get("std", 0.1))
        ang = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
        centres = radius * torch.stack([ang.cos(), ang.sin()], dim=1)
        return ref, ref2, centres, std
    train = load_dataset(data, split="train").x
    test = load_dataset(data, split="test").x
    m = min(n, test.shape[0], train.shape[0])
    perm = torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(seed))
    return test[:m], train[perm[:m]], train.reshape(train.shape[0], -1).double(), 0.0


def _row(cache: Path, mode: str, data: str, kind: str, seed: int, verbose: bool) -> dict[str, Any]:
    path = cache / "rows" / f"v{VERSION}-{mode}-{data}-{kind}-s{seed}.json"
    if path.exists():
        return json.loads(path.read_text())
    from fewflow.evaluate import primary_metric, score
    from fewflow.metrics.diagnostics import MixtureVelocity, field_diagnostics
    from fewflow.solvers import solve

    size = SIZES[mode]
    ref, ref2, points, std = _references(data, int(size["n_eval"]), seed)
    shape = list(ref.shape[1:])
    n = ref.shape[0]
    t0 = time.perf_counter()
    if kind == "exact":
        model: Any = MixtureVelocity(points, std=std)
        dtype = torch.float64
    else:
        model, _ = _trained(cache, mode, data, kind, seed, verbose)
        dtype = next(model.parameters()).dtype
    train_s = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(seed + 1)
    x0 = torch.randn(n, *shape, generator=gen, dtype=torch.float64).to(dtype)
    t1 = time.perf_counter()
    with torch.no_grad():
        x = solve(model, x0, steps=SAMPLE_STEPS, stepper="euler").x
    sample_s = time.perf_counter() - t1
    primary = primary_metric(shape)
    quality = score(x.float(), ref, dataset=data, seed=seed)[primary]
    floor = score(ref2, ref, dataset=data, seed=seed)[primary]
    nd = int(size["n_diag"])
    t2 = time.perf_counter()
    diag = field_diagnostics(model, shape, ts=TS, n=nd, generator=torch.Generator().manual_seed(seed + 2),
                             x0=x0[:nd].clone(), steps=32)
    row = {
        "data": data, "model": kind, "dim": diag["dim"], "jacobian": diag["jacobian"],
        "asymmetry": diag["asymmetry"], "circulation": diag["circulation"],
        "asymmetry_by_t": {str(r["t"]): r["asymmetry"] for r in diag["per_t"]},
        "circulation_by_t": {str(r["t"]): r["circulation"] for r in diag["per_t"]},
        "straightness": diag["straightness"], "curvature": diag["curvature"],
        "metric": primary, "quality": float(quality), "floor": float(floor),
        "steps": 0 if kind == "exact" else int(size["steps"]), "train_s": train_s, "sample_s": sample_s,
        "diag_s": time.perf_counter() - t2,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, row)
    return row


def _claims(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for data in dict.fromkeys(r["data"] for r in rows):
        by = {r["model"]: r for r in rows if r["data"] == data}
        if not all(k in by for k in MODELS):
            continue
        ex, mlp, gp = by["exact"], by["mlp"], by["grad_phi"]
        out.append({"claim": f"the exact marginal velocity is a gradient field: Jacobian asymmetry "
                             f"< {EXACT_MAX:g}", "dataset": data, "met": ex["asymmetry"] < EXACT_MAX,
                    "value": f"{ex['asymmetry']:.2e} (circulation {ex['circulation']:.2e})"})
        out.append({"claim": f"an unconstrained trained network is not a gradient field: mean asymmetry "
                             f"> {MLP_MIN:g}", "dataset": data, "met": mlp["asymmetry"] > MLP_MIN,
                    "value": f"{mlp['asymmetry']:.3g} (circulation {mlp['circulation']:.3g})"})
        out.append({"claim": f"grad-phi model is conservative to float precision: asymmetry "
                             f"< {CONSERVATIVE_MAX:g}", "dataset": data,
                    "met": gp["asymmetry"] < CONSERVATIVE_MAX,
                    "value": f"{gp['asymmetry']:.2e} (circulation {gp['circulation']:.2e})"})
        ok = math.isfinite(mlp["quality"]) and mlp["quality"] <= QUALITY_SLACK * gp["quality"]
        out.append({"claim": f"non-conservativity does not harm samples: MLP {mlp['metric']} <= "
                             f"{QUALITY_SLACK:g} x grad-phi's", "dataset": data, "met": bool(ok),
                    "value": f"MLP {mlp['quality']:.4g} vs grad-phi {gp['quality']:.4g} "
                             f"(exact {ex['quality']:.4g}, floor {mlp['floor']:.4g})"})
    return out


def part(mode: str, cache: Path, seed: int = 0, verbose: bool = True) -> dict[str, Any]:
    """Run the part in ``mode`` ("smoke" | "quick" | "full"), caching runs and rows under ``cache``.

    Returns ``{"rows": [...], "claims": [{"claim", "dataset", "met", "value"}], "lines": [markdown]}``."""
    if mode not in SIZES:
        raise FewflowError(f"unknown mode {mode!r}: smoke, quick or full")
    cache = Path(cache) / "ll_diagnostics"
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows: list[dict[str, Any]] = []
    for data in SIZES[mode]["sets"]:
        for kind in MODELS:
            t0 = time.perf_counter()
            rows.append(_row(cache, mode, data, kind, seed, verbose))
            r = rows[-1]
            _say(verbose, f"  {data}/{kind}: asymmetry {r['asymmetry']:.3g}, "
                          f"{r['metric']} {r['quality']:.4g} ({time.perf_counter() - t0:.1f} s)")
    claims = _claims(rows)
    table = format_table(
        ["data", "field", "Jacobian", "asymmetry", "circulation", *[f"asym t={t:g}" for t in TS],
         "metric", "value", "floor", "straightness", "train steps"],
        [[r["data"], r["model"], r["jacobian"], r["asymmetry"], r["circulation"],
          *[r["asymmetry_by_t"][str(float(t))] for t in TS], r["metric"], r["quality"], r["floor"],
          r["straightness"], r["steps"]] for r in rows],
    )
    lines = [
        f"## {TITLE}",
        "",
        f"Linear path, N(0, I) to data; `exact` = closed-form marginal velocity, `mlp` = residual MLP, "
        f"`grad_phi` = ConservativeMLP (v = grad phi), both trained with `cfm` for {SIZES[mode]['steps']} "
        f"steps. Asymmetry = ||J - J^T||_F / ||J||_F (0: gradient field, 2: rotation), circulation = mean "
        f"|normalised loop integral| (0: gradient field, 1: rotation), averaged over t in {list(TS)}; "
        f"samples: Euler, {SAMPLE_STEPS} steps.",
        "",
        table,
        "",
        *[f"- {'met' if c['met'] else '**not met**'} ({c['dataset']}): {c['claim']}: {c['value']}"
          for c in claims],
    ]
    return {"rows": rows, "claims": claims, "lines": lines}
