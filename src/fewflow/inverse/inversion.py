"""Baselines for FlowOpt: plain ODE inversion and gradient descent through the sampler.

Both are written in fewflow time (t = 0 noise, t = 1 data) and use fewflow's solver
(:func:`fewflow.solvers.solve`) for every integration.

**ODE inversion** integrates the prior's probability-flow ODE ``dx/dt = v(x, t)`` *backwards*, from the
image at ``t = 1`` to the noise at ``t = 0`` (or to ``t_start = 1 - n_max / steps``), on the decreasing
uniform grid: the shared loop accepts decreasing grids, so Euler steps ``x_{t - h} = x_t - h v(x_t, t)``
with ``h = 1 / steps``. Each step evaluates the velocity at the point it starts from, while the forward
Euler sampler evaluates it at the point it arrives from, so ``f(ode_invert(x)) != x`` at finite ``steps``:
the reconstruction error FlowOpt removes (Ronai, Kulikov & Michaeli, "FlowOpt: Fast Optimization Through
Whole Flow Processes for Training-Free Editing", arXiv 2510.22010, compare against such inversions).

**Gradient descent through the sampler** minimises ``1/2 ||A f(z) - y||^2`` over the latent ``z`` by
back-propagating through the ``n_max``-step sampler ``f`` (Adam or SGD on ``z``; the network's weights are
not touched). One iteration costs a forward and a backward pass through ``n_max`` network calls; fewflow
counts a backward as two forwards, so an iteration is ``3 n_max`` network evaluations against FlowOpt's
``n_max``: ``SamplerGDConfig.iterations = 10`` matches FlowOpt's 30 inversion iterations at equal NFE.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fewflow._validate import FewflowError, check_finite, unknown_name
from fewflow.inverse.base import InverseResult, InverseSpec, register_inverse
from fewflow.inverse.operators import Identity, Measurement
from fewflow.solvers import SolveResult, uniform_grid
from fewflow.solvers import solve as ode_solve

__all__ = [
    "ODEInversionConfig",
    "SamplerGDConfig",
    "ode_invert",
    "ode_inversion_solve",
    "sampler_gd_solve",
]


def _int_at_least(name: str, value: Any, minimum: int) -> int:
    bad = isinstance(value, bool) or not isinstance(value, int | float)
    if bad or int(value) != value or value < minimum:
        raise FewflowError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_data(name: str, x: Any) -> Tensor:
    if not torch.is_tensor(x) or not x.is_floating_point():
        raise FewflowError(f"{name} must be a floating-point tensor")
    if x.dim() < 2 or x.shape[0] == 0:
        raise FewflowError(f"{name} must be a non-empty batch (B, ...), got shape {tuple(x.shape)}")
    check_finite(name, x)
    return x


def _invert(
    model: Callable[..., Tensor], x: Tensor, steps: int, n_max: int, stepper: str, cond: dict[str, Any]
) -> SolveResult:
    """Backwards solve from t = 1 over the last ``n_max`` of ``steps`` uniform steps (to 1 - n_max/steps)."""
    grid = uniform_grid(steps).flip(0)[: n_max + 1]
    return ode_solve(model, x, grid=grid, stepper=stepper, cond=cond)


def ode_invert(
    model: Callable[..., Tensor],
    x: Tensor,
    steps: int,
    *,
    n_max: int | None = None,
    stepper: str = "euler",
    **cond: Any,
) -> Tensor:
    """Invert the sampler's ODE: integrate ``dx/dt = v(x, t, **cond)`` from ``x`` at ``t = 1`` backwards.

    Args:
        model: velocity model in fewflow time.
        x: data batch ``(B, ...)`` at ``t = 1`` (not modified).
        steps: uniform steps of the grid on [0, 1].
        n_max: walk back only the last ``n_max`` steps, to ``t = 1 - n_max / steps`` (default: all, to
            ``t = 0``, the initial noise).
        stepper: any fewflow stepper name (default Euler); with Euler the cost is ``n_max`` network calls.
        **cond: the model's condition (``y=labels``, ``c=...``).

    Returns:
        The latent at ``1 - n_max / steps``, shaped like ``x``.
    """
    x = _check_data("x", x)
    steps = _int_at_least("steps", steps, 1)
    n = steps if n_max is None else _int_at_least("n_max", n_max, 1)
    if n > steps:
        raise FewflowError(f"n_max must lie in [1, steps={steps}], got {n}")
    return _invert(model, x, steps, n, stepper, cond).x


def _sample(
    model: Callable[..., Tensor], z: Tensor, steps: int, n_max: int, stepper: str, cond: dict[str, Any],
    grad: bool = False,
) -> SolveResult:
    grid = uniform_grid(steps)[steps - n_max:]
    return ode_solve(model, z, grid=grid, stepper=stepper, cond=cond, grad=grad)


def _identity_y(meas: Measurement | Tensor, who: str) -> Tensor:
    if torch.is_tensor(meas):
        return _check_data("y", meas)
    if not isinstance(meas, Measurement):
        raise FewflowError(f"meas must be a Measurement or a tensor, got {type(meas).__name__}")
    if not isinstance(meas.op, Identity):
        raise FewflowError(f"{who} inverts images only: the measurement operator must be the identity, "
                           f"got {meas.op.name!r}")
    return _check_data("measurement y", meas.y)


# --------------------------------------------------------------------------- ODE inversion


@dataclass
class ODEInversionConfig:
    """Plain ODE inversion followed by the sampler (the reconstruction ``f(z)``).

    Defaults: 10 Euler steps each way, the inversion setting of the FlowOpt authors (T = 10); at equal NFE
    with FlowOpt (``(iterations + 2) * T``) give ``steps`` the larger budget and keep ``sample_steps`` at
    the sampler's T.
    """

    steps: int = field(default=10, metadata={"help": "inversion steps from t = 1 back to t = 0"})
    sample_steps: int | None = field(
        default=None, metadata={"help": "steps of the sampler that reconstructs f(z) (None: steps)"}
    )
    stepper: str = field(default="euler", metadata={"help": "stepper both ways"})


def ode_inversion_solve(
    model: Callable[..., Tensor],
    meas: Measurement | Tensor,
    cfg: ODEInversionConfig | None = None,
    *,
    generator: torch.Generator | None = None,
    **cond: Any,
) -> InverseResult:
    """Invert ``y`` (identity measurement or a tensor) with :func:`ode_invert`, then sample ``x = f(z)``
    with ``sample_steps`` forward steps. ``generator`` is unused (deterministic)."""
    cfg = ODEInversionConfig() if cfg is None else cfg
    if not isinstance(cfg, ODEInversionConfig):
        raise FewflowError(f"cfg must be an ODEInversionConfig, got {type(cfg).__name__}")
    y = _identity_y(meas, "ode_inversion")
    steps = _int_at_least("steps", cfg.steps, 1)
    sample_steps = steps if cfg.sample_steps is None else _int_at_least("sample_steps", cfg.sample_steps, 1)
    inv = _invert(model, y, steps, steps, cfg.stepper, cond)
    rec = _sample(model, inv.x, sample_steps, sample_steps, cfg.stepper, cond)
    rn = (rec.x - y).reshape(y.shape[0], -1).double().norm(dim=1)
    ynorm = y.reshape(y.shape[0], -1).double().norm(dim=1).clamp_min(1e-12)
    hist = [{"iter": 0.0, "loss": float(0.5 * rn.pow(2).mean()), "residual": float(rn.mean()),
             "rel_residual": float((rn / ynorm).max()),
             "nfe": float(inv.nfe + rec.nfe)}]
    meta = {"solver": "ode_inversion", "steps": steps, "sample_steps": sample_steps, "stepper": cfg.stepper,
            "nfe_invert": inv.nfe, "nfe_sample": rec.nfe}
    return InverseResult(x=rec.x, nfe=inv.nfe + rec.nfe, history=hist, z=inv.x, meta=meta)


# --------------------------------------------------------------------------- gradient descent


_OPTIMIZERS = ("adam", "sgd")


@dataclass
class SamplerGDConfig:
    """Gradient descent on the latent through the ``n_max``-step sampler (back-propagation).

    ``iterations = 10`` costs ``10 * 3 T`` evaluations plus the final sample, FlowOpt's 30 iterations at
    equal NFE; ``nfe_budget`` (per sample, initial inversion included) sets the iterations instead. Adam
    with ``lr = 0.05`` (per latent coordinate; latents are unit-scale noise) is fewflow's choice, not a
    published setting.
    """

    steps: int = field(default=10, metadata={"help": "sampler steps T on [0, 1]"})
    n_max: int | None = field(
        default=None, metadata={"help": "last steps the latent passes through (None: T)"}
    )
    iterations: int = field(default=10, metadata={"help": "optimiser steps (3 T network evaluations each)"})
    nfe_budget: int | None = field(
        default=None, metadata={"help": "total NFE per sample; overrides iterations when given"}
    )
    optimizer: str = field(default="adam", metadata={"help": "adam | sgd"})
    lr: float = field(default=0.05, metadata={"help": "optimiser learning rate"})
    init: str = field(default="auto", metadata={"help": "auto (= ode) | ode | noise"})
    stepper: str = field(default="euler", metadata={"help": "the sampler's stepper"})
    keep_iterates: bool = field(default=False, metadata={"help": "keep f(z_k) of every iteration"})


def sampler_gd_solve(
    model: Callable[..., Tensor],
    meas: Measurement | Tensor,
    cfg: SamplerGDConfig | None = None,
    *,
    generator: torch.Generator | None = None,
    z_init: Tensor | None = None,
    **cond: Any,
) -> InverseResult:
    """Minimise ``1/2 ||A f(z) - y||^2`` (summed per sample) by back-propagating through the sampler.

    ``meas`` is a :class:`~fewflow.inverse.operators.Measurement` (a tensor means the identity: inversion).
    The latent starts from ``z_init``, or the ODE inversion of ``y`` (of ``A^+ y``, or ``A^T y`` without a
    pseudo-inverse, for restoration), or fresh noise (``init="noise"``, from ``generator``). Only the
    latent receives gradients. ``nfe`` counts forwards plus twice the backwards.
    """
    cfg = SamplerGDConfig() if cfg is None else cfg
    if not isinstance(cfg, SamplerGDConfig):
        raise FewflowError(f"cfg must be a SamplerGDConfig, got {type(cfg).__name__}")
    if torch.is_tensor(meas):
        meas = Measurement(y=meas, op=Identity(), sigma=0.0)
    if not isinstance(meas, Measurement):
        raise FewflowError(f"meas must be a Measurement or a tensor, got {type(meas).__name__}")
    y, op = _check_data("measurement y", meas.y), meas.op
    steps = _int_at_least("steps", cfg.steps, 1)
    n_max = steps if cfg.n_max is None else _int_at_least("n_max", cfg.n_max, 1)
    if n_max > steps:
        raise FewflowError(f"n_max must lie in [1, steps={steps}], got {n_max}")
    if cfg.optimizer not in _OPTIMIZERS:
        raise unknown_name("optimizer", str(cfg.optimizer), _OPTIMIZERS)
    if cfg.init not in ("auto", "ode", "noise"):
        raise unknown_name("init", str(cfg.init), ("auto", "ode", "noise"))
    lr = float(cfg.lr)
    if not math.isfinite(lr) or lr <= 0:
        raise FewflowError(f"lr must be a positive number, got {cfg.lr!r}")
    identity = isinstance(op, Identity)

    nfe = 0
    with torch.no_grad():
        if identity:
            start = y
        else:
            try:
                start = op.pinv(y)
            except FewflowError:
                start = op.adjoint(y)
        if z_init is not None:
            _check_data("z_init", z_init)
            if z_init.shape != start.shape:
                raise FewflowError(f"z_init has shape {tuple(z_init.shape)} but the data batch has shape "
                                   f"{tuple(start.shape)}")
            z0 = z_init.detach().clone()
        elif cfg.init == "noise":
            z0 = torch.randn(start.shape, generator=generator, device=start.device, dtype=start.dtype)
            if n_max < steps:
                res = ode_solve(model, z0, grid=uniform_grid(steps)[: steps - n_max + 1], stepper=cfg.stepper,
                                cond=cond)
                z0, nfe = res.x, nfe + res.nfe
        else:
            res = _invert(model, start, steps, n_max, cfg.stepper, cond)
            z0, nfe = res.x, nfe + res.nfe
    nfe_init = nfe
    per_iter = 3 * n_max * _per_step(cfg.stepper)
    if cfg.nfe_budget is not None:
        budget = _int_at_least("nfe_budget", cfg.nfe_budget, 1)
        iterations = max(0, (budget - nfe_init - n_max * _per_step(cfg.stepper)) // per_iter)
    else:
        iterations = _int_at_least("iterations", cfg.iterations, 0)

    z = z0.clone().requires_grad_(True)
    opt: torch.optim.Optimizer
    opt = torch.optim.Adam([z], lr=lr) if cfg.optimizer == "adam" else torch.optim.SGD([z], lr=lr)
    ynorm = y.reshape(y.shape[0], -1).double().norm(dim=1).clamp_min(1e-12)
    history: list[dict[str, float]] = []
    iterates: list[Tensor] = []

    def record(k: int, x: Tensor, total: int) -> None:
        with torch.no_grad():
            rn = (op.forward(x) - y).reshape(y.shape[0], -1).double().norm(dim=1)
            history.append({"iter": float(k), "loss": float(0.5 * rn.pow(2).mean()),
                            "residual": float(rn.mean()), "rel_residual": float((rn / ynorm).max()),
                            "nfe": float(total)})
            if cfg.keep_iterates:
                iterates.append(x.detach().clone())

    for k in range(iterations):
        with torch.enable_grad():
            res = _sample(model, z, steps, n_max, cfg.stepper, cond, grad=True)
            r = op.forward(res.x) - y
            loss = 0.5 * r.pow(2).sum()
            (g,) = torch.autograd.grad(loss, z)
        nfe += 3 * res.nfe
        record(k, res.x, nfe)
        if not bool(torch.isfinite(g).all()):
            raise FewflowError("gradient through the sampler is not finite; lower lr")
        z.grad = g
        opt.step()
    with torch.no_grad():
        final = _sample(model, z.detach(), steps, n_max, cfg.stepper, cond)
    nfe += final.nfe
    record(iterations, final.x, nfe)
    meta = {"solver": "sampler_gd", "steps": steps, "n_max": n_max, "iterations": iterations,
            "optimizer": cfg.optimizer, "lr": lr, "stepper": cfg.stepper, "nfe_init": nfe_init,
            "t_start": 1.0 - n_max / steps, "measurement": meas.describe()}
    return InverseResult(
        x=final.x, nfe=nfe, history=history, iterates=iterates, z=z.detach().clone(), meta=meta
    )


def _per_step(stepper: str) -> int:
    from fewflow.solvers import get_stepper

    return int(get_stepper(stepper).nfe_per_step)


register_inverse(InverseSpec(
    name="ode_inversion",
    label="ODE inversion",
    paper="baseline (backwards integration of the probability-flow ODE)",
    summary="integrate the prior's ODE from the image back to the noise, then sample",
    config=ODEInversionConfig,
    solve=ode_inversion_solve,
    tasks=("invert",),
    docs="flowopt",
))

register_inverse(InverseSpec(
    name="sampler_gd",
    label="Gradient descent through the sampler",
    paper="baseline (back-propagation through the N-step Euler sampler)",
    summary="Adam / SGD on the latent with gradients back-propagated through the whole sampler",
    config=SamplerGDConfig,
    solve=sampler_gd_solve,
    tasks=("invert", "restore"),
    docs="flowopt",
))
