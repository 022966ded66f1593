"""``fewflow bench samplers``: training-free and light-fine-tune samplers on the few-step teachers.

On the CFM teachers of :mod:`fewflow.bench.fewstep` (same cache, same mode presets; checkerboard, moons,
digits), measured on the same fixed evaluation draws and metrics:

1. **Schedules x steppers**: quality vs NFE (1-16) for every time grid — ``uniform``, ``shift``
   (shift 3, Esser et al.), ``edm`` (Karras rho = 7, started at t = 0), ``logsnr`` (uniform in log-SNR of the
   linear path), ``boss`` (Bellman-optimal steps of the teacher, Nguyen et al.) — times every stepper:
   ``euler`` (NFE steps), ``midpoint`` and ``heun`` (NFE / 2 steps), ``flowturbo`` pseudo-corrector (1 Heun
   + NFE - 2 pseudo steps, Zhao et al.). Every cell reports the NFE counted by the solver and wall time.
2. **BOSS refined**: the teacher fine-tuned on its reference segments of the Bellman schedules for
   K = 1, 2, 4, 8 (``BossRefineLoss``), sampled with Euler on those schedules.
3. **FlowTurbo with a refiner**: a ``FlowTurboRefiner`` trained with ``FlowTurboRefinerLoss``; the block
   sequence 1 Heun + P pseudo + R refiner steps at predictor NFE 4, 8, 16.
4. **Source pruning** (Lee et al.): data-sparse axes of the data, pruned N(0, I) draws at the CIFAR-10
   threshold tau = 0.048 rescaled to the same per-axis rejection rate in d dimensions
   (``tau_d = 0.048 sqrt(3072 / d)``: the cosine of a random direction has standard deviation
   ``~ 1 / sqrt(d)``; tau = 0.048 in 64-D accepts almost nothing with 18 axes);
   Euler at NFE 5 / 10 / 100 with and without pruning, and the acceptance rate (N(0, I) sources only:
   the 8-gaussians source of moons is a data set, not prunable).
5. **Guidance** (digits): constant-scale CFG at several scales vs RAAG (Zhu et al.) at NFE 2, 4, 8 with
   FD-digits and classifier accuracy, plus the RAAG ratio along the trajectory
   (``samplers_raag_ratio.png``).

Each part's result is cached as JSON under ``<cache>/<data set>/samplers-<key>/`` as soon as it is done.
Outputs: ``benchmarks/results/samplers.{md,json,png}``.

Longer than fewflow's ~400-line guide on purpose: one benchmark: its parts, claims and report.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from fewflow._validate import FewflowError, unknown_name
from fewflow.bench.common import (
    BenchData,
    Counted,
    Ledger,
    add_common_args,
    atomic_write_json,
    default_cache_dir,
    format_table,
    json_key,
    measure_samples,
    primary_metric,
    quality,
    run_datasets,
    write_outputs,
)
from fewflow.bench.fewstep import RESULTS, FewstepConfig, bench_data, teacher_for

__all__ = [
    "SamplersConfig",
    "SAMPLER_PRESETS",
    "GRID_NAMES",
    "STEPPERS",
    "run",
    "main",
    "time_grid",
    "check_sampler_claims",
]

GRID_NAMES = ("uniform", "shift", "edm", "logsnr", "boss")
STEPPERS = ("euler", "midpoint", "heun", "flowturbo")


@dataclass
class SamplerPreset:
    """Sizes of the samplers benchmark for one mode: BOSS reference draws, refinement and refiner training
    steps (batch = the teacher's), CFG scales and RAAG settings."""

    boss_ref: int
    boss_refine_steps: int
    refiner_steps: int
    cfg_scales: tuple[float, ...] = (1.0, 1.25, 1.5, 2.0, 3.0)
    raag: tuple[tuple[float, float], ...] = ((2.0, 3.0), (3.0, 1.0), (3.0, 3.0), (5.0, 3.0))  # (w_max, alpha)


SAMPLER_PRESETS = {
    "smoke": SamplerPreset(16, 5, 5, (1.0, 2.0), ((3.0, 2.0),)),
    "quick": SamplerPreset(128, 200, 200),
    "full": SamplerPreset(256, 1500, 1500),
}


@dataclass
class SamplersConfig:
    """What to run (see :class:`fewflow.bench.fewstep.FewstepConfig`; teachers are shared through
    ``cache_dir`` and ``mode``). ``nfe``: NFE budgets of the schedule x stepper grid."""

    mode: str = "quick"
    datasets: tuple[str, ...] | None = None
    nfe: tuple[int, ...] = (1, 2, 4, 8, 16)
    seed: int = 0
    cache_dir: Path = field(default_factory=default_cache_dir)
    out_dir: Path | None = RESULTS
    workers: int = 1
    verbose: bool = True

    def __post_init__(self) -> None:
        if self.mode not in SAMPLER_PRESETS:
            raise unknown_name("benchmark mode", self.mode, SAMPLER_PRESETS)
        self.cache_dir = Path(self.cache_dir)
        self.fewstep = FewstepConfig(
            mode=self.mode,
            datasets=self.datasets,
            seed=self.seed,
            cache_dir=self.cache_dir,
            out_dir=None,
            verbose=self.verbose,
        )
        self.datasets = tuple(d for d in (self.fewstep.datasets or ()) if d != "mnist")

    @property
    def preset(self) -> SamplerPreset:
        return SAMPLER_PRESETS[self.mode]


def _log(cfg: SamplersConfig, msg: str) -> None:
    if cfg.verbose:
        print(f"[samplers {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------------------- grids


def time_grid(name: str, steps: int, boss_cost: torch.Tensor | None = None) -> torch.Tensor:
    """The ``steps``-step time grid ``name`` (:func:`fewflow.solvers.get_grid`: uniform, shift = SD3's
    shift 3, EDM's rho = 7 spacing, uniform in log-SNR of the linear schedule), or the BOSS Bellman
    schedule of the teacher's cost matrix ``boss_cost``."""
    from fewflow.solvers import get_grid
    from fewflow.solvers.boss import bellman_schedule

    if name == "boss":
        if boss_cost is None:
            raise ValueError("the boss grid needs the teacher's cost matrix")
        return bellman_schedule(boss_cost, steps).grid
    return get_grid(name, steps)


def _stepper_plan(stepper: str, nfe: int) -> tuple[int, Any] | None:
    """``(steps, stepper factory)`` spending exactly ``nfe`` predictor evaluations
    (:func:`fewflow.solvers.stepper_for_nfe`), or None when the stepper cannot."""
    from fewflow.solvers import stepper_for_nfe

    try:
        stepper_for_nfe(stepper, nfe, exact=True)
    except FewflowError:
        return None
    return stepper_for_nfe(stepper, nfe, exact=True)[0], lambda: stepper_for_nfe(stepper, nfe, exact=True)[1]


def _eval(
    data: BenchData,
    fn: Callable[[torch.Tensor, dict], tuple[torch.Tensor, int]],
    x0: torch.Tensor | None = None,
) -> dict[str, float]:
    if x0 is not None:
        data = copy.copy(data)
        data.eval_x0 = x0
    x, nfe, wall = measure_samples(fn, data)
    return {**quality(data, x, data.eval_y), "nfe": nfe, "sample_wall_s": wall}


def _solve_fn(model: Any, grid: torch.Tensor, stepper_factory: Callable[[], Any]) -> Callable:
    from fewflow.solvers import solve

    def fn(x0: torch.Tensor, cond: dict) -> tuple[torch.Tensor, int]:
        r = solve(model, x0, grid=grid, stepper=stepper_factory(), cond=cond)
        return r.x, r.nfe

    return fn


# ----------------------------------------------------------------------------------------- parts


def part_grid(cfg: SamplersConfig, data: BenchData, teacher: Any, boss_cost: torch.Tensor) -> dict[str, Any]:
    """Schedule x stepper x NFE table."""
    out: dict[str, Any] = {}
    for sched in GRID_NAMES:
        for st in STEPPERS:
            row = {}
            for k in cfg.nfe:
                plan = _stepper_plan(st, k)
                if plan is None:
                    continue
                steps, factory = plan
                grid = time_grid(sched, steps, boss_cost)
                row[str(k)] = _eval(data, _solve_fn(teacher, grid, factory))
            out[f"{sched}/{st}"] = row
    return out


def _boss_reference(cfg: SamplersConfig, data: BenchData, teacher: Any) -> Any:
    from fewflow.solvers.boss import boss_reference

    n = cfg.preset.boss_ref
    g = torch.Generator().manual_seed(cfg.seed + 77)
    if data.name == "moons":
        from fewflow.data import load_dataset

        x0 = load_dataset("8gaussians", n=n, seed=cfg.seed + 909).x
    else:
        x0 = torch.randn(n, *data.shape, generator=g)
    cond = {} if data.num_classes is None else {"y": torch.arange(n) % data.num_classes}
    return boss_reference(teacher, x0, 100, cond=cond)


def _train_refiner_method(
    name: str, cfg: SamplersConfig, data: BenchData, teacher: Any, values: dict[str, Any], steps: int,
) -> tuple[Any, Any, dict[str, Any], Ledger, list[dict[str, Any]], float]:
    """Train the registry's method ``name`` (a sampler refinement of ``teacher``) for ``steps`` optimiser
    steps at the teacher's batch; returns ``(network, method config, run meta, ledger, stage records,
    wall seconds)``."""
    from dataclasses import asdict

    from fewflow.methods import BuildContext, get_method
    from fewflow.paths import AffinePath
    from fewflow.train import TrainConfig, train_stages

    spec = get_method(name)
    mcfg = spec.make_config({**spec.small_scale_values(), **values})
    fp = cfg.fewstep.preset(data.name)
    ledger = Ledger()
    meta: dict[str, Any] = {"shape": list(data.shape), "num_classes": data.num_classes,
                            "conditional": data.num_classes is not None}
    ctx = BuildContext(data=data.dataset(), path=AffinePath("linear"), source=data.source,
                       num_classes=data.num_classes, teacher=Counted(teacher, ledger, "teacher"),
                       record=meta.__setitem__, seed=cfg.seed)
    torch.manual_seed(cfg.seed + 5)
    if spec.make_model is not None:
        net = spec.make_model(mcfg, meta)
    else:
        net = copy.deepcopy(teacher).requires_grad_(True).train()
    stages = spec.build(mcfg, ctx)
    tc = TrainConfig(steps=steps, batch_size=fp.batch, lr=fp.lr, ema_decay=0.999, progress=False, log_every=0,
                     ckpt_every=0, device="cpu")
    t0 = time.perf_counter()
    _, recs, _ = train_stages(Counted(net, ledger, name), stages, data.dataset(), tc,
                              seed_of=lambda k: cfg.seed * 100 + k)
    return net.eval(), mcfg, meta, ledger, [asdict(r) for r in recs], time.perf_counter() - t0


def _method_sampler(name: str, net: Any, mcfg: Any, meta: dict[str, Any], data: BenchData, teacher: Any,
                    nfe: int, info: dict[str, Any]) -> Callable:
    """``(x0, cond) -> (x, nfe)`` through :func:`fewflow.sampling.generate` with the method's sampler."""
    from dataclasses import asdict

    from fewflow.config import DataSpec, ObjectiveSpec, RunConfig
    from fewflow.sampling import generate, sampling_plan

    run_cfg = RunConfig(data=DataSpec(name=data.name), method={"name": name, **asdict(mcfg)},
                        objective=ObjectiveSpec(conditional=data.num_classes is not None), meta=meta)
    info["n_refine"] = int(getattr(sampling_plan(net, run_cfg, nfe, teacher).stepper, "n_refine", 0))

    def fn(x0: torch.Tensor, cond: dict) -> tuple[torch.Tensor, int]:
        r = generate(net, run_cfg, x0.shape[0], nfe=nfe, x0=x0, label=cond.get("y"), teacher=teacher,
                     check_finite=False)
        info["steps"] = int(r.times.numel() - 1)
        info["refiner_calls"] = int(getattr(r.carry, "refiner_calls", 0) or 0)

        return r.x, r.nfe

    return fn


def part_boss_refined(cfg: SamplersConfig, data: BenchData, teacher: Any) -> dict[str, Any]:
    """BOSS phase 2 (the registry's ``boss_refine``): fine-tune a copy of the teacher on the reference
    segments of its K = 1, 2, 4, 8 Bellman grids (lr 2e-4 as the BOSS code), then Euler on those grids."""
    ks = tuple(k for k in cfg.nfe if k <= 8)
    values = {"grid_steps": ks, "n_ref": cfg.preset.boss_ref, "fine_steps": 100}
    net, mcfg, meta, ledger, rec, wall = _train_refiner_method(
        "boss_refine", cfg, data, teacher, values, cfg.preset.boss_refine_steps
    )
    rows = {str(k): _eval(data, _method_sampler("boss_refine", net, mcfg, meta, data, None, k, {}))
            for k in ks}
    return {"metrics": rows, "train_wall_s": wall, "train_evals": ledger.evals, "stages": rec,
            "reference_draws": cfg.preset.boss_ref, "grids": meta.get("grids")}


def part_flowturbo_refiner(cfg: SamplersConfig, data: BenchData, teacher: Any) -> dict[str, Any]:
    """Train the registry's ``flowturbo_refiner`` on the frozen teacher; sample with 1 Heun + P pseudo + R
    refiner blocks at predictor NFE 4, 8, 16 (R ~ 30 % of the steps, as the code's 3 of 9)."""
    net, mcfg, meta, ledger, rec, wall = _train_refiner_method(
        "flowturbo_refiner", cfg, data, teacher, {"hidden": 64, "depth": 2}, cfg.preset.refiner_steps
    )
    rows = {}
    for k in (n for n in cfg.nfe if n >= 4):
        info: dict[str, Any] = {}
        m = _eval(data, _method_sampler("flowturbo_refiner", net, mcfg, meta, data, teacher, k, info))
        rows[str(k)] = {**m, **info}
    return {"metrics": rows, "train_wall_s": wall, "train_evals": ledger.evals, "stages": rec}




def part_pruning(cfg: SamplersConfig, data: BenchData, teacher: Any) -> dict[str, Any]:
    """Source pruning at Euler NFE 5 / 10 / 100: data-sparse axes (threshold 0.01) of the training data,
    pruned N(0, I) draws (``tau_d = 0.048 sqrt(3072 / d)``, module docstring), acceptance rate; the unpruned
    draws for comparison."""
    from fewflow.solvers import uniform_grid
    from fewflow.source_pruning import DirectionalPruning, PrunedSource, fit_pruning_axes
    from fewflow.sources import GaussianSource

    if data.name == "moons":
        return {"skipped": "the source is the 8-gaussians data set, not a Gaussian: nothing to prune"}
    axes = fit_pruning_axes(data.train)
    tau = min(1.0, 0.048 * math.sqrt(3072 / data.dim))  # CIFAR-10 tau, same per-axis rejection in d dims
    src = PrunedSource(GaussianSource(data.shape), DirectionalPruning(axes, tau=tau))
    g = torch.Generator().manual_seed(cfg.seed + 31)
    # coupled draws: keep the accepted rows of the fixed evaluation draws and replace only the rejected
    # ones by accepted draws (still exactly the pruned law), so that the comparison is not drowned in the
    # noise of two independent sample sets
    x0 = data.eval_x0.clone()
    ok = src.pruning.accept(x0)
    n_rej = int((~ok).sum())
    if n_rej:
        x0[~ok] = src.sample(n_rej, generator=g).to(x0.dtype)
    rate = src.sample_with_rate(max(4 * x0.shape[0], 10_000), generator=g).acceptance_rate
    rows = {}
    for k in (5, 10, 100):
        grid = uniform_grid(k)
        rows[str(k)] = {
            "pruned": _eval(data, _solve_fn(teacher, grid, lambda: "euler"), x0=x0),
            "gaussian": _eval(data, _solve_fn(teacher, grid, lambda: "euler")),
        }
    return {"axes": int(axes.shape[0]), "acceptance_rate": rate, "tau": tau, "replaced": n_rej,
            "metrics": rows}


def part_guidance(
    cfg: SamplersConfig, data: BenchData, teacher: Any, plot_path: Path | None
) -> dict[str, Any]:
    """Digits: constant-scale CFG (``fewflow.guidance.CFG``) vs RAAG (``fewflow.guidance.raag.RAAG``, the
    paper's squared ratio) at Euler NFE 2, 4, 8; FD-digits and classifier accuracy. Writes the RAAG ratio
    plot."""
    from fewflow.guidance import CFG
    from fewflow.guidance.raag import RAAG, plot_ratio_history
    from fewflow.solvers import uniform_grid

    assert data.num_classes is not None
    rows: dict[str, Any] = {}
    for w in cfg.preset.cfg_scales:
        model = CFG(teacher, w, data.num_classes)
        rows[f"CFG w={w:g}"] = {
            str(k): _eval(data, _solve_fn(model, uniform_grid(k), lambda: "euler")) for k in (2, 4, 8)
        }
    history: dict[str, Any] = {}
    for w_max, alpha in cfg.preset.raag:
        rows[f"RAAG w_max={w_max:g} alpha={alpha:g}"] = r = {}
        for k in (2, 4, 8):
            model = RAAG(teacher, w_max, alpha, data.num_classes, record=(k == 8))
            r[str(k)] = _eval(data, _solve_fn(model, uniform_grid(k), lambda: "euler"))
            if k == 8:
                n = data.eval_x0.shape[0]  # drop the records of the (untimed) warm-up call on 8 rows
                history[f"w_max={w_max:g}, alpha={alpha:g}"] = [
                    rec for rec in model.ratio_history if rec.ratio.numel() == min(n, 4000)
                ]
    if plot_path is not None and history:
        plot_ratio_history(history, plot_path, title="RAAG on digits (Euler, 8 steps)")
    return {"metrics": rows}


# ---------------------------------------------------------------------------------------- running


def run_dataset(cfg: SamplersConfig, name: str) -> dict[str, Any]:
    """Every part on one data set (cached part by part)."""
    from fewflow.solvers.boss import boss_cost_matrix

    torch.set_num_threads(1)
    data = bench_data(cfg.fewstep, name)
    teacher, tmeta = teacher_for(cfg.fewstep, data)
    key = json_key(
        {
            "teacher": tmeta["key"],
            "preset": asdict(cfg.preset),
            "nfe": list(cfg.nfe),
            "seed": cfg.seed,
            "n_eval": int(data.eval_x0.shape[0]),
            "v": 2,
        }
    )
    folder = cfg.cache_dir / name / f"samplers-{key}"
    res: dict[str, Any] = {
        "dataset": name,
        "kind": data.kind,
        "metric": primary_metric(data),
        "teacher": tmeta,
        "source": data.source_description(),
    }
    ref = _boss_reference(cfg, data, teacher)
    cost = boss_cost_matrix(teacher, reference=ref)
    parts: dict[str, Callable[[], dict[str, Any]]] = {
        "grid": lambda: part_grid(cfg, data, teacher, cost),
        "boss_refined": lambda: part_boss_refined(cfg, data, teacher),
        "flowturbo_refiner": lambda: part_flowturbo_refiner(cfg, data, teacher),
        "pruning": lambda: part_pruning(cfg, data, teacher),
    }
    if data.num_classes is not None:
        plot = (Path(cfg.out_dir) / "samplers_raag_ratio.png") if cfg.out_dir is not None else None
        parts["guidance"] = lambda: part_guidance(cfg, data, teacher, plot)
    for part, fn in parts.items():
        path = folder / f"{part}.json"
        if path.is_file():
            res[part] = json.loads(path.read_text())
            _log(cfg, f"{name}/{part}: cached")
            continue
        t0 = time.perf_counter()
        try:
            res[part] = fn()
        except Exception as exc:  # reported in the table, never silently dropped
            res[part] = {"error": f"{type(exc).__name__}: {exc}"}
        res[part]["wall_s"] = time.perf_counter() - t0
        atomic_write_json(path, res[part])
        _log(cfg, f"{name}/{part}: done in {res[part]['wall_s']:.0f} s")
    res["boss_grids"] = {str(k): time_grid("boss", k, cost).tolist() for k in cfg.nfe}
    return res


def check_sampler_claims(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The samplers benchmark's claims, computed: BOSS <= uniform (Euler) at every NFE and < at NFE <= 4;
    refinement improves BOSS; FlowTurbo (pseudo-corrector) beats Heun and Euler at equal predictor NFE
    (>= 4); no quality loss from pruning at 100 NFE (within 10 %); RAAG at least as good as the best
    constant CFG at NFE <= 4 on FD-digits with equal or better accuracy."""
    claims = []
    for name, r in results.items():
        met = r["metric"]
        grid = r.get("grid", {})
        if "error" in grid or not grid:
            continue

        def val(key: str, k: Any, grid: dict = grid, met: str = met) -> float:
            return grid.get(key, {}).get(str(k), {}).get(met, math.inf)

        ks = sorted(int(k) for k in grid.get("uniform/euler", {}))
        never_worse = all(val("boss/euler", k) <= val("uniform/euler", k) * 1.0 + 1e-12 for k in ks if k > 1)
        better_small = all(val("boss/euler", k) < val("uniform/euler", k) for k in ks if 1 < k <= 4)
        claims.append(
            {
                "dataset": name,
                "claim": "BOSS grid never worse than uniform (Euler, NFE >= 2)",
                "value": ", ".join(
                    f"{k}: {val('boss/euler', k):.3g} vs {val('uniform/euler', k):.3g}" for k in ks if k > 1
                ),
                "met": never_worse,
            }
        )
        claims.append(
            {
                "dataset": name,
                "claim": "BOSS grid better than uniform at NFE 2-4",
                "value": "see above",
                "met": better_small,
            }
        )
        br = r.get("boss_refined", {}).get("metrics", {})
        if br:
            kk = [k for k in br if int(k) > 1]
            ok = all(br[k][met] < val("boss/euler", k) for k in kk)
            claims.append(
                {
                    "dataset": name,
                    "claim": "BOSS refinement improves the BOSS grid (Euler)",
                    "value": ", ".join(f"{k}: {br[k][met]:.3g} vs {val('boss/euler', k):.3g}" for k in kk),
                    "met": ok,
                }
            )
        fk = [k for k in ks if k >= 4]
        ok = all(
            val("uniform/flowturbo", k) < min(val("uniform/heun", k), val("uniform/euler", k)) for k in fk
        )
        claims.append(
            {
                "dataset": name,
                "claim": "FlowTurbo pseudo-corrector beats Heun and Euler (uniform, "
                "equal predictor NFE >= 4)",
                "value": ", ".join(
                    f"{k}: {val('uniform/flowturbo', k):.3g} / {val('uniform/heun', k):.3g} / "
                    f"{val('uniform/euler', k):.3g}"
                    for k in fk
                ),
                "met": ok,
            }
        )
        pr = r.get("pruning", {})
        if "metrics" in pr:
            a, b = pr["metrics"]["100"]["pruned"][met], pr["metrics"]["100"]["gaussian"][met]
            claims.append(
                {
                    "dataset": name,
                    "claim": "pruning: no quality loss at 100 NFE (within 10 %)",
                    "value": f"{a:.4g} vs {b:.4g} (acceptance {pr['acceptance_rate']:.3f}, "
                    f"{pr['axes']} axes)",
                    "met": bool(a <= 1.1 * b),
                }
            )
        gd = r.get("guidance", {}).get("metrics", {})
        if gd:
            for k in ("2", "4"):
                cfgs = {n: v[k] for n, v in gd.items() if n.startswith("CFG")}
                raags = {n: v[k] for n, v in gd.items() if n.startswith("RAAG")}
                bc = min(cfgs, key=lambda n: cfgs[n]["fd"])
                br_ = min(raags, key=lambda n: raags[n]["fd"])
                ok = raags[br_]["fd"] <= cfgs[bc]["fd"] and raags[br_]["accuracy"] >= cfgs[bc]["accuracy"]
                claims.append(
                    {
                        "dataset": name,
                        "claim": f"RAAG >= best constant CFG at NFE {k} (FD, acc)",
                        "value": f"{br_}: FD {raags[br_]['fd']:.3g} acc {raags[br_]['accuracy']:.3f} "
                        f"vs {bc}: FD {cfgs[bc]['fd']:.3g} acc {cfgs[bc]['accuracy']:.3f}",
                        "met": bool(ok),
                    }
                )
    return claims


def write_report(cfg: SamplersConfig, results: dict[str, dict[str, Any]], wall_s: float) -> dict[str, Path]:
    """``samplers.md`` (tables + claims), ``samplers.json`` and ``samplers.png`` (quality vs NFE, Euler and
    the best stepper per schedule)."""
    assert cfg.out_dir is not None
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    claims = check_sampler_claims(results)
    lines = [
        f"# Samplers benchmark ({cfg.mode} mode)",
        "",
        f"Generated by `python benchmarks/samplers.py --{cfg.mode}` in {wall_s / 60:.1f} min on the "
        f"few-step benchmark's teachers (seed {cfg.seed}, torch {torch.__version__}, one thread per "
        "process). NFE = batched network evaluations per sample counted by the solver; wall = seconds "
        "to sample the whole evaluation set. See docs/benchmarks.md.",
        "",
    ]
    if claims:
        lines += [
            "## Claims (computed)",
            "",
            format_table(
                ["data set", "claim", "measured", "met"],
                [[c["dataset"], c["claim"], c["value"], c["met"]] for c in claims],
            ),
            "",
        ]
    panels = {}
    for name, r in results.items():
        met = r["metric"]
        pretty = {"sliced_w2": "sliced-W2", "fd": "FD-digits"}[met]
        lines += [f"## {name} ({r['source']} -> {name}; {pretty}, lower is better)", ""]
        grid = r.get("grid", {})
        if "error" in grid:
            lines += [f"schedule x stepper grid FAILED: {grid['error']}", ""]
            grid = {}
        head = ["schedule / stepper"] + [f"NFE {k}" for k in cfg.nfe] + ["wall s @max NFE"]
        rows = []
        for key, row in grid.items():
            if key == "wall_s":
                continue
            last = row[str(max(int(k) for k in row))] if row else {}
            rows.append([key] + [row.get(str(k), {}).get(met) for k in cfg.nfe] + [last.get("sample_wall_s")])
        br = r.get("boss_refined", {})
        if "metrics" in br:
            rows.append(
                ["boss refined / euler"] + [br["metrics"].get(str(k), {}).get(met) for k in cfg.nfe] + [None]
            )
        ft = r.get("flowturbo_refiner", {})
        if "metrics" in ft:
            rows.append(
                ["uniform / flowturbo + refiner (predictor NFE)"]
                + [ft["metrics"].get(str(k), {}).get(met) for k in cfg.nfe]
                + [None]
            )
        lines += [format_table(head, rows), ""]
        if "metrics" in br:
            lines += [
                f"BOSS refinement: {br['stages'][0]['steps']} steps, {br['train_wall_s']:.0f} s on "
                f"{br['reference_draws']} reference trajectories (100 Euler steps). Bellman grids: "
                + "; ".join(
                    f"K={k}: " + ", ".join(f"{t:.2f}" for t in g)
                    for k, g in r["boss_grids"].items()
                    if int(k) <= 4
                )
                + ".",
                "",
            ]
        elif "error" in br:
            lines += [f"BOSS refinement FAILED: {br['error']}", ""]
        if "metrics" in ft:
            lines += [
                "FlowTurbo refiner: "
                + f"{ft['stages'][0]['steps']} steps, {ft['train_wall_s']:.0f} s; "
                + "; ".join(
                    f"predictor NFE {k}: {v['steps']} steps with {v['n_refine']} refiner blocks "
                    f"({v['refiner_calls']} refiner calls)"
                    for k, v in ft["metrics"].items()
                )
                + ".",
                "",
            ]
        elif "error" in ft:
            lines += [f"FlowTurbo refiner FAILED: {ft['error']}", ""]
        pr = r.get("pruning", {})
        if "metrics" in pr:
            sec = "mmd" if r["kind"] == "toy" else "accuracy"
            prow = [
                [
                    f"Euler NFE {k}",
                    v["gaussian"][met],
                    v["pruned"][met],
                    v["gaussian"].get(sec),
                    v["pruned"].get(sec),
                ]
                for k, v in pr["metrics"].items()
            ]
            lines += [
                f"Source pruning: {pr['axes']} data-sparse axes, tau {pr['tau']:.3g}, acceptance rate "
                f"{pr['acceptance_rate']:.3f} ({pr.get('replaced', 0)} of the evaluation draws rejected and "
                "redrawn).",
                "",
                format_table(
                    ["sampler", f"{pretty} N(0,I)", f"{pretty} pruned", f"{sec} N(0,I)", f"{sec} pruned"],
                    prow,
                ),
                "",
            ]
        elif pr:
            lines += [f"Source pruning: {pr.get('skipped') or pr.get('error')}", ""]
        gd = r.get("guidance", {})
        if "metrics" in gd:
            grows = [
                [n] + [v[k]["fd"] for k in ("2", "4", "8")] + [v[k]["accuracy"] for k in ("2", "4", "8")]
                for n, v in gd["metrics"].items()
            ]
            lines += [
                "Guidance (Euler, uniform grid; a CFG call is one batched forward of 2B):",
                "",
                format_table(["guidance", "FD @2", "FD @4", "FD @8", "acc @2", "acc @4", "acc @8"], grows),
                "",
                "RAAG ratio along the trajectory: `samplers_raag_ratio.png`.",
                "",
            ]
        elif "error" in gd:
            lines += [f"Guidance FAILED: {gd['error']}", ""]
        curves = {}
        for key, row in grid.items():
            if key.endswith("/euler") or key == "uniform/flowturbo" or key == "uniform/heun":
                ks = sorted(int(k) for k in row)
                curves[key] = (ks, [row[str(k)][met] for k in ks])
        if "metrics" in br:
            ks = sorted(int(k) for k in br["metrics"])
            curves["boss refined/euler"] = (ks, [br["metrics"][str(k)][met] for k in ks])
        panels[name] = {"metric": pretty, "curves": curves, "hlines": {}}
    title = "samplers on the CFM teachers: quality vs NFE"
    return write_outputs(out, "samplers", lines, cfg, wall_s, claims, results, panels, title)


def _run_one(args: tuple[SamplersConfig, str]) -> dict[str, Any]:
    cfg, name = args
    torch.set_num_threads(1)
    return run_dataset(cfg, name)


def run(cfg: SamplersConfig) -> dict[str, Any]:
    """Run the benchmark (teachers from the shared cache, trained there if missing) and write the report
    when ``cfg.out_dir`` is set. Returns ``{"results", "claims", "paths", "wall_s"}``."""
    t0 = time.perf_counter()
    names = list(cfg.datasets or ())
    results = run_datasets(_run_one, cfg, names)
    wall = time.perf_counter() - t0
    paths = write_report(cfg, results, wall) if cfg.out_dir is not None else {}
    return {"results": results, "claims": check_sampler_claims(results), "paths": paths, "wall_s": wall}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fewflow bench samplers", description=__doc__.splitlines()[0])
    add_common_args(ap, "samplers", "checkerboard,moons,digits")
    return ap


def config_from_args(argv: Sequence[str] | None = None) -> SamplersConfig:
    a = parser().parse_args(argv)
    kw: dict[str, Any] = {}
    if a.cache is not None:
        kw["cache_dir"] = a.cache
    return SamplersConfig(
        mode=a.mode or "quick",
        datasets=tuple(a.datasets.split(",")) if a.datasets else None,
        seed=a.seed,
        out_dir=a.out,
        workers=a.workers,
        verbose=not a.quiet,
        **kw,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python benchmarks/samplers.py [--quick|--full|--smoke] [--datasets ...]``."""
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    out = run(config_from_args(argv))
    for c in out["claims"]:
        print(f"claim [{c['dataset']}] {c['claim']}: {'MET' if c['met'] else 'NOT MET'} ({c['value']})")
    if out["paths"]:
        print("wrote", ", ".join(str(p) for p in out["paths"].values()))
    return 0
