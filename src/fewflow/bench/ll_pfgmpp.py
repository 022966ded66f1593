"""Benchmark part: PFGM++ on 8x8 digits, augmented dimensions D against robustness ("PFGM++: Unlocking the
Potential of Physics-Inspired Generative Models", Xu et al., arXiv 2302.04265).

One unconditional ``pfgmpp`` run per D in {16, 64, 256, 2048, inf} (``D = inf`` is EDM), identical
networks, steps and seeds, trained by :func:`fewflow.runs.train_run` into ``cache`` (a ``DONE`` marker; a
rerun resumes). Each run is sampled through :func:`fewflow.sampling.generate` (the method's EDM Heun sampler
from the PFGM++ prior) from the same standard Gaussian draws, and scored by the digits classifier's
Frechet distance (:func:`fewflow.evaluate.score`, "FD-digits") against the test split:

* at several NFE budgets (2 K + 1 evaluations for K Heun steps), no injected noise;
* at the paper's robustness test, ``x += alpha sigma eps`` before every step (the official
  ``generate_alpha.py``), at the largest NFE.

The paper's claims at our scale: a moderate D (here D = 64 = N, fixed before running) is more robust than
D = inf to injected noise and to few sampling steps; and a large D (2048) behaves like D = inf (the
alignment r = sigma sqrt(D)). Rows are cached as JSON under ``cache``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import torch

from fewflow._validate import FewflowError
from fewflow.bench.common import cached_row, format_table, train_once

__all__ = ["SIZES", "part"]

TITLE = "PFGM++ on digits: augmented dimensions D vs robustness (arXiv 2302.04265)"
VERSION = 1
MODERATE = 64.0  # the "moderate D" of the claims (D = N = 64 pixels), fixed before any run

# per mode: the Ds trained, steps, network, evaluation sizes, NFE budgets, noise-injection levels
SIZES: dict[str, dict[str, Any]] = {
    "smoke": {"Ds": (64.0, math.inf), "steps": 30, "hidden": 64, "depth": 2, "batch": 64, "n_eval": 200,
              "nfes": (5, 9), "alphas": (0.0, 0.2)},
    "quick": {"Ds": (16.0, 64.0, 256.0, 2048.0, math.inf), "steps": 400, "hidden": 256, "depth": 3,
              "batch": 128, "n_eval": 500, "nfes": (5, 9, 35), "alphas": (0.0, 0.1, 0.2)},
    "full": {"Ds": (16.0, 64.0, 256.0, 2048.0, math.inf), "steps": 3000, "hidden": 512, "depth": 4,
             "batch": 256, "n_eval": 2000, "nfes": (5, 9, 17, 35), "alphas": (0.0, 0.05, 0.1, 0.2)},
}


def _say(verbose: bool, msg: str) -> None:
    if verbose:
        print(msg, flush=True)


def _dname(D: float) -> str:
    return "inf" if math.isinf(D) else str(int(D))


def _trained(cache: Path, D: float, s: dict[str, Any], seed: int, verbose: bool) -> tuple[Any, Any]:
    """Train (or resume, or load) the run of ``D``; returns ``(ema model, RunConfig)``."""
    from fewflow.config import default_config
    from fewflow.runs import load_run

    def make() -> Any:
        rc = default_config("digits", "pfgmpp")
        rc.method = {"name": "pfgmpp", "D": "inf" if math.isinf(D) else float(D), "backbone": "mlp",
                     "hidden": s["hidden"], "depth": s["depth"]}
        rc.objective.conditional = False
        rc.objective.label_dropout = 0.0
        return rc

    root = cache / f"D{_dname(D)}"
    train_once(root, make, steps=s["steps"], batch_size=s["batch"], seed=seed, lr=1e-3,
               say=(lambda m: _say(verbose, m)), label=f"D={_dname(D)}")
    return load_run(root)


def _fd(model: Any, rc: Any, z: torch.Tensor, ref: torch.Tensor, nfe: int, alpha: float, seed: int) -> float:
    """FD-digits of ``len(z)`` samples of the run at ``nfe`` with injected noise ``alpha``."""
    from fewflow.evaluate import score
    from fewflow.sampling import generate

    cfg = dataclasses.replace(rc, method={**rc.method, "alpha": float(alpha)})
    g = torch.Generator().manual_seed(seed + 7)
    res = generate(model, cfg, z.shape[0], nfe=nfe, x0=z, generator=g, check_finite=False)
    return float(score(res.x, ref, dataset="digits")["fd"])


def _row(D: float, s: dict[str, Any], cache: Path, seed: int, verbose: bool) -> dict[str, Any]:
    from fewflow.data import load_dataset

    model, rc = _trained(cache, D, s, seed, verbose)
    ref = load_dataset("digits", split="test").x
    z = torch.randn(s["n_eval"], *ref.shape[1:], generator=torch.Generator().manual_seed(1000 + seed))
    t0 = time.perf_counter()
    fd_nfe = {str(n): _fd(model, rc, z, ref, n, 0.0, seed) for n in s["nfes"]}
    top = max(s["nfes"])
    fd_alpha = {str(a): _fd(model, rc, z, ref, top, a, seed) for a in s["alphas"]}
    return {"dataset": "digits", "D": _dname(D), "steps": s["steps"], "n_eval": s["n_eval"],
            "fd_nfe": fd_nfe, "fd_alpha": fd_alpha, "alpha_nfe": top,
            "eval_wall_s": round(time.perf_counter() - t0, 1)}


def _claims(rows: list[dict[str, Any]], s: dict[str, Any]) -> list[dict[str, Any]]:
    by = {r["D"]: r for r in rows}
    mod, inf = by.get(_dname(MODERATE)), by.get("inf")
    out: list[dict[str, Any]] = []
    if mod is None or inf is None:
        return out
    a_top, n_low, n_top = str(max(s["alphas"])), str(min(s["nfes"])), str(max(s["nfes"]))
    fm, fi = mod["fd_alpha"][a_top], inf["fd_alpha"][a_top]
    out.append({
        "claim": f"with injected noise (alpha = {a_top}, {n_top} NFE) D = {_dname(MODERATE)} has a lower "
                 "FD-digits than D = inf (EDM): moderate D is more robust",
        "dataset": "digits", "met": bool(fm < fi),
        "value": f"FD {fm:.3g} (D={_dname(MODERATE)}) vs {fi:.3g} (D=inf)",
    })
    fm, fi = mod["fd_nfe"][n_low], inf["fd_nfe"][n_low]
    out.append({
        "claim": f"at the lowest budget ({n_low} NFE) D = {_dname(MODERATE)} has a lower FD-digits than "
                 "D = inf",
        "dataset": "digits", "met": bool(fm < fi),
        "value": f"FD {fm:.3g} (D={_dname(MODERATE)}) vs {fi:.3g} (D=inf)",
    })
    big = by.get("2048")
    if big is not None:
        fb, fi = big["fd_nfe"][n_top], inf["fd_nfe"][n_top]
        out.append({
            "claim": f"D = 2048 behaves like D = inf at {n_top} NFE (FD-digits within 25 %)",
            "dataset": "digits", "met": bool(abs(fb - fi) <= 0.25 * fi),
            "value": f"FD {fb:.3g} (D=2048) vs {fi:.3g} (D=inf)",
        })
    return out


def part(mode: str, cache: Path, seed: int = 0, verbose: bool = True) -> dict[str, Any]:
    """Run the PFGM++ part in ``mode`` ("smoke", "quick" or "full"); see the module docstring."""
    if mode not in SIZES:
        raise FewflowError(f"mode must be one of {list(SIZES)}, got {mode!r}")
    torch.set_num_threads(1)
    s = SIZES[mode]
    cache = Path(cache) / "ll_pfgmpp" / f"{mode}-v{VERSION}-seed{seed}"
    rows = []
    for D in s["Ds"]:
        t0 = time.perf_counter()
        row = cached_row(cache / "rows", f"D{_dname(D)}", lambda D=D: _row(D, s, cache, seed, verbose))
        rows.append(row)
        _say(verbose, f"  D={row['D']}: FD by NFE {row['fd_nfe']}, by alpha {row['fd_alpha']} "
                      f"({time.perf_counter() - t0:.0f} s)")
    claims = _claims(rows, s)
    nfes, alphas = [str(n) for n in s["nfes"]], [str(a) for a in s["alphas"]]
    top = max(s["nfes"])
    table = format_table(
        ["D", *[f"FD @ {n} NFE" for n in nfes], *[f"FD alpha={a} @ {top}" for a in alphas if a != "0.0"]],
        [[r["D"], *[r["fd_nfe"][n] for n in nfes], *[r["fd_alpha"][a] for a in alphas if a != "0.0"]]
         for r in rows],
    )
    lines = [
        f"## {TITLE}",
        "",
        f"Unconditional `pfgmpp` runs on 8x8 digits (MLP {s['hidden']}x{s['depth']}, {s['steps']} steps, "
        f"EDM defaults: sigma in [0.002, 80], rho 7, ln sigma ~ N(-1.2, 1.2^2); mode {mode}). FD-digits of "
        f"{s['n_eval']} samples from the same Gaussian draws (each D's prior is a scale mixture of them) "
        "against the test split; NFE = 2 K + 1 for K Heun steps; alpha: noise x += alpha sigma eps injected "
        "before every step (the paper's robustness test).",
        "",
        table,
        "",
    ]
    return {"rows": rows, "claims": claims, "lines": lines}
