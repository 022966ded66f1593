"""``fewflow bench fewstep``: every few-step method against one CFM teacher, at an equal training budget.

For each data set (checkerboard: N(0, I) -> checkerboard; moons: 8 gaussians -> moons; digits 8x8,
class-conditional; MNIST only when cached and asked for) a CFM teacher is trained (``CFMLoss``, linear path),
then each method trains a student of the same network family (``fewflow.models.MLP``, flow-map variant where
the method needs one) with the same optimiser (AdamW through ``fewflow.train.Trainer``, grad-clip 1, EMA
0.999) and the same budget of network evaluations (see :mod:`fewflow.bench.common` for the accounting):

The methods are the registry's few-step family (``fewflow methods``: reflow, reflow2, Rectified Diffusion,
MeanFlow, SplitMeanFlow, MF-RAE, MDT-dist VM and VM + VD, consistency, shortcut; each built by its own
``build`` and sampled by its own sampler), at the settings of its ``small_scale`` and the preset's pair set.
Methods that start from the teacher copy its weights; teacher pairs and teacher trajectories are paid from
the method's budget. Ablations (registered with ``ablation=True``; ``--ablations`` or by name in
``--only``): MeanFlow with 0 % s != t rows and with the wrong JVP tangents; VM alone vs VM + VD is the
``mdt_vm`` / ``mdt_vd`` pair.

Each method's result is written to ``<cache>/<data set>/<method>-<key>/result.json`` as soon as it is done;
a rerun only trains what is missing. Outputs: ``benchmarks/results/fewstep.{md,json,png}``.

Longer than fewflow's ~400-line guide on purpose: one benchmark: presets, training at equal budget,
claims and report.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from fewflow._validate import FewflowError, unknown_name
from fewflow.bench.common import (
    BWD,
    FWD,
    RESULTS,
    BenchData,
    Counted,
    Ledger,
    NetSpec,
    UNetSpec,
    add_common_args,
    atomic_write_json,
    budget_steps,
    count_step,
    default_cache_dir,
    floor_metrics,
    format_table,
    json_key,
    load_bench_data,
    load_state,
    make_net,
    measure_samples,
    primary_metric,
    quality,
    run_datasets,
    save_state,
    train_teacher,
    write_outputs,
)
from fewflow.methods import MethodSpec

__all__ = [
    "FewstepConfig",
    "Preset",
    "PRESETS",
    "method_specs",
    "train_method",
    "run",
    "main",
    "method_names",
    "check_claims",
]



@dataclass
class Preset:
    """Sizes of one mode for one kind of data set. Budgets are in forward-equivalents per sample;
    ``budget_cfm_steps`` expresses the student budget as that many CFM steps at ``batch``
    (``E = budget_cfm_steps * batch * 3``)."""

    n_train: int
    n_eval: int
    net: NetSpec | UNetSpec
    batch: int
    lr: float
    teacher_steps: int
    budget_cfm_steps: int
    n_pairs: int
    pair_steps: int  # Heun steps of the teacher ODE for pairs (2 NFE each)
    teacher_ref_steps: int = 100
    teacher_coupling: str = "independent"  # "ot": exact minibatch OT-CFM teacher
    boss_ref: int = 0  # BOSS refinement's reference trajectories (0: the method's default)

    @property
    def budget(self) -> float:
        return float(self.budget_cfm_steps * self.batch * (FWD + BWD))


# MNIST (28x28, ``--datasets mnist``): a UNet (base 16, two resolutions, 138k parameters) with an exact-OT
# CFM teacher. A training step at batch 64 costs ~0.25 s on one CPU core, so the full mode's budgets are
# what fits about an hour of two cores (students at 1000 CFM-step equivalents, of which reflow's teacher
# pairs take a quarter per round); a GPU runs the same presets in minutes.
_MNIST_NET = UNetSpec(base=16, mults=(1, 2))
PRESETS: dict[str, dict[str, Preset]] = {
    "smoke": {
        "toy": Preset(2000, 256, NetSpec(32, 2), 64, 1e-3, 40, 16, 64, 4, teacher_ref_steps=20),
        "image": Preset(0, 200, NetSpec(32, 2), 64, 1e-3, 40, 16, 64, 4, teacher_ref_steps=20),
        "mnist": Preset(0, 100, UNetSpec(base=8, mults=(1, 2)), 16, 1e-3, 10, 12, 32, 2, teacher_ref_steps=10,
                        teacher_coupling="ot"),
    },
    "quick": {
        "toy": Preset(20_000, 2000, NetSpec(128, 3), 256, 1e-3, 1200, 400, 3000, 10),
        "image": Preset(0, 1000, NetSpec(256, 3), 128, 1e-3, 1200, 400, 1500, 10),
        "mnist": Preset(0, 500, _MNIST_NET, 64, 2e-3, 300, 150, 500, 5, teacher_coupling="ot"),
    },
    "full": {
        "toy": Preset(50_000, 10_000, NetSpec(128, 3), 512, 1e-3, 5000, 4500, 20_000, 25),
        "image": Preset(0, 2000, NetSpec(256, 3), 256, 1e-3, 5000, 3000, 10_000, 25),
        "mnist": Preset(0, 1000, _MNIST_NET, 64, 2e-3, 3000, 1000, 3000, 8, teacher_coupling="ot",
                        boss_ref=300),
    },
}

DEFAULT_DATASETS = {
    "smoke": ("checkerboard", "digits"),
    "quick": ("checkerboard", "moons", "digits"),
    "full": ("checkerboard", "moons", "digits"),
}


@dataclass
class FewstepConfig:
    """What to run. ``mode``: ``"smoke"`` (tests), ``"quick"`` (CI) or ``"full"`` (committed tables);
    ``methods``: ``None`` = all (plus ablations when ``ablations``); ``workers``: data sets trained in
    parallel processes (each single-threaded); ``out_dir``: where ``fewstep.{md,json,png}`` go (``None``:
    nothing written besides the cache)."""

    mode: str = "quick"
    datasets: tuple[str, ...] | None = None
    methods: tuple[str, ...] | None = None
    ablations: bool = False
    nfe: tuple[int, ...] = (1, 2, 4, 8)
    seed: int = 0
    cache_dir: Path = field(default_factory=default_cache_dir)
    out_dir: Path | None = RESULTS
    workers: int = 1
    verbose: bool = True

    def __post_init__(self) -> None:
        if self.mode not in PRESETS:
            raise unknown_name("benchmark mode", self.mode, PRESETS)
        if self.datasets is None:
            self.datasets = DEFAULT_DATASETS[self.mode]
        for d in self.datasets:
            if d not in ("checkerboard", "moons", "digits", "mnist"):
                raise unknown_name("data set", d, ("checkerboard", "moons", "digits", "mnist"))
        if self.methods:
            from fewflow.methods import list_methods

            # the few-step family, and BOSS refinement (a teacher fine-tuned for its own optimal grids)
            known = [s.name for s in list_methods(family="fewstep")] + ["boss_refine"]
            for m in self.methods:
                if m not in known:
                    raise unknown_name("few-step method", m, known)
        self.cache_dir = Path(self.cache_dir)

    def preset(self, data: str) -> Preset:
        kind = "toy" if data in ("checkerboard", "moons") else "mnist" if data == "mnist" else "image"
        return PRESETS[self.mode][kind]

    @property
    def stem(self) -> str:
        """``fewstep``, or ``fewstep_mnist`` for a run on MNIST alone (its own tables)."""
        return "fewstep_mnist" if tuple(self.datasets or ()) == ("mnist",) else "fewstep"


# ------------------------------------------------------------------------------------------ methods


def method_specs(cfg: FewstepConfig) -> list[MethodSpec]:
    """The registry's few-step methods a config runs, in registration order (ablations on request)."""
    from fewflow.methods import get_method, list_methods

    if cfg.methods:
        return [get_method(m) for m in cfg.methods]
    return [s for s in list_methods(family="fewstep") if cfg.ablations or not s.ablation]


