"""Evaluate a trained run at several NFE budgets: sample quality next to the two-sample floor.

For 2-D data the metrics are sliced-W2 (Bonneel et al., "Sliced and Radon Wasserstein Barycenters of
Measures"), squared MMD with an RBF kernel (Gretton et al., "A Kernel Two-Sample Test") and the energy
distance (Szekely & Rizzo); for image data the Frechet distance in the features of fewflow's digits
classifier and that classifier's accuracy on class-conditional samples. Every row also carries the
straightness of the sampling paths, the wall time of sampling and the NFE actually spent.

The *floor* is the same metric between two independent draws of real data of the same size: the best
score a perfect model can reach with this many samples. ``ratio`` = metric / floor (1 is perfect).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from fewflow._validate import FewflowError
from fewflow.run import RunConfig, build_data, build_source, generate, steps_for_nfe

__all__ = ["evaluate_run", "format_table", "primary_metric", "sample_metrics"]

KERNEL_POINTS = 2000  # MMD / energy distance use O(n^2) memory: at most this many points per set


def primary_metric(cfg: RunConfig) -> str:
    """The headline metric of a run's data: ``sliced_w2`` for vectors, ``fd_digits`` for images."""
    return "sliced_w2" if len(cfg.meta.get("shape", [])) == 1 else "fd_digits"


def _vector_metrics(seed: int) -> dict[str, Callable[[torch.Tensor, torch.Tensor], float]]:
    from fewflow.metrics import energy_distance, mmd_rbf, sliced_wasserstein

    def sw(a: torch.Tensor, b: torch.Tensor) -> float:
        # the same projections for every evaluation: differences between rows are not projection noise
        return sliced_wasserstein(a, b, n_proj=512, generator=torch.Generator().manual_seed(seed + 17))

    return {
        "sliced_w2": sw,
        "mmd": lambda a, b: mmd_rbf(a[:KERNEL_POINTS], b[:KERNEL_POINTS]),
        "energy": lambda a, b: energy_distance(a[:KERNEL_POINTS], b[:KERNEL_POINTS]),
    }


def _image_metrics() -> dict[str, Callable[[torch.Tensor, torch.Tensor], float]]:
    try:
        from fewflow.metrics import fd_digits
    except ImportError as e:  # the metrics layer may not ship it yet
        raise FewflowError(
            f"image metrics need fewflow.metrics.fd_digits, which is not available ({e})"
        ) from None
    return {"fd_digits": lambda a, b: float(fd_digits(a, b))}


def sample_metrics(cfg: RunConfig, seed: int = 0) -> dict[str, Callable[[torch.Tensor, torch.Tensor], float]]:
    """Metric name -> ``metric(samples, reference) -> float`` for the run's kind of data."""
    return _vector_metrics(seed) if len(cfg.meta.get("shape", [])) == 1 else _image_metrics()


def _straightness(traj: torch.Tensor | None, times: torch.Tensor) -> float | None:
    if traj is None:
        return None
    try:
        from fewflow.metrics import straightness
    except ImportError:
        return None
    return float(straightness(traj, times))


