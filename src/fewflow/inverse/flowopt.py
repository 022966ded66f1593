"""FlowOpt: Jacobian-free optimisation through the whole sampler, for inversion, editing and restoration.

From Ronai, Kulikov & Michaeli, "FlowOpt: Fast Optimization Through Whole Flow Processes for
Training-Free Editing" (arXiv 2510.22010). The paper puts noise at t = 1 and data at t = 0; everything here
is written in **fewflow time** (t = 0 noise, t = 1 data): the sampler integrates ``dx/dt = v(x, t)``
forwards from the latent to the data end.

**The sampler as a black box.** Take the uniform grid of ``T`` steps on ``[0, 1]`` and keep its last
``n_max`` steps. The latent ``z`` sits at ``t_start = 1 - n_max / T`` (``n_max = T``: ``z`` is the initial
noise) and ``f_c(z)`` is the ``n_max``-step sampler (Euler by default) from ``t_start`` to 1 under the
condition ``c``. FlowOpt minimises ``1/2 ||f_c(z) - y||^2`` over ``z`` without differentiating the network,
replacing the Jacobian ``J = df_c/dz`` by the identity in the gradient ``J^T (f_c(z) - y)``::

    z_{k+1} = z_k - eta (f_c(z_k) - y).

Every iterate ``x_k = f_c(z_k)`` is a finished sample, so the optimisation can be watched and stopped early.

**Step size.** The paper proves a sufficient condition on ``eta`` for convergence and estimates its upper
bound empirically. What follows is fewflow's reading of it (inferred, not quoted): linearising
``e_k = f(z_k) - y`` gives ``e_{k+1} ~= (I - eta J) e_k``, which contracts when ``||I - eta J|| < 1``. Along a
unit direction ``d`` that is ``||d - eta J d|| < 1``, i.e. ``eta < 2 <d, J d> / ||J d||^2``; for a symmetric
positive-definite ``J`` with largest eigenvalue ``L`` (the sampler's Lipschitz constant) the tightest
direction gives ``eta < 2 / L``. :func:`estimate_step_bound` measures ``J d`` by finite differences of the
sampler on random probes refined by power iteration and returns ``L_hat = max ||J d||`` and
``eta_max = min 2 <d, J d> / ||J d||^2``. Probes can only miss directions, so ``eta_max`` is an upper
estimate of the true bound; :class:`FlowOptConfig` uses ``eta = safety * eta_max`` (``safety = 0.5``,
i.e. ``1 / L_hat`` for a symmetric Jacobian: half the bound, margin for the probes and for the sampler's
nonlinearity).

For editing the aim is not convergence (the target sampler can usually reproduce the input exactly, which
would undo the edit) but a controlled pull towards the input: the authors hand-set a small step (0.01 for
SD3 latents, 8 iterations). With ``eta = None`` fewflow picks ``eta = (1 - (1 - edit_pull)^(1/K)) / L_hat``
for ``K`` iterations, so that, linearised, the stiffest direction moves the fraction ``edit_pull``
(default 0.3) of the way from the first edit back to the input and softer directions less (fewflow's rule).

**Tasks.**

* ``"invert"`` (``meas.op`` is the identity): find ``z`` with ``f_c(z) = y``. The iteration starts from the
  plain ODE inversion of ``y`` (:func:`fewflow.inverse.inversion.ode_invert`, ``n_max`` steps back to
  ``t_start``), as the authors start from an inversion.
* ``"edit"`` (identity operator and ``target_cond`` given): invert ``y`` under the source condition
  ``cond``, then iterate with ``f`` under ``target_cond`` and the same target ``y``: the result obeys the
  new condition while staying close to the input.
* ``"restore"`` (any other linear operator ``A``): ``z_{k+1} = z_k - eta A^T (A f(z_k) - y)``, the same
  Jacobian-free step on ``1/2 ||A f(z) - y||^2``. This extension to measurements is fewflow's, not the
  paper's. Linearised, the residual obeys ``r_{k+1} = (I - eta A J A^T) r_k``, so the step bound is
  estimated on ``u -> A f(z_0 + A^T (u - A z_0))`` (Jacobian ``A J A^T``), and iterations stop early once
  the residual
  reaches the noise level (``||A f(z) - y|| / sqrt(m) <= sigma``, the discrepancy principle).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fewflow._validate import FewflowError, check_finite, unknown_name
from fewflow.inverse.base import InverseResult, InverseSpec, Operator, register_inverse
from fewflow.inverse.operators import Identity, Measurement
from fewflow.solvers import solve as ode_solve
from fewflow.solvers import uniform_grid

__all__ = [
    "FlowOptConfig",
    "estimate_step_bound",
    "flowopt_iterate",
    "resolve_settings",
    "sampler_map",
    "solve",
]

#: authors' settings (their ``yaml_files``): (steps T, iterations) per task; n_max = T except editing.
_DEFAULTS = {"invert": (10, 30), "restore": (10, 30), "edit": (15, 8)}
_INITS = ("auto", "ode", "noise")


@dataclass
class FlowOptConfig:
    """FlowOpt's settings. ``None`` means "the authors' default for the task" (see the fields).

    The authors (SD3 / FLUX, 1024^2 images) use T = 10 steps, n_max = 10, 30 iterations for inversion and
    T = 15, n_max = 12 (SD3) or 13 (FLUX), 8 iterations for editing, with hand-set step sizes 0.01 / 0.0025
    for their latents; fewflow estimates the step size from the sampler instead (``eta = None``).
    """

    steps: int | None = field(
        default=None, metadata={"help": "sampler steps T on [0, 1] (None: 10 invert/restore, 15 edit)"}
    )
    n_max: int | None = field(
        default=None,
        metadata={"help": "last steps the latent passes through; z sits at t = 1 - n_max/T "
                          "(None: T for invert/restore, round(0.8 T) = 12 of 15 for edit)"},
    )
    iterations: int | None = field(
        default=None, metadata={"help": "FlowOpt iterations (None: 30 invert/restore, 8 edit)"}
    )
    eta: float | None = field(
        default=None, metadata={"help": "step size; None: safety * the estimated bound eta_max"}
    )
    safety: float = field(
        default=0.5, metadata={"help": "invert/restore with eta=None: eta = safety * estimated eta_max"}
    )
    edit_pull: float = field(
        default=0.3,
        metadata={"help": "edit with eta=None: linearised fraction of the way back to the input along the "
                          "stiffest direction after all iterations"},
    )
    per_sample_eta: bool = field(
        default=True, metadata={"help": "eta=None: one step size per sample (each row is its own problem)"}
    )
    probes: int = field(default=2, metadata={"help": "random probe directions of the step-bound estimate"})
    power_iters: int = field(default=2, metadata={"help": "power-iteration refinements per probe"})
    eps: float = field(default=1e-2, metadata={"help": "relative finite-difference step of the estimate"})
    tol: float = field(
        default=1e-3,
        metadata={"help": "stop once max ||A f(z) - y|| / ||y|| <= tol (invert/restore; 0: off)"},
    )
    init: str = field(
        default="auto",
        metadata={"help": "auto | ode | noise: ODE inversion of y (of A^+ y for restore), or fresh noise"},
    )
    stepper: str = field(default="euler", metadata={"help": "the sampler's stepper (the authors: Euler)"})
    keep_iterates: bool = field(default=True, metadata={"help": "keep every iterate f(z_k) in the result"})


def _positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
        raise FewflowError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if int(value) < minimum:
        raise FewflowError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _positive_float(name: str, value: Any, upper: float | None = None) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise FewflowError(f"{name} must be a positive number, got {value!r}") from None
    if not math.isfinite(v) or v <= 0 or (upper is not None and v > upper):
        rng = f"in (0, {upper}]" if upper is not None else "a positive finite number"
        raise FewflowError(f"{name} must be {rng}, got {value!r}")
    return v


def resolve_settings(cfg: FlowOptConfig, task: str) -> dict[str, Any]:
    """Validate ``cfg`` and fill the task's defaults: ``{"steps", "n_max", "iterations", "t_start", ...}``."""
    if not isinstance(cfg, FlowOptConfig):
        raise FewflowError(f"cfg must be a FlowOptConfig, got {type(cfg).__name__}")
    if task not in _DEFAULTS:
        raise unknown_name("FlowOpt task", task, sorted(_DEFAULTS))
    d_steps, d_iters = _DEFAULTS[task]
    steps = _positive_int("steps", d_steps if cfg.steps is None else cfg.steps)
    if cfg.n_max is None:
        n_max = steps if task != "edit" else max(1, round(0.8 * steps))
    else:
        n_max = _positive_int("n_max", cfg.n_max)
    if n_max > steps:
        raise FewflowError(f"n_max must lie in [1, steps={steps}], got {n_max}")
    iterations = _positive_int("iterations", d_iters if cfg.iterations is None else cfg.iterations, 0)
    eta = None if cfg.eta is None else _positive_float("eta", cfg.eta)
    if cfg.init not in _INITS:
        raise unknown_name("FlowOpt init", str(cfg.init), _INITS)
    tol = float(cfg.tol)
    if not math.isfinite(tol) or tol < 0:
        raise FewflowError(f"tol must be >= 0, got {cfg.tol!r}")
    return {
        "task": task, "steps": steps, "n_max": n_max, "iterations": iterations, "eta": eta,
        "safety": _positive_float("safety", cfg.safety, upper=1.0),
        "edit_pull": _positive_float("edit_pull", cfg.edit_pull, upper=0.999),
        "probes": _positive_int("probes", cfg.probes), "power_iters": _positive_int("power_iters",
                                                                                     cfg.power_iters, 0),
        "eps": _positive_float("eps", cfg.eps), "tol": tol, "init": cfg.init, "stepper": cfg.stepper,
        "t_start": 1.0 - n_max / steps,
    }


