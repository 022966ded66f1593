"""Run configuration: one plain, JSON-serialisable description of a training run, and the
functions that turn it into library objects (data, model, objective, sampler).

A run folder holds ``config.json`` (``RunConfig.to_dict()``) beside its checkpoints, so any run can
be rebuilt from its folder alone::

    cfg = RunConfig.for_data("checkerboard", method="cfm", coupling="ot")
    data = build_data(cfg)
    model = build_model_from_config(cfg, data)
    objective = build_objective(cfg, data)
    ...
    x = generate(model, cfg, n=2000, nfe=8, stepper="heun").x

Methods live in a registry (:func:`register_method`), so a new training method (MeanFlow, reflow,
...) adds one builder without touching this file's logic. The reference method is conditional flow
matching ("cfm"): Lipman et al., *Flow Matching for Generative Modeling* (2023) and Tong et al.,
*Improving and Generalizing Flow-Based Generative Models with Minibatch Optimal Transport* (2024):
``x_t = alpha_t x1 + sigma_t x0``, loss ``E || v(x_t, t) - (alpha'_t x1 + sigma'_t x0) ||^2``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fewflow._validate import FewflowError, unknown_name

__all__ = [
    "CONFIG_VERSION",
    "COUPLINGS",
    "DataSpec",
    "GRIDS",
    "MethodSpec",
    "ObjectiveSpec",
    "RunConfig",
    "SOURCES",
    "SamplerSpec",
    "TIME_SAMPLERS",
    "TOY_DATASETS",
    "build_coupling",
    "build_data",
    "build_grid",
    "build_model_from_config",
    "build_objective",
    "build_path",
    "build_source",
    "build_time_sampler",
    "build_train_config",
    "draw_source",
    "default_config",
    "generate",
    "get_method",
    "list_methods",
    "load_run",
    "read_config",
    "read_run_folder",
    "resolve_model_config",
    "train_run",
    "register_method",
    "set_by_path",
]

CONFIG_VERSION = 1

TOY_DATASETS = ("8gaussians", "moons", "checkerboard", "spirals", "rings", "gmm")
IMAGE_DATASETS = ("digits", "mnist")
DATASETS = TOY_DATASETS + IMAGE_DATASETS

# name -> (class name in fewflow.couplings, default kwargs)
COUPLINGS: dict[str, tuple[str, dict[str, Any]]] = {
    "independent": ("IndependentCoupling", {}),
    "ot": ("ExactOTCoupling", {}),
    "sinkhorn": ("SinkhornCoupling", {"reg": 0.05}),
    "wcfm": ("WeightedCoupling", {"eps": 0.1}),
    "sb": ("SchrodingerBridgeCoupling", {"sigma": 0.1}),
    "class_ot": ("ClassConditionalOT", {}),
}
SCHEDULES = ("linear", "cosine", "vp", "polynomial")
TIME_SAMPLERS = ("uniform", "logit_normal", "shifted")
SOURCES = ("gaussian", "norm_aligned")
GRIDS = ("uniform", "shift", "edm", "logsnr", "boss")
STEPPERS = ("euler", "midpoint", "heun", "rk4")
MODEL_TYPES = {"mlp": "MLP", "unet": "UNet", "dit": "DiT"}


# --------------------------------------------------------------------------- dataclasses


@dataclass
class DataSpec:
    """Which data set: ``fewflow.data.load_dataset(name, n=n, seed=seed, **kwargs)``."""

    name: str = "checkerboard"
    n: int | None = None
    seed: int = 0
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class ObjectiveSpec:
    """How the loss is built: method, path schedule, coupling, time sampler, source, conditioning."""

    method: str = "cfm"
    schedule: str = "linear"
    schedule_kwargs: dict[str, Any] = field(default_factory=dict)
    coupling: str = "independent"
    coupling_kwargs: dict[str, Any] = field(default_factory=dict)
    time_sampler: str = "uniform"
    time_kwargs: dict[str, Any] = field(default_factory=dict)
    source: str = "gaussian"
    source_kwargs: dict[str, Any] = field(default_factory=dict)
    conditional: bool = False
    label_dropout: float = 0.0
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class SamplerSpec:
    """Sampling defaults used by ``fewflow sample`` / ``eval`` when no option overrides them."""

    stepper: str = "euler"
    nfe: int = 100
    grid: str = "uniform"
    grid_kwargs: dict[str, Any] = field(default_factory=dict)
    cfg_scale: float = 1.0


_SECTIONS: dict[str, type] = {
    "data": DataSpec,
    "objective": ObjectiveSpec,
    "sampler": SamplerSpec,
}


@dataclass
class RunConfig:
    """Everything needed to rebuild a run: data, model, objective, sampler defaults and the
    trainer's settings (``train``: keyword arguments of :class:`fewflow.train.TrainConfig`).

    ``model`` is the network's own config dict, as accepted by ``fewflow.models.build_model``
    (``{"type": "MLP", "hidden": 256, "depth": 4}``); the data-dependent entries (``dim`` /
    ``in_channels`` + ``size``, ``num_classes``, ``flow_map``) are filled in from the data set when
    training starts, so ``fewflow.train.checkpoint.load_model`` can rebuild it from the run folder.

    ``meta`` is filled when training starts (data shape, number of classes, value range) so that
    sampling a finished run does not need to reload its data set.
    """

    data: DataSpec = field(default_factory=DataSpec)
    model: dict[str, Any] = field(default_factory=lambda: {"type": "MLP", "hidden": 256, "depth": 4})
    objective: ObjectiveSpec = field(default_factory=ObjectiveSpec)
    sampler: SamplerSpec = field(default_factory=SamplerSpec)
    train: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    version: int = CONFIG_VERSION

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
        extra = set(d) - known
        if extra:
            raise FewflowError(
                f"unknown run-config key(s) {sorted(extra)}; valid keys: {', '.join(sorted(known))}"
            )
        version = d.get("version", CONFIG_VERSION)
        if version != CONFIG_VERSION:
            raise FewflowError(
                f"run config version {version!r} is not supported (this fewflow reads {CONFIG_VERSION})"
            )
        kw: dict[str, Any] = {}
        for name, sec_cls in _SECTIONS.items():
            sec = d.get(name, {})
            if sec is None:
                sec = {}
            if not isinstance(sec, Mapping):
                raise FewflowError(f"run config section {name!r} must be a mapping, got {type(sec).__name__}")
            sec_known = {f.name for f in dataclasses.fields(sec_cls)}
            bad = set(sec) - sec_known
            if bad:
                raise FewflowError(
                    f"unknown key(s) {sorted(bad)} in section {name!r}; "
                    f"valid keys: {', '.join(sorted(sec_known))}"
                )
            kw[name] = sec_cls(**copy.deepcopy(dict(sec)))
        model = d.get("model", None)
        if model is None:
            model = RunConfig().model
        if not isinstance(model, Mapping):
            raise FewflowError(f"run config section 'model' must be a mapping, got {type(model).__name__}")
        kw["model"] = copy.deepcopy(dict(model))
        for name in ("train", "meta"):
            val = d.get(name, {}) or {}
            if not isinstance(val, Mapping):
                raise FewflowError(f"run config section {name!r} must be a mapping, got {type(val).__name__}")
            kw[name] = copy.deepcopy(dict(val))
        kw["seed"] = d.get("seed", 0)
        cfg = cls(**kw)
        cfg.validate()
        return cfg

    def to_json(self, path: str | Path) -> Path:
        """Write ``to_dict()`` as indented JSON (atomically: temp file + rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        tmp.replace(path)
        return path

    @classmethod
    def from_file(cls, path: str | Path) -> RunConfig:
        """Read a JSON or YAML file (by suffix) written by :meth:`to_json` or by hand."""
        return cls.from_dict(read_config(path))

    def replace(self, overrides: Mapping[str, Any]) -> RunConfig:
        """A copy with dotted-key overrides applied (``{"train.steps": 100, "objective.coupling": "ot"}``)."""
        d = self.to_dict()
        for key, value in overrides.items():
            set_by_path(d, key, value)
        return RunConfig.from_dict(d)

    # -- validation ---------------------------------------------------------------------
    def validate(self) -> None:
        """Check names and ranges; raise :class:`FewflowError` naming the first problem."""
        dat, mod, obj, smp = self.data, self.model, self.objective, self.sampler
        if not isinstance(dat.name, str) or dat.name not in DATASETS:
            raise unknown_name("data set", str(dat.name), DATASETS)
        if dat.n is not None and (not _is_int(dat.n) or dat.n <= 0):
            raise FewflowError(f"data.n must be a positive integer or null, got {dat.n!r}")
        if not _is_int(dat.seed):
            raise FewflowError(f"data.seed must be an integer, got {dat.seed!r}")
        if not isinstance(mod, dict) or "type" not in mod:
            raise FewflowError("run config section 'model' needs a 'type' (one of: MLP, UNet, DiT)")
        mod["type"] = model_type(mod["type"])
        if obj.method not in _METHODS:
            raise unknown_name("method", str(obj.method), _METHODS)
        if obj.schedule not in SCHEDULES:
            raise unknown_name("schedule", str(obj.schedule), SCHEDULES)
        if obj.coupling not in COUPLINGS:
            raise unknown_name("coupling", str(obj.coupling), COUPLINGS)
        if obj.time_sampler not in TIME_SAMPLERS:
            raise unknown_name("time sampler", str(obj.time_sampler), TIME_SAMPLERS)
        if obj.source not in SOURCES:
            raise unknown_name("source", str(obj.source), SOURCES)
        if not isinstance(obj.conditional, bool):
            raise FewflowError(f"objective.conditional must be true or false, got {obj.conditional!r}")
        if not _is_number(obj.label_dropout) or not 0.0 <= obj.label_dropout < 1.0:
            raise FewflowError(f"objective.label_dropout must lie in [0, 1), got {obj.label_dropout!r}")
        if obj.label_dropout > 0 and not obj.conditional:
            raise FewflowError("objective.label_dropout > 0 needs objective.conditional = true")
        if smp.stepper not in stepper_names():
            raise unknown_name("stepper", str(smp.stepper), stepper_names())
        if smp.grid not in GRIDS:
            raise unknown_name("time grid", str(smp.grid), GRIDS)
        if not _is_int(smp.nfe) or smp.nfe < 1:
            raise FewflowError(f"sampler.nfe must be a positive integer, got {smp.nfe!r}")
        if not _is_number(smp.cfg_scale):
            raise FewflowError(f"sampler.cfg_scale must be a number, got {smp.cfg_scale!r}")
        if not _is_int(self.seed):
            raise FewflowError(f"seed must be an integer, got {self.seed!r}")
        for sec, name in (
            (dat.kwargs, "data.kwargs"),
            (obj.schedule_kwargs, "objective.schedule_kwargs"),
            (obj.coupling_kwargs, "objective.coupling_kwargs"),
            (obj.time_kwargs, "objective.time_kwargs"),
            (obj.source_kwargs, "objective.source_kwargs"),
            (obj.kwargs, "objective.kwargs"),
            (smp.grid_kwargs, "sampler.grid_kwargs"),
        ):
            if not isinstance(sec, dict):
                raise FewflowError(f"{name} must be a mapping, got {type(sec).__name__}")
        _check_train_keys(self.train)

    # -- defaults -----------------------------------------------------------------------
    @classmethod
    def for_data(cls, name: str, **objective: Any) -> RunConfig:
        """Sensible defaults for a data set (see :func:`default_config`), objective fields overridden."""
        cfg = default_config(name)
        if objective:
            cfg = cfg.replace({f"objective.{k}": v for k, v in objective.items()})
        return cfg


def model_type(name: str) -> str:
    """Canonical model type (``"mlp"`` -> ``"MLP"``, ``"unet"`` -> ``"UNet"``, ``"dit"`` -> ``"DiT"``)."""
    key = str(name).lower()
    if key not in MODEL_TYPES:
        raise unknown_name("model type", str(name), MODEL_TYPES.values())
    return MODEL_TYPES[key]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


def _train_fields() -> set[str] | None:
    try:
        from fewflow.train import TrainConfig
    except ImportError:  # trainer layer not installed yet: accept any keys
        return None
    return {f.name for f in dataclasses.fields(TrainConfig)}


def _check_train_keys(train: Mapping[str, Any]) -> None:
    names = _train_fields()
    if names is None:
        return
    bad = set(train) - names
    if bad:
        raise FewflowError(
            f"unknown key(s) {sorted(bad)} in section 'train'; valid keys: {', '.join(sorted(names))}"
        )


def default_config(name: str) -> RunConfig:
    """Per-data-set defaults.

    * 2-D toys: MLP 4 x 256, unconditional, 4000 steps, batch 512, lr 1e-3, EMA.
    * digits (8 x 8): class-conditional MLP 4 x 512 on the flattened image, label dropout 0.1 (for CFG).
    * mnist: class-conditional UNet, label dropout 0.1.
    """
    if name not in DATASETS:
        raise unknown_name("data set", str(name), DATASETS)
    if name in TOY_DATASETS:
        cfg = RunConfig(
            data=DataSpec(name=name, n=50_000),
            model={"type": "MLP", "hidden": 256, "depth": 4},
            train=_train_defaults(steps=4000, batch_size=512, lr=1e-3),
        )
    elif name == "digits":
        cfg = RunConfig(
            data=DataSpec(name=name),
            model={"type": "MLP", "hidden": 512, "depth": 4},
            objective=ObjectiveSpec(conditional=True, label_dropout=0.1),
            sampler=SamplerSpec(cfg_scale=1.0),
            train=_train_defaults(steps=5000, batch_size=256, lr=1e-3),
        )
    else:  # mnist
        cfg = RunConfig(
            data=DataSpec(name=name),
            model={"type": "UNet", "base": 32, "mults": [1, 2, 2]},
            objective=ObjectiveSpec(conditional=True, label_dropout=0.1),
            train=_train_defaults(steps=20_000, batch_size=128, lr=2e-4),
        )
    cfg.validate()
    return cfg


def _train_defaults(**kw: Any) -> dict[str, Any]:
    """Keep only the defaults that :class:`fewflow.train.TrainConfig` knows (names may differ by version)."""
    names = _train_fields()
    if names is None:
        return dict(kw)
    return {k: v for k, v in kw.items() if k in names}


def read_config(path: str | Path) -> dict[str, Any]:
    """Read a JSON (``.json``) or YAML (``.yaml`` / ``.yml``) config file into a dict."""
    path = Path(path)
    if not path.is_file():
        raise FewflowError(f"config file not found: {path}")
    text = path.read_text()
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            d = yaml.safe_load(text)
        else:
            d = json.loads(text)
    except Exception as e:  # json.JSONDecodeError, yaml.YAMLError
        raise FewflowError(f"cannot parse config file {path}: {str(e).splitlines()[0]}") from e
    if not isinstance(d, dict):
        raise FewflowError(f"config file {path} must hold a mapping at the top level")
    return d


def set_by_path(d: dict[str, Any], key: str, value: Any) -> None:
    """Set ``d["a"]["b"] = value`` for ``key = "a.b"``, creating inner dicts under ``*kwargs``/``train``."""
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
    cur[parts[-1]] = value


# --------------------------------------------------------------------------- methods


@dataclass(frozen=True)
class MethodSpec:
    """A registered training method: ``builder(cfg, data) -> objective`` and whether it trains a
    flow-map model ``u(x, s, t)`` (sampled with flow-map jumps) instead of a velocity ``v(x, t)``."""

    name: str
    builder: Callable[[RunConfig, Any], Any]
    flow_map: bool = False
    description: str = ""


_METHODS: dict[str, MethodSpec] = {}


def register_method(
    name: str,
    builder: Callable[[RunConfig, Any], Any],
    *,
    flow_map: bool = False,
    description: str = "",
    overwrite: bool = False,
) -> MethodSpec:
    """Register a training method under ``name``; ``builder(cfg: RunConfig, data: Dataset)`` returns an
    objective ``objective(model, x1, *, generator=None, **cond) -> LossOutput``."""
    if not isinstance(name, str) or not name:
        raise FewflowError(f"method name must be a non-empty string, got {name!r}")
    if name in _METHODS and not overwrite:
        raise FewflowError(f"method {name!r} is already registered (pass overwrite=True to replace it)")
    spec = MethodSpec(name=name, builder=builder, flow_map=flow_map, description=description)
    _METHODS[name] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    """The :class:`MethodSpec` registered under ``name``."""
    if name not in _METHODS:
        raise unknown_name("method", str(name), _METHODS)
    return _METHODS[name]


def list_methods() -> list[str]:
    """Names of the registered methods."""
    return sorted(_METHODS)


# --------------------------------------------------------------------------- builders


def build_data(cfg: RunConfig, *, n: int | None = None, seed: int | None = None) -> Any:
    """Load the run's data set (``fewflow.data.load_dataset``); ``n``/``seed`` override the config
    (e.g. a fresh reference sample for evaluation)."""
    from fewflow.data import load_dataset

    d = cfg.data
    return load_dataset(d.name, n=d.n if n is None else n, seed=d.seed if seed is None else seed, **d.kwargs)


def data_meta(data: Any) -> dict[str, Any]:
    """What sampling needs to know about the data without loading it: shape, classes, value range."""
    vr = getattr(data, "value_range", None)
    return {
        "shape": list(data.x.shape[1:]),
        "num_classes": getattr(data, "num_classes", None),
        "value_range": list(vr) if vr is not None else None,
    }


def _meta(cfg: RunConfig, data: Any | None) -> dict[str, Any]:
    if data is not None:
        return data_meta(data)
    if cfg.meta.get("shape"):
        return cfg.meta
    raise FewflowError("the run config has no data shape (meta.shape); pass the data set")


def resolve_model_config(cfg: RunConfig, data: Any | None = None) -> dict[str, Any]:
    """The run's model config with the data-dependent entries filled in from ``data`` (or ``cfg.meta``):
    ``dim`` for an MLP, ``in_channels`` and ``size`` for image networks, ``num_classes`` when
    conditional, ``flow_map`` for flow-map methods."""
    meta = _meta(cfg, data)
    shape = list(meta["shape"])
    m = dict(cfg.model)
    m["type"] = model_type(m.get("type", "MLP"))
    if m["type"] == "MLP":
        m.setdefault("dim", int(math.prod(shape)))
    else:
        if len(shape) != 3 or shape[1] != shape[2]:
            raise FewflowError(
                f"model type {m['type']!r} needs square images (C, H, W), got data shape {tuple(shape)}"
            )
        m.setdefault("in_channels", int(shape[0]))
        m.setdefault("size", int(shape[1]))
    if cfg.objective.conditional:
        k = meta.get("num_classes")
        if not k:
            raise FewflowError(
                f"data set {cfg.data.name!r} has no class labels; cannot train a conditional model"
            )
        m.setdefault("num_classes", int(k))
    if get_method(cfg.objective.method).flow_map:
        m.setdefault("flow_map", True)
        if m["type"] == "MLP":
            # MeanFlow's pitfall: high-frequency time features blow up d u / d t; a few low Fourier
            # frequencies of (t, t - s) work at toy scale (the notes' calibration runs).
            m.setdefault("time_features", "fourier")
            m.setdefault("num_frequencies", 3)
    return m


def build_model_from_config(cfg: RunConfig, data: Any | None = None) -> torch.nn.Module:
    """Create the network with ``fewflow.models.build_model(resolve_model_config(cfg, data))``."""
    from fewflow.models import build_model

    m = resolve_model_config(cfg, data)
    try:
        return build_model(m)
    except FewflowError:
        raise
    except TypeError as e:
        raise FewflowError(f"bad model settings for {m['type']!r}: {e}") from e


def build_path(cfg: RunConfig) -> Any:
    """``AffinePath(get_schedule(objective.schedule, **objective.schedule_kwargs))``."""
    from fewflow.paths import AffinePath, get_schedule

    return AffinePath(get_schedule(cfg.objective.schedule, **cfg.objective.schedule_kwargs))


def build_source(cfg: RunConfig, data: Any | None = None) -> Any:
    """The source distribution x0, or ``None`` for the standard Gaussian N(0, I) (what every objective
    and :func:`generate` use by default). ``gaussian`` with ``scale``: ``GaussianSource(shape, scale)``;
    ``norm_aligned``: ``NormAlignedGaussian.fit(data.x)`` (Gaussian scaled so that its mean norm
    matches the data's); a trained run reuses the scale stored in ``meta["source_scale"]``."""
    name, kw = cfg.objective.source, dict(cfg.objective.source_kwargs)
    if name == "gaussian" and not kw:
        return None
    from fewflow.sources import GaussianSource, NormAlignedGaussian

    if name == "gaussian":
        return _construct(
            lambda **k: GaussianSource(tuple(_meta(cfg, data)["shape"]), **k), kw, "source 'gaussian'"
        )
    if name == "norm_aligned":
        scale = cfg.meta.get("source_scale") if data is None else None
        if scale is not None:  # a trained run: the scale fitted at training time, no data needed
            return NormAlignedGaussian(tuple(cfg.meta["shape"]), scale=float(scale))
        if data is None:
            data = build_data(cfg)
        return NormAlignedGaussian.fit(data.x)
    raise unknown_name("source", name, SOURCES)


def draw_source(
    source: Any | None,
    cfg: RunConfig,
    n: int,
    *,
    device: torch.device,
    dtype: torch.dtype,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``n`` source samples x0 of the run's data shape (``None`` source: standard normal)."""
    if source is not None:
        return source.sample(n, device=device, dtype=dtype, generator=generator)
    shape = tuple(int(v) for v in _meta(cfg, None)["shape"])
    gdev = generator.device if generator is not None else device
    return torch.randn((n, *shape), generator=generator, device=gdev, dtype=dtype).to(device)


def build_coupling(cfg: RunConfig) -> Any:
    """The (x0, x1) coupling named by ``objective.coupling`` with its default kwargs overridden."""
    import fewflow.couplings as C

    cls_name, defaults = COUPLINGS[cfg.objective.coupling]
    kw = {**defaults, **cfg.objective.coupling_kwargs}
    return _construct(getattr(C, cls_name), kw, f"coupling {cfg.objective.coupling!r}")


def build_time_sampler(cfg: RunConfig) -> Any:
    """``uniform`` -> UniformTime; ``logit_normal`` -> LogitNormalTime(mean, std);
    ``shifted`` -> ShiftedTime(UniformTime(), shift)."""
    import fewflow.objectives as O

    name, kw = cfg.objective.time_sampler, dict(cfg.objective.time_kwargs)
    if name == "uniform":
        return _construct(O.UniformTime, kw, "time sampler 'uniform'")
    if name == "logit_normal":
        return _construct(O.LogitNormalTime, kw, "time sampler 'logit_normal'")
    if name == "shifted":
        if "shift" not in kw:
            raise FewflowError("time sampler 'shifted' needs objective.time_kwargs.shift")
        return O.ShiftedTime(O.UniformTime(), float(kw["shift"]))
    raise unknown_name("time sampler", name, TIME_SAMPLERS)


def _construct(cls: Any, kw: dict[str, Any], what: str) -> Any:
    try:
        return cls(**kw)
    except TypeError as e:
        raise FewflowError(f"bad arguments for {what}: {e}") from e


def build_objective(cfg: RunConfig, data: Any) -> Any:
    """The training objective from the method registry."""
    return get_method(cfg.objective.method).builder(cfg, data)


def build_train_config(cfg: RunConfig, **overrides: Any) -> Any:
    """``fewflow.train.TrainConfig(**cfg.train, **overrides)`` (``seed`` defaults to the run's seed)."""
    from fewflow.train import TrainConfig

    kw = {**cfg.train, **overrides}
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    if "seed" in names:
        kw.setdefault("seed", cfg.seed)
    _check_train_keys(kw)
    try:
        return TrainConfig(**kw)
    except TypeError as e:
        raise FewflowError(f"bad train settings: {e}") from e


def _build_cfm(cfg: RunConfig, data: Any) -> Any:
    """Conditional flow matching (Lipman et al. 2023; Tong et al. 2024 for the OT couplings)."""
    from fewflow.objectives import CFMLoss

    obj = cfg.objective
    num_classes = _meta(cfg, data).get("num_classes") if obj.conditional else None
    return CFMLoss(
        build_path(cfg),
        source=build_source(cfg, data),
        coupling=build_coupling(cfg),
        time_sampler=build_time_sampler(cfg),
        label_dropout=float(obj.label_dropout),
        num_classes=num_classes,
        **obj.kwargs,
    )


register_method("cfm", _build_cfm, description="conditional flow matching (Lipman et al. 2023)")


def _flow_map_kwargs(cfg: RunConfig, data: Any) -> dict[str, Any]:
    obj = cfg.objective
    if obj.schedule != "linear":
        raise FewflowError(f"method {obj.method!r} needs the linear path (objective.schedule = 'linear')")
    num_classes = _meta(cfg, data).get("num_classes") if obj.conditional else None
    return dict(
        path=build_path(cfg),
        source=build_source(cfg, data),
        label_dropout=float(obj.label_dropout),
        num_classes=num_classes,
    )


def _build_meanflow(cfg: RunConfig, data: Any) -> Any:
    """MeanFlow (Geng et al. 2025): average-velocity model trained with the JVP identity.

    ``objective.kwargs`` pass through to :class:`fewflow.objectives.MeanFlowLoss` (``ratio``,
    ``adaptive_p``, ``adaptive_c``, ``omega``, ``kappa``, ...); ``objective.time_sampler = "uniform"``
    draws (s, t) uniformly (the toy-scale choice), otherwise the paper's logit-normal pair."""
    from fewflow.objectives.meanflow import MeanFlowLoss, TimePairSampler

    obj = cfg.objective
    ts = TimePairSampler.uniform() if obj.time_sampler == "uniform" else TimePairSampler.logit_normal(
        **obj.time_kwargs
    )
    kw = {**_flow_map_kwargs(cfg, data), "time_sampler": ts, **obj.kwargs}
    return _construct(MeanFlowLoss, kw, "meanflow")


def _build_splitmeanflow(cfg: RunConfig, data: Any) -> Any:
    """SplitMeanFlow (Guo et al. 2025): interval-splitting consistency plus the flow-matching boundary."""
    from fewflow.objectives.meanflow import TimePairSampler
    from fewflow.objectives.splitmeanflow import SplitMeanFlowLoss

    obj = cfg.objective
    ts = TimePairSampler.uniform() if obj.time_sampler == "uniform" else TimePairSampler.logit_normal(
        **obj.time_kwargs
    )
    kw = {**_flow_map_kwargs(cfg, data), "time_sampler": ts, **obj.kwargs}
    return _construct(SplitMeanFlowLoss, kw, "splitmeanflow")


register_method(
    "meanflow",
    _build_meanflow,
    flow_map=True,
    description="MeanFlow average-velocity model (Geng et al. 2025)",
)
register_method(
    "splitmeanflow",
    _build_splitmeanflow,
    flow_map=True,
    description="SplitMeanFlow interval-splitting consistency (Guo et al. 2025)",
)


# --------------------------------------------------------------------------- sampling


def build_grid(kind: str, steps: int, **kw: Any) -> Tensor:
    """A time grid of ``steps`` steps from 0 to 1: ``uniform``, ``shift`` (``shift=``), ``edm`` (``rho=``)
    or ``logsnr`` (uniform in log-SNR of ``schedule=``, default linear). BOSS grids depend on the model:
    see :func:`boss_grid`."""
    from fewflow.solvers import edm_grid, logsnr_grid, shifted_grid, uniform_grid

    if not _is_int(steps) or steps < 1:
        raise FewflowError(f"number of steps must be a positive integer, got {steps!r}")
    if kind == "logsnr":
        from fewflow.paths import LinearSchedule

        return logsnr_grid(steps, kw.get("schedule") or LinearSchedule())
    if kind == "boss":
        raise FewflowError("the BOSS grid depends on the model: build it with fewflow.run.boss_grid(...)")
    if kind == "uniform":
        return uniform_grid(steps)
    if kind == "shift":
        return shifted_grid(steps, float(kw.get("shift", 3.0)))
    if kind == "edm":  # starts at t = 0 (the source) when there are >= 2 steps
        rho = {"rho": float(kw["rho"])} if "rho" in kw else {}
        return edm_grid(steps, start_at_zero=True, **rho) if steps >= 2 else uniform_grid(1)
    raise unknown_name("time grid", kind, GRIDS)


def stepper_names() -> tuple[str, ...]:
    """Velocity steppers a run can sample with (the solver layer's registry, flow-map jumps excluded),
    plus ``flowturbo`` (FlowTurbo's Heun + pseudo-corrector sequence)."""
    try:
        from fewflow.solvers.steppers import STEPPERS as registry
    except ImportError:
        return STEPPERS
    names = {k for k in registry if k not in ("flow_map", "flowmap", "euler_maruyama", "em")}
    return tuple(sorted(names | {"flowturbo"}))


def boss_grid(
    model: Any,
    cfg: RunConfig,
    steps: int,
    *,
    run_dir: str | Path | None = None,
    n_ref: int = 256,
    fine_steps: int = 100,
    cond: Mapping[str, Any] | None = None,
) -> Tensor:
    """The Bellman-optimal ``steps``-step Euler grid of this model (BOSS, Nguyen et al. 2023): reference
    trajectories from ``n_ref`` source draws on ``fine_steps`` Euler steps, the one-jump cost matrix and the
    dynamic program. With ``run_dir`` the schedule is saved as ``boss-K<steps>.json`` there and re-used."""
    from fewflow.solvers.boss import BossSchedule, boss_schedule

    path = Path(run_dir) / f"boss-K{steps}-fine{fine_steps}.json" if run_dir is not None else None
    if path is not None and path.is_file():
        return BossSchedule.load(path).grid
    try:
        param = next(iter(model.parameters()))
        device, dtype = param.device, param.dtype
    except (AttributeError, StopIteration):
        device, dtype = torch.device("cpu"), torch.get_default_dtype()
    gen = torch.Generator().manual_seed(1234)
    x0 = draw_source(build_source(cfg), cfg, n_ref, device=device, dtype=dtype, generator=gen)
    if cond is None and cfg.objective.conditional:
        k = int(_meta(cfg, None).get("num_classes") or 0)
        cond = {"y": torch.arange(n_ref, device=device) % k}
    with torch.no_grad():
        sched = boss_schedule(model, x0, steps, fine_steps, cond=cond)
    if path is not None:
        sched.save(path)
    return sched.grid


def _nfe_per_step(stepper: str) -> int:
    try:
        from fewflow.solvers.steppers import get_stepper
    except ImportError:
        return {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4}.get(stepper, 1)
    return int(get_stepper(stepper).nfe_per_step)


def steps_for_nfe(stepper: str, nfe: int) -> int:
    """Number of solver steps that spend ``nfe`` function evaluations (Heun/midpoint: 2 per step,
    RK4: 4); raises if ``nfe`` is smaller than one step's cost."""
    if not _is_int(nfe) or nfe < 1:
        raise FewflowError(f"nfe must be a positive integer, got {nfe!r}")
    if stepper == "flowturbo":  # one Heun step (2 NFE) then pseudo-corrector steps (1 NFE each)
        if nfe < 3:
            raise FewflowError(
                f"flowturbo needs nfe >= 3 (one Heun step + pseudo-corrector steps), got {nfe!r}"
            )
        return nfe - 1
    per = _nfe_per_step(stepper)
    if nfe < per:
        raise FewflowError(f"stepper {stepper!r} spends {per} evaluations per step; nfe={nfe} is too small")
    return nfe // per


def generate(
    model: Any,
    cfg: RunConfig,
    n: int,
    *,
    nfe: int | None = None,
    stepper: str | None = None,
    grid: str | Tensor | Sequence[float] | None = None,
    grid_kwargs: Mapping[str, Any] | None = None,
    cfg_scale: float | None = None,
    label: int | Tensor | None = None,
    source: Any | None = None,
    generator: torch.Generator | None = None,
    trajectory: bool = False,
    progress: bool = False,
    raag_alpha: float | None = None,
    run_dir: str | Path | None = None,
) -> Any:
    """Draw ``n`` samples from a trained run: x0 from the source, then ``fewflow.solvers.solve`` from
    t = 0 to t = 1 with ``nfe`` evaluations of ``stepper`` on the chosen time grid.

    Conditional runs sample labels uniformly unless ``label`` fixes one; with ``cfg_scale != 1`` the
    model is wrapped in classifier-free guidance ``v_u + w (v_c - v_u)`` (Ho & Salimans,
    *Classifier-Free Diffusion Guidance*), or in RAAG with ``w_max = cfg_scale`` when ``raag_alpha`` is
    given (Zhu et al., *Ratio-Aware Adaptive Guidance*). Flow-map methods use flow-map jumps.
    ``stepper="flowturbo"`` runs FlowTurbo's Heun + pseudo-corrector blocks with ``nfe`` predictor calls;
    ``grid="boss"`` the model's Bellman-optimal grid (:func:`boss_grid`, cached in ``run_dir``).
    Returns the solver's ``SolveResult`` (``.x``, ``.nfe``, ``.times``, ``.trajectory``).
    """
    from fewflow.solvers import solve

    smp = cfg.sampler
    nfe = smp.nfe if nfe is None else nfe
    stepper = smp.stepper if stepper is None else stepper
    grid = smp.grid if grid is None else grid
    gkw = dict(smp.grid_kwargs if grid_kwargs is None else grid_kwargs)
    scale = float(smp.cfg_scale if cfg_scale is None else cfg_scale)
    if not _is_int(n) or n < 1:
        raise FewflowError(f"number of samples must be a positive integer, got {n!r}")
    flow_map = get_method(cfg.objective.method).flow_map or bool(getattr(model, "is_flow_map", False))
    if flow_map:
        steps = nfe if _is_int(nfe) and nfe >= 1 else steps_for_nfe("euler", nfe)
        step_obj: Any = "flow_map"
    elif stepper == "flowturbo":
        from fewflow.solvers.flowturbo import FlowTurboStepper

        steps = steps_for_nfe(stepper, nfe)
        step_obj = FlowTurboStepper(1, steps - 1)
    else:
        if stepper not in stepper_names():
            raise unknown_name("stepper", str(stepper), stepper_names())
        steps = steps_for_nfe(stepper, nfe)
        step_obj = stepper
    if grid == "logsnr":
        gkw.setdefault("schedule", build_path(cfg).schedule)
    if torch.is_tensor(grid) or isinstance(grid, (list, tuple)):  # an explicit grid (e.g. a saved BOSS one)
        from fewflow.solvers import as_grid

        time_grid = as_grid(grid)
        if time_grid.numel() - 1 != steps:
            raise FewflowError(f"the given grid has {time_grid.numel() - 1} steps; nfe={nfe} needs {steps}")
    elif grid == "boss":
        time_grid = boss_grid(model, cfg, steps, run_dir=run_dir)
    else:
        time_grid = build_grid(grid, steps, **gkw)
    try:
        param = next(iter(model.parameters()))
        device, dtype = param.device, param.dtype
    except (AttributeError, StopIteration):
        device, dtype = torch.device("cpu"), torch.get_default_dtype()
    src = build_source(cfg) if source is None else source
    x0 = draw_source(src, cfg, n, device=device, dtype=dtype, generator=generator)
    cond: dict[str, Any] = {}
    f = model
    if cfg.objective.conditional:
        k = int(_meta(cfg, None).get("num_classes") or 0)
        if label is None:
            y = torch.randint(0, k, (n,), generator=generator, device=x0.device)
        elif torch.is_tensor(label):
            y = label.to(x0.device).long().reshape(-1)
            if y.shape != (n,):
                raise FewflowError(f"label tensor must have shape ({n},), got {tuple(y.shape)}")
        else:
            y = torch.full((n,), int(label), device=x0.device, dtype=torch.long)
        # the null class k (unconditional samples) exists when the model was trained with label dropout
        top = k if cfg.objective.label_dropout > 0 else k - 1
        if bool(((y < 0) | (y > top)).any()):
            extra = f" ({k} = unconditional)" if top == k else ""
            raise FewflowError(
                f"labels must lie in [0, {top}]{extra} for this run, got {sorted(set(y.tolist()))[:5]}"
            )
        cond["y"] = y
        if raag_alpha is not None:
            from fewflow.guidance import RAAG

            f = RAAG(model, w_max=scale, alpha=float(raag_alpha), num_classes=k)
        elif scale != 1.0:
            from fewflow.guidance import CFG

            f = CFG(model, scale, k)
    elif label is not None:
        raise FewflowError("this run is unconditional; --label needs a class-conditional run")
    elif scale != 1.0 or raag_alpha is not None:
        raise FewflowError(
            "this run is unconditional; classifier-free guidance (--cfg) needs a conditional run"
        )
    with torch.no_grad():
        return solve(
            f,
            x0,
            grid=time_grid,
            stepper=step_obj,
            cond=cond or None,
            trajectory=trajectory,
            progress=progress,
            generator=generator,
        )


# --------------------------------------------------------------------------- runs on disk


def read_run_folder(run_dir: str | Path) -> RunConfig:
    """The :class:`RunConfig` stored in ``run_dir/config.json`` (the trainer's layout
    ``{"run_config": ..., "train_config": ...}``; the full ``train_config`` fills ``train``)."""
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
    rc = doc.get("run_config", doc) if "run_config" in doc else doc
    if not isinstance(rc, dict) or not rc:
        raise FewflowError(f"{path} holds no fewflow run config (was it written by another tool?)")
    rc = dict(rc)
    tc = doc.get("train_config")
    if isinstance(tc, dict):
        rc["train"] = {**tc, **(rc.get("train") or {})}
    try:
        return RunConfig.from_dict(rc)
    except FewflowError as e:
        raise FewflowError(f"{path}: {e}") from None


def _figures_after_training(model: Any, cfg: RunConfig, out_dir: Path, data: Any) -> None:
    from fewflow.plotting import plot_samples, plot_trajectories

    gen = torch.Generator().manual_seed(cfg.seed)
    shape = list(cfg.meta.get("shape", []))
    n = 2000 if shape == [2] else 64
    res = generate(model, cfg, n, generator=gen, trajectory=shape == [2], source=build_source(cfg, data))
    vr = cfg.meta.get("value_range")
    plot_samples(
        res.x,
        out_dir / "samples.png",
        reference=data.x[:n] if shape == [2] else None,
        value_range=tuple(vr) if (vr and len(shape) == 3) else None,
        title=f"{cfg.data.name}, {cfg.objective.method}: {cfg.sampler.stepper} NFE {res.nfe}",
    )
    if res.trajectory is not None:
        plot_trajectories(res.trajectory, out_dir / "trajectories.png", reference=data.x[:n])


def train_run(
    cfg: RunConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    figures: bool = True,
    eval_fn: Callable[..., Any] | None = None,
) -> Any:
    """Train the run described by ``cfg`` into ``out_dir`` and return the trainer's ``TrainResult``.

    Loads the data, fills the data-dependent model settings and ``meta``, builds model + objective,
    and runs :class:`fewflow.train.Trainer` (which writes ``config.json``, ``ckpt-*/``, logs). With
    ``figures`` it also writes ``samples.png`` (and ``trajectories.png`` for 2-D) from the EMA model.
    """
    from fewflow.train import Trainer
    from fewflow.train.checkpoint import write_run_config

    out_dir = Path(out_dir)
    data = build_data(cfg)
    meta = data_meta(data)
    if resume and cfg.meta and cfg.meta.get("shape") != meta["shape"]:
        raise FewflowError(f"data shape {meta['shape']} differs from the run's {cfg.meta.get('shape')}")
    cfg = RunConfig.from_dict(cfg.to_dict())  # a private copy
    cfg.meta = meta
    if cfg.objective.source == "norm_aligned":  # the fitted scale travels with the run folder
        meta["source_scale"] = float(build_source(cfg, data).scale)
    cfg.model = resolve_model_config(cfg, data)
    from fewflow.models import build_model

    model = build_model(dict(cfg.model))
    objective = build_objective(cfg, data)
    tc = build_train_config(cfg)
    cfg.train = dataclasses.asdict(tc)
    if not resume:
        write_run_config(out_dir, cfg.to_dict(), tc)
    trainer = Trainer(model, objective, data, tc, out_dir=out_dir, run_config=cfg.to_dict(), eval_fn=eval_fn)
    result = trainer.fit(resume=resume)
    if figures:
        trained, _ = load_run(out_dir, which="ema")
        _figures_after_training(trained, cfg, out_dir, data)
    return result


def load_run(
    run_dir: str | Path, which: str = "ema", device: str | torch.device | None = None
) -> tuple[Any, RunConfig]:
    """Load a trained run: ``(model in eval mode, RunConfig)``; any problem (missing folder, corrupt
    checkpoint, a config that describes another model) becomes one :class:`FewflowError`."""
    run_dir = Path(run_dir)
    cfg = read_run_folder(run_dir)
    from fewflow.models import build_model
    from fewflow.train.checkpoint import load_model

    def _build(_: dict) -> torch.nn.Module:  # always the model described by this folder's config.json
        return build_model(dict(cfg.model))

    try:
        model, _ = load_model(run_dir, which=which, build_model=_build, map_location=device)
    except FewflowError as e:
        raise FewflowError(f"cannot load the model of {run_dir}: {_one_line(e)}") from e
    except Exception as e:  # safetensors / torch load_state_dict / JSON errors
        raise FewflowError(f"cannot load the checkpoint in {run_dir}: {_one_line(e)}") from e
    model.eval()
    return model, cfg


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
