"""The shared benchmark harness: data, networks, equal-budget training, evaluation, caching, tables, plots.

Used by :mod:`fewflow.bench.fewstep` and :mod:`fewflow.bench.samplers`; nothing here implements a loss, a
solver or a metric — those come from the library (``fewflow.objectives``, ``fewflow.solvers``,
``fewflow.metrics``, ``fewflow.train.Trainer``).

**Network evaluations (the training budget).** Every network a method touches during training (student,
teacher) is wrapped in :class:`Counted`, which adds to one :class:`Ledger` per call, in *forward-
equivalents per sample* (one forward of one sample through the network = 1)::

    forward without gradient (teacher, stop-gradient targets)        1      (FWD)
    forward whose output carries a gradient (forward + backward)     1 + 2  (FWD + BWD)
    forward-mode JVP (primal + tangent) under torch.func.jvp          3      (JVP)
    ... whose primal output carries the gradient (MeanFlow "fused")  3 + 2  (JVP + BWD)

A backward pass costs about two forwards (it multiplies by the weights twice: input and weight
gradients). A JVP evaluates the primal and the tangent in one pass; forward-mode AD through our MLPs
measured 2-3x a forward on CPU, so it is charged 3 forwards. Teacher pair generation (reflow, Rectified
Diffusion) and teacher trajectories (MF-RAE CMT, consistency distillation) go through the same ledger, so
they are paid from the method's budget. The teacher's own training is not charged to any method (every
distillation method shares it). Each method gets the same budget ``E``; a training stage of budget ``E_k``
runs ``floor(E_k / e)`` optimiser steps, where ``e`` is the cost of one step measured by a probe call on a
throw-away copy of the student (all objectives here have a fixed cost per step). The ledger's actual total
is reported beside the budget (it is within one step's cost of it).

Longer than fewflow's ~400-line guide on purpose: the harness both benchmarks share (budget ledger, data,
evaluation, tables).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fewflow._validate import FewflowError, unknown_name

__all__ = [
    "BWD",
    "FWD",
    "JVP",
    "BenchData",
    "Counted",
    "Ledger",
    "NetSpec",
    "UNetSpec",
    "TOY_SETS",
    "IMAGE_SETS",
    "add_common_args",
    "atomic_write_json",
    "cached_row",
    "run_datasets",
    "train_once",
    "write_outputs",
    "budget_steps",
    "count_step",
    "default_cache_dir",
    "floor_metrics",
    "json_key",
    "load_bench_data",
    "load_state",
    "make_net",
    "measure_samples",
    "quality",
    "primary_metric",
    "save_state",
    "plot_quality_vs_nfe",
    "train_teacher",
    "format_table",
]

FWD = 1.0
BWD = 2.0
JVP = 3.0

TOY_SETS = ("checkerboard", "moons")
IMAGE_SETS = ("digits", "mnist")
ROOT = Path(__file__).resolve().parents[3]
RESULTS = ROOT / "benchmarks" / "results"


def default_cache_dir() -> Path:
    """``$FEWFLOW_BENCH_CACHE`` or ``<repo>/benchmarks/.cache`` (git-ignored)."""
    env = os.environ.get("FEWFLOW_BENCH_CACHE")
    return Path(env).expanduser() if env else ROOT / "benchmarks" / ".cache"


# ---------------------------------------------------------------------------------------- bookkeeping


@dataclass
class Ledger:
    """Running total of network evaluations in forward-equivalents per sample (module docstring)."""

    evals: float = 0.0
    calls: int = 0
    by_kind: dict[str, float] = field(default_factory=dict)

    def add(self, kind: str, rows: int, weight: float) -> None:
        self.evals += rows * weight
        self.calls += 1
        self.by_kind[kind] = self.by_kind.get(kind, 0.0) + rows * weight

    def reset(self) -> None:
        self.evals, self.calls, self.by_kind = 0.0, 0, {}


def _under_jvp(x: Tensor) -> bool:
    fn = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", None)
    return bool(fn(x)) if fn is not None else False


class Counted(nn.Module):
    """A network that charges every call to a :class:`Ledger` (weights in the module docstring).

    Forwards ``is_flow_map``, ``num_classes`` and ``config`` of the wrapped network, so objectives and
    solvers treat it exactly like the network itself. ``name`` labels the ledger entries.
    """

    def __init__(self, net: nn.Module, ledger: Ledger, name: str = "student") -> None:
        super().__init__()
        self.net = net
        self.ledger = ledger
        self.name = name
        self.is_flow_map = bool(getattr(net, "is_flow_map", False))
        self.num_classes = getattr(net, "num_classes", None)
        self.config = getattr(net, "config", None)

    def __deepcopy__(self, memo: dict) -> Counted:  # EMA copies share the ledger (they are never trained)
        new = Counted(copy.deepcopy(self.net, memo), self.ledger, self.name)
        return new

    def forward(self, x: Tensor, *times: Any, **cond: Any) -> Tensor:
        out = self.net(x, *times, **cond)
        trains = torch.is_grad_enabled() and any(p.requires_grad for p in self.net.parameters())
        if _under_jvp(x):
            w, kind = JVP + (BWD if trains else 0.0), "jvp+bwd" if trains else "jvp"
        elif out.requires_grad:
            w, kind = FWD + BWD, "fwd+bwd"
        else:
            w, kind = FWD, "fwd"
        self.ledger.add(f"{self.name}:{kind}", int(x.shape[0]), w)
        return out


def json_key(obj: Any) -> str:
    """A short stable hash of a JSON-able object (cache keys)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def atomic_write_json(path: Path, obj: Any) -> Path:
    """Benchmark JSON (sorted keys), written atomically by :func:`fewflow._io.atomic_write_json`."""
    from fewflow._io import atomic_write_json as write

    return write(Path(path), obj, indent=1, sort_keys=True)