def method_names(cfg: FewstepConfig) -> list[str]:
    """The methods a config runs, in table order."""
    return [s.name for s in method_specs(cfg)]


def bench_method_config(spec: MethodSpec, p: Preset) -> Any:
    """The method's config at benchmark scale: its documented small-scale settings, and the preset's pair
    set (count, teacher steps) for methods that train on teacher pairs."""
    values = dict(spec.small_scale_values())
    if spec.needs.pairs:
        values.update(n_pairs=p.n_pairs, pair_steps=p.pair_steps)
    if spec.name == "boss_refine" and p.boss_ref:
        values.update(n_ref=p.boss_ref)
    return spec.make_config(values)


def run_config_for(
    spec: MethodSpec, mcfg: Any, data: BenchData, recorded: dict[str, Any] | None = None
) -> Any:
    """A :class:`~fewflow.config.RunConfig` describing a trained benchmark model, for
    :func:`fewflow.sampling.generate`; ``recorded``: what the method's build recorded for its sampler
    (BOSS refinement's fitted grids)."""
    from fewflow.config import DataSpec, ObjectiveSpec, RunConfig

    meta = {"shape": list(data.shape), "num_classes": data.num_classes,
            "conditional": data.num_classes is not None, **(recorded or {})}
    cfg = RunConfig(data=DataSpec(name=data.name), method={"name": spec.name, **asdict(mcfg)},
                    objective=ObjectiveSpec(conditional=data.num_classes is not None), meta=meta)
    cfg.validate()
    return cfg


