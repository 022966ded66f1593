"""``fewflow bench discrete``: sequences on the simplex and transition matching, at CPU scale.

Three parts, each trained through the method registry (``fewflow.runs.train_run``: the same run folders
``fewflow train`` writes, cached so a rerun resumes where a killed one stopped) and scored with
:mod:`fewflow.metrics.sequences` / :func:`fewflow.evaluate.score`:

* ``simplex``: Gumbel-softmax FM (``gsfm``) against linear-simplex FM (``simplex_fm``) on the synthetic
  first-order Markov chain with K = 4, 20, 64 states (L = 16), same denoiser and steps: unigram and
  bigram KL of the samples to the chain's exact statistics. The paper's claim: GSFM degrades least as K
  grows.
* ``real``: GSFM on DNA windows (64 bp, a bacterial genome) and protein crops (64 aa): k-mer
  Jensen-Shannon distance (k = 1..6 as far as the data supports) to held-out data, against the held-out vs
  train floor; STGFlow on DNA steers the GC content with a regressor trained on clean windows, for
  gamma in {0, 1, 4, 16}. Needs ``fewflow fetch dna`` / ``fewflow fetch proteins`` (full mode only).
* ``tm``: difference transition matching (``dtm``) against flow matching with Euler (``cfm``) at equal
  backbone evaluations T in {1, 2, 4, 8, 16} on 8x8 digits (FD-digits) and on a 2-D mixture of 8
  Gaussians (sliced W2), where one Euler step of FM lands every sample on the data mean and one DTM
  transition does not.

Writes ``discrete.{json,md,png}``; the JSON's ``claims`` list uses the ``{claim, dataset, met, value}``
format of every fewflow benchmark.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fewflow._io import atomic_write_json, atomic_write_text
from fewflow._validate import FewflowError
from fewflow.bench.common import RESULTS, add_common_args, cached_row, format_table, train_once

__all__ = ["DiscreteConfig", "SIZES", "main", "run"]

PARTS = ("simplex", "real", "tm")
TM_T = (1, 2, 4, 8, 16)
GAMMAS = (0.0, 1.0, 4.0, 16.0)
REAL_KWARGS: dict[str, dict[str, Any]] = {"dna": {"length": 64}, "proteins": {"length": 64}}

# per mode: training steps and evaluation sizes (the full mode fits in well under an hour on 2 cores)
SIZES: dict[str, dict[str, Any]] = {
    "smoke": {"Ks": (4,), "seq_steps": 40, "n_eval": 200, "sample_steps": 20, "real": False,
              "tm_sets": ("8gaussians",), "tm_steps": 60, "tm_eval": 300, "batch": 128},
    "quick": {"Ks": (4, 20), "seq_steps": 300, "n_eval": 1000, "sample_steps": 50, "real": False,
              "tm_sets": ("8gaussians",), "tm_steps": 800, "tm_eval": 2000, "batch": 256},
    "full": {"Ks": (4, 20, 64), "seq_steps": 2000, "n_eval": 4000, "sample_steps": 100, "real": True,
             "real_steps": 2000, "tm_sets": ("8gaussians", "digits"), "tm_steps": 4000, "tm_eval": 2000,
             "batch": 256},
}


@dataclass
class DiscreteConfig:
    mode: str = "quick"
    parts: tuple[str, ...] = PARTS
    seed: int = 0
    cache_dir: Path | None = None
    out_dir: Path | None = None
    verbose: bool = True
    sizes: dict[str, Any] = field(default_factory=dict)

    def size(self, key: str) -> Any:
        return self.sizes[key] if key in self.sizes else SIZES[self.mode][key]


def _say(cfg: DiscreteConfig, msg: str) -> None:
    if cfg.verbose:
        print(msg, flush=True)


# --------------------------------------------------------------------------- training through the registry


def _trained(cfg: DiscreteConfig, tag: str, data: str, method: str, *, steps: int,
             data_kwargs: dict | None = None, method_kwargs: dict | None = None, model: dict | None = None,
             n: int | None = None, conditional: bool | None = None) -> tuple[Any, Any]:
    """Train (or resume, or load) the run ``tag`` in the cache; returns ``(ema model, RunConfig)``."""
    from fewflow.config import default_config
    from fewflow.runs import load_run

    def make() -> Any:
        rc = default_config(data, method)
        rc.method = {"name": method, **(method_kwargs or {})}
        if data_kwargs:
            rc.data.kwargs = dict(data_kwargs)
        if n is not None:
            rc.data.n = n
        if model is not None:
            rc.model = dict(model)
        if conditional is not None:
            rc.objective.conditional = conditional
            rc.objective.label_dropout = 0.1 if conditional else 0.0
        return rc

    root = _cache(cfg) / tag
    train_once(root, make, steps=steps, batch_size=cfg.size("batch"), seed=cfg.seed,
               say=(lambda m: _say(cfg, m)), label=tag)
    return load_run(root)


def _cache(cfg: DiscreteConfig) -> Path:
    base = cfg.cache_dir or (RESULTS.parent / ".cache")
    return Path(base) / "discrete" / cfg.mode


def _cached_row(cfg: DiscreteConfig, key: str, compute: Any) -> dict[str, Any]:
    """A result row cached as JSON, so a rerun reports without recomputing."""
    return cached_row(_cache(cfg) / "rows", key, compute)


# ------------------------------------------------------------------------ part 1: GSFM vs linear simplex FM


def _sample_simplex(model: Any, rc: Any, n: int, steps: int, seed: int, guidance: Any = None) -> Tensor:
    from fewflow.methods import get_method
    from fewflow.objectives.gsfm import sample_gsfm
    from fewflow.objectives.simplex_fm import sample_simplex_fm

    L, K = (int(v) for v in rc.meta["shape"])
    mcfg = get_method(rc.method_name).make_config(rc.method)
    fn = sample_gsfm if rc.method_name == "gsfm" else sample_simplex_fm
    g = torch.Generator().manual_seed(seed)
    _, tokens = fn(model, n, L, K, steps, cfg=mcfg, guidance=guidance, generator=g)
    return tokens


def part_simplex(cfg: DiscreteConfig) -> dict[str, Any]:
    from fewflow.data import load_dataset
    from fewflow.metrics.sequences import bigram_kl, unigram_kl

    rows = []
    for K in cfg.size("Ks"):
        stats = load_dataset("markov", n=10, seed=cfg.seed, K=K).meta
        for method in ("gsfm", "simplex_fm"):
            def compute(K: int = K, method: str = method, stats: dict = stats) -> dict[str, Any]:
                model, rc = _trained(cfg, f"markov-K{K}-{method}", "markov", method,
                                     steps=cfg.size("seq_steps"), data_kwargs={"K": K}, n=50_000)
                t0 = time.perf_counter()
                tok = _sample_simplex(model, rc, cfg.size("n_eval"), cfg.size("sample_steps"), cfg.seed)
                wall = time.perf_counter() - t0
                return {"K": K, "method": method, "unigram_kl": unigram_kl(tok, stats["unigram"]),
                        "bigram_kl": bigram_kl(tok, stats["bigram"]), "sample_wall_s": wall}
            row = _cached_row(cfg, f"simplex-K{K}-{method}", compute)
            rows.append(row)
            _say(cfg, f"  markov K={K:>2} {method:>10}: unigram KL {row['unigram_kl']:.4f}, "
                      f"bigram KL {row['bigram_kl']:.4f}")
    claims = []
    Ks = list(cfg.size("Ks"))
    if len(Ks) > 1:
        by = {(r["method"], r["K"]): r["bigram_kl"] for r in rows}
        lo, hi = Ks[0], Ks[-1]
        g_up, s_up = by[("gsfm", hi)] - by[("gsfm", lo)], by[("simplex_fm", hi)] - by[("simplex_fm", lo)]
        claims.append({
            "claim": f"GSFM's bigram KL grows less than linear-simplex FM's from K={lo} to K={hi}",
            "dataset": "markov", "met": bool(g_up < s_up),
            "value": f"GSFM {by[('gsfm', lo)]:.4f} -> {by[('gsfm', hi)]:.4f}; simplex FM "
                     f"{by[('simplex_fm', lo)]:.4f} -> {by[('simplex_fm', hi)]:.4f}",
        })
        claims.append({
            "claim": f"GSFM's bigram KL is lower than linear-simplex FM's at K={hi}",
            "dataset": "markov", "met": bool(by[("gsfm", hi)] < by[("simplex_fm", hi)]),
            "value": f"{by[('gsfm', hi)]:.4f} vs {by[('simplex_fm', hi)]:.4f}",
        })
    return {"rows": rows, "claims": claims}


# --------------------------------------------------------------------------- part 2: real sequences + STGFlow


def part_real(cfg: DiscreteConfig) -> dict[str, Any]:
    from fewflow.data import load_dataset
    from fewflow.guidance.stg import STGuided, train_sequence_classifier
    from fewflow.metrics.sequences import floor_kmer_distance, gc_content, kmer_distance, novelty

    rows: list[dict[str, Any]] = []
    claims: list[dict[str, Any]] = []
    n_eval = min(cfg.size("n_eval"), 2000)
    for name in ("dna", "proteins"):
        try:
            train = load_dataset(name, split="train", **REAL_KWARGS[name])
            test = load_dataset(name, split="test", **REAL_KWARGS[name])
        except FewflowError as e:
            _say(cfg, f"  {name}: skipped ({e})")
            rows.append({"dataset": name, "skipped": str(e)})
            continue
        K = int(train.x.shape[-1])

        def compute(name: str = name, train: Any = train, test: Any = test, K: int = K) -> dict[str, Any]:
            model, rc = _trained(cfg, f"{name}-gsfm", name, "gsfm", steps=cfg.size("real_steps"),
                                 data_kwargs=REAL_KWARGS[name])
            tok = _sample_simplex(model, rc, n_eval, cfg.size("sample_steps"), cfg.seed)
            held = test.x.argmax(-1)[:n_eval]
            dist = kmer_distance(tok, held, K=K)
            floor = floor_kmer_distance(train.x.argmax(-1)[:n_eval], held)
            fl = floor["mean"] if isinstance(floor, dict) else float(floor)
            out = {"dataset": name, "kmer_js": dist["mean"], "floor": fl,
                   "novelty": float(novelty(tok, train.x.argmax(-1)[:5000]))}
            out["ratio"] = out["kmer_js"] / out["floor"] if out["floor"] > 0 else math.inf
            if name == "dna":
                gc = gc_content(train.x.argmax(-1), per_sequence=True).float()
                scorer = train_sequence_classifier(train.x, gc, steps=400,
                                                   generator=torch.Generator().manual_seed(cfg.seed))
                steer = []
                for gamma in GAMMAS:
                    guide = STGuided(scorer, gamma, M=8, generator=torch.Generator().manual_seed(cfg.seed))
                    tg = _sample_simplex(model, rc, min(n_eval, 500), cfg.size("sample_steps"), cfg.seed,
                                         guidance=guide if gamma > 0 else None)
                    steer.append({"gamma": gamma, "gc": float(gc_content(tg)),
                                  "kmer_js": kmer_distance(tg, held, K=K)["mean"]})
                out["stg"] = steer
            return out

        row = _cached_row(cfg, f"real-{name}", compute)
        rows.append(row)
        _say(cfg, f"  {name}: k-mer JS {row['kmer_js']:.4f} (floor {row['floor']:.4f}, x{row['ratio']:.2f})")
        claims.append({"claim": "GSFM's k-mer distance to held-out data is within 2x of the held-out vs "
                                "train floor", "dataset": name, "met": bool(row["ratio"] <= 2.0),
                       "value": f"{row['kmer_js']:.4f} vs floor {row['floor']:.4f} (x{row['ratio']:.2f})"})
        if "stg" in row:
            gcs = [s["gc"] for s in row["stg"]]
            mono = all(b > a for a, b in zip(gcs, gcs[1:]))
            claims.append({
                "claim": "STGFlow raises the GC content monotonically in gamma (0, 1, 4, 16)",
                "dataset": name,
                "met": bool(mono),
                "value": ", ".join(f"gamma {s['gamma']:g}: GC {s['gc']:.3f} (k-mer JS {s['kmer_js']:.3f})"
                                   for s in row["stg"]),
            })
    return {"rows": rows, "claims": claims}


# --------------------------------------------------------------------------- part 3: DTM vs FM Euler


def _tm_models(cfg: DiscreteConfig, name: str) -> tuple[tuple[Any, Any], tuple[Any, Any]]:
    steps = cfg.size("tm_steps")
    if name == "digits":
        # a transformer backbone of the same width and depth for both (DTM 119k parameters with its head,
        # the DiT 167k)
        fm_model = {"type": "DiT", "patch": 2, "hidden": 64, "depth": 2, "heads": 4}
        dtm = _trained(cfg, "digits-dtm", "digits", "dtm", steps=steps, conditional=False,
                       method_kwargs={"width": 64, "depth": 2})
        fm = _trained(cfg, "digits-cfm", "digits", "cfm", steps=steps, conditional=False, model=fm_model)
    else:
        dtm = _trained(cfg, f"{name}-dtm", name, "dtm", steps=steps, n=50_000,
                       method_kwargs={"width": 128, "depth": 3})
        fm = _trained(cfg, f"{name}-cfm", name, "cfm", steps=steps, n=50_000,
                      model={"type": "MLP", "hidden": 128, "depth": 3})
    return dtm, fm


def part_tm(cfg: DiscreteConfig) -> dict[str, Any]:
    from fewflow.data import load_dataset
    from fewflow.evaluate import primary_metric, score
    from fewflow.objectives.transition_matching import tm_sample
    from fewflow.sampling import generate

    rows: list[dict[str, Any]] = []
    claims: list[dict[str, Any]] = []
    n = cfg.size("tm_eval")
    for name in cfg.size("tm_sets"):
        image = name == "digits"
        if image:
            ref_all = load_dataset("digits", split="test").x
            ref, ref2 = ref_all[: len(ref_all) // 2], ref_all[len(ref_all) // 2:]
            n_here = min(n, ref.shape[0])
        else:
            ref = load_dataset(name, n=n, seed=cfg.seed + 101).x
            ref2 = load_dataset(name, n=n, seed=cfg.seed + 202).x
            n_here = n
        metric = primary_metric(tuple(ref.shape[1:]))
        floor = score(ref2[:n_here], ref[:n_here], dataset=name if image else None)[metric]

        def compute(name: str = name, n_here: int = n_here, ref: Tensor = ref, metric: str = metric) -> dict:
            (dtm, dcfg), (fm, fcfg) = _tm_models(cfg, name)
            out: dict[str, Any] = {"dataset": name, "metric": metric, "dtm": {}, "fm": {}}
            for T in TM_T:
                g = torch.Generator().manual_seed(cfg.seed)
                t0 = time.perf_counter()
                with torch.no_grad():
                    xd, counts = tm_sample(dtm, n_here, T=T, head_steps=int(dcfg.method.get("head_steps", 4)),
                                           generator=g)
                wd = time.perf_counter() - t0
                g = torch.Generator().manual_seed(cfg.seed)
                t0 = time.perf_counter()
                xf = generate(fm, fcfg, n_here, nfe=T, stepper="euler", generator=g, raw=True,
                              check_finite=False).x
                wf = time.perf_counter() - t0
                ds = score(xd, ref[:n_here], dataset=name if len(ref.shape) > 2 else None)
                fs = score(xf, ref[:n_here], dataset=name if len(ref.shape) > 2 else None)
                out["dtm"][str(T)] = {metric: ds[metric], "backbone": counts["backbone"],
                                      "head": counts["head"],
                                      "wall_s": wd, "spread": float(xd.flatten(1).std(0).mean())}
                out["fm"][str(T)] = {metric: fs[metric], "backbone": T, "wall_s": wf,
                                     "spread": float(xf.flatten(1).std(0).mean())}
            return out

        row = _cached_row(cfg, f"tm-{name}", compute)
        row["floor"] = floor
        rows.append(row)
        for T in TM_T:
            d, f = row["dtm"][str(T)], row["fm"][str(T)]
            _say(cfg, f"  {name} T={T:>2}: DTM {metric} {d[metric]:.4g} | FM Euler {f[metric]:.4g}")
        small = [T for T in TM_T if T <= 4]
        better = [row["dtm"][str(T)][metric] < row["fm"][str(T)][metric] for T in small]
        claims.append({
            "claim": "DTM beats FM Euler at equal backbone evaluations for T <= 4", "dataset": name,
            "met": bool(all(better)),
            "value": "; ".join(f"T={T}: {row['dtm'][str(T)][metric]:.3g} vs {row['fm'][str(T)][metric]:.3g}"
                               for T in small) + f" ({metric}, floor {floor:.3g})",
        })
        if not image:
            d1, f1 = row["dtm"]["1"], row["fm"]["1"]
            claims.append({
                "claim": "FM with one Euler step collapses to the mean; DTM with one transition does not "
                         "(DTM's sliced W2 at T=1 under half of FM's, its spread over half the data's)",
                "dataset": name,
                "met": bool(d1[metric] < 0.5 * f1[metric] and d1["spread"] > 0.5 * float(ref.std(0).mean())),
                "value": f"sliced W2 {d1[metric]:.3f} vs {f1[metric]:.3f}; spread {d1['spread']:.3f} vs "
                         f"{f1['spread']:.3f} (data {float(ref.std(0).mean()):.3f})",
            })
    return {"rows": rows, "claims": claims}


# --------------------------------------------------------------------------- report


def _report(cfg: DiscreteConfig, parts: dict[str, Any], claims: list[dict[str, Any]],
            wall: float) -> list[str]:
    lines = [f"# Discrete and transition benchmark ({cfg.mode} mode, seed {cfg.seed}, {wall / 60:.1f} min)",
             ""]
    if "simplex" in parts:
        lines += ["## GSFM vs linear-simplex FM (Markov chain, L = 16)", "",
                  format_table(["K", "method", "unigram KL", "bigram KL", "sample s"],
                               [[r["K"], r["method"], r["unigram_kl"], r["bigram_kl"], r["sample_wall_s"]]
                                for r in parts["simplex"]["rows"]]), ""]
    if "real" in parts:
        got = [r for r in parts["real"]["rows"] if "skipped" not in r]
        lines += ["## Real sequences (GSFM)", ""]
        if got:
            lines += [format_table(["data", "k-mer JS", "floor", "ratio", "novelty"],
                                   [[r["dataset"], r["kmer_js"], r["floor"], r["ratio"], r["novelty"]]
                                    for r in got]), ""]
            for r in got:
                if "stg" in r:
                    lines += ["STGFlow on DNA (GC-content regressor):", "",
                              format_table(["gamma", "GC", "k-mer JS"],
                                           [[s["gamma"], s["gc"], s["kmer_js"]] for s in r["stg"]]), ""]
        for r in parts["real"]["rows"]:
            if "skipped" in r:
                lines += [f"- {r['dataset']}: skipped ({r['skipped']})"]
        lines += [""]
    if "tm" in parts:
        for r in parts["tm"]["rows"]:
            m = r["metric"]
            lines += [f"## DTM vs FM Euler at equal backbone evaluations ({r['dataset']}, {m}; floor "
                      f"{r['floor']:.4g})", "",
                      format_table(["T", f"DTM {m}", "DTM head evals", f"FM Euler {m}", "DTM spread",
                                    "FM spread"],
                                   [[T, r["dtm"][str(T)][m], r["dtm"][str(T)]["head"], r["fm"][str(T)][m],
                                     r["dtm"][str(T)]["spread"], r["fm"][str(T)]["spread"]]
                                    for T in TM_T]), ""]
    lines += ["## Claims", "", format_table(["data", "claim", "met", "value"],
                                             [[c["dataset"], c["claim"], "yes" if c["met"] else "NO",
                                               c["value"]] for c in claims]), ""]
    return lines


def _plot(parts: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    if "simplex" in parts and parts["simplex"]["rows"]:
        panels.append("simplex")
    panels += [f"tm:{r['dataset']}" for r in parts.get("tm", {}).get("rows", [])]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, p in zip(axes[0], panels):
        if p == "simplex":
            for method in ("gsfm", "simplex_fm"):
                rs = [r for r in parts["simplex"]["rows"] if r["method"] == method]
                ax.plot([r["K"] for r in rs], [r["bigram_kl"] for r in rs], "o-", label=method)
            ax.set_xscale("log")
            ax.set_xlabel("states K")
            ax.set_ylabel("bigram KL")
            ax.set_title("Markov chain")
        else:
            r = next(r for r in parts["tm"]["rows"] if r["dataset"] == p.split(":")[1])
            m = r["metric"]
            ax.plot(TM_T, [r["dtm"][str(T)][m] for T in TM_T], "o-", label="DTM")
            ax.plot(TM_T, [r["fm"][str(T)][m] for T in TM_T], "s-", label="FM Euler")
            ax.axhline(r["floor"], color="gray", ls=":", label="floor")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("backbone evaluations T")
            ax.set_ylabel(m)
            ax.set_title(r["dataset"])
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(cfg: DiscreteConfig) -> dict[str, Any]:
    """Run the selected parts; write the tables when ``cfg.out_dir`` is set. Returns ``{"claims", "parts",
    "paths"}``."""
    if cfg.mode not in SIZES:
        raise FewflowError(f"unknown mode {cfg.mode!r}; choose one of {sorted(SIZES)}")
    bad = sorted(set(cfg.parts) - set(PARTS))
    if bad:
        raise FewflowError(f"unknown parts {bad}; choose from {list(PARTS)}")
    t0 = time.perf_counter()
    parts: dict[str, Any] = {}
    for p in cfg.parts:
        if p == "real" and not cfg.size("real"):
            continue
        _say(cfg, f"[{p}]")
        parts[p] = {"simplex": part_simplex, "real": part_real, "tm": part_tm}[p](cfg)
    claims = [c for p in parts.values() for c in p["claims"]]
    wall = time.perf_counter() - t0
    paths: dict[str, Path] = {}
    if cfg.out_dir is not None:
        out = Path(cfg.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"md": out / "discrete.md", "json": out / "discrete.json", "png": out / "discrete.png"}
        atomic_write_text(paths["md"], "\n".join(_report(cfg, parts, claims, wall)))
        atomic_write_json(paths["json"], {"mode": cfg.mode, "seed": cfg.seed, "wall_s": wall,
                                          "claims": claims,
                                          "results": {k: v["rows"] for k, v in parts.items()}})
        _plot(parts, paths["png"])
    return {"claims": claims, "parts": parts, "paths": paths}


def main(argv: Sequence[str] | None = None) -> int:
    """``fewflow bench discrete [--quick|--full|--smoke] [--parts simplex,real,tm]``."""
    import os

    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ap = argparse.ArgumentParser(prog="fewflow bench discrete", description=__doc__.split("\n\n")[0])
    add_common_args(ap, "discrete", "unused here")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated: {', '.join(PARTS)}")
    ap.set_defaults(mode="quick")
    a = ap.parse_args(list(argv) if argv is not None else None)
    cfg = DiscreteConfig(mode=a.mode, parts=tuple(p for p in a.parts.split(",") if p), seed=a.seed,
                         cache_dir=a.cache, out_dir=a.out, verbose=not a.quiet)
    out = run(cfg)
    for c in out["claims"]:
        print(f"claim [{c['dataset']}] {c['claim']}: {'MET' if c['met'] else 'NOT MET'} ({c['value']})")
    if out["paths"]:
        print("wrote", ", ".join(str(p) for p in out["paths"].values()))
    return 0