def save_state(net: nn.Module, path: Path) -> None:
    """Weights as safetensors, written atomically."""
    from fewflow._io import atomic_save_safetensors

    state = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
    atomic_save_safetensors(Path(path), state)


def load_state(net: nn.Module, path: Path) -> nn.Module:
    """Load safetensors weights into ``net`` (on ``net``'s device)."""
    from safetensors.torch import load_file

    dev = next(net.parameters()).device
    net.load_state_dict({k: v.to(dev) for k, v in load_file(str(path)).items()})
    return net


# ----------------------------------------------------------------------------------------------- data


@dataclass
class BenchData:
    """One benchmark data set.

    ``train``: training data (``labels`` for class-conditional sets); ``source``: the training source
    (``GaussianSource`` or ``DataSource`` of 8-gaussians for moons); ``eval_x0``: fixed source draws for
    evaluation; ``eval_y``: their labels (images); ``target``: held-out real samples the metrics compare to.
    """

    name: str
    kind: str  # "toy" | "image"
    train: Tensor
    labels: Tensor | None
    num_classes: int | None
    source: Any
    eval_x0: Tensor
    eval_y: Tensor | None
    target: Tensor
    target2: Tensor | None = None  # a second independent real set for the two-sample floor (toys)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.train.shape[1:])

    @property
    def dim(self) -> int:
        return int(math.prod(self.shape))

    def dataset(self) -> Any:
        from fewflow.data import Dataset

        return Dataset(self.train, self.labels, self.name, self.num_classes, (-1.0, 1.0), self.name, {})

    def cond(self, y: Tensor | None) -> dict[str, Tensor]:
        return {} if y is None else {"y": y}

    def source_description(self) -> str:
        return "8gaussians" if self.name == "moons" else "N(0, I)"


