"""``fewflow bench likelihood_latent``: latent flows, exact likelihoods, fine-tuning and field diagnostics.

One part per paper, each a module ``fewflow.bench.ll_<name>`` with ``part(mode, cache, seed, verbose) ->
{"rows", "claims", "lines"}`` that trains through the method registry, caches its runs and rows (a rerun
resumes where a killed one stopped) and states its paper's effect at this scale as claims:

* ``lfm``: latent flow matching on MNIST against pixel-space FM at equal training wall time;
* ``tarflow``: an autoregressive normalizing flow (TARFlow / STARFlow): bits/dim, denoising, Jacobi vs
  sequential sampling, Bayes classification from conditional likelihoods;
* ``pfgmpp``: PFGM++ for D in {16, 64, 256, 2048, inf}: quality at low NFE and under injected noise;
* ``mle_finetune``: fine-tuning by MLE of reconstructions, before vs after, straightforward and residual;
* ``symmflow``: one network that generates, classifies and segments;
* ``diagnostics``: is the learned field a gradient field (analytic, unconstrained, grad-phi)?

Writes ``likelihood_latent.{json,md,png}`` with the ``{claim, dataset, met, value}`` claims of every part.
"""

from __future__ import annotations

import argparse
import importlib
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fewflow._io import atomic_write_json, atomic_write_text
from fewflow._validate import FewflowError
from fewflow.bench.common import RESULTS, add_common_args, format_table

__all__ = ["PARTS", "main", "run"]

PARTS = ("lfm", "tarflow", "pfgmpp", "mle_finetune", "symmflow", "diagnostics")
STEM = "likelihood_latent"


def _plot(claims: list[dict[str, Any]], path: Path) -> None:
    """One row per claim: met (green) or not (red), grouped by part, so the state of every paper's
    effect at this scale reads at a glance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not claims:
        return
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(claims) + 1.0))
    labels = [f"[{c['part']}] {c['claim'][:80]}" for c in claims]
    ax.barh(range(len(claims)), [1] * len(claims),
            color=["#2a9d8f" if c["met"] else "#e76f51" for c in claims])
    ax.set_yticks(range(len(claims)))
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xticks([])
    ax.set_title("likelihood_latent claims: green met, red not met", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(mode: str = "quick", parts: Sequence[str] = PARTS, *, cache_dir: Path | None = None,
        out_dir: Path | None = None, seed: int = 0, verbose: bool = True) -> dict[str, Any]:
    """Run the selected parts; write the tables when ``out_dir`` is set. Returns ``{"claims", "parts",
    "paths"}``. Each part caches its runs and rows, so a rerun after a failure resumes."""
    if mode not in ("smoke", "quick", "full"):
        raise FewflowError(f"unknown mode {mode!r}; choose smoke, quick or full")
    bad = sorted(set(parts) - set(PARTS))
    if bad:
        raise FewflowError(f"unknown parts {bad}; choose from {list(PARTS)}")
    cache = Path(cache_dir) if cache_dir is not None else RESULTS.parent / ".cache"
    cache = cache / STEM
    t0 = time.perf_counter()
    results: dict[str, Any] = {}
    claims: list[dict[str, Any]] = []
    lines = [f"# Latent flows, likelihoods, fine-tuning and field diagnostics ({mode} mode, seed {seed})", ""]
    for name in parts:
        if verbose:
            print(f"[{name}]", flush=True)
        t1 = time.perf_counter()
        mod = importlib.import_module(f"fewflow.bench.ll_{name}")
        out = mod.part(mode, cache, seed=seed, verbose=verbose)
        wall = time.perf_counter() - t1
        results[name] = {"rows": out["rows"], "wall_s": wall}
        for c in out["claims"]:
            claims.append({**c, "part": name})
        lines += [*out["lines"], ""]
    wall = time.perf_counter() - t0
    lines[0] += f"; this run {wall / 60:.1f} min, parts cached by an earlier run are read back"
    lines += ["## Claims", "", format_table(
        ["part", "data", "claim", "met", "value"],
        [[c["part"], c["dataset"], c["claim"], "yes" if c["met"] else "NO", c["value"]] for c in claims],
    ), ""]
    paths: dict[str, Path] = {}
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {k: out / f"{STEM}.{k}" for k in ("md", "json", "png")}
        atomic_write_text(paths["md"], "\n".join(lines))
        atomic_write_json(paths["json"], {"mode": mode, "seed": seed, "wall_s": wall,
                                          "claims": [{k: c[k] for k in ("claim", "dataset", "met", "value")}
                                                     | {"part": c["part"]} for c in claims],
                                          "results": results})
        _plot(claims, paths["png"])
    return {"claims": claims, "parts": results, "paths": paths}


def main(argv: Sequence[str] | None = None) -> int:
    """``fewflow bench likelihood_latent [--quick|--full|--smoke] [--parts lfm,tarflow,...]``."""
    import os

    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ap = argparse.ArgumentParser(prog=f"fewflow bench {STEM}", description=__doc__.split("\n\n")[0])
    add_common_args(ap, STEM, "unused here")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated: {', '.join(PARTS)}")
    ap.set_defaults(mode="quick")
    a = ap.parse_args(list(argv) if argv is not None else None)
    out = run(a.mode, tuple(p for p in a.parts.split(",") if p), cache_dir=a.cache, out_dir=a.out,
              seed=a.seed, verbose=not a.quiet)
    for c in out["claims"]:
        print(f"claim [{c['part']}/{c['dataset']}] {c['claim']}: {'MET' if c['met'] else 'NOT MET'} "
              f"({c['value']})")
    if out["paths"]:
        print("wrote", ", ".join(str(p) for p in out["paths"].values()))
    return 0
