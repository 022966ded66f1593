"""FLAIR: variational posterior inference with a flow-matching prior.

Erbach et al., "Solving Inverse Problems with FLAIR" (arXiv 2506.02680). The paper (Stable Diffusion 3
convention) runs its time from 1 = noise to 0 = data; everything below is in fewflow's time, t = 0 noise,
t = 1 data: ``t_fewflow = 1 - t_paper`` and ``v_fewflow = -v_paper``. With ``x_t = (1 - t) eps + t x`` and
the prior's velocity ``v(x_t, t) ~ x - eps``, the denoised and noise estimates are

    x1_hat = x_t + (1 - t) v(x_t, t),        eps_hat = x_t - t v(x_t, t).

FLAIR fits a point-mass variational posterior ``q(x | y) = delta(mu)`` (``mu`` in the prior's space; a
latent prior passes ``encode`` / ``decode``) to

    ||y - A(D(mu))||^2 / (2 sigma^2) + int lambda(t) E_eps ||v(x_t, t) - (mu - eps)||^2 dt,
    x_t = (1 - t) eps + t mu,

one ``t`` per iteration on the grid ``t_k = linspace(0, 1 - t_min, steps + 2)[1:-1]`` (ascending in
fewflow time = the paper's descending ``linspace(1, ts_min, n + 2)``). Its four ingredients:

1. **Flow-matching regulariser** (score-distillation-like): the gradient of the v-loss with respect to
   ``mu`` with a stop-gradient on the network, ``g = (mu - eps) - v(x_t, t)``; one SGD step
   ``mu <- mu - lr_reg * lambda(t) * g``. (In expectation over ``eps`` and for a Gaussian prior this is
   ``(1 - t) Sigma_t^{-1} (mu - m)``: a prior pull with the metric of ``p_t``.)
2. **Deterministic trajectory adjustment (DTA)**: the noise is not fresh but mixes the model's noise
   estimate of the previous iteration, ``eps_k = a eps_hat_{k-1} + sqrt(1 - a^2) xi``, ``a = t_k`` (the
   paper's ``1 - t``), ``xi ~ N(0, I)``; ``dta=False`` draws ``eps_k = xi``.
3. **Decoupled hard data consistency (HDC)**: after each regulariser step, up to ``data_steps`` SGD steps
   on ``lambda(t) ||A(D(mu)) - y||^2`` with rate ``lr_data``, stopping early (per sample) once
   ``||A(D(mu)) - y||^2 < max(early_stop, sigma^2) * m``: the residual never has to go below the noise
   floor ``sigma sqrt(m)`` (at the authors' noise level 0.01 the two thresholds coincide, 1e-4).
   ``hdc=False`` (the ablation) adds one weighted data gradient to the regulariser step instead:
   ``mu <- mu - lambda(t) (lr_reg g + lr_data grad ||A(D(mu)) - y||^2)``.
4. **Calibrated regulariser weights (CRW)**: ``lambda(t) = reg_weight * w(t)`` with
   ``w = 1 / (mse(t) + 1e-7)`` normalised to mean 1 over the bins (clipped at 0), ``mse(t)`` the prior's
   per-t v-MSE on held-out data (:func:`calibrate`); the data term uses the same ``lambda(t)``.
   ``crw=False`` sets ``w = 1``.

The result is ``D(mu)`` after the last iteration.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import Tensor

from fewflow._validate import FewflowError, check_batch, check_finite, unknown_name
from fewflow.inverse.base import InverseResult, InverseSpec, Operator, register_inverse
from fewflow.inverse.operators import Measurement

__all__ = ["FlairConfig", "calibrate", "crw_weights", "solve"]

PAPER = 'Erbach et al., "Solving Inverse Problems with FLAIR" (arXiv 2506.02680)'


@dataclass
class FlairConfig:
    """FLAIR settings; defaults follow the authors' configs (``configs/inpainting.yaml``, ``x12.yaml``).

    Attributes:
        steps: outer iterations, one regulariser step each (paper ``n_steps`` 50).
        t_min: the paper's smallest noise time ``ts_min`` (0.18); in fewflow time the loop runs
            ``t`` from about 0 up to ``1 - t_min``.
        lr_reg: SGD rate of the regulariser step (1.0).
        lr_data: SGD rate of the data steps: 0.1 for inpainting (paper); the paper's x12 super-resolution
            uses 12 because average pooling by ``f`` has ``||A||^2 = 1 / f^2``: scale it like ``f^2``
            (:meth:`for_task` gives 0.4 for x2 and 1.6 for x4).
        data_steps: at most this many HDC steps per iteration (paper ``likelihood_steps`` 15).
        early_stop: HDC stops when the squared residual per measured value drops below
            ``max(early_stop, sigma^2)`` (paper ``early_stopping`` 1e-4).
        reg_weight: global regulariser weight (paper ``regularizer_weight`` 0.5).
        dta: deterministic trajectory adjustment on/off.
        hdc: decoupled hard data consistency on/off (off: one weighted data gradient per iteration).
        crw: calibrated regulariser weights on/off (on: ``solve`` needs ``calibration``).
    """

    steps: int = 50
    t_min: float = 0.18
    lr_reg: float = 1.0
    lr_data: float = 0.1
    data_steps: int = 15
    early_stop: float = 1e-4
    reg_weight: float = 0.5
    dta: bool = True
    hdc: bool = True
    crw: bool = True

    def __post_init__(self) -> None:
        if int(self.steps) != self.steps or int(self.steps) < 1:
            raise FewflowError(f"flair steps must be a positive integer, got {self.steps!r}")
        if int(self.data_steps) != self.data_steps or int(self.data_steps) < 0:
            raise FewflowError(f"flair data_steps must be a non-negative integer, got {self.data_steps!r}")
        self.steps, self.data_steps = int(self.steps), int(self.data_steps)
        if not 0.0 <= float(self.t_min) < 1.0:
            raise FewflowError(f"flair t_min must lie in [0, 1), got {self.t_min}")
        for name in ("lr_reg", "lr_data", "early_stop", "reg_weight"):
            v = float(getattr(self, name))
            if not math.isfinite(v) or v < 0:
                raise FewflowError(f"flair {name} must be a finite number >= 0, got {getattr(self, name)!r}")
            setattr(self, name, v)
        for name in ("dta", "hdc", "crw"):
            if not isinstance(getattr(self, name), bool):
                raise FewflowError(f"flair {name} must be true or false, got {getattr(self, name)!r}")

    @classmethod
    def for_task(cls, task: str, **overrides: Any) -> FlairConfig:
        """Defaults for one of :data:`fewflow.inverse.operators.TASKS`: ``lr_data = 0.1`` except
        super-resolution, ``0.1 * f^2`` (0.4 for ``"sr2"``, 1.6 for ``"sr4"``), as the paper's x12 rate."""
        from fewflow.inverse.operators import TASKS

        if task not in TASKS:
            raise unknown_name("inverse task", task, TASKS)
        lr = {"sr2": 0.4, "sr4": 1.6}.get(task, 0.1)
        valid = {f.name for f in fields(cls)}
        bad = sorted(set(overrides) - valid)
        if bad:
            raise FewflowError(f"unknown FlairConfig field(s): {', '.join(bad)}")
        return cls(**{"lr_data": lr, **overrides})


