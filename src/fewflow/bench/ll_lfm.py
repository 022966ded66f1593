"""Benchmark part: flow matching in pixel space against flow matching in an autoencoder's latent space
("Flow Matching in Latent Space", Dao, Phung, Nguyen, Tran; arXiv 2307.08698).

On 8x8 digits (smoke and quick modes) or 28x28 MNIST (full mode; ``fewflow fetch mnist`` first),
unconditional, three runs trained by :func:`fewflow.runs.train_run` into ``cache`` (a
``DONE`` marker; a rerun resumes):

* ``autoencoder``: fewflow's convolutional autoencoder (method ``autoencoder``; a 1 x 4 x 4 latent, 16
  numbers for 64 pixels on digits, 4 x 8 x 8 = 256 numbers for MNIST's 784: the small version of LFM's
  frozen SD VAE);
* ``pixel``: ``cfm`` with fewflow's residual MLP on the pixels;
* ``latent``: the same ``cfm`` and MLP (same width, depth, steps, batch, learning rate) on the scaled latents
  (``RunConfig.latent``: data encoded once, scale ``1 / std``), samples decoded.

Each is scored with :func:`fewflow.evaluate.evaluate_run` (the data set's classifier's Frechet distance,
Euler at several NFE, against the same held-out half of the data and its two-sample floor); the
autoencoder's own cap is the FD of reconstructions ``D(E(x))`` of the other half. The LFM effects checked
(thresholds fixed before any run): latent FM is at least as good as pixel FM at few steps (NFE 4); it
degrades less from its largest NFE to NFE 2; and its quality is capped by the autoencoder (its best FD is
no better than the reconstructions'). Result rows are cached as JSON.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from fewflow._io import atomic_write_json
from fewflow._validate import FewflowError
from fewflow.bench.common import format_table, train_once

__all__ = ["SIZES", "part"]

TITLE = "Flow matching in latent space (LFM; Dao et al., arXiv 2307.08698)"
VERSION = 2

# per mode: training steps, network sizes, evaluation size and NFE budgets
SIZES: dict[str, dict[str, Any]] = {
    "smoke": {"dataset": "digits", "ae_steps": 40, "fm_steps": 40, "batch": 64, "ae_width": 8, "hidden": 64,
              "depth": 2, "n_eval": 200, "nfes": (2, 4, 8)},
    "quick": {"dataset": "digits", "ae_steps": 500, "fm_steps": 1500, "batch": 256, "ae_width": 16,
              "hidden": 256, "depth": 3, "n_eval": 800, "nfes": (1, 2, 4, 8, 32)},
    "full": {"dataset": "mnist", "ae_steps": 1000, "fm_steps": 2000, "batch": 256, "ae_width": 16,
             "hidden": 512, "depth": 3, "n_eval": 2000, "nfes": (1, 2, 4, 8, 32, 100)},
}
FEW_NFE = 4  # the "few steps" budget of the first claim


def _say(verbose: bool, msg: str) -> None:
    if verbose:
        print(msg, flush=True)


def _trained(root: Path, method: str, size: dict[str, Any], seed: int, verbose: bool, *,
             steps: int, latent: Path | None = None) -> tuple[Any, Any, float]:
    """Train (or resume, or load) a run under ``root``; returns ``(ema model, RunConfig, train seconds)``."""
    from fewflow.config import default_config
    from fewflow.runs import load_run

    def make() -> Any:
        rc = default_config(size["dataset"], method)
        rc.objective.conditional, rc.objective.label_dropout = False, 0.0
        if method == "autoencoder":
            rc.method = {"name": method, "width": size["ae_width"]}
        else:
            rc.model = {"type": "MLP", "hidden": size["hidden"], "depth": size["depth"]}
            rc.latent = str(latent) if latent is not None else None
        return rc

    secs = train_once(root, make, steps=steps, batch_size=size["batch"], seed=seed,
                      say=(lambda m: _say(verbose, m)))
    model, rc = load_run(root)
    return model, rc, secs


def _rows(mode: str, cache: Path, seed: int, verbose: bool) -> list[dict[str, Any]]:
    from fewflow.evaluate import evaluate_run, score
    from fewflow.runs import build_data

    size = SIZES[mode]
    dataset = size["dataset"]
    root = cache / "runs"
    ae, ae_rc, ae_s = _trained(root / "autoencoder", "autoencoder", size, seed, verbose,
                               steps=size["ae_steps"])
    runs = {
        "pixel": _trained(root / "pixel", "cfm", size, seed, verbose, steps=size["fm_steps"]),
        "latent": _trained(root / "latent", "cfm", size, seed, verbose, steps=size["fm_steps"],
                           latent=root / "autoencoder"),
    }
    rows: list[dict[str, Any]] = []
    n = int(size["n_eval"])
    floor = None
    for space, (model, rc, secs) in runs.items():
        rep = evaluate_run(model, rc, nfes=size["nfes"], n=n, seed=seed)
        floor = rep["floor"]["fd"]
        shape = "x".join(str(v) for v in rc.meta["shape"])
        for r in rep["results"]:
            rows.append({"dataset": dataset, "space": space, "model_input": shape, "nfe": int(r["nfe"]),
                         "fd": float(r["fd"]), "fd_floor": float(floor), "train_s": secs,
                         "train_steps": int(size["fm_steps"])})
        _say(verbose, f"  {space}: " + ", ".join(f"NFE {r['nfe']} FD {r['fd']:.3g}" for r in rep["results"]))
    # the autoencoder's cap: reconstructions of the held-out half scored like the samples (evaluate_run's
    # split: the same seeded permutation, reference = first n, floor sample = next n)
    real = build_data(ae_rc, n=None)
    n = min(n, real.x.shape[0] // 2)
    perm = torch.randperm(real.x.shape[0], generator=torch.Generator().manual_seed(seed))
    ref, other = real.x[perm[:n]], real.x[perm[n : 2 * n]]
    with torch.no_grad():
        recon = ae(other).recon
    mse = float((recon - other).pow(2).mean())
    fd = score(recon, ref, dataset=dataset, seed=seed)["fd"]
    rows.append({"dataset": dataset, "space": "reconstruction", "model_input": "-", "nfe": 0, "fd": float(fd),
                 "fd_floor": float(floor) if floor is not None else None, "train_s": ae_s,
                 "train_steps": int(size["ae_steps"]), "recon_mse": mse,
                 "data_var": float(real.x.var(0).mean())})
    return rows


def _claims(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    def fd(space: str, nfe: int) -> float:
        return next(r["fd"] for r in rows if r["space"] == space and r["nfe"] == nfe)

    nfes = sorted({r["nfe"] for r in rows if r["space"] == "pixel"})
    top = nfes[-1]
    few = FEW_NFE if FEW_NFE in nfes else nfes[0]
    low = 2 if 2 in nfes else nfes[0]
    recon = next(r["fd"] for r in rows if r["space"] == "reconstruction")
    dataset = rows[0]["dataset"]
    lat_few, pix_few = fd("latent", few), fd("pixel", few)
    lat_deg, pix_deg = fd("latent", low) / fd("latent", top), fd("pixel", low) / fd("pixel", top)
    best_latent = min(fd("latent", k) for k in nfes)
    return [
        {"claim": f"LFM: flow matching in the autoencoder's latent space is at least as good as in pixel "
                  f"space at few steps (FD, Euler NFE {few}; same MLP, steps and batch)",
         "dataset": dataset, "met": bool(lat_few <= pix_few),
         "value": f"latent {lat_few:.3g} vs pixel {pix_few:.3g}"},
        {"claim": f"LFM: latent flows need fewer steps: FD(NFE {low}) / FD(NFE {top}) is smaller in latent "
                  "space",
         "dataset": dataset, "met": bool(lat_deg < pix_deg),
         "value": f"latent x{lat_deg:.2f} vs pixel x{pix_deg:.2f}"},
        {"claim": "LFM: latent sample quality is capped by the autoencoder (best latent FD >= FD of "
                  "reconstructions D(E(x)) of held-out data)",
         "dataset": dataset, "met": bool(best_latent >= recon),
         "value": f"best latent {best_latent:.3g} vs reconstructions {recon:.3g}"},
    ]


def _lines(rows: list[dict[str, Any]], claims: list[dict[str, Any]], mode: str) -> list[str]:
    nfes = sorted({r["nfe"] for r in rows if r["space"] == "pixel"})
    table = []
    for space in ("pixel", "latent"):
        rs = {r["nfe"]: r for r in rows if r["space"] == space}
        first = next(iter(rs.values()))
        table.append([space, first["model_input"], *[rs[k]["fd"] for k in nfes], first["train_s"],
                      1e3 * first["train_s"] / max(first["train_steps"], 1)])
    rec = next(r for r in rows if r["space"] == "reconstruction")
    table.append(["AE reconstruction", "-", *[rec["fd"] if k == nfes[-1] else None for k in nfes],
                  rec["train_s"], 1e3 * rec["train_s"] / max(rec["train_steps"], 1)])
    floor = rows[0]["fd_floor"]
    out = [
        f"## {TITLE}",
        "",
        f"{rows[0]['dataset']}, unconditional `cfm` with the same MLP (same steps and batch) in pixel space "
        "and on the latents of a convolutional autoencoder (`fewflow train --method autoencoder`, then "
        f"`--latent`); FD in the data set's classifier's features at Euler NFE (two-sample floor "
        f"{floor:.3g}); mode `{mode}`. The reconstruction row is the autoencoder's cap, D(E(x)) of held-out "
        f"images (recon MSE "
        f"{rec['recon_mse']:.3g}, pixel variance {rec['data_var']:.3g}).",
        "",
        *format_table(["space", "model input", *[f"FD NFE {k}" for k in nfes], "train s", "ms/step"],
                      table).splitlines(),
        "",
        *format_table(["claim", "met", "value"], [[c["claim"], c["met"], c["value"]] for c in claims]
                      ).splitlines(),
        "",
    ]
    return out


def part(mode: str, cache: Path, seed: int = 0, verbose: bool = True) -> dict[str, Any]:
    """Run (or read back) the LFM part: ``{"rows", "claims", "lines"}`` (module docstring). ``mode``:
    ``smoke`` (seconds), ``quick`` (about a minute on one core) or ``full`` (several minutes)."""
    if mode not in SIZES:
        raise FewflowError(f"unknown mode {mode!r}; choose one of {', '.join(SIZES)}")
    root = Path(cache) / "lfm" / f"{mode}-s{seed}"
    path = root / f"rows-v{VERSION}.json"
    if path.exists():
        rows = json.loads(path.read_text())
    else:
        _say(verbose, f"{TITLE} [{mode}]")
        rows = _rows(mode, root, seed, verbose)
        atomic_write_json(path, rows)
    claims = _claims(rows)
    return {"rows": rows, "claims": claims, "lines": _lines(rows, claims, mode)}
