"""Pretrained folders: one trained model in a folder laid out like a Hugging Face Hub model repository.

A pretrained folder holds exactly three files:

* ``model.safetensors`` -- the chosen weights (EMA by default) of the network, nothing else;
* ``config.json`` -- the run config that rebuilds and samples the network (method, model config, meta with
  the data shape, classes, normalization, sampler defaults, ...) plus ``"format": "fewflow-pretrained-1"``,
  ``"fewflow_version"`` and ``"weights"`` (which weights, and their sha256);
* ``README.md`` -- a model card (YAML front matter ``library_name: fewflow``) naming the data set, the
  method and its paper, the default sampler and, when given, a table of evaluation metrics.

Nothing is pickled and nothing is downloaded::

    save_pretrained("runs/mf", "export/mf")
    model, cfg = from_pretrained("export/mf")
    x = fewflow.sampling.generate(model, cfg, 16).x   # the same samples as the run for the same seed
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fewflow._io import atomic_path, json_default, sha256_file
from fewflow._validate import FewflowError
from fewflow.config import RunConfig
from fewflow.methods import get_method

__all__ = ["CONFIG_FILE", "CARD_FILE", "FORMAT", "WEIGHTS_FILE", "from_pretrained", "is_pretrained",
           "model_card", "save_pretrained"]

FORMAT = "fewflow-pretrained-1"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
_EXTRA_KEYS = ("format", "fewflow_version", "weights")


def _version() -> str:
    from fewflow import __version__

    return str(__version__)


def is_pretrained(folder: str | Path) -> bool:
    """Whether ``folder/config.json`` is a pretrained-folder config (``"format": "fewflow-pretrained-1"``)."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        return False
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(doc, dict) and doc.get("format") == FORMAT


def _check_exportable(cfg: RunConfig, run_dir: Path) -> None:
    """One clear error when the run needs something outside its own weights to sample."""
    if cfg.meta.get("latent") or cfg.latent:
        raise FewflowError(
            f"{run_dir} is a latent run (it samples through the decoder of the autoencoder run "
            f"{cfg.latent or cfg.meta['latent'].get('ae_run')}): latent runs are not exportable to a "
            "pretrained folder yet"
        )
    spec = get_method(cfg.method_name)
    if spec.sampling is not None and spec.needs.teacher != "none" and spec.needs.model == "custom" \
            and cfg.teacher:
        raise FewflowError(
            f"{run_dir} is a {spec.name!r} run, which needs its teacher {cfg.teacher} at sampling time: "
            "runs that sample with a teacher are not exportable to a pretrained folder yet"
        )


def _check_out_dir(out: Path, run_dir: Path) -> None:
    if out.resolve() == run_dir.resolve():
        raise FewflowError(f"the pretrained folder must not be the run folder itself ({out})")
    if out.exists() and not out.is_dir():
        raise FewflowError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not is_pretrained(out):
        raise FewflowError(f"{out} is a non-empty folder that is not a fewflow pretrained folder; "
                           "pick an empty or new folder")


def save_pretrained(run_dir: str | Path, out_dir: str | Path, *, which: str = "ema",
                    metrics: Any = None) -> Path:
    """Write the ``which`` weights (``"ema"`` or ``"model"``) of the run in ``run_dir`` as a pretrained
    folder ``out_dir`` (module docstring); returns ``out_dir``. The folder is written atomically (an older
    pretrained folder there is replaced whole). ``metrics``: an :func:`fewflow.evaluate.evaluate_run`
    report (or its ``results`` rows) to put in the model card. Latent runs and runs that need a teacher at
    sampling time are refused with one :class:`FewflowError`."""
    from safetensors.torch import save_file

    from fewflow.runs import load_run

    run_dir, out = Path(run_dir), Path(out_dir)
    if which not in ("ema", "model"):
        raise FewflowError(f"which must be 'ema' or 'model', got {which!r}")
    model, cfg = load_run(run_dir, which=which, device="cpu")
    _check_exportable(cfg, run_dir)
    _check_out_dir(out, run_dir)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    doc: dict[str, Any] = {"format": FORMAT, "fewflow_version": _version(), **cfg.to_dict()}
    with atomic_path(out) as tmp:
        tmp.mkdir()
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT, "which": which})
        doc["weights"] = {"file": WEIGHTS_FILE, "which": which, "sha256": sha256_file(tmp / WEIGHTS_FILE),
                          "parameters": int(sum(p.numel() for p in model.parameters()))}
        (tmp / CONFIG_FILE).write_text(json.dumps(doc, indent=1, default=json_default, allow_nan=False))
        (tmp / CARD_FILE).write_text(model_card(cfg, which=which, metrics=metrics))
    return out


