"""Run configuration: one plain, JSON-serialisable description of a training run.

A run folder holds ``config.json`` (``RunConfig.to_dict()``) beside its checkpoints, so any run can be
rebuilt from its folder alone. Sections:

* ``data``: which data set (``fewflow.data.load_dataset(name, n=..., seed=..., **kwargs)``);
* ``model``: the network's own config dict (``{"type": "MLP", "hidden": 256, "depth": 4}``);
* ``method``: ``{"name": "meanflow", **fields}``, the registered method and its config dataclass's fields
  (see :mod:`fewflow.methods`); ``teacher``: the run folder of a teacher for methods that distil one;
  ``latent``: the run folder of a trained ``autoencoder`` whose latents the method trains on (latent flow
  matching; the data is encoded once, sampling decodes);
* ``objective``: ingredients shared by the methods -- path schedule, coupling, training time sampler,
  source, class conditioning;
* ``sampler``: sampling defaults (``None`` fields fall back to the method's default sampler);
* ``train``: keyword arguments of :class:`fewflow.train.TrainConfig`; ``meta``: what training learnt
  about the data (shape, classes, value range, fitted source scale, fitted grids).

Dotted overrides (``--set train.lr=3e-4``) go through :meth:`RunConfig.replace`; string values are parsed
as YAML plus scientific notation (``3e-4`` is a number, which plain YAML 1.1 does not give). Unknown keys
fail, naming the closest valid key.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fewflow._validate import FewflowError, closest, numbers_in, parse_value, unknown_key, unknown_name

__all__ = [
    "CONFIG_VERSION",
    "MEMORY_KIND",
    "DataSpec",
    "ObjectiveSpec",
    "RunConfig",
    "SamplerSpec",
    "closest",
    "default_config",
    "model_type",
    "parse_value",
    "read_config",
    "set_by_path",
    "unknown_key",
]

CONFIG_VERSION = 2
#: ``data.kind`` of a run trained by ``fewflow.train.Trainer`` on data held in memory: it cannot be reloaded
MEMORY_KIND = "memory"
MODEL_TYPES = {"mlp": "MLP", "unet": "UNet", "dit": "DiT"}
_MAX_CONFIG_BYTES = 1 << 20  # a config file is small: a larger one is a mistake (or a YAML bomb)


def set_by_path(d: dict[str, Any], key: str, value: Any) -> None:
    """Set ``d["a"]["b"] = value`` for ``key = "a.b"``, creating missing inner sections."""
    parts = key.split(".")
    if not all(parts):
        raise FewflowError(f"bad config key {key!r}")
    cur = d
    for p in parts[:-1]:
        if p not in cur or cur[p] is None:
            cur[p] = {}
        if not isinstance(cur[p], dict):
            raise FewflowError(f"config key {key!r}: {p!r} is not a section")
        cur = cur[p]
    cur[parts[-1]] = parse_value(value)


def read_config(path: str | Path) -> dict[str, Any]:
    """Read a JSON (``.json``) or YAML (``.yaml`` / ``.yml``) config file into a dict.

    YAML aliases are refused (a document of nested aliases expands without bound)."""
    path = Path(path)
    if not path.is_file():
        raise FewflowError(f"config file not found: {path}")
    if path.stat().st_size > _MAX_CONFIG_BYTES:
        raise FewflowError(f"config file {path} is larger than 1 MiB; is it really a config?")
    text = path.read_text()
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            class _NoAliases(yaml.SafeLoader):
                def compose_node(self, parent: Any, index: Any) -> Any:  # type: ignore[override]
                    if self.check_event(yaml.events.AliasEvent):
                        raise yaml.YAMLError("YAML aliases (*name) are not allowed in fewflow configs")
                    return super().compose_node(parent, index)

            d = numbers_in(yaml.load(text, Loader=_NoAliases))  # noqa: S506 (a SafeLoader subclass)
        else:
            d = json.loads(text)
    except Exception as e:  # json.JSONDecodeError, yaml.YAMLError
        raise FewflowError(f"cannot parse config file {path}: {str(e).splitlines()[0]}") from e
    if not isinstance(d, dict):
        raise FewflowError(f"config file {path} must hold a mapping at the top level")
    return d


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


def model_type(name: str) -> str:
    """Canonical model type (``"mlp"`` -> ``"MLP"``, ``"unet"`` -> ``"UNet"``, ``"dit"`` -> ``"DiT"``)."""
    key = str(name).lower()
    if key not in MODEL_TYPES:
        raise unknown_name("model type", str(name), MODEL_TYPES.values())
    return MODEL_TYPES[key]


# --------------------------------------------------------------------------- sections


@dataclass
class DataSpec:
    """Which data: ``fewflow.data.load_dataset(name, n=n, seed=seed, **kwargs)``.

    ``name`` is a built-in data set or, for data from the user, the ``--data`` value: a folder of images,
    an ``.npy`` / ``.npz`` / ``.csv`` file or ``module:function`` (in Python also the function itself).
    Training records what it loaded: ``kind`` (``folder | npy | npz | csv | function``), ``path`` (absolute,
    or ``module:function``) and ``sha256`` (of the file or the folder's images), so that ``fewflow eval``
    reloads the same data and refuses a file that changed. ``kind = "memory"``: data that was handed to
    ``fewflow.train.Trainer`` in memory (a tensor, arrays), which nothing can reload. ``kwargs`` of user
    data: ``image_size`` (folders: centre-crop and resize to S x S) and ``normalize`` (arrays; default
    true).
    """

    name: str = "checkerboard"
    n: int | None = None
    seed: int = 0
    kwargs: dict[str, Any] = field(default_factory=dict)
    kind: str | None = None
    path: str | None = None
    sha256: str | None = None


@dataclass
class ObjectiveSpec:
    """Ingredients shared by the training methods: the path schedule (alpha_t, sigma_t), the coupling
    of (x0, x1), the training time sampler, the source x0 and class conditioning (labels ``y``, dropped
    with probability ``label_dropout`` so that classifier-free guidance has an unconditional branch)."""

    path: str = "linear"
    path_kwargs: dict[str, Any] = field(default_factory=dict)
    coupling: str = "independent"
    coupling_kwargs: dict[str, Any] = field(default_factory=dict)
    time_sampler: str = "uniform"
    time_kwargs: dict[str, Any] = field(default_factory=dict)
    source: str = "gaussian"
    source_kwargs: dict[str, Any] = field(default_factory=dict)
    conditional: bool = False
    label_dropout: float = 0.0


@dataclass
class SamplerSpec:
    """Sampling defaults of ``fewflow sample`` / ``eval``; ``None`` means the method's default sampler."""

    stepper: str | None = None
    nfe: int | None = None
    grid: str | None = None
    grid_kwargs: dict[str, Any] = field(default_factory=dict)
    cfg_scale: float = 1.0


_SECTIONS: dict[str, type] = {"data": DataSpec, "objective": ObjectiveSpec, "sampler": SamplerSpec}


def _section(name: str, sec_cls: type, sec: Any) -> Any:
    if sec is None:
        sec = {}
    if not isinstance(sec, Mapping):
        raise FewflowError(f"run config section {name!r} must be a mapping, got {type(sec).__name__}")
    known = {f.name for f in dataclasses.fields(sec_cls)}
    for k in sec:
        if k not in known:
            raise unknown_key(str(k), name, known)
    return sec_cls(**copy.deepcopy(dict(sec)))


@dataclass
class RunConfig:
    """Everything needed to rebuild a run (module docstring). ``model``'s data-dependent entries
    (``dim`` / ``in_channels`` + ``size``, ``num_classes``, ``flow_map``) are filled in when training
    starts, so the model can be rebuilt from the run folder without its data."""

    data: DataSpec = field(default_factory=DataSpec)
    model: dict[str, Any] = field(default_factory=lambda: {"type": "MLP", "hidden": 256, "depth": 4})
    method: dict[str, Any] = field(default_factory=lambda: {"name": "cfm"})
    teacher: str | None = None
    latent: str | None = None
    objective: ObjectiveSpec = field(default_factory=ObjectiveSpec)
    sampler: SamplerSpec = field(default_factory=SamplerSpec)
    train: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    version: int = CONFIG_VERSION

    @property
    def method_name(self) -> str:
        return str(self.method.get("name", "cfm"))

    # -- serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready nested dict (deep copy)."""
        return copy.deepcopy(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RunConfig:
        """Build and validate from a nested dict; unknown keys or values raise :class:`FewflowError`."""
        if not isinstance(d, Mapping):
            raise FewflowError(f"run config must be a mapping, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        for k in d:
            if k not in known:
                raise unknown_key(str(k), "", known)
        version = d.get("version", CONFIG_VERSION)
        if version != CONFIG_VERSION:
            raise FewflowError(
                f"run config version {version!r} is not supported (this fewflow reads {CONFIG_VERSION})"
            )
        kw: dict[str, Any] = {n: _section(n, c, d.get(n)) for n, c in _SECTIONS.items()}
        for name, default in (("model", RunConfig().model), ("method", {"name": "cfm"})):
            val = d.get(name)
            if val is None:
                val = default
            if isinstance(val, str) and name == "method":
                val = {"name": val}
            if not isinstance(val, Mapping):
                raise FewflowError(f"run config section {name!r} must be a mapping, got {type(val).__name__}")
            kw[name] = copy.deepcopy(dict(val))
        for name in ("train", "meta"):
            val = d.get(name, {}) or {}
            if not isinstance(val, Mapping):
                raise FewflowError(f"run config section {name!r} must be a mapping, got {type(val).__name__}")
            kw[name] = copy.deepcopy(dict(val))
        kw["seed"] = d.get("seed", 0)
        kw["teacher"] = d.get("teacher")
        kw["latent"] = d.get("latent")
        cfg = cls(**kw)
        cfg.validate()
        return cfg

    def to_json(self, path: str | Path) -> Path:
        """Write ``to_dict()`` as indented JSON, atomically."""
        from fewflow._io import atomic_write_json

        return atomic_write_json(Path(path), self.to_dict(), indent=2)

    @classmethod
    def from_file(cls, path: str | Path) -> RunConfig:
        """Read a JSON or YAML file (by suffix) written by :meth:`to_json` or by hand."""
        return cls.from_dict(read_config(path))

    def replace(self, overrides: Mapping[str, Any]) -> RunConfig:
        """A copy with dotted-key overrides applied (``{"train.steps": 100, "method.ratio": 0.5}``).
        Setting ``method.name`` to another method drops the previous method's fields."""
        d = self.to_dict()
        for key, value in overrides.items():
            if key == "method.name" and parse_value(value) != d["method"].get("name"):
                d["method"] = {}
            set_by_path(d, key, value)
        return RunConfig.from_dict(d)

    # -- validation ---------------------------------------------------------------------
    def validate(self) -> None:
        """Check names and ranges; raise :class:`FewflowError` naming the first problem."""
        from fewflow.data import DATASETS, USER_DATA_HINT, USER_KINDS, import_path_of, is_import_path
        from fewflow.data import looks_like_user_data as _user_data
        from fewflow.methods import get_method

        dat, mod, obj, smp = self.data, self.model, self.objective, self.sampler
        if callable(dat.name):  # a data function given in Python: record its import path
            dat.name = import_path_of(dat.name)
        if not isinstance(dat.name, str) or not dat.name.strip():
            raise FewflowError("data.name must name a data set (it is empty)")
        if dat.kind is not None and dat.kind not in (*USER_KINDS, MEMORY_KIND):
            raise unknown_name("data kind", str(dat.kind), (*USER_KINDS, MEMORY_KIND))
        if dat.kind is None and dat.name not in DATASETS and not _user_data(dat.name):
            raise FewflowError(f"{unknown_name('data set', str(dat.name), DATASETS)}; {USER_DATA_HINT}")
        for key in ("path", "sha256"):
            if getattr(dat, key) is not None and not isinstance(getattr(dat, key), str):
                raise FewflowError(f"data.{key} must be a string or null, got {getattr(dat, key)!r}")
        if dat.n is not None and (not _is_int(dat.n) or dat.n <= 0):
            raise FewflowError(f"data.n must be a positive integer or null, got {dat.n!r}")
        if not _is_int(dat.seed):
            raise FewflowError(f"data.seed must be an integer, got {dat.seed!r}")
        if isinstance(mod, dict) and isinstance(mod.get("type"), type):  # a model class given in Python
            mod["type"] = import_path_of(mod["type"])
        if not isinstance(mod, dict) or "type" not in mod:
            raise FewflowError("run config section 'model' needs a 'type' (MLP, UNet, DiT or module:Class)")
        if is_import_path(mod["type"]):  # the user's network, imported and checked when it is built
            mod["type"] = str(mod["type"]).strip()
        else:
            try:
                mod["type"] = model_type(mod["type"])
            except FewflowError as e:
                raise FewflowError(f"{e}; or your own network as module:Class") from None
        spec = get_method(self.method_name)
        self.method = spec.config_dict(self.method)  # fills defaults, rejects unknown fields
        if spec.needs.teacher and self.teacher is not None and not isinstance(self.teacher, str):
            raise FewflowError(f"teacher must be a run folder path, got {self.teacher!r}")
        if self.latent is not None and (not isinstance(self.latent, str) or not self.latent.strip()):
            raise FewflowError(f"latent must be the run folder of an autoencoder, got {self.latent!r}")
        from fewflow.couplings import COUPLINGS
        from fewflow.objectives.time_samplers import TIME_SAMPLERS
        from fewflow.paths import SCHEDULES
        from fewflow.sources import SOURCES

        for what, val, table in (
            ("path schedule", obj.path, SCHEDULES),
            ("coupling", obj.coupling, COUPLINGS),
            ("time sampler", obj.time_sampler, TIME_SAMPLERS),
            ("source", obj.source, SOURCES),
        ):
            if val not in table:
                raise unknown_name(what, str(val), table)
        if not isinstance(obj.conditional, bool):
            raise FewflowError(f"objective.conditional must be true or false, got {obj.conditional!r}")
        if not _is_number(obj.label_dropout) or not 0.0 <= obj.label_dropout < 1.0:
            raise FewflowError(f"objective.label_dropout must lie in [0, 1), got {obj.label_dropout!r}")
        if obj.label_dropout > 0 and not obj.conditional:
            raise FewflowError("objective.label_dropout > 0 needs objective.conditional = true")
        from fewflow.solvers import GRIDS, STEPPER_NAMES

        if smp.stepper is not None and smp.stepper not in STEPPER_NAMES:
            raise unknown_name("stepper", str(smp.stepper), STEPPER_NAMES)
        if smp.grid is not None and smp.grid not in GRIDS:
            raise unknown_name("time grid", str(smp.grid), GRIDS)
        if smp.nfe is not None and (not _is_int(smp.nfe) or smp.nfe < 1):
            raise FewflowError(f"sampler.nfe must be a positive integer, got {smp.nfe!r}")
        if not _is_number(smp.cfg_scale):
            raise FewflowError(f"sampler.cfg_scale must be a number, got {smp.cfg_scale!r}")
        if not _is_int(self.seed):
            raise FewflowError(f"seed must be an integer, got {self.seed!r}")
        for sec, name in (
            (dat.kwargs, "data.kwargs"),
            (obj.path_kwargs, "objective.path_kwargs"),
            (obj.coupling_kwargs, "objective.coupling_kwargs"),
            (obj.time_kwargs, "objective.time_kwargs"),
            (obj.source_kwargs, "objective.source_kwargs"),
            (smp.grid_kwargs, "sampler.grid_kwargs"),
        ):
            if not isinstance(sec, dict):
                raise FewflowError(f"{name} must be a mapping, got {type(sec).__name__}")
        from fewflow.train import TrainConfig

        names = {f.name for f in dataclasses.fields(TrainConfig)}
        for k in self.train:
            if k not in names:
                raise unknown_key(str(k), "train", names)


def default_config(name: str, method: str | None = None) -> RunConfig:
    """Per-data-set defaults (``method`` defaults to ``cfm``, ``gsfm`` for sequence data).

    * 2-D toys: MLP 4 x 256, unconditional, 4000 steps, batch 512, lr 1e-3, EMA.
    * digits (8 x 8): class-conditional MLP 4 x 512 on the flattened image, label dropout 0.1 (for CFG).
    * mnist: class-conditional UNet, label dropout 0.1.
    * sequences (markov, motifs, dna, proteins): the sequence method builds its own network; 4000 steps,
      batch 256, lr 1e-3 (50,000 draws of the synthetic sets).
    """
    from fewflow.data import DATASETS, SEQUENCE_SETS, TOY_DATASETS

    if name not in DATASETS:
        raise unknown_name("data set", str(name), DATASETS)
    method = method or ("gsfm" if name in SEQUENCE_SETS else "cfm")
    if name in SEQUENCE_SETS:
        synthetic = name in ("markov", "motifs")
        cfg = RunConfig(
            data=DataSpec(name=name, n=50_000 if synthetic else None),
            train={"steps": 4000, "batch_size": 256, "lr": 1e-3},
        )
    elif name in TOY_DATASETS:
        cfg = RunConfig(
            data=DataSpec(name=name, n=50_000),
            model={"type": "MLP", "hidden": 256, "depth": 4},
            train={"steps": 4000, "batch_size": 512, "lr": 1e-3},
        )
    elif name == "digits":
        cfg = RunConfig(
            data=DataSpec(name=name),
            model={"type": "MLP", "hidden": 512, "depth": 4},
            objective=ObjectiveSpec(conditional=True, label_dropout=0.1),
            train={"steps": 5000, "batch_size": 256, "lr": 1e-3},
        )
    else:  # mnist
        cfg = RunConfig(
            data=DataSpec(name=name),
            model={"type": "UNet", "base": 32, "mults": [1, 2, 2]},
            objective=ObjectiveSpec(conditional=True, label_dropout=0.1),
            train={"steps": 20_000, "batch_size": 128, "lr": 2e-4},
        )
    cfg.method = {"name": method}
    cfg.validate()
    return cfg