@dataclass
class Pairs:
    """Teacher pairs for the methods that need them, cached on disk and charged to the ledger whether
    generated now or loaded (``pair_wall_s``: their generation time, added to the method's time)."""

    data: BenchData
    ledger: Ledger
    cache: Path
    teacher_key: str
    method_key: str
    pair_wall_s: float = 0.0

    def __call__(self, model: Any, *, tag: str, n: int, steps: int, seed: int) -> Path:
        from fewflow.couplings.reflow import generate_reflow_pairs

        net = model.net if isinstance(model, Counted) else model
        name = f"teacher-{self.teacher_key}" if tag == "teacher" else f"{tag}-{self.method_key}"
        folder = self.cache / f"pairs-{name}-{n}-{steps}-s{seed}"
        info_path = folder / "bench.json"
        nfe_each = 2 * steps
        if info_path.is_file():
            info = json.loads(info_path.read_text())
            self.ledger.add("pair-teacher:fwd", n, nfe_each)  # charged as if generated now
            self.pair_wall_s += float(info["wall_s"])
            return folder
        cond_fn = None
        if self.data.num_classes is not None:
            k = self.data.num_classes

            def cond_fn(m: int, g: torch.Generator) -> dict[str, torch.Tensor]:
                return {"y": torch.randint(0, k, (m,), generator=g)}

        was_training = net.training
        net.eval()
        t0 = time.perf_counter()
        generate_reflow_pairs(Counted(net, self.ledger, "pair-teacher"), self.data.source, n, folder,
                              steps=steps, stepper="heun", batch_size=4096, shard_size=max(1024, n // 4),
                              cond_fn=cond_fn, seed=seed)
        net.train(was_training)
        atomic_write_json(info_path, {"wall_s": time.perf_counter() - t0, "evals": n * nfe_each})
        return folder


def _probe(st: Any, data: BenchData, batch: int) -> tuple[torch.Tensor, dict[str, Any]]:
    x1 = data.train[:batch]
    cond: dict[str, Any] = {} if data.labels is None else {"y": data.labels[:batch]}
    if st.pair_sets:
        cond["x0"] = torch.randn(x1.shape, generator=torch.Generator().manual_seed(0))
    return x1, cond


def train_method(
    spec: MethodSpec, data: BenchData, teacher: torch.nn.Module, teacher_key: str, p: Preset, cache: Path,
    seed: int, method_key: str, recorded: dict[str, Any] | None = None,
) -> tuple[torch.nn.Module, Any, Ledger, list[dict[str, Any]], float]:
    """Train one registered method at the benchmark's budget: its stages (from ``spec.build``) share the
    budget left after its teacher pairs, each stage's optimiser steps are its budget over the measured cost
    of one step. Returns ``(trained network, method config, ledger, stage records, pair wall time)``; what
    the build records for sampling (``ctx.record``) goes into ``recorded``."""
    from fewflow.methods import BuildContext
    from fewflow.objectives.mfrae import init_from_teacher
    from fewflow.paths import AffinePath
    from fewflow.train import TrainConfig, train_stages

    mcfg = bench_method_config(spec, p)
    ledger = Ledger()
    pairs = Pairs(data, ledger, cache, teacher_key, method_key)
    ctx = BuildContext(
        data=data.dataset(), path=AffinePath("linear"), source=data.source, num_classes=data.num_classes,
        teacher=Counted(teacher, ledger, "teacher") if spec.needs.teacher != "none" else None,
        pairs=pairs, work_dir=cache, seed=seed,
        record=(lambda k, v: recorded.__setitem__(k, v)) if recorded is not None else (lambda k, v: None),
    )
    torch.manual_seed(seed + 7)
    net = make_net(data, p.net, flow_map=spec.flow_map)
    if spec.needs.init_from_teacher and ctx.teacher is not None:
        init_from_teacher(net, teacher, zero=("cond.h_embed.mlp.2",) if spec.flow_map else ())
    student = Counted(net, ledger, "student")
    stages = spec.build(mcfg, ctx)
    build_cost = ledger.evals  # teacher calls of the build itself (BOSS's reference trajectories)
    pair_sets = sum(st.pair_sets for st in stages)
    pair_cost = pair_sets * mcfg.n_pairs * 2 * mcfg.pair_steps if spec.needs.pairs else 0
    train_budget = p.budget - pair_cost - build_cost
    if train_budget <= 0:
        raise FewflowError(f"budget {p.budget:g} cannot pay for the teacher pairs ({pair_cost:g}) and the "
                           f"teacher calls of the build ({build_cost:g})")
    costs: list[float] = []

    def steps_of(st: Any, k: int, batch: int, _data: Any) -> int:
        x1, cond = _probe(st, data, batch)
        per = count_step(st.objective, student, x1, cond, ledger)
        costs.append(per)
        return budget_steps(st.share * train_budget, per)

    tc = TrainConfig(steps=1, batch_size=p.batch, lr=p.lr, ema_decay=0.999, progress=False, log_every=0,
                     ckpt_every=0, device="cpu")
    _, recs, _ = train_stages(student, stages, data.dataset(), tc, steps_of=steps_of,
                              seed_of=lambda k: (seed + k) * 100)
    records = [{**asdict(r), "per_step_evals": c} for r, c in zip(recs, costs)]
    return net, mcfg, ledger, records, pairs.pair_wall_s


# ---------------------------------------------------------------------------------------- sampling


def evaluate(net: torch.nn.Module, run_cfg: Any, data: BenchData, nfes: Sequence[int]) -> dict[str, dict]:
    """Metrics, NFE and sampling wall time of ``net`` at each NFE on the fixed evaluation draws, sampled
    through :func:`fewflow.sampling.generate` with the method's own sampler."""
    from fewflow.sampling import generate

    net.eval()
    out = {}
    for k in nfes:

        def fn(x0: torch.Tensor, cond: dict, k: int = k) -> tuple[torch.Tensor, int]:
            r = generate(net, run_cfg, x0.shape[0], nfe=int(k), x0=x0, label=cond.get("y"),
                         check_finite=False)
            return r.x, r.nfe

        x, nfe, wall = measure_samples(fn, data)
        m = quality(data, x, data.eval_y)
        out[str(k)] = {**m, "nfe": nfe, "sample_wall_s": wall, "ms_per_1k": 1000 * wall / x.shape[0] * 1000}
    return out


# ------------------------------------------------------------------------------------------ running


def _log(cfg: FewstepConfig, msg: str) -> None:
    if cfg.verbose:
        print(f"[fewstep {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def teacher_for(cfg: FewstepConfig, data: BenchData) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The cached CFM teacher of a data set (also used by the samplers benchmark)."""
    p = cfg.preset(data.name)
    # a private copy: a data-set source (moons' 8 gaussians) is stateful, and every run must see it fresh
    return train_teacher(copy.deepcopy(data), p.net, p.teacher_steps, p.batch, p.lr, cfg.seed, cfg.cache_dir,
                         coupling=p.teacher_coupling)


def bench_data(cfg: FewstepConfig, name: str) -> BenchData:
    p = cfg.preset(name)
    return load_bench_data(name, p.n_train, p.n_eval, cfg.seed)


def run_dataset(cfg: FewstepConfig, name: str) -> dict[str, Any]:
    """Teacher + every method on one data set; each method's result JSON is written when it finishes."""
    torch.set_num_threads(1)
    if name == "mnist":
        from fewflow.data import default_cache_dir as data_cache
        from fewflow.data.images import MNIST_FILE

        if not (data_cache() / MNIST_FILE).exists():
            _log(cfg, "mnist is not cached: skipped (fetch it with `fewflow fetch mnist`)")
            return {"dataset": name, "skipped": "mnist not cached"}
    data = bench_data(cfg, name)
    p = cfg.preset(name)
    teacher, tmeta = teacher_for(cfg, data)
    _log(
        cfg,
        f"{name}: teacher ready ({'cached' if tmeta.get('cached') else 'trained'}, "
        f"{tmeta['train_wall_s']:.0f} s)",
    )
    folder = cfg.cache_dir / name
    tkey = tmeta["key"]
    # teacher rows and the floor (cheap; cached too)
    tpath = (
        folder / f"teacher-{tkey}" / f"eval-{json_key([list(cfg.nfe), p.n_eval, p.teacher_ref_steps])}.json"
    )
    if tpath.is_file():
        teacher_eval = json.loads(tpath.read_text())
    else:
        nfes = sorted({*cfg.nfe, 8, p.teacher_ref_steps})
        teacher_eval = {
            "metrics": evaluate(teacher, _teacher_cfg(data), data, nfes),
            "floor": floor_metrics(data),
            "meta": tmeta,
        }
        atomic_write_json(tpath, teacher_eval)
    results: dict[str, Any] = {
        "dataset": name,
        "kind": data.kind,
        "teacher": teacher_eval,
        "metric": primary_metric(data),
        "preset": asdict(p),
        "budget": p.budget,
        "source": data.source_description(),
        "methods": {},
    }
    for spec in method_specs(cfg):
        m = spec.name
        key = _method_key(cfg, spec, tkey, p)
        mdir = folder / f"{m}-{key}"
        rpath = mdir / "result.json"
        if rpath.is_file():
            results["methods"][m] = {**json.loads(rpath.read_text()), "cached": True}
            _log(cfg, f"{name}/{m}: cached")
            continue
        _log(cfg, f"{name}/{m}: training (budget {p.budget:.3g} evals)")
        t0 = time.perf_counter()
        ledger = Ledger()
        try:
            # a fresh copy per method: the 8-gaussians source of moons is stateful (epoch permutations), so
            # sharing it would make a method's result depend on which methods ran before it
            recorded: dict[str, Any] = {}
            net, mcfg, ledger, records, pair_wall = train_method(
                spec, copy.deepcopy(data), teacher, tkey, p, folder, cfg.seed, key, recorded
            )
            train_wall = time.perf_counter() - t0 + pair_wall
            metrics = evaluate(net, run_config_for(spec, mcfg, data, recorded), data, cfg.nfe)
            res = {
                "method": m,
                "label": spec.label,
                "dataset": name,
                "key": key,
                "config": asdict(mcfg),
                "budget": p.budget,
                "train_evals": ledger.evals,
                "stages": records,
                "ledger": dict(ledger.by_kind),
                "train_wall_s": train_wall,
                "metrics": metrics,
                "recorded": recorded,
                "error": None,
            }
            save_state(net, mdir / "model.safetensors")
        except Exception as exc:  # a failing method is reported in the table, not silently dropped
            res = {
                "method": m,
                "label": spec.label,
                "dataset": name,
                "key": key,
                "budget": p.budget,
                "error": f"{type(exc).__name__}: {exc}",
                "metrics": {},
                "train_wall_s": time.perf_counter() - t0,
                "train_evals": ledger.evals,
            }
            _log(cfg, f"{name}/{m}: FAILED {res['error']}")
        atomic_write_json(rpath, res)
        results["methods"][m] = res
        met = primary_metric(data)
        summ = ", ".join(f"{k}:{v.get(met, float('nan')):.3g}" for k, v in res["metrics"].items())
        _log(cfg, f"{name}/{m}: done in {res['train_wall_s']:.0f} s; {met} {summ}")
    return results


def _preset_key(p: Preset) -> dict[str, Any]:
    out = asdict(p)
    if out["teacher_coupling"] == "independent":  # keys of the earlier presets stay as they were
        del out["teacher_coupling"]
    del out["boss_ref"]  # it reaches BOSS refinement's own config, which is part of the key
    return out


def _method_key(cfg: FewstepConfig, spec: MethodSpec, teacher_key: str, p: Preset) -> str:
    return json_key({"m": spec.name, "teacher": teacher_key, "preset": _preset_key(p), "seed": cfg.seed,
                     "nfe": list(cfg.nfe), "v": spec.version, "config": asdict(bench_method_config(spec, p))})


def _teacher_cfg(data: BenchData) -> Any:
    from fewflow.methods import get_method

    spec = get_method("cfm")
    return run_config_for(spec, spec.make_config(), data)


def load_student(cfg: FewstepConfig, name: str, method: str) -> tuple[torch.nn.Module, Any] | None:
    """The cached trained student of ``method`` on ``name`` with the run config that samples it."""
    from fewflow.methods import get_method

    spec = get_method(method)
    data = bench_data(cfg, name)
    p = cfg.preset(name)
    _, tmeta = teacher_for(cfg, data)
    mdir = cfg.cache_dir / name / f"{method}-{_method_key(cfg, spec, tmeta['key'], p)}"
    if not (mdir / "model.safetensors").is_file():
        return None
    net = load_state(make_net(data, p.net, flow_map=spec.flow_map), mdir / "model.safetensors").eval()
    return net, run_config_for(spec, bench_method_config(spec, p), data)


# ------------------------------------------------------------------------------------------- claims


def check_claims(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The benchmark's claims, computed from the results (never hand-written):

    * checkerboard and moons, 1 NFE: the best method's sliced-W2 <= 1.5 x the teacher's 100-step value;
    * checkerboard and moons, 1 NFE: every method's sliced-W2 <= teacher 1-step Euler / 3;
    * digits, 2 NFE: the best method's FD-digits <= 1.5 x the teacher's 100-step FD-digits;
    * MNIST: the best method within 2 x (1 NFE) and 1.5 x (2 NFE) of the teacher's 100-step FD-MNIST, and
      every method at 1 NFE <= the teacher's 1-step Euler FD / 3.
    Ablations are excluded."""
    from fewflow.methods import get_method

    claims = []
    for name, r in results.items():
        if "methods" not in r:
            continue
        met = r["metric"]
        tm = r["teacher"]["metrics"]
        ref_key = str(max(int(k) for k in tm))
        ref = tm[ref_key][met]
        main = {m: v for m, v in r["methods"].items() if not get_method(m).ablation}
        if not main:
            continue
        # (NFE, factor) of "the best method within factor x teacher@ref"
        bests = [("1", 1.5)] if r["kind"] == "toy" else [("1", 2.0), ("2", 1.5)] if name == "mnist" else [
            ("2", 1.5)]
        for nfe, factor in bests:
            vals = {m: v["metrics"].get(nfe, {}).get(met, math.inf) for m, v in main.items()}
            best_m = min(vals, key=lambda k: vals[k])
            claims.append(
                {
                    "dataset": name,
                    "claim": f"best method at {nfe} NFE within {factor:g}x of teacher@{ref_key}",
                    "value": f"{get_method(best_m).label}: {vals[best_m]:.4g} vs {factor:g} x {ref:.4g} = "
                    f"{factor * ref:.4g}",
                    "met": bool(vals[best_m] <= factor * ref),
                }
            )
        if r["kind"] == "toy" or name == "mnist":
            vals = {m: v["metrics"].get("1", {}).get(met, math.inf) for m, v in main.items()}
            t1 = tm["1"][met]
            worst = max(vals, key=lambda k: vals[k])
            claims.append(
                {
                    "dataset": name,
                    "claim": "every method at 1 NFE beats teacher 1-step Euler by >= 3x",
                    "value": f"worst {get_method(worst).label}: {vals[worst]:.4g} vs {t1:.4g} / 3 = "
                    f"{t1 / 3:.4g}",
                    "met": bool(vals[worst] <= t1 / 3),
                }
            )
    return claims


# ---------------------------------------------------------------------------------------- reporting


def write_report(cfg: FewstepConfig, results: dict[str, dict[str, Any]], wall_s: float) -> dict[str, Path]:
    """``<stem>.md`` (tables + claims), ``<stem>.json`` (everything), ``<stem>.png`` (quality vs NFE); the
    stem is ``fewstep``, or ``fewstep_mnist`` for a run on MNIST alone."""
    assert cfg.out_dir is not None
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    claims = check_claims(results)
    runs = [v for r in results.values() for v in r.get("methods", {}).values()]
    n_all, n_cached = len(runs), sum(bool(v.get("cached")) for v in runs)
    names = tuple(cfg.datasets or ())
    sets = "" if names == DEFAULT_DATASETS[cfg.mode] else f" --datasets {','.join(names)}"
    train_total = sum(float(v.get("train_wall_s") or 0.0) for v in runs) + sum(
        float(r["teacher"]["meta"]["train_wall_s"]) for r in results.values() if "teacher" in r
    )
    lines = [
        f"# Few-step benchmark ({cfg.mode} mode)",
        "",
        f"Generated by `fewflow bench fewstep --{cfg.mode}{sets}` in {wall_s / 60:.1f} min "
        f"(seed {cfg.seed}, torch {torch.__version__}, {torch.get_num_threads()} thread(s) per process, "
        f"{cfg.workers} process(es); {n_cached} of {n_all} method results reused from the cache, total "
        f"training time of all methods and teachers {train_total / 60:.1f} min). Budgets are network "
        "evaluations in forward-equivalents per sample "
        "(backward = 2, JVP = 3; teacher pairs and trajectories included); see docs/benchmarks.md.",
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
        if "methods" not in r:
            lines += [f"## {name}", "", f"skipped: {r.get('skipped')}", ""]
            continue
        met = r["metric"]
        fd_name = {"digits": "FD-digits", "mnist": "FD-MNIST"}.get(name, "FD")
        pretty = {"sliced_w2": "sliced-W2", "fd": fd_name}[met]
        sec = "mmd" if r["kind"] == "toy" else "accuracy"
        sec_pretty = {"mmd": "MMD^2", "accuracy": "class. acc."}[sec]
        tm = r["teacher"]["metrics"]
        p = r["preset"]
        lines += [
            f"## {name} ({r['source']} -> {name}; {pretty} lower is better)",
            "",
            (f"UNet base {p['net']['base']} x {p['net']['mults']}" if "base" in p["net"]
             else f"MLP {p['net']['hidden']}x{p['net']['depth']}")
            + f", batch {p['batch']}, AdamW lr {p['lr']}, "
            f"teacher {r['teacher']['meta']['steps']} CFM steps"
            + (" (exact minibatch OT coupling)" if p.get("teacher_coupling") == "ot" else "")
            + f"; student budget {r['budget']:.3g} "
            f"evaluations (= {p['budget_cfm_steps']} CFM steps); {p['n_eval']} evaluation samples.",
            "",
        ]
        head = (
            ["method"]
            + [f"{pretty} @{k}" for k in cfg.nfe]
            + [f"{sec_pretty} @{k}" for k in cfg.nfe]
            + ["train evals", "train s", f"sample ms/1k @{cfg.nfe[0]}"]
        )
        rows = []
        fl = r["teacher"]["floor"]
        trow = (
            ["teacher (Euler)"]
            + [tm.get(str(k), {}).get(met) for k in cfg.nfe]
            + [tm.get(str(k), {}).get(sec) for k in cfg.nfe]
            + [None, r["teacher"]["meta"]["train_wall_s"], tm[str(cfg.nfe[0])]["ms_per_1k"]]
        )
        rows.append(trow)
        for m, v in r["methods"].items():
            mm = v.get("metrics", {})
            label = v.get("label", m) + (f" (FAILED: {v['error']})" if v.get("error") else "")
            rows.append(
                [label]
                + [mm.get(str(k), {}).get(met) for k in cfg.nfe]
                + [mm.get(str(k), {}).get(sec) for k in cfg.nfe]
                + [v.get("train_evals"), v.get("train_wall_s"), mm.get(str(cfg.nfe[0]), {}).get("ms_per_1k")]
            )
        lines += [format_table(head, rows), ""]
        refs = [k for k in sorted(tm, key=int) if int(k) not in cfg.nfe]
        lines += [
            "Teacher at more steps and the two-sample floor: "
            + "; ".join(f"Euler {k} steps {pretty} {tm[k][met]:.4g}" for k in refs)
            + f"; floor {pretty} {fl[met]:.4g}"
            + (f", floor {sec_pretty} {fl[sec]:.4g}" if sec in fl else "")
            + ".",
            "",
        ]
        panels[name] = {
            "metric": pretty,
            "curves": {
                "teacher (Euler)": (list(cfg.nfe), [tm[str(k)][met] for k in cfg.nfe]),
                **{
                    v.get("label", m): (
                        list(cfg.nfe),
                        [v.get("metrics", {}).get(str(k), {}).get(met) for k in cfg.nfe],
                    )
                    for m, v in r["methods"].items()
                },
            },
            "hlines": {
                f"teacher@{refs[-1] if refs else ''}": tm[refs[-1]][met] if refs else None,
                "two-sample floor": fl[met],
            },
        }
    title = "few-step methods: quality vs NFE"
    return write_outputs(out, cfg.stem, lines, cfg, wall_s, claims, results, panels, title)


def _run_one(args: tuple[FewstepConfig, str]) -> dict[str, Any]:
    cfg, name = args
    torch.set_num_threads(1)
    return run_dataset(cfg, name)


def run(cfg: FewstepConfig) -> dict[str, Any]:
    """Run the benchmark (resumable through the cache) and write the report when ``cfg.out_dir`` is set.
    Returns ``{"results": {data set: ...}, "claims": [...], "paths": {...}, "wall_s": ...}``."""
    t0 = time.perf_counter()
    assert cfg.datasets is not None
    names = list(cfg.datasets)
    results = run_datasets(_run_one, cfg, names)
    wall = time.perf_counter() - t0
    paths = write_report(cfg, results, wall) if cfg.out_dir is not None else {}
    return {"results": results, "claims": check_claims(results), "paths": paths, "wall_s": wall}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fewflow bench fewstep", description=__doc__.splitlines()[0])
    add_common_args(ap, "fewstep", "checkerboard,moons,digits,mnist")
    ap.add_argument("--only", default=None, help="comma-separated methods (ablations allowed)")
    ap.add_argument("--ablations", action="store_true", help="also run the MeanFlow ablations")
    return ap


def config_from_args(argv: Sequence[str] | None = None) -> FewstepConfig:
    a = parser().parse_args(argv)
    kw: dict[str, Any] = {}
    if a.cache is not None:
        kw["cache_dir"] = a.cache
    datasets = tuple(a.datasets.split(",")) if a.datasets else None
    if datasets == ("mnist",):
        kw["nfe"] = (1, 2, 4)
    return FewstepConfig(
        mode=a.mode or "quick",
        datasets=datasets,
        methods=tuple(a.only.split(",")) if a.only else None,
        ablations=a.ablations,
        seed=a.seed,
        out_dir=a.out,
        workers=a.workers,
        verbose=not a.quiet,
        **kw,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python benchmarks/fewstep.py [--quick|--full|--smoke] [--only ...] [--datasets ...]``."""
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    cfg = config_from_args(argv)
    out = run(cfg)
    for c in out["claims"]:
        print(f"claim [{c['dataset']}] {c['claim']}: {'MET' if c['met'] else 'NOT MET'} ({c['value']})")
    if out["paths"]:
        print("wrote", ", ".join(str(p) for p in out["paths"].values()))
    return 0
