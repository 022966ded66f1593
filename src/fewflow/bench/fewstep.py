"""``fewflow bench fewstep``: every few-step method against one CFM teacher, at an equal training budget.

For each data set (checkerboard: N(0, I) -> checkerboard; moons: 8 gaussians -> moons; digits 8x8,
class-conditional; MNIST only when cached and asked for) a CFM teacher is trained (``CFMLoss``, linear path),
then each method trains a student of the same network family (``fewflow.models.MLP``, flow-map variant where
the method needs one) with the same optimiser (AdamW through ``fewflow.train.Trainer``, grad-clip 1, EMA
0.999) and the same budget of network evaluations (see :mod:`fewflow.bench.common` for the accounting):

=====================  =============================================================================
``reflow``             Rectified Flow (Liu et al.): teacher pairs (Heun ODE from stored noise, sharded by
                       ``generate_reflow_pairs``), retrain with ``CFMLoss.pair_loss`` from the teacher's
                       weights ("2-RF" in the paper's numbering); 1-k Euler steps.
``reflow2``            a second round: pairs from the reflowed model, retrain again ("3-RF"); both rounds
                       and both pair sets inside the same budget.
``rectified_diffusion`` Rectified Diffusion (Wang et al.): the same teacher pairs, the teacher's own
                       parameterisation (velocity on the linear path) with the paper's x1-space pseudo-Huber
                       loss, and its first-order sampler (``FirstOrderStep``).
``meanflow``           MeanFlow (Geng et al.) from scratch: JVP target, uniform (s, t), 75 % s != t, plain
                       MSE (the toy settings of docs/methods/meanflow.md).
``splitmeanflow``      SplitMeanFlow (Guo et al.) in its distillation mode: teacher velocity on the boundary,
                       initialised from the teacher.
``mfrae``              the MF-RAE recipe (Hu et al.): consistency mid-training on 16-step teacher
                       trajectories (teacher init), then MeanFlow distillation with the finite difference.
``mdt_vm``, ``mdt_vmvd``  MDT-dist (Zhou et al.): Velocity Matching alone, and with Velocity Distillation.
``consistency``        consistency distillation (Song et al.) with a Heun teacher step, as a flow map.
``shortcut``           shortcut models (Frans et al.) from scratch.
=====================  =============================================================================

Ablations (``--ablations`` or by name in ``--only``): ``meanflow_ratio0`` (no s != t rows: plain CFM, the
paper's collapse at 1 NFE) and ``meanflow_wrong_tangents`` (the paper's wrong JVP tangents); VM alone vs VM+VD
is the ``mdt_vm`` / ``mdt_vmvd`` pair.

Each method's result is written to ``<cache>/<data set>/<method>-<key>/result.json`` as soon as it is done;
a rerun only trains what is missing. Outputs: ``benchmarks/results/fewstep.{md,json,png}``.
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
    BWD,
    FWD,
    RESULTS,
    BenchData,
    Counted,
    Ledger,
    NetSpec,
    Stage,
    add_common_args,
    atomic_write_json,
    default_cache_dir,
    floor_metrics,
    format_table,
    infinite_dict_batches,
    json_key,
    load_bench_data,
    load_state,
    make_net,
    measure_samples,
    primary_metric,
    quality,
    run_datasets,
    save_state,
    train_stages,
    train_teacher,
    write_outputs,
)

__all__ = [
    "FewstepConfig",
    "Preset",
    "PRESETS",
    "METHODS",
    "ABLATIONS",
    "run",
    "main",
    "method_names",
    "check_claims",
]

VD_WEIGHT = 0.1  # MDT-dist's VD weight here (the paper: 1.0, which diverged at toy scale; see _mdt)


@dataclass
class Preset:
    """Sizes of one mode for one kind of data set. Budgets are in forward-equivalents per sample;
    ``budget_cfm_steps`` expresses the student budget as that many CFM steps at ``batch``
    (``E = budget_cfm_steps * batch * 3``)."""

    n_train: int
    n_eval: int
    net: NetSpec
    batch: int
    lr: float
    teacher_steps: int
    budget_cfm_steps: int
    n_pairs: int
    pair_steps: int  # Heun steps of the teacher ODE for pairs (2 NFE each)
    teacher_ref_steps: int = 100

    @property
    def budget(self) -> float:
        return float(self.budget_cfm_steps * self.batch * (FWD + BWD))


PRESETS: dict[str, dict[str, Preset]] = {
    "smoke": {
        "toy": Preset(2000, 256, NetSpec(32, 2), 64, 1e-3, 40, 16, 64, 4, teacher_ref_steps=20),
        "image": Preset(0, 200, NetSpec(32, 2), 64, 1e-3, 40, 16, 64, 4, teacher_ref_steps=20),
    },
    "quick": {
        "toy": Preset(20_000, 2000, NetSpec(128, 3), 256, 1e-3, 1200, 400, 3000, 10),
        "image": Preset(0, 1000, NetSpec(256, 3), 128, 1e-3, 1200, 400, 1500, 10),
    },
    "full": {
        "toy": Preset(50_000, 10_000, NetSpec(128, 3), 512, 1e-3, 5000, 4500, 20_000, 25),
        "image": Preset(0, 2000, NetSpec(256, 3), 256, 1e-3, 5000, 3000, 10_000, 25),
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
        for m in self.methods or ():
            if m not in METHODS and m not in ABLATIONS:
                raise unknown_name("method", m, [*METHODS, *ABLATIONS])
        self.cache_dir = Path(self.cache_dir)

    def preset(self, data: str) -> Preset:
        return PRESETS[self.mode]["toy" if data in ("checkerboard", "moons") else "image"]


# ------------------------------------------------------------------------------------------ methods


@dataclass
class Context:
    """What a method builder gets: data, teacher (frozen, unwrapped), preset, ledger and cache folder."""

    data: BenchData
    teacher: torch.nn.Module
    teacher_key: str
    preset: Preset
    ledger: Ledger
    cache: Path
    seed: int
    cached_wall_s: float = 0.0  # wall time of cached pair sets, added to the method's training time

    def counted_teacher(self) -> Counted:
        return Counted(self.teacher, self.ledger, "teacher")

    def student(self, flow_map: bool, init: bool) -> Counted:
        """A fresh student; ``init``: copy the teacher's weights (flow maps: zero the interval embedding's
        last layer so that ``u(x, s, t) = v(x, t)`` at init; ``fewflow.objectives.mfrae.init_from_teacher``).
        """
        from fewflow.objectives.mfrae import init_from_teacher

        torch.manual_seed(self.seed + 7)
        net = make_net(self.data, self.preset.net, flow_map=flow_map)
        if init:
            init_from_teacher(net, self.teacher, zero=("cond.h_embed.mlp.2",) if flow_map else ())
        return Counted(net, self.ledger, "student")

    def pairs(self, model: torch.nn.Module, name: str, seed: int) -> tuple[Path, dict[str, Any]]:
        """Reflow pairs ``(x0, ODE(x0))`` of ``model`` (Heun, ``pair_steps`` steps), cached on disk; the
        NFE is charged to the ledger whether generated now or loaded."""
        from fewflow.couplings.reflow import generate_reflow_pairs

        p = self.preset
        folder = self.cache / f"pairs-{name}-{p.n_pairs}-{p.pair_steps}-s{seed}"
        info_path = folder / "bench.json"
        nfe_each = 2 * p.pair_steps
        if info_path.is_file():
            info = json.loads(info_path.read_text())
            self.ledger.add("pair-teacher:fwd", p.n_pairs, nfe_each)  # charged as if generated now
            self.cached_wall_s += float(info["wall_s"])
            return folder, info
        cond_fn = None
        if self.data.num_classes is not None:
            k = self.data.num_classes

            def cond_fn(m: int, g: torch.Generator) -> dict[str, torch.Tensor]:
                return {"y": torch.randint(0, k, (m,), generator=g)}

        t0 = time.perf_counter()
        generate_reflow_pairs(
            Counted(model, self.ledger, "pair-teacher"),
            self.data.source,
            p.n_pairs,
            folder,
            steps=p.pair_steps,
            stepper="heun",
            batch_size=4096,
            shard_size=max(1024, p.n_pairs // 4),
            cond_fn=cond_fn,
            seed=seed,
        )
        info = {"wall_s": time.perf_counter() - t0, "evals": p.n_pairs * nfe_each}
        atomic_write_json(info_path, info)
        return folder, info


@dataclass
class Plan:
    """A method's student, its training stages (callables build them lazily, after earlier stages ran)
    and how to sample from the result."""

    student: Counted
    stages: list[Stage | Callable[[Counted], Stage]]
    sampler: str  # "euler" | "first_order" | "flowmap" | "mdt"


def _pair_objective() -> Callable[..., Any]:
    """CFM on stored pairs (``CFMLoss.pair_loss``: the noise is never resampled)."""
    from fewflow.objectives import CFMLoss
    from fewflow.paths import AffinePath

    cfm = CFMLoss(AffinePath("linear"))

    def objective(model: Any, x1: torch.Tensor, *, x0: torch.Tensor, generator: Any = None, **cond: Any):
        return cfm.pair_loss(model, x0, x1, generator=generator, **cond)

    return objective


def _reflow(ctx: Context, rounds: int = 1) -> Plan:
    p = ctx.preset
    student = ctx.student(flow_map=False, init=True)
    folder, _ = ctx.pairs(ctx.teacher, f"teacher-{ctx.teacher_key}", ctx.seed)
    pair_cost = p.n_pairs * 2 * p.pair_steps
    train_budget = p.budget - rounds * pair_cost
    if train_budget <= 0:
        raise FewflowError(f"budget {p.budget:g} cannot pay for {rounds} pair set(s) of {pair_cost:g}")
    obj = _pair_objective()
    share = train_budget / rounds
    stages: list[Stage | Callable[[Counted], Stage]] = [
        Stage("reflow-1", obj, lambda: infinite_dict_batches(folder, p.batch, ctx.seed), p.batch, p.lr, share)
    ]
    if rounds == 2:

        def second(student: Counted) -> Stage:
            net = student.net
            key = json_key({"teacher": ctx.teacher_key, "p": asdict(p), "round1": VERSIONS.get("reflow2", 2),
                            "seed": ctx.seed})
            f2, _ = ctx.pairs(net.eval(), f"reflow1-{key}", ctx.seed + 1)
            net.train()
            return Stage(
                "reflow-2",
                obj,
                lambda: infinite_dict_batches(f2, p.batch, ctx.seed + 1),
                p.batch,
                p.lr,
                share,
            )

        stages.append(second)
    return Plan(student, stages, "euler")


def _rectified_diffusion(ctx: Context) -> Plan:
    from fewflow.objectives.rectified_diffusion import RectifiedDiffusionLoss
    from fewflow.paths import AffinePath

    p = ctx.preset
    student = ctx.student(flow_map=False, init=True)
    folder, _ = ctx.pairs(ctx.teacher, f"teacher-{ctx.teacher_key}", ctx.seed)
    budget = p.budget - p.n_pairs * 2 * p.pair_steps
    loss = RectifiedDiffusionLoss(AffinePath("linear"), prediction="velocity", loss="huber", space="x1")
    st = Stage("rd", loss, lambda: infinite_dict_batches(folder, p.batch, ctx.seed), p.batch, p.lr, budget)
    return Plan(student, [st], "first_order")


def _meanflow(ctx: Context, **kw: Any) -> Plan:
    from fewflow.objectives.meanflow import MeanFlowLoss, TimePairSampler

    p = ctx.preset
    opts = {"time_sampler": TimePairSampler.uniform(), "ratio": 0.75, "adaptive_p": 0.0, **kw}
    loss = MeanFlowLoss(source=ctx.data.source, **opts)
    student = ctx.student(flow_map=True, init=False)
    return Plan(student, [Stage("meanflow", loss, ctx.data.dataset(), p.batch, p.lr, p.budget)], "flowmap")


def _splitmeanflow(ctx: Context) -> Plan:
    from fewflow.objectives.splitmeanflow import SplitMeanFlowLoss

    p = ctx.preset
    loss = SplitMeanFlowLoss(source=ctx.data.source, teacher=ctx.counted_teacher())
    student = ctx.student(flow_map=True, init=True)
    return Plan(
        student, [Stage("splitmeanflow", loss, ctx.data.dataset(), p.batch, p.lr, p.budget)], "flowmap"
    )


def _mfrae(ctx: Context) -> Plan:
    from fewflow.objectives.mfrae import ConsistencyMidTrainingLoss, MeanFlowDistillationLoss

    p = ctx.preset
    teacher = ctx.counted_teacher()
    cmt = ConsistencyMidTrainingLoss(teacher, steps=16, pairs_per_trajectory=8, source=ctx.data.source)
    mfd = MeanFlowDistillationLoss(teacher, source=ctx.data.source)
    student = ctx.student(flow_map=True, init=True)
    b_cmt = max(1, p.batch // 8)  # 8 grid pairs per trajectory: p.batch regression rows per step
    return Plan(
        student,
        [
            Stage("cmt", cmt, ctx.data.dataset(), b_cmt, p.lr, p.budget / 2),
            Stage("mfd", mfd, ctx.data.dataset(), p.batch, p.lr, p.budget / 2),
        ],
        "flowmap",
    )


def _mdt(ctx: Context, vd: bool) -> Plan:
    """VM alone; or VM for the first half of the budget, then VM + ``0.1`` VD at 0.3x the learning rate.

    Deviations from the paper (measured, docs/benchmarks.md): in 2-D ``d_norm=False`` -- the derivative
    normalisation ``d / (||d|| + 0.1)`` (tuned for TRELLIS latents) shrinks the derivative term and biased
    the 1-step map (quick runs: 1-NFE sliced-W2 0.5 with it, 0.2-0.33 without); on digits the paper's
    ``d_norm=True`` is kept (without it VM broke down: FD-digits 16, accuracy 0.2). VD weight 0.1 after a VM
    warm-up (the notes' advice): with the paper's ``lambda_vd = 1`` VD diverged on moons (1-NFE sliced-W2
    11 from the start, 6.9 after the warm-up at the full budget)."""
    from fewflow.objectives.mdt import MDTDistLoss

    p = ctx.preset
    teacher = ctx.counted_teacher()
    dn = ctx.data.kind == "image"
    vm = MDTDistLoss(teacher, lambda_vm=1.0, lambda_vd=0.0, d_norm=dn, source=ctx.data.source)
    student = ctx.student(flow_map=True, init=True)
    if not vd:
        return Plan(student, [Stage("vm", vm, ctx.data.dataset(), p.batch, p.lr, p.budget)], "mdt")
    vmvd = MDTDistLoss(teacher, lambda_vm=1.0, lambda_vd=VD_WEIGHT, d_norm=dn, source=ctx.data.source)
    return Plan(student, [Stage("vm", vm, ctx.data.dataset(), p.batch, p.lr, p.budget / 2),
                          Stage("vm+vd", vmvd, ctx.data.dataset(), p.batch, 0.3 * p.lr, p.budget / 2)], "mdt")


def _consistency(ctx: Context) -> Plan:
    from fewflow.objectives.consistency import ConsistencyLoss
    from fewflow.objectives.meanflow import TimePairSampler

    p = ctx.preset
    loss = ConsistencyLoss(
        ctx.counted_teacher(),
        delta=1.0 / 16,
        teacher_stepper="heun",
        time_sampler=TimePairSampler.uniform(),
        source=ctx.data.source,
    )
    student = ctx.student(flow_map=True, init=True)
    return Plan(student, [Stage("cd", loss, ctx.data.dataset(), p.batch, p.lr, p.budget)], "flowmap")


def _shortcut(ctx: Context) -> Plan:
    from fewflow.objectives.consistency import ShortcutLoss

    p = ctx.preset
    loss = ShortcutLoss(source=ctx.data.source)
    student = ctx.student(flow_map=True, init=False)
    return Plan(student, [Stage("shortcut", loss, ctx.data.dataset(), p.batch, p.lr, p.budget)], "flowmap")


METHODS: dict[str, Callable[[Context], Plan]] = {
    "reflow": lambda c: _reflow(c, 1),
    "reflow2": lambda c: _reflow(c, 2),
    "rectified_diffusion": _rectified_diffusion,
    "meanflow": _meanflow,
    "splitmeanflow": _splitmeanflow,
    "mfrae": _mfrae,
    "mdt_vm": lambda c: _mdt(c, False),
    "mdt_vmvd": lambda c: _mdt(c, True),
    "consistency": _consistency,
    "shortcut": _shortcut,
}
ABLATIONS: dict[str, Callable[[Context], Plan]] = {
    "meanflow_ratio0": lambda c: _meanflow(c, ratio=0.0),
    "meanflow_wrong_tangents": lambda c: _meanflow(c, tangents="end_time"),
}
#: bump a method's version when its recipe changes, so cached results of the old recipe are not reused
VERSIONS: dict[str, int] = {"mdt_vm": 4, "mdt_vmvd": 6}
LABELS = {
    "reflow": "Reflow (2-RF)",
    "reflow2": "Reflow x2 (3-RF)",
    "rectified_diffusion": "Rectified Diffusion",
    "meanflow": "MeanFlow",
    "splitmeanflow": "SplitMeanFlow",
    "mfrae": "MF-RAE (CMT->MFD)",
    "mdt_vm": "MDT-dist VM",
    "mdt_vmvd": "MDT-dist VM+VD",
    "consistency": "Consistency distillation",
    "shortcut": "Shortcut",
    "meanflow_ratio0": "ablation: MeanFlow 0% s!=t",
    "meanflow_wrong_tangents": "ablation: MeanFlow wrong tangents",
}


def method_names(cfg: FewstepConfig) -> list[str]:
    """The methods a config runs, in table order."""
    if cfg.methods:
        return list(cfg.methods)
    return [*METHODS, *(ABLATIONS if cfg.ablations else ())]


# ---------------------------------------------------------------------------------------- sampling


def sampler_fn(net: torch.nn.Module, kind: str, nfe: int) -> Callable[[torch.Tensor, dict], tuple]:
    """``(x0, cond) -> (x, nfe)`` for a trained student (or the teacher with ``"euler"``)."""
    from fewflow.objectives.mdt import DataEndVelocity
    from fewflow.objectives.rectified_diffusion import FirstOrderStep
    from fewflow.paths import AffinePath
    from fewflow.solvers import solve

    def run(x0: torch.Tensor, cond: dict) -> tuple[torch.Tensor, int]:
        if kind in ("euler", "flowmap"):
            r = solve(net, x0, steps=nfe, cond=cond)
        elif kind == "first_order":
            r = solve(net, x0, steps=nfe, stepper=FirstOrderStep(AffinePath("linear"), "velocity"), cond=cond)
        elif kind == "mdt":
            r = solve(DataEndVelocity(net), x0, steps=nfe, cond=cond)
        else:
            raise unknown_name("sampler", kind, ("euler", "first_order", "flowmap", "mdt"))
        return r.x, r.nfe

    return run


def evaluate(net: torch.nn.Module, kind: str, data: BenchData, nfes: Sequence[int]) -> dict[str, dict]:
    """Metrics, NFE and sampling wall time of ``net`` at each NFE on the fixed evaluation draws."""
    net.eval()
    out = {}
    for k in nfes:
        x, nfe, wall = measure_samples(sampler_fn(net, kind, int(k)), data)
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
    return train_teacher(copy.deepcopy(data), p.net, p.teacher_steps, p.batch, p.lr, cfg.seed, cfg.cache_dir)


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
        if cfg.mode == "quick":
            return {"dataset": name, "skipped": "mnist is not run in quick mode"}
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
            "metrics": evaluate(teacher, "euler", data, nfes),
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
    for m in method_names(cfg):
        key = json_key(
            {"m": m, "teacher": tkey, "preset": asdict(p), "seed": cfg.seed, "nfe": list(cfg.nfe),
             "v": VERSIONS.get(m, 2)}
        )
        mdir = folder / f"{m}-{key}"
        rpath = mdir / "result.json"
        if rpath.is_file():
            results["methods"][m] = {**json.loads(rpath.read_text()), "cached": True}
            _log(cfg, f"{name}/{m}: cached")
            continue
        _log(cfg, f"{name}/{m}: training (budget {p.budget:.3g} evals)")
        ledger = Ledger()
        # a fresh copy per method: the 8-gaussians source of moons is stateful (epoch permutations), so
        # sharing it would make a method's result depend on which methods ran before it
        ctx = Context(copy.deepcopy(data), teacher, tkey, p, ledger, folder, cfg.seed)
        builder = METHODS.get(m) or ABLATIONS[m]
        t0 = time.perf_counter()
        try:
            plan = builder(ctx)
            pre_evals = ledger.evals
            records: list[dict[str, Any]] = []
            net = plan.student.net
            for st in plan.stages:
                stage = st(plan.student) if callable(st) and not isinstance(st, Stage) else st
                net, rec = train_stages(plan.student, [stage], data, ledger, cfg.seed + len(records))
                records += rec
            train_wall = time.perf_counter() - t0 + ctx.cached_wall_s
            metrics = evaluate(net, plan.sampler, data, cfg.nfe)
            res = {
                "method": m,
                "label": LABELS.get(m, m),
                "dataset": name,
                "key": key,
                "budget": p.budget,
                "train_evals": ledger.evals,
                "pair_and_setup_evals": pre_evals,
                "stages": records,
                "ledger": dict(ledger.by_kind),
                "train_wall_s": train_wall,
                "sampler": plan.sampler,
                "metrics": metrics,
                "error": None,
            }
            save_state(net, mdir / "model.safetensors")
        except Exception as exc:  # a failing method is reported in the table, not silently dropped
            res = {
                "method": m,
                "label": LABELS.get(m, m),
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


def load_student(cfg: FewstepConfig, name: str, method: str) -> tuple[torch.nn.Module, str] | None:
    """The cached trained student of ``method`` on ``name`` (for the demo), with its sampler kind."""
    data = bench_data(cfg, name)
    p = cfg.preset(name)
    _, tmeta = teacher_for(cfg, data)
    key = json_key(
        {
            "m": method,
            "teacher": tmeta["key"],
            "preset": asdict(p),
            "seed": cfg.seed,
            "nfe": list(cfg.nfe),
            "v": VERSIONS.get(method, 2),
        }
    )
    mdir = cfg.cache_dir / name / f"{method}-{key}"
    if not (mdir / "model.safetensors").is_file():
        return None
    res = json.loads((mdir / "result.json").read_text())
    flow = res["sampler"] in ("flowmap", "mdt")
    return load_state(make_net(data, p.net, flow_map=flow), mdir / "model.safetensors").eval(), res["sampler"]


# ------------------------------------------------------------------------------------------- claims


def check_claims(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's acceptance claims, computed from the results (never hand-written):

    * checkerboard and moons, 1 NFE: the best method's sliced-W2 <= 1.5 x the teacher's 100-step value;
    * checkerboard and moons, 1 NFE: every method's sliced-W2 <= teacher 1-step Euler / 3;
    * digits, 2 NFE: the best method's FD-digits <= 1.5 x the teacher's 100-step FD-digits.
    Ablations are excluded."""
    claims = []
    for name, r in results.items():
        if "methods" not in r:
            continue
        met = r["metric"]
        tm = r["teacher"]["metrics"]
        ref_key = str(max(int(k) for k in tm))
        ref = tm[ref_key][met]
        main = {m: v for m, v in r["methods"].items() if m in METHODS}
        if not main:
            continue
        nfe = "1" if r["kind"] == "toy" else "2"
        vals = {m: v["metrics"].get(nfe, {}).get(met, math.inf) for m, v in main.items()}
        best_m = min(vals, key=lambda k: vals[k])
        claims.append(
            {
                "dataset": name,
                "claim": f"best method at {nfe} NFE within 1.5x of teacher@{ref_key}",
                "value": f"{LABELS.get(best_m, best_m)}: {vals[best_m]:.4g} vs 1.5 x {ref:.4g} = "
                f"{1.5 * ref:.4g}",
                "met": bool(vals[best_m] <= 1.5 * ref),
            }
        )
        if r["kind"] == "toy":
            t1 = tm["1"][met]
            worst = max(vals, key=lambda k: vals[k])
            claims.append(
                {
                    "dataset": name,
                    "claim": "every method at 1 NFE beats teacher 1-step Euler by >= 3x",
                    "value": f"worst {LABELS.get(worst, worst)}: {vals[worst]:.4g} vs {t1:.4g} / 3 = "
                    f"{t1 / 3:.4g}",
                    "met": bool(vals[worst] <= t1 / 3),
                }
            )
    return claims


# ---------------------------------------------------------------------------------------- reporting


def write_report(cfg: FewstepConfig, results: dict[str, dict[str, Any]], wall_s: float) -> dict[str, Path]:
    """``fewstep.md`` (tables + claims), ``fewstep.json`` (everything), ``fewstep.png`` (quality vs NFE)."""
    assert cfg.out_dir is not None
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    claims = check_claims(results)
    runs = [v for r in results.values() for v in r.get("methods", {}).values()]
    n_all, n_cached = len(runs), sum(bool(v.get("cached")) for v in runs)
    train_total = sum(float(v.get("train_wall_s") or 0.0) for v in runs) + sum(
        float(r["teacher"]["meta"]["train_wall_s"]) for r in results.values() if "teacher" in r
    )
    lines = [
        f"# Few-step benchmark ({cfg.mode} mode)",
        "",
        f"Generated by `python benchmarks/fewstep.py --{cfg.mode}` in {wall_s / 60:.1f} min "
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
        pretty = {"sw2": "sliced-W2", "fd": "FD-digits" if name == "digits" else "FD"}[met]
        sec = "mmd" if r["kind"] == "toy" else "acc"
        sec_pretty = {"mmd": "MMD^2", "acc": "class. acc."}[sec]
        tm = r["teacher"]["metrics"]
        p = r["preset"]
        lines += [
            f"## {name} ({r['source']} -> {name}; {pretty} lower is better)",
            "",
            f"MLP {p['net']['hidden']}x{p['net']['depth']}, batch {p['batch']}, AdamW lr {p['lr']}, "
            f"teacher {r['teacher']['meta']['steps']} CFM steps; student budget {r['budget']:.3g} "
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
    return write_outputs(out, "fewstep", lines, cfg, wall_s, claims, results, panels, title)


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
    return FewstepConfig(
        mode=a.mode or "quick",
        datasets=tuple(a.datasets.split(",")) if a.datasets else None,
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