# ---------------------------------------------------------------------------------------------- helpers
def _randn(ref: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal noise shaped like ``ref`` (drawn on the generator's device, moved to ``ref``'s)."""
    gdev = generator.device if generator is not None else ref.device
    return torch.randn(ref.shape, generator=generator, device=gdev, dtype=ref.dtype).to(ref.device)


@contextlib.contextmanager
def _eval_mode(model: Any) -> Iterator[None]:
    """Evaluate an ``nn.Module`` prior in eval mode and restore its previous mode afterwards."""
    was = getattr(model, "training", None)
    if isinstance(model, torch.nn.Module):
        model.eval()
    try:
        yield
    finally:
        if isinstance(model, torch.nn.Module) and was:
            model.train(True)


def _clean_cond(cond: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cond.items() if v is not None}


def _velocity(model: Any, x: Tensor, t: float, cond: dict[str, Any]) -> Tensor:
    """``model(x, t, **cond)`` with ``t`` as a ``(B,)`` tensor on ``x``'s device and dtype."""
    tb = torch.full((x.shape[0],), float(t), device=x.device, dtype=x.dtype)
    v = model(x, tb, **cond) if cond else model(x, tb)
    if not torch.is_tensor(v) or v.shape != x.shape:
        got = tuple(v.shape) if torch.is_tensor(v) else type(v).__name__
        raise FewflowError(f"the prior must return a velocity of shape {tuple(x.shape)}, got {got}")
    return v


def _back_project(op: Operator, y: Tensor) -> Tensor:
    """``pinv(y)`` where the operator has one, else the adjoint ``A^T y`` (e.g. blur)."""
    try:
        return op.pinv(y)
    except FewflowError:
        return op.adjoint(y)


def _check_meas(meas: Any) -> Measurement:
    if not isinstance(meas, Measurement):
        raise FewflowError(
            f"meas must be a fewflow.inverse.operators.Measurement (see measure()), got {type(meas).__name__}"
        )
    check_finite("measurement y", meas.y)
    return meas


def _per_sample_sq(r: Tensor) -> Tensor:
    return r.reshape(r.shape[0], -1).pow(2).sum(1)


def _bshape(v: Tensor, ref: Tensor) -> Tensor:
    return v.reshape(v.shape[0], *([1] * (ref.dim() - 1)))


# ------------------------------------------------------------------------------------------ calibration
def calibrate(
    model: Any,
    x_heldout: Tensor,
    bins: int = 100,
    generator: torch.Generator | None = None,
    **cond: Any,
) -> Tensor:
    """The prior's per-t velocity error on held-out data, for the calibrated weights (CRW).

    Entry ``i`` is ``mean over x, eps and dims of (v(x_t, t_i) - (x - eps))^2`` at ``t_i = i / (bins - 1)``
    (fewflow time, so entry 0 is pure noise), ``x_t = (1 - t_i) eps + t_i x``, one fresh ``eps`` per
    sample and bin: ``bins`` forward passes over ``x_heldout``. For an exact prior this is the
    irreducible error (``s^2 / (t^2 s^2 + (1 - t)^2)`` per dim for data ``N(m, s^2 I)``). Compute it once
    per prior and pass it to :func:`solve` as ``calibration=``.

    Args:
        model: velocity model ``v(x, t, **cond)``.
        x_heldout: ``(N, *shape)`` held-out data (not used for training), in the prior's space.
        bins: number of time bins (paper: 100).
        generator: for the noise draws.
        **cond: condition passed to the model (e.g. ``y=labels`` of shape ``(N,)``).

    Returns:
        ``(bins,)`` tensor on ``x_heldout``'s device and dtype.
    """
    if not torch.is_tensor(x_heldout) or not x_heldout.is_floating_point():
        raise FewflowError("x_heldout must be a floating-point tensor")
    check_batch("x_heldout", x_heldout)
    check_finite("x_heldout", x_heldout)
    if int(bins) != bins or int(bins) < 2:
        raise FewflowError(f"bins must be an integer >= 2, got {bins!r}")
    cond = _clean_cond(cond)
    x = x_heldout.detach()
    out = torch.empty(int(bins), dtype=torch.float64, device=x.device)
    with torch.no_grad(), _eval_mode(model):
        for i in range(int(bins)):
            t = i / (int(bins) - 1)
            eps = _randn(x, generator)
            v = _velocity(model, (1 - t) * eps + t * x, t, cond)
            out[i] = (v - (x - eps)).double().pow(2).mean()
    check_finite("calibration curve (the prior returned non-finite velocities)", out)
    return out.to(x.dtype)


def crw_weights(curve: Tensor) -> Tensor:
    """Calibrated regulariser weights from a :func:`calibrate` curve: ``w = 1 / (mse + 1e-7)``, normalised
    to mean 1 and clipped at 0 (same length, entry ``i`` at ``t_i = i / (len - 1)``)."""
    if not torch.is_tensor(curve) or curve.dim() != 1 or curve.numel() < 2 or not curve.is_floating_point():
        raise FewflowError("calibration must be a 1-D float tensor with >= 2 bins (from calibrate())")
    check_finite("calibration", curve)
    if bool((curve < 0).any()):
        raise FewflowError("calibration holds negative mean squared errors; pass the curve from calibrate()")
    w = 1.0 / (curve.double() + 1e-7)
    w = w / w.mean()
    return w.clamp_min(0.0).to(curve.dtype)


def _weight_at(weights: Tensor | None, t: float) -> float:
    if weights is None:
        return 1.0
    n = weights.numel()
    return float(weights[min(n - 1, max(0, round(t * (n - 1))))])


# --------------------------------------------------------------------------------------------- solver
def _data_grad(mu: Tensor, meas: Measurement, decode: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
    """``grad_mu ||A(D(mu)) - y||^2`` and the per-sample squared residual (before the step)."""
    with torch.enable_grad():
        m = mu.detach().requires_grad_(True)
        sq = _per_sample_sq(meas.op(decode(m)) - meas.y)
        (g,) = torch.autograd.grad(sq.sum(), m)
    return g, sq.detach()


def solve(
    model: Any,
    meas: Measurement,
    cfg: FlairConfig | None = None,
    *,
    generator: torch.Generator | None = None,
    calibration: Tensor | None = None,
    encode: Callable[[Tensor], Tensor] | None = None,
    decode: Callable[[Tensor], Tensor] | None = None,
    **cond: Any,
) -> InverseResult:
    """Restore ``meas`` with FLAIR (module docstring for the maths).

    Args:
        model: the prior's velocity model ``v(x, t, **cond)`` (fewflow time), frozen.
        meas: the :class:`~fewflow.inverse.operators.Measurement` ``y = A(x) + sigma n``.
        cfg: :class:`FlairConfig` (defaults if ``None``).
        generator: for the initial and the DTA noise.
        calibration: the :func:`calibrate` curve of this prior (required when ``cfg.crw``).
        encode, decode: map data to the prior's space and back (identity by default; a latent prior
            passes its encoder and any differentiable decoder). ``mu`` starts at ``encode(pinv(y))``
            (``encode(A^T y)`` for operators without a pseudo-inverse).
        **cond: condition for the prior (``y=labels``, ``c=...``); ``None`` values are dropped.

    Returns:
        :class:`~fewflow.inverse.base.InverseResult` with ``x = D(mu)``, ``z = mu``, ``nfe = steps`` and one
        history row per iteration (``t``, ``weight``, ``loss`` = mean squared residual, ``residual`` = mean
        ``||A(x) - y||``, ``data_steps`` taken).
    """
    cfg = FlairConfig() if cfg is None else cfg
    if not isinstance(cfg, FlairConfig):
        raise FewflowError(f"cfg must be a FlairConfig, got {type(cfg).__name__}")
    meas = _check_meas(meas)
    if cfg.crw and calibration is None:
        raise FewflowError(
            "FLAIR with crw=True needs calibration=fewflow.inverse.flair.calibrate(model, x_heldout) "
            "(the prior's per-t error on held-out data), or set crw=False"
        )
    weights = crw_weights(calibration) if cfg.crw else None
    enc = encode if encode is not None else (lambda z: z)
    dec = decode if decode is not None else (lambda z: z)
    cond = _clean_cond(cond)

    with torch.no_grad():
        mu = enc(_back_project(meas.op, meas.y)).detach().clone()
    check_finite("initial estimate encode(pinv(y))", mu)
    floor = max(cfg.early_stop, meas.sigma**2) * meas.m
    ts = torch.linspace(0.0, 1.0 - cfg.t_min, cfg.steps + 2, dtype=torch.float64)[1:-1].tolist()
    eps_hat = _randn(mu, generator)
    history: list[dict[str, float]] = []
    with _eval_mode(model):
        for k, t in enumerate(ts):
            lam = cfg.reg_weight * _weight_at(weights, t)
            xi = _randn(mu, generator)
            eps = t * eps_hat + math.sqrt(max(0.0, 1.0 - t * t)) * xi if cfg.dta else xi
            x_t = (1.0 - t) * eps + t * mu
            with torch.no_grad():
                v = _velocity(model, x_t, t, cond)
            eps_hat = x_t - t * v
            g = (mu - eps) - v
            n_data = 0
            if cfg.hdc:
                mu = mu - cfg.lr_reg * lam * g
                for _ in range(cfg.data_steps):
                    gd, sq = _data_grad(mu, meas, dec)
                    active = sq >= floor
                    if not bool(active.any()):
                        break
                    mu = mu - cfg.lr_data * lam * gd * _bshape(active.to(mu.dtype), mu)
                    n_data += 1
            else:
                gd, _ = _data_grad(mu, meas, dec)
                mu = mu - lam * (cfg.lr_reg * g + cfg.lr_data * gd)
                n_data = 1
            mu = mu.detach()
            with torch.no_grad():
                sq = _per_sample_sq(meas.op(dec(mu)) - meas.y)
            if not bool(torch.isfinite(mu).all()):
                raise FewflowError(
                    f"FLAIR diverged at iteration {k} (t = {t:.3f}); lower lr_reg / lr_data"
                )
            history.append({"iter": float(k), "t": float(t), "weight": float(lam), "loss": float(sq.mean()),
                            "residual": float(sq.sqrt().mean()), "data_steps": float(n_data)})
        with torch.no_grad():
            x = dec(mu).detach()
    meta = {"config": asdict(cfg), "measurement": meas.describe(), "noise_floor": math.sqrt(floor),
            "latent": encode is not None or decode is not None}
    return InverseResult(x=x, nfe=cfg.steps, history=history, z=mu, meta=meta)


register_inverse(
    InverseSpec(
        name="flair",
        label="FLAIR",
        paper=PAPER,
        summary="variational posterior with a flow-matching regulariser, trajectory adjustment, "
        "hard data consistency and calibrated weights",
        config=FlairConfig,
        solve=solve,
        tasks=("restore",),
        docs="flair",
    )
)
