"""Run folders: train a :class:`~fewflow.config.RunConfig` into a folder, and load it back.

A run folder holds ``config.json`` (``{"run_config": ..., "train_config": ...}``, written only by
:func:`fewflow.train.checkpoint.write_run_config`), checkpoints ``ckpt-*/`` (safetensors + JSON, a
``latest`` pointer), ``log.csv``, figures, and -- for methods with several stages -- ``stages/``; methods
trained on teacher pairs keep them in ``pairs/``. Everything sampling needs (data shape, classes, value
range, a fitted source scale or time grid) is in ``run_config.meta``, so sampling never reloads the data.

One training run::

    cfg = default_config("moons", method="meanflow")
    train_run(cfg, "runs/mf")          # data -> meta -> model -> method stages -> Trainer
    model, cfg = load_run("runs/mf")
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fewflow._validate import FewflowError
from fewflow.config import MEMORY_KIND, RunConfig, model_type
from fewflow.data import is_import_path, user_data_meta
from fewflow.methods import BuildContext, MethodSpec, get_method

__all__ = [
    "build_context",
    "build_data",
    "build_model",
    "build_path",
    "build_source",
    "build_user_model",
    "check_inputs",
    "data_meta",
    "check_latent",
    "latent_autoencoder",
    "latent_data",
    "load_run",
    "load_teacher",
    "read_run_folder",
    "resolve_model_config",
    "resolve_user_model_config",
    "run_config_for",
    "train_run",
    "user_data_config",
]


MEMORY_NAME = "in-memory data"  # data.name of a Trainer run on data without a name


# --------------------------------------------------------------------------- ingredients


def build_data(cfg: RunConfig, *, n: int | None = None, seed: int | None = None, verify: bool = True) -> Any:
    """The run's data set (``fewflow.data.load_dataset``); ``n`` / ``seed`` override the config (a fresh
    reference sample for evaluation).

    Data from the user (a folder, an ``.npy`` / ``.npz`` / ``.csv`` file, ``module:function``) is read from
    the recorded ``data.path`` once there is one; the first load records ``data.kind``, ``data.path`` and
    ``data.sha256`` in ``cfg`` (so the run folder's config says what was loaded), later loads refuse a file
    whose sha256 changed (unless ``verify=False``)."""
    from fewflow.data import DATASETS, load_dataset

    d = cfg.data
    n, seed = (d.n if n is None else n), (d.seed if seed is None else seed)
    if d.kind == MEMORY_KIND:
        what = "data" if d.name == MEMORY_NAME else f"data {d.name!r}"
        raise FewflowError(
            f"this run was trained by fewflow.train.Trainer on {what} held in memory, which fewflow cannot "
            "reload (fewflow eval and --resume need the data): train on data from fewflow.data.load_dataset "
            "and pass run_config=fewflow.runs.run_config_for(model, data) to the Trainer"
        )
    if d.kind is None and d.name in DATASETS:
        return load_dataset(d.name, n=n, seed=seed, **d.kwargs)
    kw = dict(d.kwargs)
    if d.kind is not None:
        kw["kind"] = d.kind
    if verify and d.sha256 is not None:
        kw["sha256"] = d.sha256
    data = load_dataset(d.path or d.name, n=n, seed=seed, **kw)
    src = data.meta.get("source", {})
    if d.kind is None:
        d.kind, d.path, d.sha256 = src.get("kind"), src.get("path"), src.get("sha256")
    return data


def check_inputs(cfg: RunConfig) -> Any:
    """Load the run's data and, for a user network (``module:Class``), build it once without training, so
    that bad input fails at once with one clear error; records what was loaded in ``cfg.data`` (see
    :func:`build_data`). Returns the data set."""
    data = build_data(cfg)
    if cfg.latent:  # the network sees the autoencoder's latents
        latents, record = latent_data(cfg, data)
        meta = {**data_meta(latents, cfg), "latent": record}
    else:
        meta = data_meta(data, cfg)
    if is_import_path(cfg.model.get("type")):
        build_model(cfg, meta)
    return data


def user_data_config(name: Any, method: str | None = None) -> RunConfig:
    """Defaults for data from the user (``fewflow train --data PATH``): the 2-D toys' settings (MLP 4 x 256
    on the flattened sample, 4000 steps, batch 512, lr 1e-3, unconditional), every sample loaded; a FASTA
    file takes the sequence sets' (GSFM, batch 256)."""
    from fewflow.config import DataSpec, default_config
    from fewflow.data.user import is_fasta_path

    if isinstance(name, str) and is_fasta_path(Path(name)):
        cfg = default_config("markov", method=method)
        cfg.data = DataSpec(name=name)
        cfg.validate()
        return cfg
    cfg = default_config("checkerboard", method=method or "cfm")
    cfg.data = DataSpec(name=name)
    cfg.validate()
    return cfg