def load_bench_data(name: str, n_train: int, n_eval: int, seed: int = 0) -> BenchData:
    """``checkerboard`` (N(0, I) -> checkerboard), ``moons`` (8 gaussians -> moons), ``digits`` (8x8,
    class-conditional, N(0, I) source) or ``mnist`` (if cached). Fixed seeds: the same evaluation draws
    for every method."""
    from fewflow.data import load_dataset
    from fewflow.sources import DataSource, GaussianSource

    g = torch.Generator().manual_seed(10_000 + seed)
    if name in TOY_SETS:
        train = load_dataset(name, n=n_train, seed=seed).x
        target = load_dataset(name, n=n_eval, seed=seed + 101).x
        target2 = load_dataset(name, n=n_eval, seed=seed + 202).x
        if name == "moons":
            src_pool = load_dataset("8gaussians", n=n_train, seed=seed + 303).x
            source: Any = DataSource(src_pool, generator=torch.Generator().manual_seed(seed + 404))
            eval_x0 = load_dataset("8gaussians", n=n_eval, seed=seed + 505).x
        else:
            source = GaussianSource((2,))
            eval_x0 = torch.randn(n_eval, 2, generator=g)
        return BenchData(name, "toy", train, None, None, source, eval_x0, None, target, target2)
    if name in IMAGE_SETS:
        from fewflow.metrics import get_feature_classifier

        # build (or load) the metric's classifier up front, so its one-off training is not timed as sampling
        get_feature_classifier(name)
        tr = load_dataset(name, split="train")
        te = load_dataset(name, split="test")
        assert tr.y is not None
        source = GaussianSource(tuple(tr.x.shape[1:]))
        eval_x0 = torch.randn(n_eval, *tr.x.shape[1:], generator=g)
        eval_y = torch.arange(n_eval) % 10
        return BenchData(name, "image", tr.x, tr.y, 10, source, eval_x0, eval_y, te.x, tr.x)
    raise unknown_name("benchmark data set", name, TOY_SETS + IMAGE_SETS)


def primary_metric(data: BenchData) -> str:
    """The headline metric key (:func:`fewflow.evaluate.primary_metric`): ``sliced_w2`` or ``fd``."""
    from fewflow.evaluate import primary_metric as primary

    return primary(data.shape)


def quality(data: BenchData, x: Tensor, y: Tensor | None = None) -> dict[str, float]:
    """Metrics of generated samples against the held-out set, from the one evaluation harness
    (:func:`fewflow.evaluate.score`: sliced-W2, MMD, energy for 2-D sets; FD and classifier accuracy for
    images). Non-finite samples score ``inf``."""
    from fewflow.evaluate import score

    return score(x, data.target, dataset=data.name, y=y)


def floor_metrics(data: BenchData) -> dict[str, float]:
    """The metric of real data against the held-out set (two-sample floor): a second exact draw of the
    same size for toys; the training split against the test split for images (with the real labels)."""
    if data.kind == "toy":
        assert data.target2 is not None
        return quality(data, data.target2)
    return quality(data, data.train, data.labels)


# ------------------------------------------------------------------------------------------- networks


@dataclass
class NetSpec:
    """The one network family of a benchmark run: ``fewflow.models.MLP`` with low-frequency Fourier time
    features (3 frequencies, as the MeanFlow docs advise for flow maps; the teacher uses the same so that
    students can be initialised from it)."""

    hidden: int = 128
    depth: int = 3
    num_frequencies: int = 3


@dataclass(frozen=True)
class UNetSpec:
    """A convolutional network family for 28x28 images: ``fewflow.models.UNet`` (``base`` channels times
    ``mults`` per resolution, no attention by default: CPU budgets), sinusoidal time features."""

    base: int = 16
    mults: tuple[int, ...] = (1, 2)
    attention: bool = False


def make_net(data: BenchData, spec: NetSpec | UNetSpec, flow_map: bool = False) -> nn.Module:
    """The benchmark's network for ``data`` (class-conditional when the data set has labels): an MLP, or a
    UNet for a :class:`UNetSpec`."""
    from fewflow.models import MLP, UNet

    if isinstance(spec, UNetSpec):
        return UNet(in_channels=data.shape[0], base=spec.base, mults=spec.mults, size=data.shape[-1],
                    num_classes=data.num_classes, flow_map=flow_map, attention=spec.attention)
    return MLP(
        data.dim,
        hidden=spec.hidden,
        depth=spec.depth,
        time_features="fourier",
        num_classes=data.num_classes,
        flow_map=flow_map,
        num_frequencies=spec.num_frequencies,
    )


# ------------------------------------------------------------------------------------------- training


def count_step(
    objective: Callable[..., Any], student: nn.Module, x1: Tensor, cond: dict[str, Any], ledger: Ledger
) -> float:
    """Forward-equivalents of one optimiser step: one objective call plus backward on a throw-away copy
    of the student (teacher calls are charged through their own :class:`Counted` wrapper)."""
    probe = copy.deepcopy(student)
    saved = (ledger.evals, ledger.calls, dict(ledger.by_kind))
    g = torch.Generator(device=x1.device).manual_seed(0)
    out = objective(probe, x1, generator=g, **cond)
    out.loss.backward()
    cost = ledger.evals - saved[0]
    ledger.evals, ledger.calls, ledger.by_kind = saved  # the probe is bookkeeping, not training
    return cost


