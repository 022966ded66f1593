"""The one method registry.

A *method* is a training procedure from a paper: its loss (an objective in :mod:`fewflow.objectives`),
the settings of that loss, what it needs (a teacher run, a flow-map network, labels, teacher pairs),
the training stages it runs and the sampler that fits the model it trains. Each method file in
``fewflow/objectives/`` declares itself once, next to its loss::

    @dataclass
    class MeanFlowConfig:            # fields = the loss constructor's settings, paper defaults
        ratio: float = 0.25
        ...

    register(MethodSpec(
        name="meanflow", label="MeanFlow", paper="Geng et al., Mean Flows for One-step ... (2505.13447)",
        summary="...", config=MeanFlowConfig, loss=MeanFlowLoss, build=_build,
        needs=Needs(model="flow_map"), sampler=DefaultSampler("flow_map", nfe=1),
    ))

and the CLI (``fewflow methods``, ``fewflow train --method``), the run folders, sampling, the
benchmarks and the demo read this registry; none keeps a list of its own. ``build(cfg, ctx)`` returns the
method's :class:`Stage` list; the app that trains (``fewflow.runs`` or a benchmark) supplies the
:class:`BuildContext` and runs the stages with :func:`fewflow.train.train_stages`.

Methods are discovered by importing every module of :mod:`fewflow.objectives` (sorted by name), so a
new method is one new file there.

Longer than fewflow's ~400-line guide on purpose: the registry's records, config coercion and lookup are
one contract.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fewflow._validate import FewflowError, unknown_name

__all__ = [
    "BuildContext",
    "DefaultSampler",
    "MethodSpec",
    "Needs",
    "SamplingPlan",
    "Stage",
    "get_method",
    "list_methods",
    "methods_table",
    "register",
    "register_variant",
]


@dataclass(frozen=True)
class Needs:
    """What a method needs before it can train.

    teacher: ``"none"``, ``"optional"`` or ``"required"``: a trained velocity run (``fewflow train
        --teacher RUN``) that the method distils or refines.
    model: the network it trains: ``"velocity"`` ``v(x, t)``, ``"flow_map"`` ``u(x, s, t)`` (the run's
        model with ``flow_map=True``), or ``"custom"`` (the method builds it: :attr:`MethodSpec.make_model`).
    labels: ``"optional"`` (class-conditional when the run is), ``"none"`` or ``"required"``.
    init_from_teacher: the student starts from the teacher's weights.
    pairs: the method trains on teacher pairs ``(x0, ODE(x0))`` generated before training.
    coupling: ``"any"`` (the run's coupling is used), or ``"fixed"`` (the method fixes its own pairing).
    ddp_mode: how the trainer averages gradients under torchrun (``"allreduce"`` for losses that call the
        model through ``torch.func``).
    data: the data the method trains on: ``"continuous"`` (vectors and images, the default) or
        ``"sequence"`` (one-hot sequences ``(N, L, K)`` of a data set with ``meta["kind"] == "sequence"``) or
        ``"points"`` (point clouds ``(N, P, 3)``; samples are drawn from an input cloud, not from noise).
    """

    teacher: str = "none"
    model: str = "velocity"
    labels: str = "optional"
    init_from_teacher: bool = False
    pairs: bool = False
    coupling: str = "any"
    ddp_mode: str = "wrap"
    data: str = "continuous"

    def describe(self) -> list[str]:
        out = []
        if self.teacher != "none":
            out.append("teacher" if self.teacher == "required" else "teacher (optional)")
        if self.model != "velocity":
            out.append(f"{self.model} model")
        if self.labels == "required":
            out.append("labels")
        if self.pairs:
            out.append("teacher pairs")
        if self.init_from_teacher:
            out.append("init from teacher")
        if self.data != "continuous":
            out.append(f"{self.data} data")
        return out


@dataclass(frozen=True)
class DefaultSampler:
    """The sampler a method's model is drawn with when the user names none."""

    stepper: str = "euler"
    nfe: int = 100
    grid: str = "uniform"


@dataclass
class SamplingPlan:
    """What :func:`fewflow.sampling.generate` integrates: ``model`` (possibly wrapped), and the stepper the
    method requires (``None``: the user's or the default choice), and a fitted grid if the method has one."""

    model: Any
    stepper: Any = None
    grid: list[float] | None = None


@dataclass
class Stage:
    """One training stage of a method.

    objective: ``objective(model, x1, *, generator=None, **cond) -> LossOutput``.
    data: ``None`` (the run's data set), a data set / iterable of batch dicts, or a callable
        ``data(model) -> that`` evaluated when the stage starts (after earlier stages trained ``model``:
        the second reflow round draws its pairs from the first round's model).
    share: the fraction of the method's training budget this stage spends (steps in ``fewflow train``,
        network evaluations in the benchmarks); the shares of a method sum to 1.
    batch_divisor: the stage's batch is the run's batch divided by this (a CMT row expands into several
        regression rows).
    lr_scale: the stage's learning rate relative to the run's; lr: an absolute one (the paper's), if set.
    pair_sets: teacher-pair sets the stage trains on (their generation is paid from the method's budget
        before the stages share what is left).
    """

    name: str
    objective: Callable[..., Any]
    data: Any = None
    share: float = 1.0
    batch_divisor: int = 1
    lr_scale: float = 1.0
    lr: float | None = None
    pair_sets: int = 0


@dataclass
class BuildContext:
    """What a method's ``build`` receives (filled by the app that trains).

    data: the training :class:`fewflow.data.Dataset`; path: the run's :class:`~fewflow.paths.AffinePath`;
    source: the source (``None``: N(0, I)); coupling, time_sampler: the run's choices (``None``: the
    loss's default); num_classes: classes when the run is class-conditional (else ``None``);
    label_dropout: probability of the null label; teacher: the frozen teacher (``None`` if not needed);
    pairs: ``pairs(model, *, tag, n, steps, seed) -> folder`` of reflow pairs (x0, ODE(x0)) of ``model``
    (``steps`` Heun steps), generated or cached by the app; work_dir: a folder for the method's artefacts;
    record: ``record(key, value)`` stores a fitted quantity (a grid, a scale) in the run's meta so
    sampling needs nothing else; seed: the run's.
    """

    data: Any
    path: Any
    source: Any = None
    coupling: Any = None
    time_sampler: Any = None
    num_classes: int | None = None
    label_dropout: float = 0.0
    teacher: Any = None
    pairs: Callable[..., Path] | None = None
    work_dir: Path | None = None
    record: Callable[[str, Any], None] = field(default=lambda k, v: None)
    seed: int = 0

    @property
    def image_like(self) -> bool:
        """Data with more than one non-batch dimension (images)."""
        return self.data is not None and self.data.x.dim() > 2

    def need_teacher(self, method: str) -> Any:
        if self.teacher is None:
            raise FewflowError(f"method {method!r} needs a teacher run (fewflow train --teacher RUN)")
        return self.teacher

    def conditioning(self) -> dict[str, Any]:
        """Keyword arguments every loss takes for class conditioning."""
        return {"label_dropout": self.label_dropout, "num_classes": self.num_classes}


@dataclass(frozen=True)
class MethodSpec:
    """A registered method (module docstring).

    name: the CLI name; label: the name in tables; paper: citation with arXiv id; summary: one line.
    config: a dataclass whose fields are the method's settings, with the paper's defaults; every field is a
        keyword argument of ``loss`` unless listed in ``recipe_fields`` (settings of the recipe around the
        loss: number of reflow rounds, stage shares).
    loss: the loss class (for the config = constructor contract and the docs).
    build: ``build(cfg, ctx) -> list[Stage]``.
    needs: :class:`Needs`; sampler: :class:`DefaultSampler`.
    sampling: ``sampling(model, cfg, ctx_meta) -> SamplingPlan`` when the method samples differently from
        an ODE on its model (a flow map jumps; MDT reads the data end; a refiner pairs with its teacher).
    make_model: ``make_model(cfg, meta) -> nn.Module`` for ``needs.model == "custom"``.
    small_scale: overrides of config fields that fewflow's 2-D and 8x8 benchmarks use (documented on the
        method's docs page with the reason).
    docs: the method's page under ``docs/methods/`` (its stem; default: the name).
    version: bump when the recipe changes, so cached benchmark results are not reused.
    family: ``"base"`` (trains a model from data), ``"fewstep"`` (a few-step model) or ``"refiner"``
        (fine-tunes a sampler of a trained model); variant_of / ablation: for registered variants.
    """

    name: str
    label: str
    paper: str
    summary: str
    config: type
    build: Callable[[Any, BuildContext], list[Stage]]
    loss: type | None = None
    needs: Needs = Needs()
    sampler: DefaultSampler = DefaultSampler()
    sampling: Callable[..., SamplingPlan] | None = None
    make_model: Callable[..., Any] | None = None
    recipe_fields: tuple[str, ...] = ()
    small_scale: Mapping[str, Any] = field(default_factory=dict)
    docs: str = ""
    version: int = 1
    family: str = "base"
    variant_of: str | None = None
    ablation: bool = False
    overrides: Mapping[str, Any] = field(default_factory=dict)

    @property
    def flow_map(self) -> bool:
        return self.needs.model == "flow_map"

    # -- config ---------------------------------------------------------------------------
    def small_scale_values(self) -> dict[str, Any]:
        """:attr:`small_scale` without the fields a variant fixes."""
        return {k: v for k, v in self.small_scale.items() if k not in self.overrides}

    def field_names(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self.config)]

    def make_config(self, values: Mapping[str, Any] | None = None) -> Any:
        """The config dataclass from ``values`` (``name`` ignored), variant overrides applied first;
        unknown fields fail naming the closest one, values are checked against the field types."""
        from fewflow._validate import parse_value, unknown_key

        values = {k: v for k, v in dict(values or {}).items() if k != "name"}
        names = self.field_names()
        for k in values:
            if k not in names:
                raise unknown_key(str(k), f"method ({self.name})", names)
        kw = {k: parse_value(v) for k, v in values.items()}
        for k, v in self.overrides.items():
            if k in kw and kw[k] != v:
                raise FewflowError(
                    f"method {self.name!r} fixes {k} = {v!r}; use {self.variant_of!r} to change it"
                )
            kw[k] = v
        hints = typing.get_type_hints(self.config)
        for k, v in kw.items():
            kw[k] = _coerce(v, hints.get(k), f"method.{k}")
        try:
            return self.config(**kw)
        except (TypeError, ValueError) as e:
            raise FewflowError(f"bad settings for method {self.name!r}: {e}") from None

    def config_dict(self, values: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """``{"name": ..., **fields}`` with every default filled in (what a run's config.json stores)."""
        return {"name": self.name, **dataclasses.asdict(self.make_config(values))}

    def fields_table(self) -> list[dict[str, Any]]:
        """Name, type, default and help of each config field (help from ``field(metadata={"help": ...})``)."""
        hints = typing.get_type_hints(self.config)
        cfg = self.make_config()
        out = []
        for f in dataclasses.fields(self.config):
            out.append({
                "name": f.name,
                "type": _type_name(hints.get(f.name)),
                "default": getattr(cfg, f.name),
                "help": f.metadata.get("help", ""),
            })
        return out

    def describe(self) -> dict[str, Any]:
        """The JSON row of ``fewflow methods --json``."""
        return {
            "name": self.name,
            "label": self.label,
            "paper": self.paper,
            "summary": self.summary,
            "family": self.family,
            "docs": f"docs/methods/{self.docs or self.variant_of or self.name}.md",
            "needs": self.needs.describe(),
            "needs_detail": dataclasses.asdict(self.needs),
            "default_sampler": dataclasses.asdict(self.sampler),
            "variant_of": self.variant_of,
            "ablation": self.ablation,
            "config": self.fields_table(),
        }


def _type_name(tp: Any) -> str:
    if tp is None:
        return "any"
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(v: Any, tp: Any, where: str) -> Any:
    """Cast ``v`` to a simple annotated type (int/float/bool/str, their Optional, tuples of floats)."""
    if tp is None or v is None:
        return v
    args = typing.get_args(tp)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", ())) and args:
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(v, a, where)
            except FewflowError:
                continue
        raise FewflowError(f"{where} must be one of {[_type_name(a) for a in args]}, got {v!r}")
    if tp is bool:
        if isinstance(v, bool):
            return v
        raise FewflowError(f"{where} must be true or false, got {v!r}")
    if tp is int:
        if isinstance(v, int) and not isinstance(v, bool):
            return v
        if isinstance(v, float) and v.is_integer():
            return int(v)
        raise FewflowError(f"{where} must be an integer, got {v!r}")
    if tp is float:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
        raise FewflowError(f"{where} must be a number, got {v!r}")
    if tp is str:
        if isinstance(v, str):
            return v
        raise FewflowError(f"{where} must be a string, got {v!r}")
    if origin is tuple:
        if isinstance(v, (list, tuple)):
            return tuple(v)
        raise FewflowError(f"{where} must be a list, got {v!r}")
    return v


_REGISTRY: dict[str, MethodSpec] = {}
_LOADED = False


def register(spec: MethodSpec) -> MethodSpec:
    """Add ``spec`` to the registry (one name, once)."""
    if not isinstance(spec.name, str) or not spec.name:
        raise FewflowError(f"method name must be a non-empty string, got {spec.name!r}")
    if spec.name in _REGISTRY and _REGISTRY[spec.name] is not spec:
        raise FewflowError(f"method {spec.name!r} is already registered")
    if not dataclasses.is_dataclass(spec.config):
        raise FewflowError(f"method {spec.name!r}: config must be a dataclass")
    _REGISTRY[spec.name] = spec
    return spec


def register_variant(
    name: str, base: MethodSpec, *, label: str, summary: str = "", ablation: bool = False,
    family: str | None = None, **overrides: Any,
) -> MethodSpec:
    """A registered variant of ``base`` with some config fields fixed (ablations, recipe variants)."""
    spec = dataclasses.replace(
        base, name=name, label=label, summary=summary or base.summary, variant_of=base.name,
        ablation=ablation, overrides={**base.overrides, **overrides}, family=family or base.family,
    )
    spec.make_config()  # the overrides name real fields
    return register(spec)


def _load_all() -> None:
    global _LOADED
    if _LOADED:
        return
    import fewflow.objectives as pkg

    for mod in sorted(m.name for m in pkgutil.iter_modules(pkg.__path__)):
        importlib.import_module(f"fewflow.objectives.{mod}")
    _LOADED = True


def get_method(name: str) -> MethodSpec:
    """The :class:`MethodSpec` registered under ``name``."""
    _load_all()
    if name not in _REGISTRY:
        from fewflow._validate import closest

        hint = closest(name, _REGISTRY)
        err = unknown_name("method", str(name), _REGISTRY)
        if hint:
            err = FewflowError(f"{err}; did you mean {hint!r}?")
        raise err
    return _REGISTRY[name]


def list_methods(*, family: str | None = None, variants: bool = True) -> list[MethodSpec]:
    """Registered methods by name, each variant right after its method."""
    _load_all()
    specs = sorted(_REGISTRY.values(), key=lambda s: (s.variant_of or s.name, bool(s.variant_of), s.name))
    out = [s for s in specs if (family is None or s.family == family)]
    if not variants:
        out = [s for s in out if s.variant_of is None]
    return out


def methods_table(specs: Iterable[MethodSpec] | None = None) -> str:
    """A plain-text table: name, paper, needs, default sampler."""
    specs = list(specs) if specs is not None else list_methods()
    rows = [("name", "paper", "needs", "default sampler")]
    for s in specs:
        grid = f", {s.sampler.grid} grid" if s.sampler.grid != "uniform" else ""
        smp = f"{s.sampler.stepper}, {s.sampler.nfe} NFE{grid}"
        rows.append((s.name, s.paper.split(" (")[0][:60], ", ".join(s.needs.describe()) or "-", smp))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