def data_meta(data: Any, cfg: RunConfig) -> dict[str, Any]:
    """What sampling needs to know about the data without loading it. ``conditional`` means class labels;
    a data set with a condition tensor ``c`` adds ``cond_shape`` (the shape of one row of ``c``): the
    network then always takes ``c``, and ``objective.conditional`` with ``label_dropout`` drops it."""
    vr = getattr(data, "value_range", None)
    k = getattr(data, "num_classes", None)
    c = getattr(data, "c", None)
    if cfg.objective.conditional and not k and c is None:
        raise FewflowError(
            f"data set {cfg.data.name!r} has no labels (nor a condition c) for a conditional model"
        )
    meta = {
        "shape": list(data.x.shape[1:]),
        "num_classes": k,
        "conditional": bool(cfg.objective.conditional and k),
        "value_range": list(vr) if vr is not None else None,
    }
    if c is not None:
        meta["cond_shape"] = [int(v) for v in c.shape[1:]]
    dmeta = getattr(data, "meta", None) or {}
    if dmeta.get("kind") == "sequence":  # sampling writes FASTA with the alphabet
        meta["kind"] = "sequence"
        meta["alphabet"] = dmeta.get("alphabet")
    meta.update(user_data_meta(data))
    return meta


def _meta(cfg: RunConfig) -> dict[str, Any]:
    if not cfg.meta.get("shape"):
        raise FewflowError("the run config has no data shape (meta.shape): was it trained?")
    return cfg.meta


def build_path(cfg: RunConfig) -> Any:
    """``AffinePath(get_schedule(objective.path, **objective.path_kwargs))``."""
    from fewflow.paths import AffinePath, get_schedule

    return AffinePath(get_schedule(cfg.objective.path, **cfg.objective.path_kwargs))


def build_source(cfg: RunConfig, data: Any | None = None) -> Any:
    """The source x0, or ``None`` for N(0, I). ``gaussian`` with ``scale``: ``GaussianSource``;
    ``norm_aligned``: fitted to ``data`` (``NormAlignedGaussian.fit``), or the scale stored in the run."""
    name, kw = cfg.objective.source, dict(cfg.objective.source_kwargs)
    if name == "gaussian" and not kw:
        return None
    from fewflow.sources import GaussianSource, NormAlignedGaussian

    shape = tuple(data.x.shape[1:]) if data is not None else tuple(_meta(cfg)["shape"])
    try:
        if name == "gaussian":
            return GaussianSource(shape, **kw)
        scale = cfg.meta.get("source_scale") if data is None else None
        if scale is not None:
            return NormAlignedGaussian(shape, scale=float(scale))
        if data is None:
            raise FewflowError("the norm-aligned source is fitted to data: pass the data set")
        return NormAlignedGaussian.fit(data.x, **kw)
    except TypeError as e:
        raise FewflowError(f"bad arguments for source {name!r}: {e}") from None


def resolve_model_config(cfg: RunConfig, meta: dict[str, Any]) -> dict[str, Any]:
    """The run's model config with the data-dependent entries filled in: ``dim`` (MLP) or
    ``in_channels`` + ``size`` (image networks), ``num_classes`` when conditional, ``cond_channels`` (an
    image condition of the data's H, W, for image networks) or ``cond_dim`` (its flattened size) when the
    data has a condition ``c``, ``flow_map`` (with low-frequency Fourier time features for an MLP) for
    flow-map methods."""
    shape = list(meta["shape"])
    m = dict(cfg.model)
    if is_import_path(m.get("type")):  # the user's network: see resolve_user_model_config
        return resolve_user_model_config(m, meta, flow_map=get_method(cfg.method_name).flow_map)
    m["type"] = model_type(m.get("type", "MLP"))
    if m["type"] == "MLP":
        m.setdefault("dim", int(math.prod(shape)))
    else:
        if len(shape) != 3 or shape[1] != shape[2]:
            raise FewflowError(f"model {m['type']!r} needs square images (C, H, W), got shape {tuple(shape)}")
        m.setdefault("in_channels", int(shape[0]))
        m.setdefault("size", int(shape[1]))
    if meta.get("conditional"):
        m.setdefault("num_classes", int(meta["num_classes"]))
    if meta.get("cond_shape") is not None:  # a condition c: image channels of the same H, W, or a vector
        cs = [int(v) for v in meta["cond_shape"]]
        if m["type"] != "MLP" and len(cs) == 3 and cs[1:] == shape[1:]:
            m.setdefault("cond_channels", cs[0])
        else:
            m.setdefault("cond_dim", int(math.prod(cs)))
    if get_method(cfg.method_name).flow_map:
        m.setdefault("flow_map", True)
        if m["type"] == "MLP" and "time_features" not in m:
            # high-frequency time features blow up d u / d t of a flow map: a few low Fourier frequencies
            # (a student copied from a teacher keeps the teacher's features, so it starts as the teacher)
            m["time_features"] = "fourier"
            m.setdefault("num_frequencies", 3)
    return m


