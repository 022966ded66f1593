"""One sampling pipeline: ``generate`` draws from a trained run for the CLI, the evaluation harness,
the benchmarks and the demo.

``generate(model, cfg, n, nfe=..., stepper=..., grid=...)``:

1. asks the run's method for its sampling plan (a flow map jumps with ``u(x, s, t)``; Rectified
   Diffusion uses its first-order step; MDT-dist reads the data end; a FlowTurbo refiner pairs with its
   teacher; BOSS refinement samples on its fitted grid);
2. turns the NFE budget into steps (:func:`fewflow.solvers.stepper_for_nfe`) and builds the time grid
   (:func:`fewflow.solvers.get_grid`, or a model's BOSS grid, cached in the user cache folder);
3. draws x0 from the run's source (the fitted norm-aligned scale comes from the run's meta);
4. passes the class labels and the condition tensor ``c`` (``cond=``, for runs whose data has ``c``), and
   wraps conditional models in classifier-free guidance (Ho & Salimans 2022) or RAAG (ratio-aware
   adaptive guidance) when asked -- the unconditional branch is the null class and null condition;
5. integrates with :func:`fewflow.solvers.solve` under ``torch.no_grad`` and checks the result is finite.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from fewflow._validate import FewflowError
from fewflow.config import RunConfig
from fewflow.methods import SamplingPlan, get_method

__all__ = ["boss_grid", "decode_latents", "draw_source", "generate", "sampling_plan"]


def _device_dtype(model: Any) -> tuple[torch.device, torch.dtype]:
    try:
        p = next(iter(model.parameters()))
        return p.device, p.dtype
    except (AttributeError, StopIteration):
        return torch.device("cpu"), torch.get_default_dtype()


def draw_source(cfg: RunConfig, n: int, *, device: torch.device, dtype: torch.dtype,
                generator: torch.Generator | None = None, source: Any = None) -> Tensor:
    """``n`` source samples x0 of the run's data shape (N(0, I) unless the run has another source)."""
    from fewflow.runs import build_source

    src = source if source is not None else build_source(cfg)
    if src is not None:
        return src.sample(n, device=device, dtype=dtype, generator=generator)
    shape = tuple(int(v) for v in cfg.meta["shape"])
    gdev = generator.device if generator is not None else device
    return torch.randn((n, *shape), generator=generator, device=gdev, dtype=dtype).to(device)


def _model_key(model: Any) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def boss_grid(model: Any, cfg: RunConfig, steps: int, *, n_ref: int = 256, fine_steps: int = 100,
              cache: bool = True) -> Tensor:
    """The Bellman-optimal ``steps``-step Euler grid of ``model`` (BOSS, Nguyen et al. 2023): reference
    trajectories from ``n_ref`` source draws on ``fine_steps`` Euler steps, the one-jump cost matrix and
    the dynamic program. Cached in the user cache folder under the hash of the weights."""
    from fewflow.data import default_cache_dir
    from fewflow.solvers.boss import BossSchedule, boss_schedule

    path = default_cache_dir() / "boss" / f"{_model_key(model)}-K{steps}-n{n_ref}-f{fine_steps}.json"
    if cache and path.is_file():
        try:
            return BossSchedule.load(path).grid
        except FewflowError:
            path.unlink(missing_ok=True)  # a corrupt cache entry is rebuilt
    device, dtype = _device_dtype(model)
    gen = torch.Generator().manual_seed(1234)
    x0 = draw_source(cfg, n_ref, device=device, dtype=dtype, generator=gen)
    cond = None
    if cfg.meta.get("conditional"):
        cond = {"y": torch.arange(n_ref, device=device) % int(cfg.meta["num_classes"])}
    with torch.no_grad():
        sched = boss_schedule(model, x0, steps, fine_steps, cond=cond)
    if cache:
        sched.save(path)
    return sched.grid


def sampling_plan(model: Any, cfg: RunConfig, nfe: int, teacher: Any = None) -> SamplingPlan:
    """What the run's method integrates (see the module docstring)."""
    spec = get_method(cfg.method_name)
    if spec.sampling is not None:
        if spec.needs.teacher != "none" and teacher is None and spec.needs.model == "custom" and cfg.teacher:
            from fewflow.runs import load_teacher

            teacher, _ = load_teacher(cfg.teacher, device=_device_dtype(model)[0])
        from fewflow.runs import build_path

        return spec.sampling(model, spec.make_config(cfg.method), path=build_path(cfg), nfe=nfe,
                             teacher=teacher, meta=cfg.meta)
    if spec.flow_map or getattr(model, "is_flow_map", False):
        return SamplingPlan(model, "flow_map")
    return SamplingPlan(model)