def budget_steps(budget: float, per_step: float) -> int:
    """Optimiser steps a stage can afford: ``floor(budget / per_step)`` (at least 1)."""
    if not per_step > 0:
        raise FewflowError(f"cost of a training step must be positive, got {per_step}")
    return max(1, int(budget // per_step))


def train_teacher(
    data: BenchData, spec: NetSpec | UNetSpec, steps: int, batch_size: int, lr: float, seed: int,
    cache_dir: Path, coupling: str = "independent",
) -> tuple[nn.Module, dict[str, Any]]:
    """The CFM teacher (the registry's ``cfm`` method: linear path, ``coupling`` ``independent`` or
    ``ot``, exact minibatch OT; the data set's source), trained once per (data set, network, steps, batch,
    lr, seed, coupling) and cached as safetensors + JSON under ``cache_dir/<data set>/teacher-<key>/``.
    Shared by both benchmarks."""
    from fewflow.paths import AffinePath

    spec_key: dict[str, Any] = asdict(spec)
    if isinstance(spec, UNetSpec):
        spec_key = {"unet": spec_key}
    key_fields: dict[str, Any] = {
        "data": data.name,
        "net": spec_key,
        "steps": steps,
        "batch": batch_size,
        "lr": lr,
        "seed": seed,
        "n_train": int(data.train.shape[0]),
        "v": 1,
    }
    if coupling != "independent":  # keys of the independent teachers stay as they were
        key_fields["coupling"] = coupling
    key = json_key(key_fields)
    folder = Path(cache_dir) / data.name / f"teacher-{key}"
    net = make_net(data, spec)
    if (folder / "meta.json").is_file() and (folder / "model.safetensors").is_file():
        load_state(net, folder / "model.safetensors")
        meta = json.loads((folder / "meta.json").read_text())
        meta["cached"] = True
        return net.eval().requires_grad_(False), meta
    from fewflow.methods import BuildContext, get_method
    from fewflow.train import TrainConfig, train_stages

    torch.manual_seed(seed)
    net = make_net(data, spec)
    cfm = get_method("cfm")
    if coupling not in ("independent", "ot"):
        raise unknown_name("teacher coupling", coupling, ("independent", "ot"))
    pairing = None
    if coupling == "ot":
        from fewflow.couplings import ExactOTCoupling

        pairing = ExactOTCoupling()
    stages = cfm.build(cfm.make_config(), BuildContext(data=data.dataset(), path=AffinePath("linear"),
                                                       source=data.source, coupling=pairing, seed=seed))
    tc = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, ema_decay=0.999, progress=False, log_every=0,
                     ckpt_every=0, device="cpu")
    trained, recs, _ = train_stages(net, stages, data.dataset(), tc, seed_of=lambda k: seed * 100 + k)
    recs = [{"steps": r.steps, "wall_s": r.wall_s, "evals": r.steps * batch_size * (FWD + BWD)} for r in recs]
    meta = {
        "key": key,
        "steps": recs[0]["steps"],
        "train_wall_s": recs[0]["wall_s"],
        "train_evals": recs[0]["evals"],
        "batch": batch_size,
        "lr": lr,
        "net": asdict(spec),
        "coupling": coupling,
    }
    save_state(trained, folder / "model.safetensors")
    atomic_write_json(folder / "meta.json", meta)
    meta["cached"] = False
    return trained.eval().requires_grad_(False), meta


# ----------------------------------------------------------------------------------------- evaluation


def measure_samples(
    sample_fn: Callable[[Tensor, dict[str, Tensor]], tuple[Tensor, int]], data: BenchData, batch: int = 4000
) -> tuple[Tensor, int, float]:
    """Run ``sample_fn(x0, cond) -> (x, nfe)`` on the fixed evaluation draws (in chunks of ``batch``);
    returns samples, NFE per sample (batched forwards of one chunk) and sampling wall time in seconds."""
    xs, nfe = [], 0
    with torch.no_grad():  # warm-up (first-call allocations), not timed
        sample_fn(data.eval_x0[:8], data.cond(None if data.eval_y is None else data.eval_y[:8]))
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, data.eval_x0.shape[0], batch):
            x0 = data.eval_x0[i : i + batch]
            cond = data.cond(None if data.eval_y is None else data.eval_y[i : i + batch])
            x, nfe = sample_fn(x0, cond)
            xs.append(x)
    return torch.cat(xs), int(nfe), time.perf_counter() - t0