def build_model(cfg: RunConfig, meta: dict[str, Any] | None = None) -> nn.Module:
    """The run's network: the method's own (``make_model``) or ``fewflow.models.build_model``."""
    meta = meta if meta is not None else _meta(cfg)
    spec = get_method(cfg.method_name)
    user = is_import_path(cfg.model.get("type"))
    if spec.needs.model == "custom":
        if user:
            raise FewflowError(f"method {spec.name!r} builds its own network; --model {cfg.model['type']} "
                               "does not apply")
        assert spec.make_model is not None
        return spec.make_model(spec.make_config(cfg.method), meta)
    if user:
        return build_user_model(resolve_model_config(cfg, meta), meta, flow_map=spec.flow_map)
    from fewflow.models import build_model as build

    m = resolve_model_config(cfg, meta)
    try:
        return build(m)
    except FewflowError:
        raise
    except TypeError as e:
        raise FewflowError(f"bad model settings for {m['type']!r}: {e}") from e


# --------------------------------------------------------------------------- the user's network

USER_MODEL_ARGS = ("shape", "num_classes", "cond_shape", "flow_map")


def _user_model_class(path: str) -> type[nn.Module]:
    from fewflow.data import import_object

    cls = import_object(path, "model class")
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise FewflowError(f"model {path!r} is a {type(cls).__name__}, not a torch.nn.Module class")
    return cls


def _accepts(cls: type, name: str) -> bool:
    try:
        p = inspect.signature(cls).parameters.get(name)
    except (TypeError, ValueError):
        return False
    return p is not None and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)


def resolve_user_model_config(m: dict[str, Any], meta: dict[str, Any], *, flow_map: bool) -> dict[str, Any]:
    """The model config of a user network ``{"type": "module:Class", **kwargs}`` with the data-dependent
    arguments its constructor names filled in (unless given): ``shape`` (one sample's shape),
    ``num_classes`` (class-conditional runs), ``cond_shape`` (data with a condition ``c``), ``flow_map``
    (flow-map methods)."""
    m = dict(m)
    cls = _user_model_class(str(m["type"]))
    auto: dict[str, Any] = {"shape": [int(v) for v in meta["shape"]]}
    if meta.get("conditional"):
        auto["num_classes"] = int(meta["num_classes"])
    if meta.get("cond_shape") is not None:
        auto["cond_shape"] = [int(v) for v in meta["cond_shape"]]
    if flow_map:
        auto["flow_map"] = True
    for key, value in auto.items():
        if _accepts(cls, key):
            m.setdefault(key, value)
    return m