def _grid(steps: int, n_max: int) -> Tensor:
    """The last ``n_max`` steps of the ``steps``-step uniform grid on [0, 1] (``n_max + 1`` nodes)."""
    return uniform_grid(steps)[steps - n_max:]


def sampler_map(
    model: Callable[..., Tensor], steps: int, n_max: int | None = None, *, stepper: str = "euler",
    cond: dict[str, Any] | None = None, counter: list[int] | None = None,
) -> Callable[[Tensor], Tensor]:
    """``f(z)``: the sampler from ``t_start = 1 - n_max/steps`` to 1 over the last ``n_max`` of ``steps``
    uniform steps (``fewflow.solvers.solve``, no autograd graph). ``counter[0]`` accumulates model calls."""
    n = steps if n_max is None else n_max
    grid = _grid(steps, n)
    kw = dict(cond) if cond else {}

    def f(z: Tensor) -> Tensor:
        res = ode_solve(model, z, grid=grid, stepper=stepper, cond=kw)
        if counter is not None:
            counter[0] += res.nfe
        return res.x

    return f


def _rows(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1)


@torch.no_grad()
def estimate_step_bound(
    f: Callable[[Tensor], Tensor],
    z: Tensor,
    *,
    probes: int = 2,
    power_iters: int = 2,
    eps: float = 1e-2,
    generator: torch.Generator | None = None,
    fz: Tensor | None = None,
    per_sample: bool = False,
) -> tuple[float, float] | tuple[Tensor, Tensor]:
    """Estimate the sampler's Lipschitz constant and FlowOpt's largest contracting step at ``z``.

    For each of ``probes`` random unit directions ``d`` (per batch row), ``J d`` is measured by the finite
    difference ``(f(z + h d) - f(z)) / h`` with ``h = eps * max(||z_row||, sqrt(D))``, and ``d`` is refined
    ``power_iters`` times by power iteration ``d <- J d / ||J d||`` (towards the dominant eigenvector).
    Over every direction seen:

    * ``L_hat = max ||J d||`` (a lower estimate of ``||J||``; exact for a symmetric affine ``f`` once power
      iteration has converged);
    * ``eta_max = min 2 <d, J d> / ||J d||^2``, the largest ``eta`` with ``||d - eta J d|| < ||d||`` for
      every probe (the contraction condition ``||I - eta J|| < 1`` restricted to the probes; ``2 / L`` for a
      symmetric positive-definite ``J``). This condition is fewflow's inference from the update's
      linearisation; the paper states a sufficient condition and estimates its bound empirically.
      ``eta_max = 0`` means some probe has ``<d, J d> <= 0``: no step contracts that direction.

    Costs ``1 + probes * (power_iters + 1)`` calls of ``f`` (one fewer when ``fz = f(z)`` is given).
    ``f`` maps a batch to a batch of the same shape; ``z`` is not modified. Random directions come from
    ``generator`` (on ``z``'s device).

    Returns:
        ``(L_hat, eta_max)`` as floats (the worst row of the batch), or as ``(B,)`` float64 tensors (one per
        sample: the sampler acts on each row separately) with ``per_sample=True``.
    """
    check_finite("z", z)
    if z.dim() < 2 or not z.is_floating_point():
        raise FewflowError(f"z must be a floating-point batch (B, ...), got {z.dtype} {tuple(z.shape)}")
    probes = _positive_int("probes", probes)
    power_iters = _positive_int("power_iters", power_iters, 0)
    eps = _positive_float("eps", eps)
    base = f(z) if fz is None else fz
    if base.shape != z.shape:
        raise FewflowError(f"f must map z {tuple(z.shape)} to the same shape, got {tuple(base.shape)}")
    b, dim = z.shape[0], z[0].numel()
    h = eps * _rows(z).norm(dim=1).clamp_min(math.sqrt(dim))  # (B,)
    hx = h.reshape(b, *([1] * (z.dim() - 1)))
    lip = torch.zeros(b, dtype=torch.float64, device=z.device)
    eta = torch.full((b,), math.inf, dtype=torch.float64, device=z.device)
    for _ in range(probes):
        d = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
        d = d / _rows(d).norm(dim=1).clamp_min(1e-30).reshape_as(hx)
        for _ in range(power_iters + 1):
            jd = (f(z + hx * d) - base) / hx
            jd64, d64 = _rows(jd).double(), _rows(d).double()
            norm = jd64.norm(dim=1)
            lip = torch.maximum(lip, norm)
            curv = (jd64 * d64).sum(1)
            bound = torch.where(curv > 0, 2.0 * curv / norm.pow(2).clamp_min(1e-300), torch.zeros_like(curv))
            bound = torch.where(norm > 0, bound, torch.full_like(bound, math.inf))
            eta = torch.minimum(eta, bound)
            if not bool(torch.isfinite(norm).all()):
                raise FewflowError("the sampler returned non-finite values while estimating the step bound")
            d = jd / norm.clamp_min(1e-30).to(jd.dtype).reshape_as(hx)
    if per_sample:
        return lip, eta
    return float(lip.max()), float(eta.min())


