"""The one evaluation harness: sample quality against held-out data, next to the two-sample floor.

Used by ``fewflow eval``, the benchmarks and the demo, with one set of metric keys chosen from the data:

* vectors (2-D toys): ``sliced_w2`` (Bonneel et al., "Sliced and Radon Wasserstein Barycenters of
  Measures"; 512 fixed projections), ``mmd`` (squared MMD with an RBF kernel of median bandwidth,
  Gretton et al., "A Kernel Two-Sample Test") and ``energy`` (Szekely & Rizzo); the kernel metrics use at
  most 2000 points per set (they cost O(n^2) memory);
* sequences (one-hot ``(L, K)`` samples of a sequence data set): ``kmer_js``, the mean Jensen-Shannon
  distance of the k-mer spectra (k = 1..6 as far as the data supports; :mod:`fewflow.metrics.sequences`),
  and ``diversity`` (mean pairwise Hamming distance, a fraction of L);
* images: ``fd``, the Frechet distance in the features of fewflow's classifier for the data set (8x8
  digits or 28x28 MNIST; never called FID), and ``accuracy``, that classifier's agreement with the
  intended labels of class-conditional samples. Samples are clamped to the data range [-1, 1].

The *floor* is the same metric between two independent real draws of the same size: the best score a
perfect model can reach with this many samples. ``ratio`` = metric / floor (1 is perfect).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from fewflow._validate import FewflowError
from fewflow.config import RunConfig

__all__ = [
    "KERNEL_POINTS", "evaluate_run", "format_table", "metric_names", "primary_metric", "run_diagnostics",
    "score",
]

KERNEL_POINTS = 2000
IMAGE_METRIC_SETS = ("digits", "mnist")


def primary_metric(shape: Sequence[int], kind: str | None = None) -> str:
    """The headline metric for data of this shape: ``sliced_w2`` for vectors, ``fd`` for images,
    ``kmer_js`` for sequences (``kind="sequence"``)."""
    if kind == "sequence":
        return "kmer_js"
    return "sliced_w2" if len(shape) == 1 else "fd"


def metric_names(shape: Sequence[int], labelled: bool = False, kind: str | None = None) -> list[str]:
    """The metric keys :func:`score` returns for data of this shape."""
    if kind == "sequence":
        return ["kmer_js", "diversity"]
    if len(shape) == 1:
        return ["sliced_w2", "mmd", "energy"]
    return ["fd", "accuracy"] if labelled else ["fd"]


def _image_set(dataset: str | None, x: Tensor) -> str:
    if dataset in IMAGE_METRIC_SETS:
        return str(dataset)
    side = int(x.shape[-1])
    for name, s in (("digits", 8), ("mnist", 28)):
        if side == s:
            return name
    raise FewflowError(
        f"no image metric for {tuple(x.shape[1:])} images (fewflow scores 8x8 digits and 28x28 MNIST)"
    )


def score(
    x: Tensor, ref: Tensor, *, dataset: str | None = None, y: Tensor | None = None, seed: int = 0,
    kind: str | None = None,
) -> dict[str, float]:
    """Metrics of samples ``x`` against real ``ref`` (module docstring); non-finite samples score ``inf``
    (and accuracy 0). ``kind="sequence"`` scores one-hot sequences."""
    from fewflow.metrics import classifier_accuracy, energy_distance, fd_features, mmd_rbf, sliced_wasserstein

    x = x.detach().to("cpu", torch.float32)
    ref = ref.detach().to("cpu", torch.float32)
    shape = tuple(x.shape[1:])
    if kind == "sequence":
        from fewflow.metrics.sequences import diversity, kmer_distance

        if not bool(torch.isfinite(x).all()):
            return {"kmer_js": math.inf, "diversity": 0.0}
        tok = x.argmax(-1)
        return {"kmer_js": float(kmer_distance(tok, ref.argmax(-1), K=shape[-1])["mean"]),
                "diversity": float(diversity(tok))}
    if not bool(torch.isfinite(x).all()):
        out = {k: math.inf for k in metric_names(shape, y is not None)}
        if "accuracy" in out:
            out["accuracy"] = 0.0
        return out
    if len(shape) == 1:
        m = min(KERNEL_POINTS, x.shape[0], ref.shape[0])
        g = torch.Generator().manual_seed(seed + 17)  # the same projections for every row of a table
        return {
            "sliced_w2": sliced_wasserstein(x, ref, n_proj=512, generator=g),
            "mmd": mmd_rbf(x[:m], ref[:m]),
            "energy": energy_distance(x[:m], ref[:m]),
        }
    name = _image_set(dataset, x)
    x = x.clamp(-1.0, 1.0)
    out = {"fd": fd_features(x, ref, dataset=name)}
    if y is not None:
        out["accuracy"] = classifier_accuracy(x, y.cpu(), dataset=name)
    return out


def _straightness(traj: Tensor | None, times: Tensor) -> float | None:
    if traj is None or not bool(torch.isfinite(traj).all()):  # none for a diverged (allowed) trajectory
        return None
    from fewflow.metrics import straightness

    return float(straightness(traj, times))


def evaluate_run(
    model: Any,
    cfg: RunConfig,
    nfes: Sequence[int] = (1, 2, 4, 8, 100),
    steppers: Sequence[str] | None = None,
    *,
    grid: str | None = None,
    n: int | None = None,
    seed: int = 0,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    samples: dict[tuple[str, int], Tensor] | None = None,
    allow_nonfinite: bool = False,
    diagnostics: bool = False,
) -> dict[str, Any]:
    """Sample ``n`` points at each (stepper, NFE) with :func:`fewflow.sampling.generate` and score them
    against fresh real data. Returns ``{"data", "method", "n", "metrics", "primary", "floor", "results":
    [{"solver", "nfe", "steps", <metric>: value, "ratio", "straightness", "wall_time_s"}, ...]}``. A stepper
    whose one step costs more than an NFE budget is skipped for it; an unknown stepper name is an error.
    ``samples`` (a dict) receives the samples under ``(solver, nfe)``. Samples with NaN / inf (a diverged
    model) raise a :class:`FewflowError` naming the solver and NFE, unless ``allow_nonfinite`` (then they
    score ``inf``, see :func:`score`). ``diagnostics``: also report ``"diagnostics"``, the conservativity of
    the learned field and the straightness / curvature of its paths (:func:`field_diagnostics`)."""
    from fewflow._validate import unknown_name
    from fewflow.runs import build_data
    from fewflow.sampling import generate
    from fewflow.solvers import STEPPER_NAMES, steps_for_nfe

    shape = list(cfg.meta.get("shape", []))
    kind = cfg.meta.get("kind")
    is_vec = len(shape) == 1
    n = n if n is not None else (10_000 if is_vec else 2000)
    if not isinstance(n, int) or n < 2:
        raise FewflowError(f"number of evaluation samples must be an integer >= 2, got {n!r}")
    from fewflow.methods import get_method

    spec = get_method(cfg.method_name)
    steppers = list(steppers) if steppers else [cfg.sampler.stepper or spec.sampler.stepper]
    for name in steppers:
        if name not in STEPPER_NAMES:
            raise unknown_name("stepper", str(name), STEPPER_NAMES)
    conditional = bool(cfg.meta.get("conditional"))
    names = metric_names(shape, conditional, kind)
    primary = primary_metric(shape, kind)
    say = log or (lambda _m: None)

    if is_vec:  # a reference set and, for the floor, a second independent one of the same size
        base_seed = cfg.data.seed + 10_000 + seed
        ref = build_data(cfg, n=n, seed=base_seed).x
        ref2 = build_data(cfg, n=n, seed=base_seed + 1).x
        ref2_y = None
    else:
        real = build_data(cfg, n=None)
        if real.x.shape[0] < 2 * n:
            n = real.x.shape[0] // 2
        perm = torch.randperm(real.x.shape[0], generator=torch.Generator().manual_seed(seed))
        ref, ref2 = real.x[perm[:n]], real.x[perm[n : 2 * n]]
        ref2_y = real.y[perm[n : 2 * n]] if (conditional and real.y is not None) else None
    floor = score(ref2, ref, dataset=cfg.data.name, y=ref2_y, seed=seed, kind=kind)
    say(f"two-sample floor ({n} vs {n}): " + ", ".join(f"{k} {v:.4g}" for k, v in floor.items()))

    rows: list[dict[str, Any]] = []
    for stepper in steppers:
        for nfe in nfes:
            try:
                steps = steps_for_nfe(stepper, int(nfe))
            except FewflowError:
                continue
            gen = torch.Generator().manual_seed(seed)
            label = torch.arange(n) % int(cfg.meta["num_classes"]) if conditional else None
            t0 = time.perf_counter()
            res = generate(model, cfg, n, nfe=int(nfe), stepper=stepper, grid=grid, label=label, raw=True,
                           generator=gen, trajectory=is_vec, progress=progress, check_finite=False)
            wall = time.perf_counter() - t0
            x = res.x.detach().to("cpu", torch.float32)
            if not allow_nonfinite and not bool(torch.isfinite(res.x).all()):
                bad = int((~torch.isfinite(res.x)).reshape(n, -1).any(dim=1).sum())
                raise FewflowError(
                    f"{stepper} at NFE {res.nfe} produced non-finite values in {bad} of {n} samples "
                    "(a diverged model?); nothing was scored"
                )
            if samples is not None:
                samples[(stepper, int(res.nfe))] = x
            row: dict[str, Any] = {"solver": stepper, "nfe": int(res.nfe), "steps": steps}
            row.update(score(x, ref, dataset=cfg.data.name, y=label, seed=seed, kind=kind))
            row["ratio"] = row[primary] / floor[primary] if floor[primary] > 0 else None
            row["straightness"] = _straightness(res.trajectory, res.times)
            row["wall_time_s"] = wall
            rows.append(row)
            ratio = f" (x{row['ratio']:.2f} floor)" if row["ratio"] is not None else ""
            say(f"  {stepper:>9} NFE {res.nfe:>3}: {primary} {row[primary]:.4g}{ratio}, {wall:.2f} s")
    if not rows:
        raise FewflowError(f"no (solver, NFE) pair could run: solvers {steppers}, NFE {list(nfes)}")
    report: dict[str, Any] = {
        "data": cfg.data.name,
        "method": cfg.method_name,
        "n": n,
        "metrics": names,
        "primary": primary,
        "floor": floor,
        "results": rows,
    }
    if diagnostics:
        report["diagnostics"] = run_diagnostics(model, cfg, seed=seed)
        say("field diagnostics: asymmetry {asymmetry:.4g}, loop circulation {circulation:.4g}".format(
            **report["diagnostics"]))
    return report


def run_diagnostics(model: Any, cfg: RunConfig, *, n: int = 64, seed: int = 0,
                    ts: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9)) -> dict[str, Any]:
    """Conservativity of a run's learned field (:func:`fewflow.metrics.diagnostics.field_diagnostics`) on
    ``n`` points of its ODE paths from the run's own source (class-conditional runs: labels ``i mod K``)."""
    from fewflow.metrics.diagnostics import field_diagnostics as diagnose
    from fewflow.sampling import draw_source

    p = next((q for q in model.parameters() if q.is_floating_point()), None) if hasattr(
        model, "parameters") else None
    device = p.device if p is not None else torch.device("cpu")
    dtype = p.dtype if p is not None else torch.float32
    gen = torch.Generator(device=device).manual_seed(seed + 7)
    x0 = draw_source(cfg, n, device=device, dtype=dtype, generator=gen)
    cond: dict[str, Any] = {}
    if cfg.meta.get("conditional"):
        cond["y"] = torch.arange(n, device=device) % int(cfg.meta["num_classes"])
    return diagnose(model, cfg, ts=ts, n=n, generator=gen, x0=x0, cond=cond)


def format_table(report: dict[str, Any]) -> str:
    """A Markdown table of :func:`evaluate_run`'s result, with the floor as the last row."""
    names = list(report["metrics"])
    rows = report["results"]
    extra = [k for k in ("straightness", "wall_time_s") if any(r.get(k) is not None for r in rows)]
    head = ["solver", "NFE", *names, f"{report['primary']} / floor", *extra]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def fmt(v: Any) -> str:
        return "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))

    for r in report["results"]:
        cells = [r["solver"], r["nfe"], *[r.get(k) for k in names], r["ratio"], *[r.get(k) for k in extra]]
        lines.append("| " + " | ".join(fmt(c) for c in cells) + " |")
    floor = report["floor"]
    cells = ["two-sample floor", "-", *[floor.get(k) for k in names], 1.0, *[None for _ in extra]]
    lines.append("| " + " | ".join(fmt(c) for c in cells) + " |")
    if report.get("diagnostics"):
        from fewflow.metrics.diagnostics import format_diagnostics

        lines += ["", format_diagnostics(report["diagnostics"])]
    return "\n".join(lines)