def _one_line_error(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def build_user_model(m: dict[str, Any], meta: dict[str, Any], *, flow_map: bool = False) -> nn.Module:
    """Import ``m["type"]`` (``module:Class``, an ``nn.Module`` subclass), construct it with the other
    entries of ``m`` as keyword arguments (``shape`` / ``cond_shape`` as tuples) and check it on a batch of
    two zero samples: ``model(x, t[, y=][, c=])`` (flow maps ``model(x, s, t, ...)``) must return a tensor
    shaped like ``x``. Every failure is one :class:`FewflowError` naming the class."""
    path = str(m["type"])
    cls = _user_model_class(path)
    kwargs = {k: (tuple(v) if k in ("shape", "cond_shape") and isinstance(v, list) else v)
              for k, v in m.items() if k != "type"}
    try:
        model = cls(**kwargs)
    except FewflowError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's constructor failed
        args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        raise FewflowError(f"cannot construct model {path}({args}): {_one_line_error(e)}") from e
    if not isinstance(model, nn.Module) or not any(p.requires_grad for p in model.parameters()):
        raise FewflowError(f"model {path} has no trainable parameters")
    if flow_map and not getattr(model, "is_flow_map", False):
        raise FewflowError(f"this method trains a flow map u(x, s, t): model {path} must set "
                           "is_flow_map = True")
    _probe_user_model(model, path, meta, flow_map)
    return model


def _probe_user_model(model: nn.Module, path: str, meta: dict[str, Any], flow_map: bool) -> None:
    p = next(iter(model.parameters()), None)
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    x = torch.zeros(2, *[int(v) for v in meta["shape"]], dtype=dtype)
    times = (torch.full((2,), 0.25, dtype=dtype), torch.full((2,), 0.75, dtype=dtype)) if flow_map else (
        torch.full((2,), 0.5, dtype=dtype),)
    cond: dict[str, Any] = {}
    if meta.get("conditional"):
        cond["y"] = torch.zeros(2, dtype=torch.long)
    if meta.get("cond_shape") is not None:
        cond["c"] = torch.zeros(2, *[int(v) for v in meta["cond_shape"]], dtype=dtype)
    call = f"model {path}(x, {'s, t' if flow_map else 't'}{''.join(f', {k}=' for k in cond)})"
    was = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            out = model(x, *times, **cond)
    except Exception as e:  # noqa: BLE001 - the user's forward failed
        raise FewflowError(f"{call} failed on a test batch x of shape {tuple(x.shape)}: "
                           f"{_one_line_error(e)}") from e
    finally:
        model.train(was)
    if not torch.is_tensor(out) or out.shape != x.shape:
        got = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
        raise FewflowError(f"{call} must return a velocity shaped like x {tuple(x.shape)}, got {got}")


# --------------------------------------------------------------------------- loading


def read_run_folder(run_dir: str | Path) -> RunConfig:
    """The :class:`RunConfig` stored in ``run_dir/config.json``."""
    import json

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FewflowError(f"run folder not found: {run_dir}")
    path = run_dir / "config.json"
    if not path.is_file():
        raise FewflowError(f"{run_dir} is not a fewflow run folder (no config.json)")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FewflowError(f"{path} is corrupt: {e}") from None
    if not isinstance(doc, dict):
        raise FewflowError(f"{path} is corrupt: expected a JSON object")
    rc = doc.get("run_config", doc)
    if not isinstance(rc, dict) or not rc:
        raise FewflowError(f"{path} holds no fewflow run config (was it written by another tool?)")
    rc = dict(rc)
    if "data" not in rc:  # written by fewflow.train.Trainer with its default run config
        rc = _trainer_run_config(rc, path)
    tc = doc.get("train_config")
    if isinstance(tc, dict):
        rc["train"] = {**tc, **(rc.get("train") or {})}
    try:
        return RunConfig.from_dict(rc)
    except FewflowError as e:
        raise FewflowError(f"{path}: {e}") from None


def _trainer_run_config(rc: dict[str, Any], path: Path) -> dict[str, Any]:
    """A loadable run config from the default one of :class:`fewflow.train.Trainer` (``{"model": the
    network's config, "meta": what it recorded about the data}``): method ``cfm`` unless named, in-memory
    data (``data.kind = "memory"``: sampling works, reloading the data does not), the objective's
    conditioning from ``meta``. A network that fewflow cannot rebuild is one clear error."""
    meta = dict(rc.get("meta") or {})
    model = rc.get("model")
    who = meta.get("model_class") or "its network"
    if not isinstance(model, dict) or not model.get("type"):
        has = "has no config dict" if not isinstance(model, dict) else f"has a config without 'type' {model}"
        raise FewflowError(
            f"{path} was written by fewflow.train.Trainer for {who}, which {has}, so fewflow cannot rebuild "
            "the network: give the network a `config` dict {'type': 'module:Class', **its constructor "
            "arguments} (fewflow's MLP, UNet and DiT have one), or load the weights in Python with "
            "fewflow.train.load_model(RUN, build_model=...)"
        )
    if not meta.get("shape"):
        raise FewflowError(
            f"{path} was written by fewflow.train.Trainer without the shape of the data (meta.shape): pass "
            "run_config=fewflow.runs.run_config_for(model, data) to the Trainer"
        )
    drop = float(meta.get("label_dropout") or 0.0)
    conditional = bool(meta.get("conditional")) or (meta.get("cond_shape") is not None and drop > 0)
    return {
        **rc,
        "data": {"name": MEMORY_NAME, "kind": MEMORY_KIND},
        "objective": {"conditional": conditional, "label_dropout": drop if conditional else 0.0,
                      **(rc.get("objective") or {})},
        "meta": meta,
    }


def _data_spec(data: Any) -> dict[str, Any]:
    """The ``data`` section recording a ``fewflow.data.Dataset`` (see :func:`run_config_for`)."""
    from fewflow.data import DATASETS, IMAGE_SETS

    info = getattr(data, "meta", None) or {}
    src = info.get("source") or {}
    name = str(getattr(data, "name", "") or MEMORY_NAME)
    if src.get("kind"):  # data from the user: reloaded from its path, refused if it changed
        kw: dict[str, Any] = {}
        shape = list(data.x.shape[1:])
        if src["kind"] == "folder" and len(shape) == 3 and shape[1] == shape[2]:
            kw["image_size"] = int(shape[1])
        elif src["kind"] != "folder" and getattr(data, "normalization", None) is None:
            kw["normalize"] = False
        return {"name": src["path"], "kind": src["kind"], "path": src["path"], "sha256": src.get("sha256"),
                "kwargs": kw}
    if name in DATASETS and getattr(data, "normalization", None) is None:
        kw = {"split": info["split"]} if name in IMAGE_SETS and info.get("split") else {}
        return {"name": name, "n": len(data.x), "kwargs": kw}
    return {"name": name, "kind": MEMORY_KIND}


def run_config_for(
    model: nn.Module,
    data: Any,
    method: str = "cfm",
    *,
    conditional: bool | None = None,
    label_dropout: float = 0.0,
    seed: int = 0,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A complete run config (``RunConfig.to_dict()``) for a network trained in Python with
    :class:`fewflow.train.Trainer`: ``Trainer(model, loss, data, cfg, out_dir=RUN, run_config=
    run_config_for(model, data))`` writes a run folder that ``fewflow sample`` and ``fewflow eval`` read.

    ``model``: a fewflow network (its ``config``) or your own ``nn.Module`` with a ``config`` dict
    ``{"type": "module:Class", **constructor arguments}`` (importable where the run is read). ``data``: a
    ``fewflow.data.Dataset``: a built-in set is recorded by name (with its default settings), data from the
    user by its path and sha256 (``fewflow eval`` reloads it and refuses a changed file); other data (a
    tensor, arrays, a torch Dataset) is recorded as in-memory data, which sampling needs not but
    ``fewflow eval`` cannot reload. ``method``: the registered method of the loss (its default sampler).
    ``conditional``: class labels reach the model (default: the model has ``num_classes`` and the data
    labels); ``label_dropout``: the objective's (a null class / condition for guidance). ``overrides``:
    dotted keys for :meth:`RunConfig.replace` (e.g. ``{"objective.path": "cosine"}``)."""
    mc = getattr(model, "config", None)
    if not isinstance(mc, dict) or not mc.get("type"):
        cls = type(model)
        raise FewflowError(
            f"cannot record network {cls.__module__}:{cls.__qualname__}: fewflow rebuilds a network from "
            "its `config` dict {'type': 'module:Class', **constructor arguments}, and this one has "
            f"{'none' if not isinstance(mc, dict) else 'no type'}"
        )
    from fewflow.train import BatchSource

    facts = BatchSource(data, 1, 0, torch.device("cpu")).describe()
    if facts["shape"] is None:
        raise FewflowError("cannot tell the shape of one sample from an iterator: pass the data set, or let "
                           "the Trainer record it (run_config=None)")
    k = getattr(model, "num_classes", None)
    if conditional is None:
        conditional = (isinstance(k, int) and k > 0 and facts["labels"]) or label_dropout > 0
    d = {
        "data": _data_spec(data) if hasattr(data, "x") else {"name": MEMORY_NAME, "kind": MEMORY_KIND},
        "model": dict(mc),
        "method": {"name": method},
        "objective": {"conditional": bool(conditional), "label_dropout": float(label_dropout)},
        "seed": int(seed),
    }
    cfg = RunConfig.from_dict(d)
    if overrides:
        cfg = cfg.replace(overrides)
    if hasattr(data, "x") and torch.is_tensor(data.x):
        meta = data_meta(data, cfg)
    else:
        if conditional and not facts["labels"] and facts["cond_shape"] is None:
            raise FewflowError("the data has no labels (nor a condition c) for a conditional model")
        meta = {"shape": facts["shape"], "num_classes": facts["num_classes"],
                "conditional": bool(conditional and facts["labels"] and facts["num_classes"]),
                "value_range": None}
        if facts["cond_shape"] is not None:
            meta["cond_shape"] = facts["cond_shape"]
    if meta["conditional"] and isinstance(k, int) and k > 0:
        meta["num_classes"] = k
    cfg.meta = meta
    return cfg.to_dict()


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def load_run(
    run_dir: str | Path, which: str = "ema", device: str | torch.device | None = None
) -> tuple[nn.Module, RunConfig]:
    """Load a trained run: ``(model in eval mode, RunConfig)``; any problem (missing folder, corrupt
    checkpoint, a config describing another model) becomes one :class:`FewflowError`."""
    from fewflow.train.checkpoint import load_model

    run_dir = Path(run_dir)
    from fewflow.pretrained import from_pretrained, is_pretrained

    if is_pretrained(run_dir):  # an exported folder (fewflow export): one set of weights, no `which`
        return from_pretrained(run_dir, device=device)
    cfg = read_run_folder(run_dir)
    try:
        model, _ = load_model(run_dir, which=which, build_model=lambda _m: build_model(cfg),
                              map_location=device)
    except FewflowError as e:
        raise FewflowError(f"cannot load the model of {run_dir}: {_one_line(e)}") from e
    except Exception as e:  # safetensors / torch load_state_dict / JSON errors
        raise FewflowError(f"cannot load the checkpoint in {run_dir}: {_one_line(e)}") from e
    model.eval()
    return model, cfg


def load_teacher(path: str | Path, device: str | torch.device | None = None) -> tuple[nn.Module, RunConfig]:
    """A trained velocity run as a frozen teacher (EMA weights, eval mode, no gradients)."""
    model, cfg = load_run(path, which="ema", device=device)
    if get_method(cfg.method_name).needs.model != "velocity" or getattr(model, "is_flow_map", False):
        raise FewflowError(f"teacher {path} is a {cfg.method_name!r} run; a teacher must be a velocity model")
    return model.requires_grad_(False), cfg


# --------------------------------------------------------------------------- latent space


def _weights_file(run_dir: Path) -> Path:
    from fewflow.train.checkpoint import find_checkpoint

    ckpt = find_checkpoint(run_dir)
    ckpt = ckpt if ckpt.is_dir() else ckpt.parent
    ema = ckpt / "ema.safetensors"
    return ema if ema.is_file() else ckpt / "model.safetensors"


def latent_autoencoder(
    path: str | Path, device: str | torch.device | None = None, *, sha256: str | None = None
) -> tuple[nn.Module, RunConfig, str]:
    """The frozen autoencoder of a latent run: ``(model, its RunConfig, sha256 of its weights file)``.

    ``path`` must be a run of the ``autoencoder`` method (EMA weights, eval mode, no gradients); with
    ``sha256`` the weights must be the ones a latent run recorded (a retrained autoencoder is refused: its
    latents mean something else)."""
    from fewflow._io import sha256_file

    path = Path(path)
    cfg = read_run_folder(path)
    if cfg.method_name != "autoencoder":
        raise FewflowError(f"--latent {path} is a {cfg.method_name!r} run, not an autoencoder run "
                           "(train one with fewflow train --method autoencoder)")
    model, cfg = load_run(path, which="ema", device=device)
    digest = sha256_file(_weights_file(path))
    if sha256 is not None and digest != sha256:
        raise FewflowError(f"the autoencoder {path} has changed since this latent run was trained "
                           f"(weights sha256 {digest[:12]}..., recorded {sha256[:12]}...)")
    return model.requires_grad_(False), cfg, digest


def check_latent(cfg: RunConfig, data: Any = None) -> None:
    """Fail early, with one clear error, when ``cfg.latent`` is not an autoencoder run trained on samples of
    the run's data shape (``data``: the loaded data set, else loaded here). Encodes nothing."""
    if not cfg.latent:
        return
    path = Path(cfg.latent).expanduser()
    ae_cfg = read_run_folder(path)
    if ae_cfg.method_name != "autoencoder":
        raise FewflowError(f"--latent {path} is a {ae_cfg.method_name!r} run, not an autoencoder run "
                           "(train one with fewflow train --method autoencoder)")
    if cfg.method_name == "autoencoder":
        raise FewflowError("an autoencoder trains on the data itself: drop --latent")
    data = build_data(cfg) if data is None else data
    want, got = list(ae_cfg.meta.get("shape", [])), list(data.x.shape[1:])
    if want != got:
        raise FewflowError(f"the autoencoder {cfg.latent} was trained on samples of shape {tuple(want)}, "
                           f"this run's data {cfg.data.name!r} has shape {tuple(got)}")


def latent_data(cfg: RunConfig, data: Any, *, batch_size: int = 500,
                previous: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
    """``(latent data set, meta["latent"] record)`` for latent flow matching.

    Encodes ``data`` once with the frozen autoencoder of ``cfg.latent`` (the posterior mean for a VAE) and
    multiplies the codes by the scale factor ``s = 1 / std(z)`` (the standard deviation over every entry of
    the training latents, as Stable Diffusion's ``scaling_factor``; "Flow Matching in Latent Space", Dao et
    al., arXiv 2307.08698, uses SD's 0.18215), so the flow sees unit-variance latents. The record is
    ``{"ae_run": absolute path, "ae_sha256", "scale", "shape": latent shape, "data_shape"}``; sampling
    decodes ``D(z / s)``. Labels, conditions and the value range of the images are kept (``value_range``
    describes the decoded samples). ``previous`` (a resumed run's record) keeps its scale and checks the
    autoencoder did not change."""
    from fewflow.data import Dataset

    ae_path = Path(cfg.latent).expanduser().resolve()
    cfg.latent = str(ae_path)  # the run folder records where its autoencoder is
    ae, ae_cfg, digest = latent_autoencoder(
        ae_path, device="cpu", sha256=(previous or {}).get("ae_sha256"))
    want, got = list(ae_cfg.meta.get("shape", [])), list(data.x.shape[1:])
    if want != got:
        raise FewflowError(f"the autoencoder {cfg.latent} was trained on samples of shape {tuple(want)}, "
                           f"this run's data {cfg.data.name!r} has shape {tuple(got)}")
    if getattr(data, "meta", {}).get("kind") == "sequence":
        raise FewflowError("latent flow matching takes continuous data (images or vectors), not sequences")
    p = next(iter(ae.parameters()))
    with torch.no_grad():
        z = torch.cat([ae.encode_mean(data.x[i : i + batch_size].to(p.device, p.dtype)).float().cpu()
                       for i in range(0, data.x.shape[0], batch_size)])
    if previous and previous.get("scale") is not None:
        scale = float(previous["scale"])
    else:
        std = float(z.double().std())
        if not (math.isfinite(std) and std > 0):
            raise FewflowError(f"the autoencoder {cfg.latent} maps the data to constant latents (std {std})")
        scale = 1.0 / std
    out = Dataset(z * scale, data.y, data.name, data.num_classes, data.value_range,
                  f"{data.description} (latents of {cfg.latent})".strip(), dict(getattr(data, "meta", {})),
                  data.c, data.normalization)
    record = {"ae_run": str(ae_path), "ae_sha256": digest, "scale": scale,
              "shape": [int(v) for v in z.shape[1:]], "data_shape": got}
    return out, record


# --------------------------------------------------------------------------- training


def _check_needs(spec: MethodSpec, cfg: RunConfig, data: Any) -> None:
    if spec.needs.teacher == "required" and not cfg.teacher:
        raise FewflowError(f"method {spec.name!r} distils a trained run: pass --teacher RUN")
    if spec.needs.teacher == "none" and cfg.teacher:
        raise FewflowError(f"method {spec.name!r} takes no teacher (got --teacher {cfg.teacher})")
    if spec.needs.labels == "required" and not cfg.objective.conditional:
        raise FewflowError(f"method {spec.name!r} needs class labels (--conditional)")
    if spec.needs.labels == "none" and cfg.objective.conditional:
        raise FewflowError(f"method {spec.name!r} does not take class labels (use --unconditional)")
    if spec.needs.coupling == "fixed" and cfg.objective.coupling != "independent":
        raise FewflowError(f"method {spec.name!r} fixes its own pairs: --coupling does not apply")
    is_seq = getattr(data, "meta", {}).get("kind") == "sequence"
    if spec.needs.data == "sequence" and not is_seq:
        raise FewflowError(f"method {spec.name!r} trains on sequence data (one-hot (N, L, K)), e.g. --data "
                           "markov, dna or proteins; got {!r}".format(cfg.data.name))
    if spec.needs.data != "sequence" and is_seq:
        raise FewflowError(f"sequence data {cfg.data.name!r} needs a sequence method (gsfm, "
                           f"simplex_fm); {spec.name!r} trains on continuous data")
    if spec.flow_map and cfg.objective.path != "linear":
        raise FewflowError(f"method {spec.name!r} needs the linear path (--path linear)")


def build_context(cfg: RunConfig, data: Any, *, teacher: Any = None, work_dir: Path | None = None,
                  source: Any = None, pairs: Any = None) -> BuildContext:
    """The :class:`~fewflow.methods.BuildContext` of a run (its path, source, coupling, time sampler,
    conditioning, teacher, pair generator and a ``record`` that writes into ``cfg.meta``)."""
    from fewflow.couplings import get_coupling
    from fewflow.objectives.time_samplers import get_time_sampler

    obj = cfg.objective
    return BuildContext(
        data=data,
        path=build_path(cfg),
        source=source,
        coupling=get_coupling(obj.coupling, **obj.coupling_kwargs),
        # the default (uniform, no settings) leaves each loss its paper's own time sampler
        time_sampler=None if (obj.time_sampler == "uniform" and not obj.time_kwargs)
        else get_time_sampler(obj.time_sampler, **obj.time_kwargs),
        num_classes=int(data.num_classes) if obj.conditional and getattr(data, "num_classes", None) else None,
        label_dropout=float(obj.label_dropout),
        teacher=teacher,
        pairs=pairs,
        work_dir=work_dir,
        record=lambda k, v: cfg.meta.__setitem__(k, v),
        seed=cfg.seed,
    )


def _pair_maker(out_dir: Path, source: Any, data: Any, num_classes: int | None, progress: bool) -> Any:
    """``pairs(model, *, tag, n, steps, seed) -> folder``: teacher pairs under ``out_dir/pairs`` (Heun),
    reused when a complete set is already there."""
    from fewflow.couplings.reflow import generate_reflow_pairs
    from fewflow.sources import GaussianSource

    src = source if source is not None else GaussianSource(tuple(data.x.shape[1:]))

    def pairs(model: Any, *, tag: str, n: int, steps: int, seed: int) -> Path:
        folder = out_dir / "pairs" / f"{tag}-n{n}-heun{steps}-s{seed}"
        cond_fn = None
        if num_classes is not None:
            def cond_fn(m: int, g: torch.Generator) -> dict[str, torch.Tensor]:
                return {"y": torch.randint(0, num_classes, (m,), generator=g)}
        was = model.training if isinstance(model, nn.Module) else None
        if was:
            model.eval()
        generate_reflow_pairs(model, src, n, folder, steps=steps, stepper="heun", batch_size=4096,
                              shard_size=max(1024, n // 4), cond_fn=cond_fn, seed=seed, progress=progress)
        if was:
            model.train()
        return folder

    return pairs


def train_run(
    cfg: RunConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    figures: bool = True,
    eval_fn: Any = None,
) -> Any:
    """Train the run described by ``cfg`` into ``out_dir``; returns the last stage's ``TrainResult``.

    Loads the data, records ``meta``, seeds and builds the network (from the teacher's weights when the
    method starts there), builds the method's stages through the registry and runs them with
    :func:`fewflow.train.train_stages`. With ``figures``, writes ``samples.png`` (and, for 2-D data,
    ``trajectories.png``) from the EMA model."""
    from fewflow.train import TrainConfig, train_stages

    out_dir = Path(out_dir)
    cfg = RunConfig.from_dict(cfg.to_dict())  # a private copy
    spec = get_method(cfg.method_name)
    data = build_data(cfg)
    latent = None
    if cfg.latent:  # latent flow matching: train on the frozen autoencoder's scaled latents
        data, latent = latent_data(cfg, data, previous=cfg.meta.get("latent") if resume else None)
    meta = data_meta(data, cfg)
    if latent is not None:
        meta["latent"] = latent
    if resume and cfg.meta and cfg.meta.get("shape") != meta["shape"]:
        raise FewflowError(f"data shape {meta['shape']} differs from the run's {cfg.meta.get('shape')}")
    _check_needs(spec, cfg, data)
    cfg.meta = {**cfg.meta, **meta} if resume else meta
    source = build_source(cfg, data)
    if cfg.objective.source == "norm_aligned":  # the fitted scale travels with the run folder
        cfg.meta["source_scale"] = float(source.scale)
    tc = TrainConfig(**{**cfg.train, "seed": cfg.train.get("seed", cfg.seed)})
    teacher = None
    if cfg.teacher:
        teacher, tcfg = load_teacher(cfg.teacher, device="cpu")
        if list(tcfg.meta.get("shape", [])) != meta["shape"]:
            raise FewflowError(
                f"teacher {cfg.teacher} was trained on data of shape {tcfg.meta.get('shape')}, "
                f"this run's data has shape {meta['shape']}"
            )
        t_ae = (tcfg.meta.get("latent") or {}).get("ae_sha256")
        if t_ae != (cfg.meta.get("latent") or {}).get("ae_sha256"):
            raise FewflowError(f"teacher {cfg.teacher} and this run must share the latent space (--latent: "
                               "the same autoencoder run, or none for both)")
        if tcfg.objective.path != cfg.objective.path:
            raise FewflowError(
                f"teacher {cfg.teacher} was trained on the {tcfg.objective.path!r} path, this run uses "
                f"{cfg.objective.path!r} (--path)"
            )
        if spec.needs.init_from_teacher and spec.needs.model != "custom":
            # the student has the teacher's architecture, time features included (plus the flow-map
            # interval input), so that it starts exactly as the teacher
            built = getattr(teacher, "config", None)
            same = isinstance(built, dict) and built.get("type") == tcfg.model.get("type")
            src = built if same else tcfg.model
            cfg.model = {k: v for k, v in src.items() if k != "flow_map"}
    torch.manual_seed(tc.seed)  # the network's initial weights depend on the seed, nothing else
    model = build_model(cfg, cfg.meta)
    if teacher is not None and spec.needs.init_from_teacher and spec.needs.model != "custom":
        from fewflow.objectives.mfrae import init_from_teacher

        init_from_teacher(model, teacher, zero=("cond.h_embed.mlp.2",) if spec.flow_map else ())
    if spec.needs.model != "custom":  # the run records the network's complete config (every default)
        full = getattr(model, "config", None)
        builtin = isinstance(full, dict) and full.get("type") in ("MLP", "UNet", "DiT")
        cfg.model = dict(full) if builtin else resolve_model_config(cfg, cfg.meta)
    ctx = build_context(
        cfg, data, teacher=teacher, work_dir=out_dir, source=source,
        pairs=_pair_maker(out_dir, source, data, meta["num_classes"] if meta["conditional"] else None,
                          tc.progress),
    )
    stages = spec.build(spec.make_config(cfg.method), ctx)
    if spec.needs.ddp_mode != "wrap" and "ddp_mode" not in cfg.train:
        tc = dataclasses.replace(tc, ddp_mode=spec.needs.ddp_mode)
    cfg.train = dataclasses.asdict(tc)
    _, _, result = train_stages(model, stages, data, tc, out_dir=out_dir, run_config=cfg.to_dict(),
                                resume=resume, eval_fn=eval_fn)
    if result is None:  # every stage had finished before
        raise FewflowError(f"{out_dir}: nothing left to train")
    if result.stopped_reason == "completed" and figures and spec.needs.data != "points":
        _figures(out_dir, cfg, data)  # a point-cloud method samples from an input cloud: fewflow upsample
    return result


def _in_user_units(data: Any, rows: int) -> Any:
    """The first ``rows`` samples of ``data`` (as ``.x``) in the user's units: user data's normalisation
    undone, like the samples of ``generate``; other data as it is."""
    rec = getattr(data, "normalization", None)
    if rec is None:
        return data
    from types import SimpleNamespace

    from fewflow.data import denormalize

    return SimpleNamespace(x=denormalize(data.x[:rows], rec))


def _figures(out_dir: Path, cfg: RunConfig, data: Any) -> None:
    from fewflow.plotting import plot_samples, plot_trajectories
    from fewflow.sampling import generate

    model, cfg = load_run(out_dir, which="ema")
    gen = torch.Generator().manual_seed(cfg.seed)
    shape = list(cfg.meta.get("shape", []))
    n = 2000 if shape == [2] else 64
    c = getattr(data, "c", None)  # samples for the data's own conditions (cycled to n rows)
    cond = c[torch.arange(n) % c.shape[0]] if c is not None else None
    # (a latent run's trajectory is in latent space: no trajectory figure over the data)
    res = generate(model, cfg, n, generator=gen, trajectory=shape == [2] and not cfg.meta.get("latent"),
                   cond=cond)
    data = _in_user_units(data, n)  # the reference in the units generate returns
    vr = cfg.meta.get("value_range")
    plot_samples(
        res.x,
        out_dir / "samples.png",
        reference=data.x[:n] if shape == [2] else None,
        value_range=tuple(vr) if (vr and len(shape) == 3) else None,
        title=f"{cfg.data.name}, {cfg.method_name}: NFE {res.nfe}",
    )
    if res.trajectory is not None:
        plot_trajectories(res.trajectory, out_dir / "trajectories.png", reference=data.x[:n])