def _classifier_accuracy(x: torch.Tensor, y: torch.Tensor) -> float | None:
    try:
        from fewflow.metrics import digits_classifier_accuracy
    except ImportError:
        return None
    return float(digits_classifier_accuracy(x, y))


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
    samples: dict[tuple[str, int], torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Sample ``n`` points at each (stepper, NFE) and score them against fresh real data.

    Returns one JSON-ready dict: ``{"data", "method", "n", "metrics", "primary", "floor": {metric: value},
    "results": [{"solver", "nfe", "steps", <metric>: value, "ratio": primary / floor, "straightness",
    "wall_time_s"}, ...]}``. A stepper whose one step costs more than an NFE budget is skipped for it.
    If a dict is passed as ``samples`` it receives the samples under ``(solver, nfe)`` (for plots).
    """
    shape = list(cfg.meta.get("shape", []))
    is_vec = len(shape) == 1
    n = n if n is not None else (10_000 if is_vec else 2000)
    if not isinstance(n, int) or n < 2:
        raise FewflowError(f"number of evaluation samples must be an integer >= 2, got {n!r}")
    steppers = list(steppers) if steppers else [cfg.sampler.stepper]
    metrics = sample_metrics(cfg, seed)
    primary = primary_metric(cfg)
    say = log or (lambda _m: None)

    # real data: a reference set and, for the floor, a second independent one of the same size
    if is_vec:
        base_seed = cfg.data.seed + 10_000 + seed
        ref = build_data(cfg, n=n, seed=base_seed).x
        ref2 = build_data(cfg, n=n, seed=base_seed + 1).x
    else:
        real = build_data(cfg, n=None).x
        if real.shape[0] < 2 * n:
            n = real.shape[0] // 2
        perm = torch.randperm(real.shape[0], generator=torch.Generator().manual_seed(seed))
        ref, ref2 = real[perm[:n]], real[perm[n : 2 * n]]
    floor = {name: fn(ref2, ref) for name, fn in metrics.items()}
    say(f"two-sample floor ({n} vs {n}): " + ", ".join(f"{k} {v:.4g}" for k, v in floor.items()))

    source = build_source(cfg)
    rows: list[dict[str, Any]] = []
    for stepper in steppers:
        for nfe in nfes:
            try:
                steps = steps_for_nfe(stepper, int(nfe))
            except FewflowError:
                continue
            gen = torch.Generator().manual_seed(seed)
            label = None
            if cfg.objective.conditional:
                k = int(cfg.meta.get("num_classes") or 0)
                label = torch.arange(n) % k
            step_grid: Any = grid
            if grid == "boss":  # model-specific; built once per step count, outside the timed sampling
                from fewflow.run import boss_grid

                step_grid = boss_grid(model, cfg, steps)
            t0 = time.perf_counter()
            res = generate(
                model,
                cfg,
                n,
                nfe=int(nfe),
                stepper=stepper,
                grid=step_grid,
                label=label,
                source=source,
                generator=gen,
                trajectory=is_vec,
                progress=progress,
            )
            wall = time.perf_counter() - t0
            x = res.x.detach().to("cpu", torch.float32)
            if samples is not None:
                samples[(stepper, int(res.nfe))] = x
            row: dict[str, Any] = {"solver": stepper, "nfe": int(res.nfe), "steps": steps}
            for name, fn in metrics.items():
                row[name] = fn(x, ref)
            row["ratio"] = row[primary] / floor[primary] if floor[primary] > 0 else None
            if label is not None:
                row["classifier_accuracy"] = _classifier_accuracy(x, label)
            row["straightness"] = _straightness(res.trajectory, res.times)
            row["wall_time_s"] = wall
            rows.append(row)
            say(
                f"  {stepper:>6} NFE {res.nfe:>3}: {primary} {row[primary]:.4g} (x{row['ratio']:.2f} floor), "
                f"{wall:.2f} s"
            )
    if not rows:
        raise FewflowError(f"no (solver, NFE) pair could run: solvers {steppers}, NFE {list(nfes)}")
    return {
        "data": cfg.data.name,
        "method": cfg.objective.method,
        "n": n,
        "metrics": list(metrics),
        "primary": primary,
        "floor": floor,
        "results": rows,
    }


def format_table(report: dict[str, Any]) -> str:
    """A Markdown table of :func:`evaluate_run`'s result, with the floor as the last row."""
    names = list(report["metrics"])
    extra = [
        k
        for k in ("classifier_accuracy", "straightness", "wall_time_s")
        if any(r.get(k) is not None for r in report["results"])
    ]
    head = ["solver", "NFE", *names, f"{report['primary']} / floor", *extra]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def fmt(v: Any) -> str:
        return "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))

    for r in report["results"]:
        cells = [r["solver"], r["nfe"], *[r[k] for k in names], r["ratio"], *[r.get(k) for k in extra]]
        lines.append("| " + " | ".join(fmt(c) for c in cells) + " |")
    floor = report["floor"]
    cells = ["two-sample floor", "-", *[floor[k] for k in names], 1.0, *[None for _ in extra]]
    lines.append("| " + " | ".join(fmt(c) for c in cells) + " |")
    return "\n".join(lines)
