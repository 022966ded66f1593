"""Checkpoints: safetensors for tensors, JSON for everything else, written atomically, verified on load.

Layout of a run folder::

    run_dir/
      config.json              {"run_config": ..., "train_config": ..., "fewflow_version": ...}
      latest                   the name of the newest complete checkpoint folder (one line, exactly
                               ckpt-<step>: anything else, e.g. ../x or an absolute path, is refused)
      diverged-<step>/         the Trainer's state when step <step> had a non-finite loss (no checkpoint)
      ckpt-<step>/
        model.safetensors      the trained weights (state_dict keys)
        ema.safetensors        the EMA weights (when EMA is on)
        train_state.safetensors  optimiser / scheduler / RNG / trainer tensors ("optimizer/...", ...)
        meta.json              step, sha256 + size of each file, the JSON skeletons of the nested states

Nested states (an optimiser ``state_dict()``, RNG states, ...) are flattened by :func:`flatten_state`: every
tensor goes into the safetensors file under a path-like key and the rest of the structure stays JSON, with
``{"__tensor__": key}`` where a tensor was. Nothing is ever unpickled. A folder is first written under a
temporary name and then moved into place with ``os.replace``; ``latest`` is replaced the same way, so a run
killed at any moment leaves the previous checkpoint intact; the temps such a kill leaves are removed by the
next :func:`save_checkpoint` into the same folder (see :mod:`fewflow._io`).

Longer than fewflow's ~400-line guide on purpose: one on-disk format: writing, verifying and reading it
stay together.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from fewflow._io import atomic_path, atomic_write_text, clean_stale_temps, sha256_file
from fewflow._validate import FewflowError

FORMAT = "fewflow-checkpoint"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
LATEST_FILE = "latest"
META_FILE = "meta.json"
_CKPT_RE = re.compile(r"^ckpt-(\d+)$")


# ----------------------------------------------------------------------------------------------- flattening
def flatten_state(obj: Any, prefix: str = "") -> tuple[dict[str, Tensor], Any]:
    """Split a nested structure into ``(tensors, skeleton)``: tensors keyed by path, the rest JSON-ready.

    Dicts with string keys stay dicts; other dicts (e.g. the int keys of an optimiser state) become
    ``{"__dict__": [[key, value], ...]}``; tuples become ``{"__tuple__": [...]}``; tensors become
    ``{"__tensor__": key}``. :func:`unflatten_state` inverts it exactly.
    """
    tensors: dict[str, Tensor] = {}

    def enc(o: Any, path: str) -> Any:
        if torch.is_tensor(o):
            key = path or "tensor"
            tensors[key] = o.detach().to("cpu").clone().contiguous()
            return {"__tensor__": key}
        if isinstance(o, bool) or o is None or isinstance(o, (int, float, str)):
            return o
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return enc(torch.from_numpy(np.ascontiguousarray(o)), path)
        if isinstance(o, Mapping):
            if all(isinstance(k, str) and not k.startswith("__") for k in o):
                return {k: enc(v, f"{path}/{k}" if path else k) for k, v in o.items()}
            items = []
            for k, v in o.items():
                if not isinstance(k, (str, int, float, bool)) and k is not None:
                    raise FewflowError(f"cannot save state key {k!r} of type {type(k).__name__} at {path!r}")
                items.append([k, enc(v, f"{path}/{k}" if path else str(k))])
            return {"__dict__": items}
        if isinstance(o, tuple):
            return {"__tuple__": [enc(v, f"{path}/{i}") for i, v in enumerate(o)]}
        if isinstance(o, list):
            return [enc(v, f"{path}/{i}") for i, v in enumerate(o)]
        raise FewflowError(
            f"cannot save state value of type {type(o).__name__} at {path!r} (not a tensor or JSON)"
        )

    return tensors, enc(obj, prefix)


def unflatten_state(skeleton: Any, tensors: Mapping[str, Tensor]) -> Any:
    """Inverse of :func:`flatten_state`."""
    if isinstance(skeleton, list):
        return [unflatten_state(v, tensors) for v in skeleton]
    if isinstance(skeleton, dict):
        if set(skeleton) == {"__tensor__"}:
            key = skeleton["__tensor__"]
            if key not in tensors:
                raise FewflowError(f"checkpoint state refers to tensor {key!r} which is missing")
            return tensors[key]
        if set(skeleton) == {"__tuple__"}:
            return tuple(unflatten_state(v, tensors) for v in skeleton["__tuple__"])
        if set(skeleton) == {"__dict__"}:
            return {k: unflatten_state(v, tensors) for k, v in skeleton["__dict__"]}
        return {k: unflatten_state(v, tensors) for k, v in skeleton.items()}
    return skeleton


# ----------------------------------------------------------------------------------------------- RNG states
def capture_rng_state() -> dict[str, Any]:
    """Global RNG states: torch CPU (uint8 tensor), CUDA (one tensor per device), numpy and python (JSON)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": np_state[0],
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss_next": py_state[2]},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state` (missing parts are left alone)."""
    if "torch" in state:
        torch.set_rng_state(state["torch"].to(torch.uint8))
    if "numpy" in state:
        s = state["numpy"]
        keys = (
            s["keys"].numpy().astype(np.uint32)
            if torch.is_tensor(s["keys"])
            else np.asarray(s["keys"], np.uint32)
        )
        np.random.set_state((s["name"], keys, s["pos"], s["has_gauss"], s["cached_gaussian"]))
    if "python" in state:
        s = state["python"]
        random.setstate((s["version"], tuple(s["state"]), s["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([t.to(torch.uint8) for t in cuda_states])


# ----------------------------------------------------------------------------------------------- helpers
def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module under ``DistributedDataParallel`` / ``torch.compile`` wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def _canonical(d: Any) -> bytes:
    return json.dumps(d, sort_keys=True, separators=(",", ":")).encode()


def _state_dict_cpu(module: nn.Module) -> dict[str, Tensor]:
    return {
        k: v.detach().to("cpu").clone().contiguous() for k, v in unwrap_model(module).state_dict().items()
    }


def write_run_config(run_dir: str | os.PathLike, run_config: dict | None, train_config: Any = None) -> Path:
    """Write ``config.json`` (run_config + TrainConfig) into the run folder, atomically."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tc = train_config.to_dict() if hasattr(train_config, "to_dict") else train_config
    from fewflow import __version__

    doc = {"run_config": run_config or {}, "train_config": tc, "fewflow_version": __version__}
    try:
        text = json.dumps(doc, indent=2, sort_keys=True)
    except TypeError as e:
        raise FewflowError(f"run_config must be JSON-serialisable: {e}") from None
    path = run_dir / CONFIG_FILE
    atomic_write_text(path, text + "\n")
    return path


def read_run_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``config.json`` of a run folder (``{"run_config", "train_config", ...}``)."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise FewflowError(f"no {CONFIG_FILE} in run folder {run_dir}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FewflowError(f"{path} is corrupt: {e}") from None


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every ``ckpt-<step>`` folder in the run folder, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    out = []
    for p in run_dir.iterdir():
        m = _CKPT_RE.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out)


def _latest_name(latest: Path) -> str:
    """The checkpoint folder a ``latest`` file names: exactly ``ckpt-<step>``, a folder directly inside the
    run folder. Anything else (``../x``, an absolute path, a sub-folder, a symlink leading out of the run
    folder, binary junk) is refused with a :class:`FewflowError`: ``latest`` never points outside its run."""
    raw = latest.read_bytes()[:256]
    try:
        name = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        name = repr(raw[:40])
    if not _CKPT_RE.match(name):
        raise FewflowError(
            f"{latest} names {name[:80]!r}, which is not a checkpoint folder of this run (expected "
            "ckpt-<step>); refusing to follow it. Delete the file or write the right folder name into it"
        )
    run = latest.parent.resolve()
    target = (latest.parent / name).resolve()
    if target.parent != run:
        raise FewflowError(
            f"{latest} names {name!r}, which resolves to {target}, outside the run folder {run}; "
            "refusing to follow it"
        )
    return name


def find_checkpoint(path: str | os.PathLike) -> Path:
    """Resolve a run folder (via ``latest``, else the highest step), a ``ckpt-*`` folder or its meta.json."""
    p = Path(path)
    if p.is_file() and p.name == META_FILE:
        return p.parent
    if (p / META_FILE).is_file():
        return p
    if not p.is_dir():
        raise FewflowError(f"no checkpoint at {p}: not a run folder or a checkpoint folder")
    latest = p / LATEST_FILE
    if latest.is_file():
        name = _latest_name(latest)
        if (p / name).is_dir():
            return p / name
        warnings.warn(
            f"{latest} points to missing checkpoint {name!r}; using the newest folder", stacklevel=2
        )
    ckpts = list_checkpoints(p)
    if not ckpts:
        raise FewflowError(f"no checkpoint found in {p} (no '{LATEST_FILE}' file and no ckpt-<step> folder)")
    return ckpts[-1][1]


# ----------------------------------------------------------------------------------------------- save
def save_checkpoint(
    out_dir: str | os.PathLike,
    *,
    model: nn.Module,
    ema_model: nn.Module | None,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any | None,
    step: int,
    run_config: dict | None,
    rng_state: Mapping[str, Any] | None,
    keep_last: int = 3,
    train_config: Any = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``out_dir/ckpt-<step>/`` atomically, update ``latest``, keep the newest ``keep_last`` (0: all).

    ``rng_state`` and ``extra`` are nested structures of tensors and JSON values (see :func:`flatten_state`).
    ``config.json`` is (re)written when missing or when ``train_config`` is given. Returns the folder.
    """
    if not isinstance(step, int) or step < 0:
        raise FewflowError(f"checkpoint step must be a non-negative int, got {step!r}")
    if not isinstance(keep_last, int) or keep_last < 0:
        raise FewflowError(f"keep_last must be a non-negative int, got {keep_last!r}")
    run_dir = Path(out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(run_dir)  # temps of an earlier writer that was killed mid-save
    if train_config is not None or not (run_dir / CONFIG_FILE).exists():
        write_run_config(run_dir, run_config, train_config)

    tensors_state: dict[str, Tensor] = {}
    skeletons: dict[str, Any] = {}
    parts = {
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": dict(rng_state) if rng_state is not None else None,
        "extra": dict(extra) if extra is not None else None,
    }
    for name, obj in parts.items():
        if obj is None:
            continue
        t, sk = flatten_state(obj, name)
        tensors_state.update(t)
        skeletons[name] = sk

    files: dict[str, dict[str, Tensor]] = {"model.safetensors": _state_dict_cpu(model)}
    if ema_model is not None:
        files["ema.safetensors"] = _state_dict_cpu(ema_model)
    files["train_state.safetensors"] = tensors_state

    final = run_dir / f"ckpt-{step}"
    # the folder is written under a temp name and renamed into place (replacing a folder of the same step,
    # e.g. after a resume); a crash anywhere leaves the previous checkpoints and ``latest`` as they were
    with atomic_path(final) as tmp:
        tmp.mkdir()
        file_meta = {}
        for fname, tensors in files.items():
            fpath = tmp / fname
            save_file(tensors, str(fpath))
            file_meta[fname] = {"sha256": sha256_file(fpath), "bytes": fpath.stat().st_size}
        meta = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "step": step,
            "files": file_meta,
            "state": skeletons,
            "run_config": run_config or {},
        }
        meta["meta_sha256"] = hashlib.sha256(_canonical(meta)).hexdigest()
        with open(tmp / META_FILE, "w") as f:
            json.dump(meta, f, indent=1)
    atomic_write_text(run_dir / LATEST_FILE, final.name + "\n")
    if keep_last > 0:
        for _s, p in list_checkpoints(run_dir)[:-keep_last]:
            if p != final:
                shutil.rmtree(p, ignore_errors=True)
    return final


# ----------------------------------------------------------------------------------------------- load
@dataclass
class Checkpoint:
    """A verified checkpoint: ``tensors`` keyed ``"model/<k>"``, ``"ema/<k>"``, ``"optimizer/..."``, ...
    (all on CPU) and ``meta`` (the parsed meta.json)."""

    tensors: dict[str, Tensor]
    meta: dict[str, Any]
    path: Path | None = None
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    @property
    def has_ema(self) -> bool:
        return "ema.safetensors" in self.meta["files"]

    def _prefixed(self, prefix: str) -> dict[str, Tensor]:
        n = len(prefix) + 1
        return {k[n:]: v for k, v in self.tensors.items() if k.startswith(prefix + "/")}

    def model_state(self) -> dict[str, Tensor]:
        """The model ``state_dict``."""
        return self._prefixed("model")

    def ema_state(self) -> dict[str, Tensor] | None:
        """The EMA ``state_dict`` (``None`` when the run had no EMA)."""
        return self._prefixed("ema") if self.has_ema else None

    def state(self, name: str) -> Any:
        """A nested state: ``"optimizer"``, ``"scheduler"``, ``"rng"`` or ``"extra"`` (None if absent)."""
        sk = self.meta.get("state", {}).get(name)
        if sk is None:
            return None
        return unflatten_state(sk, self.tensors)


def _corrupt(path: Path, why: str) -> FewflowError:
    return FewflowError(f"checkpoint {path} is corrupt: {why}")


def load_checkpoint(path_or_run_dir: str | os.PathLike) -> Checkpoint:
    """Load and verify a checkpoint folder (or the newest one of a run folder); never unpickles.

    Raises ``FewflowError("checkpoint ... is corrupt: ...")`` when meta.json does not parse or fails its own
    checksum, or a safetensors file is missing, has the wrong size (truncated) or the wrong sha256.
    """
    ckpt = find_checkpoint(path_or_run_dir)
    meta_path = ckpt / META_FILE
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise _corrupt(ckpt, f"{META_FILE} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _corrupt(ckpt, f"{META_FILE} does not parse ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise _corrupt(ckpt, f"{META_FILE} is not a {FORMAT} file")
    if meta.get("version", 0) > FORMAT_VERSION:
        raise FewflowError(
            f"checkpoint {ckpt} has format version {meta.get('version')}, newer than this fewflow"
        )
    expected = meta.pop("meta_sha256", None)
    if expected is None or hashlib.sha256(_canonical(meta)).hexdigest() != expected:
        raise _corrupt(ckpt, f"{META_FILE} fails its checksum")
    meta["meta_sha256"] = expected
    tensors: dict[str, Tensor] = {}
    prefixes = {"model.safetensors": "model/", "ema.safetensors": "ema/", "train_state.safetensors": ""}
    for fname, info in meta.get("files", {}).items():
        fpath = ckpt / fname
        if not fpath.is_file():
            raise _corrupt(ckpt, f"{fname} is missing")
        size = fpath.stat().st_size
        if size != info["bytes"]:
            raise _corrupt(ckpt, f"{fname} has {size} bytes, expected {info['bytes']} (truncated?)")
        digest = sha256_file(fpath)
        if digest != info["sha256"]:
            raise _corrupt(ckpt, f"sha256 of {fname} is {digest[:12]}..., expected {info['sha256'][:12]}...")
        try:
            loaded = load_file(str(fpath), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise _corrupt(ckpt, f"{fname} does not parse ({e})") from None
        prefix = prefixes.get(fname, fname.split(".")[0] + "/")
        tensors.update({prefix + k: v for k, v in loaded.items()})
    return Checkpoint(tensors=tensors, meta=meta, path=ckpt)


def load_state_into(module: nn.Module, state: Mapping[str, Tensor], what: str = "model") -> None:
    """``module.load_state_dict(state)`` with a :class:`FewflowError` naming missing/unexpected keys and
    shape mismatches (e.g. a checkpoint of another model configuration)."""
    module = unwrap_model(module)
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        if shapes:
            parts.append(f"shape mismatch {'; '.join(shapes[:8])}{' ...' if len(shapes) > 8 else ''}")
        raise FewflowError(
            f"{what} state does not match the model ({type(module).__name__}): " + "; ".join(parts)
        )
    module.load_state_dict(dict(state), strict=True)


def load_model(
    run_dir: str | os.PathLike,
    which: str = "ema",
    build_model: Callable[[dict], nn.Module] | None = None,
    map_location: str | torch.device | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a trained model from a run (or checkpoint) folder: ``(module in eval mode, run_config)``.

    The module is built by ``build_model(run_config["model"])`` (default ``fewflow.models.build_model``) and
    loaded with the ``which`` weights: ``"ema"`` (falls back to ``"model"`` with a warning when the run had
    no EMA) or ``"model"``.
    """
    if which not in ("ema", "model"):
        raise FewflowError(f"which must be 'ema' or 'model', got {which!r}")
    ckpt = load_checkpoint(run_dir)
    run_config = ckpt.meta.get("run_config") or {}
    if not run_config:
        cfg_dir = ckpt.path.parent if ckpt.path is not None else Path(run_dir)
        if (cfg_dir / CONFIG_FILE).is_file():
            run_config = read_run_config(cfg_dir).get("run_config", {})
    model_cfg = run_config.get("model")
    if not isinstance(model_cfg, dict):
        raise FewflowError(
            f"run_config of {ckpt.path} has no 'model' dict to rebuild the network from "
            f"(keys: {sorted(run_config)})"
        )
    if build_model is None:
        try:
            from fewflow.models import build_model as _bm
        except ImportError as e:
            raise FewflowError(
                f"fewflow.models.build_model is not available ({e}); pass build_model="
            ) from None
        build_model = _bm
    module = build_model(dict(model_cfg))
    state = ckpt.ema_state() if which == "ema" else None
    if which == "ema" and state is None:
        warnings.warn(f"{ckpt.path} has no EMA weights; loading the trained model weights", stacklevel=2)
    if state is None:
        state = ckpt.model_state()
    load_state_into(module, state, what=f"{which} checkpoint {ckpt.path}")
    if map_location is not None:
        module = module.to(map_location)
    module.eval()
    return module, run_config