def _labels(cfg: RunConfig, n: int, label: int | Tensor | None, device: torch.device,
            generator: torch.Generator | None) -> Tensor:
    k = int(cfg.meta.get("num_classes") or 0)
    if label is None:
        gdev = generator.device if generator is not None else device
        return torch.randint(0, k, (n,), generator=generator, device=gdev).to(device)
    if torch.is_tensor(label):
        y = label.to(device).long().reshape(-1)
        if y.shape != (n,):
            raise FewflowError(f"label tensor must have shape ({n},), got {tuple(y.shape)}")
    else:
        y = torch.full((n,), int(label), device=device, dtype=torch.long)
    # the null class k (unconditional samples) exists when the model was trained with label dropout
    top = k if cfg.objective.label_dropout > 0 else k - 1
    if bool(((y < 0) | (y > top)).any()):
        extra = f" ({k} = unconditional)" if top == k else ""
        got = sorted(set(y.tolist()))[:5]
        raise FewflowError(f"labels must lie in [0, {top}]{extra} for this run, got {got}")
    return y


def _condition(cfg: RunConfig, n: int, cond: Any, device: torch.device, dtype: torch.dtype) -> Tensor | None:
    """The condition tensor ``c`` for ``n`` samples: ``cond`` of shape ``(n, *cond_shape)``, or one row
    (``(1, *cond_shape)`` or ``cond_shape``) repeated; ``None`` when ``cond`` is None (the model's null
    condition, which needs a run trained with condition dropout)."""
    shape = cfg.meta.get("cond_shape")
    if cond is None:
        trained_null = cfg.objective.conditional and cfg.objective.label_dropout > 0
        if shape is not None and not trained_null:
            raise FewflowError(
                f"this run is conditioned on c (one row of shape {tuple(shape)}) and has no trained null "
                "condition (label_dropout = 0): pass cond (fewflow sample --cond FILE.npy)"
            )
        return None
    if shape is None:
        raise FewflowError("this run was trained without a condition c: cond (--cond) needs data with c")
    shape = tuple(int(v) for v in shape)
    try:
        c = torch.as_tensor(cond)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise FewflowError(f"cond must be a numeric array of shape ({n}, *{shape}), got {exc}") from None
    if tuple(c.shape) == shape:
        c = c[None]
    if c.dim() != len(shape) + 1 or tuple(c.shape[1:]) != shape or c.shape[0] not in (1, n):
        raise FewflowError(
            f"cond must have shape ({n}, {', '.join(map(str, shape))}) (or one row, broadcast), got "
            f"{tuple(c.shape)}"
        )
    if c.dtype == torch.bool or c.is_complex():
        raise FewflowError(f"cond must hold real numbers, got dtype {c.dtype}")
    c = c.to(dtype=dtype)
    if not bool(torch.isfinite(c).all()):
        raise FewflowError(f"cond contains non-finite values ({int((~torch.isfinite(c)).sum())} NaN or inf)")
    return c.to(device).expand(n, *shape).contiguous()


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
    cond: Tensor | None = None,
    x0: Tensor | None = None,
    source: Any = None,
    teacher: Any = None,
    generator: torch.Generator | None = None,
    trajectory: bool = False,
    progress: bool = False,
    raag_alpha: float | None = None,
    check_finite: bool = True,
    raw: bool = False,
    decode: bool = True,
) -> Any:
    """Draw ``n`` samples of a trained run (module docstring); returns the solver's ``SolveResult``
    (``.x``, ``.nfe``, ``.times``, ``.trajectory``); non-finite samples raise unless ``check_finite`` is
    off (a benchmark scores them as diverged). ``cond`` is the condition tensor ``c`` of a run whose data
    has one (``n`` rows, or one row for all; see :func:`_condition`). ``x0`` fixes the source draws
    (evaluation); ``nfe`` / ``stepper`` / ``grid`` default to the run's sampler settings, then the
    method's default. Samples (and the trajectory) of a run on user data come back in the data's own
    units (``meta.normalization`` undone); ``raw=True`` keeps the model's normalised units. A latent run
    (``meta.latent``, trained with ``--latent AE_RUN``) returns decoded samples (:func:`decode_latents`;
    the trajectory stays in latent space) unless ``decode=False``."""
    from fewflow.solvers import as_grid, get_grid, solve, stepper_for_nfe

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise FewflowError(f"number of samples must be a positive integer, got {n!r}")
    spec = get_method(cfg.method_name)
    smp = cfg.sampler
    nfe = nfe if nfe is not None else (smp.nfe if smp.nfe is not None else spec.sampler.nfe)
    plan = sampling_plan(model, cfg, nfe, teacher)
    if plan.stepper is not None and not isinstance(plan.stepper, str):
        step_obj: Any = plan.stepper  # a method's own stepper object (FlowTurbo with a refiner, ...)
        steps = int(getattr(step_obj, "steps", nfe))
    else:
        name = plan.stepper or stepper or smp.stepper or spec.sampler.stepper
        if name == "flow_map" and not (spec.flow_map or getattr(model, "is_flow_map", False)):
            raise FewflowError("stepper 'flow_map' needs a flow-map model u(x, s, t)")
        steps, step_obj = stepper_for_nfe(name, int(nfe))
    if plan.grid is not None:
        time_grid = as_grid(plan.grid)
    else:
        g = grid if grid is not None else (smp.grid or spec.sampler.grid)
        gkw = dict(smp.grid_kwargs if grid_kwargs is None else grid_kwargs)
        if torch.is_tensor(g) or isinstance(g, (list, tuple)):
            time_grid = as_grid(g)
        elif g == "boss":
            time_grid = boss_grid(plan.model, cfg, steps)
        else:
            from fewflow.runs import build_path

            time_grid = get_grid(g, steps, schedule=build_path(cfg).schedule, **gkw)
    if time_grid.numel() - 1 != steps:
        raise FewflowError(f"the time grid has {time_grid.numel() - 1} steps; nfe={nfe} needs {steps}")
    device, dtype = _device_dtype(plan.model)
    if x0 is None:
        x0 = draw_source(cfg, n, device=device, dtype=dtype, generator=generator, source=source)
    elif x0.shape[0] != n:
        raise FewflowError(f"x0 has {x0.shape[0]} rows, n={n}")
    scale = float(smp.cfg_scale if cfg_scale is None else cfg_scale)
    model_kw: dict[str, Any] = {}
    f = plan.model
    k = int(cfg.meta["num_classes"]) if cfg.meta.get("conditional") else None
    if k is not None:
        model_kw["y"] = _labels(cfg, n, label, x0.device, generator)
    elif label is not None:
        raise FewflowError("this run is unconditional; --label needs a class-conditional run")
    c = _condition(cfg, n, cond, x0.device, x0.dtype)
    if c is not None:
        model_kw["c"] = c
    if model_kw:  # guidance: the unconditional branch is the null class and the null condition
        if raag_alpha is not None:
            from fewflow.guidance import RAAG

            f = RAAG(f, w_max=scale, alpha=float(raag_alpha), num_classes=k)
        elif scale != 1.0:
            from fewflow.guidance import CFG

            f = CFG(f, scale, k)
    elif scale != 1.0 or raag_alpha is not None:
        need = "a condition (--cond)" if cfg.meta.get("cond_shape") is not None else "a conditional run"
        raise FewflowError(f"this run is sampled unconditionally; guidance (--cfg, --raag) needs {need}")
    with torch.no_grad():
        res = solve(f, x0, grid=time_grid, stepper=step_obj, cond=model_kw or None, trajectory=trajectory,
                    progress=progress, generator=generator)
    if check_finite and not bool(torch.isfinite(res.x).all()):
        bad = int((~torch.isfinite(res.x)).any(dim=tuple(range(1, res.x.dim()))).sum())
        raise FewflowError(f"sampling produced non-finite values in {bad} of {n} samples (a diverged model?)")
    if decode and cfg.meta.get("latent"):
        import dataclasses

        res = dataclasses.replace(res, x=decode_latents(cfg, res.x))
    # -- user units: undo the normalisation of user data recorded at training (fewflow.data.normalize) --
    if not raw and cfg.meta.get("normalization") is not None:
        import dataclasses

        from fewflow.data import denormalize

        norm, traj = cfg.meta["normalization"], res.trajectory
        res = dataclasses.replace(res, x=denormalize(res.x, norm),
                                  trajectory=denormalize(traj, norm) if traj is not None else None)
    # -- end user units --
    return res