def _read_config(folder: Path) -> tuple[dict[str, Any], RunConfig]:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise FewflowError(f"no {CONFIG_FILE}")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FewflowError(f"{CONFIG_FILE} does not parse ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        got = doc.get("format") if isinstance(doc, dict) else None
        raise FewflowError(f"{CONFIG_FILE} is not a {FORMAT} config (format {got!r}); a fewflow run folder "
                           "loads with fewflow.runs.load_run")
    rc = {k: v for k, v in doc.items() if k not in _EXTRA_KEYS}
    return doc, RunConfig.from_dict(rc)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def from_pretrained(
    folder: str | Path, device: str | torch.device | None = None
) -> tuple[nn.Module, RunConfig]:
    """``(model in eval mode, RunConfig)`` of a pretrained folder written by :func:`save_pretrained`: the
    network is rebuilt from ``config.json`` and loaded with ``model.safetensors`` (its sha256 checked
    against the config, every key and shape checked). Any problem (a missing or corrupt file, another
    format, a config edited to describe another network) is one :class:`FewflowError`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from fewflow.runs import build_model
    from fewflow.train.checkpoint import load_state_into

    folder = Path(folder)
    if not folder.is_dir():
        raise FewflowError(f"pretrained folder not found: {folder}")
    try:
        doc, cfg = _read_config(folder)
        weights = folder / WEIGHTS_FILE
        if not weights.is_file():
            raise FewflowError(f"{WEIGHTS_FILE} is missing")
        want = (doc.get("weights") or {}).get("sha256")
        if want is not None and sha256_file(weights) != want:
            raise FewflowError(f"{WEIGHTS_FILE} is corrupt (its sha256 is not the one in {CONFIG_FILE})")
        try:
            state = load_file(str(weights), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise FewflowError(f"{WEIGHTS_FILE} does not parse ({_first_line(e)})") from None
        model = build_model(cfg)
        load_state_into(model, state, what=WEIGHTS_FILE)
    except FewflowError as e:
        raise FewflowError(f"cannot load the pretrained folder {folder}: {_first_line(e)}") from None
    if device is not None:
        model = model.to(device)
    model.eval()
    return model, cfg


# --------------------------------------------------------------------------- model card


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return "" if v is None else str(v)
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return str(v)


def _metrics_table(metrics: Any) -> list[str]:
    rows = metrics.get("results", []) if isinstance(metrics, dict) else list(metrics or [])
    rows = [r for r in rows if isinstance(r, dict)]
    if not rows:
        return []
    names = list(metrics.get("metrics", [])) if isinstance(metrics, dict) else []
    if not names:
        names = [k for k in rows[0] if k not in ("solver", "nfe", "steps", "ratio", "straightness",
                                                   "wall_time_s")]
    cols = ["solver", "nfe", *names] + (["ratio"] if any(r.get("ratio") is not None for r in rows) else [])
    out = ["| " + " | ".join("NFE" if c == "nfe" else c for c in cols) + " |",
           "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    if isinstance(metrics, dict):
        primary, floor = metrics.get("primary"), metrics.get("floor") or {}
        extra = f" ({metrics['n']} samples)" if metrics.get("n") else ""
        if primary and primary in floor:
            out += ["", f"Two-sample floor of {primary} on real data{extra}: {_fmt(floor[primary])}; ratio = "
                    f"{primary} / floor."]
    return out


def model_card(cfg: RunConfig, *, which: str = "ema", metrics: Any = None) -> str:
    """The ``README.md`` of a pretrained folder: YAML front matter for the Hub, then what the model is."""
    spec = get_method(cfg.method_name)
    meta = cfg.meta
    nfe = cfg.sampler.nfe if cfg.sampler.nfe is not None else spec.sampler.nfe
    stepper = cfg.sampler.stepper or spec.sampler.stepper
    grid = cfg.sampler.grid or spec.sampler.grid
    data = cfg.data.name
    lines = [
        "---",
        "library_name: fewflow",
        "tags:",
        "- flow-matching",
        "- fewflow",
        f"- {spec.name}",
        "---",
        "",
        f"# {spec.label} on {data}",
        "",
        f"A flow model trained with fewflow {_version()} ({which.upper() if which == 'ema' else 'trained'} "
        "weights).",
        "",
        f"- **Data set:** {data}, samples of shape {tuple(meta.get('shape') or ())}"
        + (f", {meta['num_classes']} classes (class-conditional)" if meta.get("conditional") else "")
        + (", normalized (samples come back in the data's units)" if meta.get("normalization") else ""),
        f"- **Method:** {spec.label} (`{spec.name}`): {spec.summary}",
        f"- **Paper:** {spec.paper}",
        f"- **Network:** {cfg.model.get('type', 'MLP')} "
        f"({', '.join(f'{k}={v}' for k, v in cfg.model.items() if k != 'type')})",
        f"- **Default sampler:** {stepper}, NFE {nfe}" + (f", {grid} time grid" if grid else ""),
        "",
        "## Usage",
        "",
        "```python",
        "from fewflow.pretrained import from_pretrained",
        "from fewflow.sampling import generate",
        "",
        'model, cfg = from_pretrained("path/to/this/folder")',
        f"x = generate(model, cfg, 16, nfe={nfe}).x",
        "```",
        "",
        "or `fewflow sample path/to/this/folder`.",
        "",
    ]
    table = _metrics_table(metrics)
    if table:
        lines += ["## Metrics", "", *table, ""]
    return "\n".join(lines)