def _task(meas: Measurement, target_cond: dict[str, Any] | None) -> str:
    identity = isinstance(meas.op, Identity)
    if target_cond is not None:
        if not identity:
            raise FewflowError("editing (target_cond) needs an identity measurement of the input image")
        return "edit"
    return "invert" if identity else "restore"


def _as_measurement(meas: Measurement | Tensor) -> Measurement:
    if torch.is_tensor(meas):
        return Measurement(y=meas, op=Identity(), sigma=0.0)
    if not isinstance(meas, Measurement):
        raise FewflowError(f"meas must be a Measurement or a tensor, got {type(meas).__name__}")
    return meas


def _data_guess(op: Operator, y: Tensor) -> Tensor:
    """A data-space starting point for restoration: ``A^+ y`` where the operator has one, else ``A^T y``."""
    try:
        return op.pinv(y)
    except FewflowError:
        return op.adjoint(y)


@torch.no_grad()
def flowopt_iterate(
    f: Callable[[Tensor], Tensor],
    z0: Tensor,
    y: Tensor,
    eta: float | Tensor,
    iterations: int,
    *,
    op: Operator | None = None,
    tol: float = 0.0,
    floor: float = 0.0,
    keep_iterates: bool = True,
    counter: list[int] | None = None,
) -> tuple[Tensor, Tensor, list[dict[str, float]], list[Tensor], str]:
    """The FlowOpt loop ``z <- z - eta g``, ``g = f(z) - y`` (``op`` None) or ``A^T (A f(z) - y)``;
    ``eta`` is a number or one value per sample ``(B,)``.

    Evaluates ``x_k = f(z_k)`` for ``k = 0..iterations`` (``iterations + 1`` calls) and records, per
    iterate, ``loss`` (batch mean of ``1/2 ||r||^2``, ``r = A x_k - y``), ``residual`` (mean ``||r||``),
    ``rel_residual`` (max ``||r|| / ||y||``) and ``nfe`` (``counter[0]`` after the call, when a counter that
    ``f`` increments is given). Stops
    early when ``rel_residual <= tol`` (``tol > 0``), when the rms residual per measured value reaches
    ``floor`` (``floor > 0``), or when an iterate is not finite ("diverged": the last finite one is kept).

    Returns ``(z, x, history, iterates, stop)`` with ``x = f(z)``.
    """
    z = z0.clone()
    if torch.is_tensor(eta):
        if eta.numel() != z.shape[0]:
            raise FewflowError(f"eta must be a number or {z.shape[0]} values (one per sample)")
        step: float | Tensor = eta.to(device=z.device, dtype=z.dtype).reshape(-1, *([1] * (z.dim() - 1)))
    else:
        step = float(eta)
    ynorm = _rows(y).norm(dim=1).clamp_min(1e-12)
    m = y[0].numel()
    history: list[dict[str, float]] = []
    iterates: list[Tensor] = []
    x_prev: Tensor | None = None
    z_prev = z
    stop = "iterations"
    for k in range(iterations + 1):
        x = f(z)
        ax = x if op is None else op.forward(x)
        r = ax - y
        rn = _rows(r).double().norm(dim=1)
        if not bool(torch.isfinite(x).all()) or not bool(torch.isfinite(rn).all()):
            stop = "diverged"
            if x_prev is None:
                raise FewflowError("the sampler returned non-finite values at the starting latent")
            z, x = z_prev, x_prev
            break
        rel = float((rn / ynorm.double()).max())
        history.append({
            "iter": float(k), "loss": float(0.5 * rn.pow(2).mean()), "residual": float(rn.mean()),
            "rel_residual": rel, "nfe": float(counter[0]) if counter is not None else float("nan"),
        })
        if keep_iterates:
            iterates.append(x.clone())
        x_prev, z_prev = x, z
        if tol > 0 and rel <= tol:
            stop = "tol"
            break
        if floor > 0 and float(rn.max()) / math.sqrt(m) <= floor:
            stop = "noise_level"
            break
        if k < iterations:
            g = r if op is None else op.adjoint(r)
            z = z - step * g
    return z, x, history, iterates, stop


