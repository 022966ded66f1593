"""SymmFlow's part of ``fewflow bench likelihood_latent``: one network classifies, segments and generates.

Caetano et al., "Symmetrical Flow Matching: Unified Image Generation, Segmentation, and Classification
with Score-Based Generative Models" (AAAI 2026, arXiv 2506.10634). One ``symmflow`` run (image + one-hot
class + thresholded-digit mask channels, trained through :func:`fewflow.runs.train_run`) is scored on
held-out images for

* classification accuracy (:func:`~fewflow.objectives.symmflow.symm_classify`, 25 Euler steps from the
  semantic noise mean, and from one noise draw as in the paper), beside fewflow's pretrained classifier
  of the data set (a separate single-task model);
* segmentation IoU (:func:`~fewflow.objectives.symmflow.symm_segment`) against the trivial baseline that
  predicts the mean training mask for every image;
* class-conditional generation: FD in classifier features and the classifier's agreement with the
  requested label, against a separate class-conditional CFM U-Net trained for the same steps.

Runs are cached under ``cache`` (a ``DONE`` marker per run; a rerun resumes), result rows as JSON.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from fewflow._io import atomic_write_json
from fewflow.bench.common import format_table, train_once

__all__ = ["SIZES", "part"]

# per mode and data set: training steps (both runs), batch, U-Net width, held-out images scored, Euler steps
SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "smoke": {"digits": {"steps": 40, "batch": 32, "base": 16, "n_eval": 100, "nfe": 10}},
    "quick": {"digits": {"steps": 200, "batch": 128, "base": 32, "n_eval": 300, "nfe": 25}},
    "full": {"digits": {"steps": 800, "batch": 128, "base": 32, "n_eval": 1000, "nfe": 25},
             "mnist": {"steps": 300, "batch": 32, "base": 16, "n_eval": 300, "nfe": 25}},
}


def _say(verbose: bool, msg: str) -> None:
    if verbose:
        print(msg, flush=True)


def _trained(root: Path, data: str, method: str, size: dict[str, Any], seed: int, verbose: bool) -> Any:
    """Train (or resume, or load) one run in ``root``; returns ``(ema model, RunConfig)``."""
    from fewflow.config import default_config
    from fewflow.runs import load_run

    def make() -> Any:
        rc = default_config(data, method)
        if method == "symmflow":
            rc.method = {"name": method, "base": size["base"]}
        else:
            rc.method = {"name": method}
            rc.model = {"type": "UNet", "base": size["base"], "mults": [1, 2]}
        rc.objective.conditional = True
        return rc

    train_once(root, make, steps=size["steps"], batch_size=size["batch"], seed=seed,
               say=(lambda m: _say(verbose, m)), label=f"{data}/{method}")
    return load_run(root)


def _row(data: str, size: dict[str, Any], root: Path, seed: int, verbose: bool) -> dict[str, Any]:
    from fewflow.data import load_dataset
    from fewflow.evaluate import score
    from fewflow.metrics import classifier_accuracy
    from fewflow.models.symm import digit_masks
    from fewflow.objectives.symmflow import mask_iou, symm_classify, symm_segment
    from fewflow.sampling import generate

    t0 = time.perf_counter()
    tag = f"s{size['steps']}-b{size['batch']}-w{size['base']}-seed{seed}"
    sym, rc = _trained(root / f"{data}-symmflow-{tag}", data, "symmflow", size, seed, verbose)
    cfm, rc_cfm = _trained(root / f"{data}-cfm-{tag}", data, "cfm", size, seed, verbose)
    tr, te = load_dataset(data), load_dataset(data, split="test")
    n, nfe = min(size["n_eval"], te.x.shape[0]), size["nfe"]
    x, y = te.x[:n], te.y[:n]
    g = torch.Generator().manual_seed(seed)
    acc = {s: float((symm_classify(sym, x, nfe, start=s, generator=g).argmax(1) == y).float().mean())
           for s in ("mean", "noise")}
    target = digit_masks(x, tr.value_range)
    iou = {s: float(mask_iou(symm_segment(sym, x, nfe, start=s, generator=g), target).mean())
           for s in ("mean", "noise")}
    prior = digit_masks(tr.x, tr.value_range).float().mean(0, keepdim=True) > 0.5
    trivial = float(mask_iou(prior.expand_as(target), target).mean())
    labels = torch.arange(n) % int(tr.num_classes)
    gen = {}
    for name, (model, cfg) in (("symmflow", (sym, rc)), ("cfm", (cfm, rc_cfm))):
        xs = generate(model, cfg, n, nfe=nfe, label=labels, generator=torch.Generator().manual_seed(seed)).x
        gen[name] = score(xs, te.x[:n], dataset=data, y=labels)
    return {
        "dataset": data, "steps": size["steps"], "n_eval": n, "nfe": nfe,
        "acc_mean_start": acc["mean"], "acc_noise_start": acc["noise"],
        "acc_classifier": float(classifier_accuracy(x, y, dataset=data)),
        "iou_mean_start": iou["mean"], "iou_noise_start": iou["noise"], "iou_mean_mask": trivial,
        "fd_symmflow": gen["symmflow"]["fd"], "label_acc_symmflow": gen["symmflow"]["accuracy"],
        "fd_cfm": gen["cfm"]["fd"], "label_acc_cfm": gen["cfm"]["accuracy"],
        "seconds": round(time.perf_counter() - t0, 1),
    }


def _available(data: str) -> bool:
    from fewflow.data import load_dataset

    try:
        load_dataset(data, n=16)
        return True
    except Exception:  # noqa: BLE001 - a data set not fetched is skipped
        return False


def part(mode: str, cache: Path, seed: int = 0, verbose: bool = True) -> dict[str, Any]:
    """Rows, claims and markdown lines of the SymmFlow part (module docstring)."""
    from fewflow._validate import FewflowError

    if mode not in SIZES:
        raise FewflowError(f"mode must be one of {list(SIZES)}, got {mode!r}")
    torch.set_num_threads(1)
    root = Path(cache) / "ll_symmflow" / mode
    rows, claims = [], []
    for data, size in SIZES[mode].items():
        if data != "digits" and not _available(data):
            _say(verbose, f"  symmflow: {data} not fetched (fewflow fetch {data}); skipped")
            continue
        key = f"{data}-s{size['steps']}-b{size['batch']}-w{size['base']}-e{size['n_eval']}-seed{seed}"
        path = root / "rows" / f"{key}.json"
        if path.exists():
            row = json.loads(path.read_text())
        else:
            row = _row(data, size, root, seed, verbose)
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(path, row)
        rows.append(row)
        claims += [
            {"claim": "one SymmFlow network classifies held-out images at >= 80% accuracy", "dataset": data,
             "met": bool(row["acc_mean_start"] >= 0.8),
             "value": f"{row['acc_mean_start']:.3f} (noise start {row['acc_noise_start']:.3f}; "
                      f"pretrained classifier {row['acc_classifier']:.3f})"},
            {"claim": "the same network segments (thresholded-digit masks) with IoU >= the mean-mask "
                      "baseline + 0.2", "dataset": data,
             "met": bool(row["iou_mean_start"] >= row["iou_mean_mask"] + 0.2),
             "value": f"{row['iou_mean_start']:.3f} vs {row['iou_mean_mask']:.3f} "
                      f"(noise start {row['iou_noise_start']:.3f})"},
            {"claim": "the same network's class-conditional samples reach FD <= 1.5x a separate CFM "
                      "generator at equal steps", "dataset": data,
             "met": bool(row["fd_symmflow"] <= 1.5 * row["fd_cfm"]),
             "value": f"FD {row['fd_symmflow']:.3g} vs {row['fd_cfm']:.3g}; label agreement "
                      f"{row['label_acc_symmflow']:.3f} vs {row['label_acc_cfm']:.3f}"},
        ]
    table = format_table(
        ["data", "steps", "acc (mean start)", "acc (noise start)", "classifier acc", "IoU (mean start)",
         "IoU (noise start)", "IoU mean mask", "FD SymmFlow", "FD CFM", "label acc SymmFlow",
         "label acc CFM"],
        [[r["dataset"], r["steps"], r["acc_mean_start"], r["acc_noise_start"], r["acc_classifier"],
          r["iou_mean_start"], r["iou_noise_start"], r["iou_mean_mask"], r["fd_symmflow"], r["fd_cfm"],
          r["label_acc_symmflow"], r["label_acc_cfm"]] for r in rows],
    )
    lines = [
        "## SymmFlow: classification, segmentation and generation with one network",
        "",
        "Caetano et al., Symmetrical Flow Matching (2506.10634). One `symmflow` U-Net over image + one-hot "
        "class + mask channels; classification and segmentation integrate from the image (t = 1 -> 0, "
        f"{rows[0]['nfe'] if rows else 25} Euler steps) from the semantic noise mean and from one noise "
        "draw (the paper's); "
        "generation is scored against a separate class-conditional CFM U-Net trained for the same steps.",
        "",
        table,
        "",
    ]
    return {"rows": rows, "claims": claims, "lines": lines}
