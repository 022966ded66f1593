"""Benchmarks composed of one part per paper (``likelihood_latent``, ``geometry``, ``control``).

A part is a module ``fewflow.bench.<prefix>_<name>`` with ``part(mode, cache, seed, verbose) -> {"rows",
"claims", "lines"[, "plots"]}``: it trains through fewflow's own API, caches its runs and rows under
``cache`` (a rerun resumes where a killed one stopped, and a finished part is read back at once) and
states its paper's effect at this scale as ``{claim, dataset, met, value}`` claims. :func:`run_parts`
runs the selected parts and writes ``<stem>.{md,json,png}`` (the png: every claim, met or not) and copies
the parts' own plots beside them as ``<stem>-<plot>.png``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fewflow._io import atomic_write_json, atomic_write_text
from fewflow._validate import FewflowError
from fewflow.bench.common import RESULTS, add_common_args, format_table

__all__ = ["run_parts", "parts_main", "MODES"]

MODES = ("smoke", "quick", "full")


def _plot_claims(claims: list[dict[str, Any]], path: Path, stem: str) -> None:
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
    ax.set_title(f"{stem} claims: green met, red not met", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_parts(stem: str, prefix: str, all_parts: Sequence[str], title: str, mode: str = "quick",
              parts: Sequence[str] | None = None, *, cache_dir: Path | None = None,
              out_dir: Path | None = None, seed: int = 0, verbose: bool = True) -> dict[str, Any]:
    """Run the selected parts of benchmark ``stem``; write the tables when ``out_dir`` is set. Returns
    ``{"claims", "parts", "paths"}``."""
    if mode not in MODES:
        raise FewflowError(f"unknown mode {mode!r}; choose smoke, quick or full")
    parts = tuple(all_parts if parts is None else parts)
    bad = sorted(set(parts) - set(all_parts))
    if bad:
        raise FewflowError(f"unknown parts {bad}; choose from {list(all_parts)}")
    cache = (Path(cache_dir) if cache_dir is not None else RESULTS.parent / ".cache") / stem
    t0 = time.perf_counter()
    results: dict[str, Any] = {}
    claims: list[dict[str, Any]] = []
    plots: list[tuple[str, Path]] = []
    lines = [f"# {title} ({mode} mode, seed {seed})", ""]
    for name in parts:
        if verbose:
            print(f"[{name}]", flush=True)
        t1 = time.perf_counter()
        mod = importlib.import_module(f"fewflow.bench.{prefix}_{name}")
        out = mod.part(mode, cache, seed=seed, verbose=verbose)
        results[name] = {"rows": out["rows"], "wall_s": time.perf_counter() - t1}
        claims += [{**c, "part": name} for c in out["claims"]]
        lines += [*out["lines"], ""]
        for p in out.get("plots", []):
            if Path(p).is_file():
                plots.append((name, Path(p)))
    wall = time.perf_counter() - t0
    lines[0] += f"; this run {wall / 60:.1f} min, parts cached by an earlier run are read back"
    lines += ["## Claims", "", format_table(
        ["part", "data", "claim", "met", "value"],
        [[c["part"], c["dataset"], c["claim"], "yes" if c["met"] else "NO", c["value"]] for c in claims],
    ), ""]
    paths: dict[str, Path] = {}
    if out_dir is not None:
        out_path = Path(out_dir)
        out_path.mkdir(parents=True, exist_ok=True)
        paths = {k: out_path / f"{stem}.{k}" for k in ("md", "json", "png")}
        if plots:
            lines += ["## Plots", ""]
        for name, p in plots:
            target = out_path / f"{stem}-{p.stem}.png"
            shutil.copyfile(p, target)
            paths[f"plot:{name}:{p.stem}"] = target
            lines += [f"![{name}: {p.stem}]({target.name})", ""]
        atomic_write_text(paths["md"], "\n".join(lines))
        atomic_write_json(paths["json"], {"mode": mode, "seed": seed, "wall_s": wall,
                                          "claims": [{k: c[k] for k in ("claim", "dataset", "met", "value")}
                                                     | {"part": c["part"]} for c in claims],
                                          "results": results})
        _plot_claims(claims, paths["png"], stem)
    return {"claims": claims, "parts": results, "paths": paths}


def parts_main(stem: str, prefix: str, all_parts: Sequence[str], title: str, description: str,
               argv: Sequence[str] | None = None) -> int:
    """``fewflow bench STEM [--quick|--full|--smoke] [--parts a,b,...]``."""
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ap = argparse.ArgumentParser(prog=f"fewflow bench {stem}", description=description)
    add_common_args(ap, stem, "unused here")
    ap.add_argument("--parts", default=",".join(all_parts), help=f"comma-separated: {', '.join(all_parts)}")
    ap.set_defaults(mode="quick")
    a = ap.parse_args(list(argv) if argv is not None else None)
    out = run_parts(stem, prefix, all_parts, title, a.mode, tuple(p for p in a.parts.split(",") if p),
                    cache_dir=a.cache, out_dir=a.out, seed=a.seed, verbose=not a.quiet)
    for c in out["claims"]:
        print(f"claim [{c['part']}/{c['dataset']}] {c['claim']}: {'MET' if c['met'] else 'NOT MET'} "
              f"({c['value']})")
    if out["paths"]:
        print("wrote", ", ".join(str(p) for p in out["paths"].values()))
    return 0