_DECODERS: dict[tuple[str, str, str], Any] = {}


def decode_latents(cfg: RunConfig, z: Tensor, *, batch_size: int = 1000) -> Tensor:
    """Images (or vectors) from the latents ``z`` of a latent run: ``D(z / s)`` with the frozen decoder of
    the autoencoder run and the scale factor ``s`` recorded in ``meta["latent"]`` ("Flow Matching in Latent
    Space", Dao et al., arXiv 2307.08698). The autoencoder is loaded once per process (on ``z``'s device)
    and refused if its weights changed since training."""
    lat = cfg.meta.get("latent")
    if not lat:
        raise FewflowError("this run was not trained in a latent space (no meta.latent)")
    key = (str(lat["ae_run"]), str(lat.get("ae_sha256")), str(z.device))
    ae = _DECODERS.get(key)
    if ae is None:
        from fewflow.runs import latent_autoencoder

        ae = latent_autoencoder(lat["ae_run"], device=z.device, sha256=lat.get("ae_sha256"))[0]
        _DECODERS.clear()
        _DECODERS[key] = ae
    p = next(iter(ae.parameters()))
    scale = float(lat["scale"])
    with torch.no_grad():
        out = [ae.decode(z[i : i + batch_size].to(p.dtype) / scale) for i in range(0, z.shape[0], batch_size)]
    return torch.cat(out).to(z.dtype)