def _check_latent(name: str, z: Tensor, like: Tensor) -> None:
    if not torch.is_tensor(z) or not z.is_floating_point():
        raise FewflowError(f"{name} must be a floating-point tensor")
    check_finite(name, z)
    if z.shape != like.shape:
        raise FewflowError(
            f"{name} has shape {tuple(z.shape)} but the data batch has shape {tuple(like.shape)}"
        )


def solve(
    model: Callable[..., Tensor],
    meas: Measurement | Tensor,
    cfg: FlowOptConfig | None = None,
    *,
    generator: torch.Generator | None = None,
    z_init: Tensor | None = None,
    target_cond: dict[str, Any] | None = None,
    target_model: Callable[..., Tensor] | None = None,
    **cond: Any,
) -> InverseResult:
    """Run FlowOpt on a measurement (inversion, editing or restoration; see the module docstring).

    Args:
        model: the prior, a velocity model ``v(x, t, **cond)`` in fewflow time.
        meas: a :class:`~fewflow.inverse.operators.Measurement`; a plain tensor ``y`` means the identity
            measurement (inversion, or editing with ``target_cond``).
        cfg: :class:`FlowOptConfig` (defaults when None).
        generator: randomness of the step-bound probes and of ``init="noise"`` (on ``y``'s device).
        z_init: the starting latent at ``t_start``, data-shaped (replaces ``cfg.init``).
        target_cond: editing: the new condition (e.g. ``{"y": new_labels}``); ``cond`` is the source one.
        target_model: editing: the model used under ``target_cond`` (e.g. a ``fewflow.guidance.CFG``
            wrapper, as the authors guide the target prompt); default ``model``.
        **cond: the condition of the input (``y=labels``, ``c=...``).

    Returns:
        :class:`~fewflow.inverse.base.InverseResult` with ``x = f(z)``, the latent ``z`` at ``t_start``,
        ``nfe`` per sample (initial inversion + step-bound estimate + sampler calls), the per-iteration
        ``history`` and, with ``keep_iterates``, every iterate ``f(z_k)``. ``meta`` holds the settings
        used, ``eta``, ``L_hat``, ``eta_max`` and the stopping reason (``iterations``, ``tol``,
        ``noise_level`` or ``diverged``).
    """
    from fewflow.inverse.inversion import _invert

    cfg = FlowOptConfig() if cfg is None else cfg
    meas = _as_measurement(meas)
    task = _task(meas, target_cond)
    s = resolve_settings(cfg, task)
    y, op = meas.y, meas.op
    if y.dim() < 2 or not y.is_floating_point() or y.shape[0] == 0:
        raise FewflowError(
            f"measurement y must be a non-empty floating-point batch (B, ...), got {tuple(y.shape)}"
        )
    if target_model is not None and target_cond is None:
        raise FewflowError("target_model is used for editing only: give target_cond too")
    steps, n_max = s["steps"], s["n_max"]
    count = [0]
    src = sampler_map(model, steps, n_max, stepper=s["stepper"], cond=cond, counter=count)
    if task == "edit":
        tgt_model = model if target_model is None else target_model
        f = sampler_map(tgt_model, steps, n_max, stepper=s["stepper"], cond=target_cond, counter=count)
    else:
        f = src

    with torch.no_grad():
        start = y if task != "restore" else _data_guess(op, y)
        if z_init is not None:
            _check_latent("z_init", z_init, start)
            z0, init = z_init.detach().clone(), "given"
        else:
            init = s["init"] if s["init"] != "auto" else "ode"
            if init == "ode":
                res = _invert(model, start, steps, n_max, s["stepper"], cond)
                z0, count[0] = res.x, count[0] + res.nfe
            else:
                z0 = torch.randn(start.shape, generator=generator, device=start.device, dtype=start.dtype)
                if n_max < steps:
                    res = ode_solve(model, z0, grid=uniform_grid(steps)[: steps - n_max + 1],
                                    stepper=s["stepper"], cond=cond)
                    z0, count[0] = res.x, count[0] + res.nfe
        nfe_init = count[0]

        eta: float | Tensor | None = s["eta"]
        lip: Tensor | None = None
        eta_max: Tensor | None = None
        eta_note = "given"
        if eta is None:
            if task == "restore":
                # the residual obeys r <- r - eta A J A^T r: probe u -> A f(z0 + A^T (u - u0)) at u0 = A z0
                u0 = op.forward(z0)

                def bound_f(u: Tensor) -> Tensor:
                    return op.forward(f(z0 + op.adjoint(u - u0)))

                at = u0
            else:
                bound_f, at = f, z0
            lip, eta_max = estimate_step_bound(
                bound_f, at, probes=s["probes"], power_iters=s["power_iters"], eps=s["eps"],
                generator=generator, per_sample=True,
            )
            if not cfg.per_sample_eta:
                lip, eta_max = lip.max().expand_as(lip), eta_max.min().expand_as(eta_max)
            eta, eta_note = _default_eta(task, s, lip, eta_max)
        nfe_bound = count[0] - nfe_init

        floor = meas.sigma if task == "restore" else 0.0
        tol = s["tol"] if task != "edit" else 0.0
        z, x, history, iterates, stop = flowopt_iterate(
            f, z0, y, eta, s["iterations"], op=op if task == "restore" else None, tol=tol, floor=floor,
            keep_iterates=bool(cfg.keep_iterates), counter=count,
        )
    meta = {
        "solver": "flowopt", **s, "eta": _plain(eta), "eta_rule": eta_note, "L_hat": _plain(lip),
        "eta_max": _plain(eta_max),
        "init": init, "stop": stop, "iterations_run": max(len(history) - 1, 0),
        "nfe_init": nfe_init, "nfe_bound": nfe_bound, "measurement": meas.describe(),
    }
    return InverseResult(x=x, nfe=count[0], history=history, iterates=iterates, z=z, meta=meta)