# -------------------------------------------------------------------------------------- tables/plots


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "**no**"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "diverged" if v > 0 else "-"
        a = abs(v)
        if a == 0:
            return "0"
        if a >= 100:
            return f"{v:.0f}"
        if a >= 1e-3:
            return f"{v:.3g}" if a < 10 else f"{v:.1f}"
        return f"{v:.1e}"
    return "-" if v is None else str(v)


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-markdown table."""
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(out)


def plot_quality_vs_nfe(panels: dict[str, dict[str, Any]], path: Path, title: str = "") -> Path:
    """One panel per data set: ``panels[name] = {"metric": label, "curves": {method: (nfes, values)},
    "hlines": {label: value}}``; log-scale y. Written with matplotlib's Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(1, len(panels))
    fig, axes = plt.subplots(1, n, figsize=(5.2 * n, 4.0), squeeze=False)
    for ax, (name, p) in zip(axes[0], panels.items()):
        colors = plt.get_cmap("tab20").colors
        for i, (label, (xs, ys)) in enumerate(p["curves"].items()):
            pts = [(a, b) for a, b in zip(xs, ys) if b is not None and math.isfinite(b) and b > 0]
            if not pts:
                continue
            teacher = label.startswith("teacher")
            style = {"color": "k", "lw": 2.0, "marker": "s"} if teacher else {
                "color": colors[(2 * i) % 20 + (i // 10) % 2], "lw": 1.2, "marker": "o"}
            ax.plot([a for a, _ in pts], [b for _, b in pts], ms=3, label=label, **style)
        for i, (label, v) in enumerate(p.get("hlines", {}).items()):
            if v is not None and math.isfinite(v) and v > 0:
                ax.axhline(v, color="k", ls=["--", ":", "-."][i % 3], lw=1, label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("NFE")
        ax.set_ylabel(p["metric"])
        ax.set_title(name)
        ax.grid(alpha=0.3, which="both")
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    if title:
        fig.suptitle(title, y=1.04)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def write_outputs(
    out: Path, stem: str, lines: list[str], cfg: Any, wall_s: float, claims: list[dict[str, Any]],
    results: dict[str, Any], panels: dict[str, Any], title: str,
) -> dict[str, Path]:
    """Write ``<stem>.md`` (the report lines), ``<stem>.json`` (mode, seed, wall time, claims, NFE list,
    results; atomically) and ``<stem>.png`` (quality vs NFE panels) into ``out``; return their paths."""
    paths = {"md": out / f"{stem}.md", "json": out / f"{stem}.json", "png": out / f"{stem}.png"}
    paths["md"].write_text("\n".join(lines))
    atomic_write_json(
        paths["json"],
        {"mode": cfg.mode, "seed": cfg.seed, "wall_s": wall_s, "claims": claims, "nfe": list(cfg.nfe),
         "results": results},
    )
    if panels:
        plot_quality_vs_nfe(panels, paths["png"], title)
    return paths


def run_datasets(
    run_one: Any, cfg: Any, names: list[str], first: tuple[str, ...] = ("digits", "mnist")
) -> dict[str, Any]:
    """``{name: run_one((cfg, name))}`` for every data set, in ``cfg.workers`` spawned processes when
    there are several (each single-threaded; the slow image sets in ``first`` start first so the pool
    stays busy). ``run_one`` must be a module-level function (it is pickled)."""
    if cfg.workers > 1 and len(names) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        order = sorted(names, key=lambda n: n not in first)
        with ProcessPoolExecutor(max_workers=cfg.workers, mp_context=mp.get_context("spawn")) as ex:
            outs = list(ex.map(run_one, [(cfg, n) for n in order]))
        got = {o["dataset"]: o for o in outs}
        return {n: got[n] for n in names}
    return {n: run_one((cfg, n)) for n in names}


def add_common_args(ap: Any, stem: str, datasets: str) -> None:
    """The options both benchmark scripts share: mode, data sets, workers, seed, cache, output, quiet.

    ``--out`` defaults to ``benchmarks/results`` (the committed tables) only with ``--full``; quick and
    smoke runs write to ``<user cache>/bench`` (``$FEWFLOW_CACHE/bench`` or ``~/.cache/fewflow/bench``), so
    they never overwrite the committed results. An explicit ``--out`` wins in any order of the flags."""
    import argparse

    from fewflow.data import default_cache_dir as user_cache_dir

    scratch = user_cache_dir() / "bench"

    class _Mode(argparse.Action):  # sets the mode; the default --out follows it until --out is given
        def __call__(self, parser: Any, ns: Any, values: Any, option_string: str | None = None) -> None:
            ns.mode = self.const if self.nargs == 0 else values
            if not getattr(ns, "out_given", False):
                ns.out = RESULTS if ns.mode == "full" else scratch

    class _Out(argparse.Action):
        def __call__(self, parser: Any, ns: Any, values: Any, option_string: str | None = None) -> None:
            ns.out, ns.out_given = values, True

    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", action=_Mode, nargs=0, dest="mode", const="quick", help="CI mode (default)")
    g.add_argument("--full", action=_Mode, nargs=0, dest="mode", const="full", help="the committed tables")
    g.add_argument("--smoke", action=_Mode, nargs=0, dest="mode", const="smoke", help="tiny (tests)")
    g.add_argument(
        "--mode", action=_Mode, dest="mode", choices=("smoke", "quick", "full"), help="the same as the flags"
    )
    ap.add_argument("--datasets", default=None, help=f"comma-separated: {datasets}")
    ap.add_argument("--workers", type=int, default=1, help="data sets in parallel processes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", type=Path, default=None, help="cache folder (default benchmarks/.cache)")
    ap.add_argument(
        "--out", type=Path, action=_Out, default=scratch,
        help=f"folder for {stem}.{{md,json,png}} (default: benchmarks/results, the committed tables, with "
        f"--full only; otherwise {scratch}, so quick and smoke runs never overwrite the committed results)",
    )
    ap.add_argument("--quiet", action="store_true")


def train_once(
    root: Path, make_config: Callable[[], Any], *, steps: int, batch_size: int, seed: int,
    lr: float | None = None, say: Callable[[str], None] | None = None, label: str | None = None,
) -> float:
    """Train the run ``make_config()`` into ``root`` once through :func:`fewflow.runs.train_run` and
    return its training seconds. A ``DONE`` file (holding the seconds) marks a finished run, so a rerun
    trains nothing; a run killed half-way resumes from its last checkpoint. The trainer settings the
    benchmarks share (no progress bar, no log lines, four checkpoints) are applied here."""
    from fewflow.runs import train_run

    done = root / "DONE"
    if not done.exists():
        rc = make_config()
        rc.seed = seed
        rc.train = {**rc.train, "steps": steps, "batch_size": batch_size, "progress": False, "log_every": 0,
                    "ckpt_every": max(steps // 4, 50), "seed": seed, **({"lr": lr} if lr is not None else {})}
        rc.validate()
        t0 = time.perf_counter()
        try:
            train_run(rc, root, resume=(root / "config.json").exists(), figures=False)
        except FewflowError as e:  # killed after its last checkpoint, before DONE was written
            if "nothing left to train" not in str(e):
                raise
        secs = time.perf_counter() - t0
        from fewflow._io import atomic_write_text

        atomic_write_text(done, f"{secs:.2f}\n")
        if say is not None:
            say(f"  trained {label or root.name} ({steps} steps, {secs:.0f} s)")
    text = done.read_text().strip()
    return float(text) if text else math.nan


def cached_row(folder: Path, key: str, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``folder/key.json`` if a run wrote it before, else ``compute()`` written there atomically: a result
    row survives a killed benchmark and a rerun reports it without recomputing."""
    path = folder / f"{key}.json"
    if path.exists():
        return json.loads(path.read_text())
    row = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, row)
    return row