def _default_eta(task: str, s: dict[str, Any], lip: Tensor, eta_max: Tensor) -> tuple[Tensor, str]:
    """Per-sample step sizes from the estimates (see the module docstring)."""
    if task == "edit":
        k = max(s["iterations"], 1)
        eta = (1.0 - (1.0 - s["edit_pull"]) ** (1.0 / k)) / lip.clamp_min(1e-12)
        return eta, "(1 - (1 - edit_pull)^(1/iterations)) / L_hat"
    ok = (eta_max > 0) & torch.isfinite(eta_max)
    fallback = torch.where(lip > 0, 1.0 / lip.clamp_min(1e-12), torch.ones_like(lip))
    eta = torch.where(ok, s["safety"] * eta_max, fallback)
    rule = "safety * eta_max" if bool(ok.all()) else "safety * eta_max (1 / L_hat where no contracting step)"
    return eta, rule


def _plain(v: float | Tensor | None) -> float | list[float] | None:
    if v is None or isinstance(v, float):
        return v
    vals = [float(a) for a in v.reshape(-1).tolist()]
    return vals[0] if len(vals) == 1 else vals


register_inverse(InverseSpec(
    name="flowopt",
    label="FlowOpt",
    paper="Ronai, Kulikov & Michaeli, FlowOpt: Fast Optimization Through Whole Flow Processes for "
          "Training-Free Editing (arXiv 2510.22010)",
    summary="Jacobian-free iterations z <- z - eta (f(z) - y) through the whole sampler",
    config=FlowOptConfig,
    solve=solve,
    tasks=("invert", "edit", "restore"),
    docs="flowopt",
))
