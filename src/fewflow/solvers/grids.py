"""Time grids for the ODE/SDE solvers.

Every grid is a 1-D float64 CPU tensor of ``n + 1`` nodes (``n`` steps), strictly monotone and inside
[0, 1]. Time runs from t = 0 (source/noise) to t = 1 (data); an increasing grid samples, a decreasing
grid integrates data -> noise (inversion, likelihood). The loop converts the grid to the state's
device and dtype once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from fewflow._validate import FewflowError, check_time

__all__ = [
    "GRIDS", "get_grid", "uniform_grid", "shifted_grid", "edm_grid", "logsnr_grid", "as_grid", "shift_time",
]

#: more steps than this in one grid is a typo (a 10**9-step grid alone takes gigabytes)
MAX_STEPS = 10**7


def _check_steps(n: int) -> int:
    if isinstance(n, bool) or int(n) != n or int(n) < 1:
        raise FewflowError(f"number of steps n must be a positive integer, got {n!r}")
    if int(n) > MAX_STEPS:
        raise FewflowError(f"{int(n)} steps is absurd (more than {MAX_STEPS}); use a smaller number")
    return int(n)


def _check_ends(t0: float, t1: float) -> None:
    for name, v in (("t0", t0), ("t1", t1)):
        if not math.isfinite(float(v)) or not 0.0 <= float(v) <= 1.0:
            raise FewflowError(f"{name} must lie in [0, 1], got {v}")
    if float(t0) == float(t1):
        raise FewflowError(f"t0 and t1 must differ, both are {t0}")


def as_grid(values: Sequence[float] | Tensor) -> Tensor:
    """Validate a custom grid: at least 2 finite nodes in [0, 1], strictly increasing or decreasing.

    Returns a 1-D float64 CPU tensor (a copy).
    """
    try:
        if torch.is_tensor(values):
            g = values.detach().to(device="cpu", dtype=torch.float64).clone()
        else:
            g = torch.tensor([float(v) for v in values], dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as err:
        raise FewflowError(f"grid must be a 1-D sequence of floats: {err}") from err
    if g.dim() != 1 or g.numel() < 2:
        raise FewflowError(f"grid must be 1-D with at least 2 nodes, got shape {tuple(g.shape)}")
    if not bool(torch.isfinite(g).all()):
        raise FewflowError("grid contains non-finite values")
    if float(g.min()) < 0.0 or float(g.max()) > 1.0:
        lo, hi = float(g.min()), float(g.max())
        raise FewflowError(f"grid must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]")
    d = g[1:] - g[:-1]
    if not (bool((d > 0).all()) or bool((d < 0).all())):
        raise FewflowError("grid must be strictly monotone (all increasing or all decreasing)")
    return g


def uniform_grid(n: int, t0: float = 0.0, t1: float = 1.0) -> Tensor:
    """``n`` equal steps from ``t0`` to ``t1``: ``t_i = t0 + (i / n)(t1 - t0)``."""
    n = _check_steps(n)
    _check_ends(t0, t1)
    g = torch.linspace(float(t0), float(t1), n + 1, dtype=torch.float64)
    g[0], g[-1] = float(t0), float(t1)
    return g


def shift_time(t: Tensor, shift: float) -> Tensor:
    """SD3 timestep shift in fewflow time (Esser et al., "Scaling Rectified Flow Transformers for
    High-Resolution Image Synthesis", 2024).

    With the noise level ``sigma = 1 - t``: ``sigma' = shift sigma / (1 + (shift - 1) sigma)``,
    ``t' = 1 - sigma'``.
    ``shift > 1`` moves nodes toward the noise end (t = 0); 0 and 1 are fixed points.
    """
    if not math.isfinite(float(shift)) or float(shift) <= 0:
        raise FewflowError(f"shift must be a positive number, got {shift}")
    check_time(t, "t")
    sig = 1.0 - t
    return 1.0 - shift * sig / (1.0 + (shift - 1.0) * sig)


def shifted_grid(n: int, shift: float, t0: float = 0.0, t1: float = 1.0) -> Tensor:
    """The uniform grid ``uniform_grid(n, t0, t1)`` warped by :func:`shift_time`.

    ``t0``/``t1`` are warped too unless they are 0 or 1 (fixed points); a decreasing grid (``t0 > t1``)
    is the exact reverse of the increasing one.
    """
    return shift_time(uniform_grid(n, t0, t1), float(shift))


def edm_grid(
    n: int,
    rho: float = 7.0,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    start_at_zero: bool = False,
) -> Tensor:
    """Karras et al. noise levels ("Elucidating the Design Space of Diffusion-Based Generative Models",
    2022) mapped to the linear path's time.

    EDM levels ``sigma_i = (sigma_max^(1/rho) + i/(K-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho`` for
    ``i = 0..K-1`` are followed by ``sigma = 0``. For ``x_t = t x1 + (1 - t) x0`` the rescaled state
    ``x_t / t = x1 + sigma x0`` has ``sigma = (1 - t) / t``, so ``t = 1 / (1 + sigma)``. The first node is
    therefore ``1 / (1 + sigma_max) > 0`` and the last is exactly 1.

    With ``start_at_zero=True`` the node ``t = 0`` is prepended (then ``K = n - 1`` EDM levels, so the
    grid still has ``n`` steps; needs ``n >= 2``). Otherwise ``K = n``.
    """
    n = _check_steps(n)
    if not (0 < sigma_min < sigma_max) or not math.isfinite(sigma_max):
        raise FewflowError(f"need 0 < sigma_min < sigma_max < inf, got {sigma_min}, {sigma_max}")
    if not (rho > 0 and math.isfinite(rho)):
        raise FewflowError(f"rho must be a finite positive number, got {rho}")
    k = n - 1 if start_at_zero else n
    if k < 1:
        raise FewflowError("edm_grid with start_at_zero=True needs n >= 2 steps")
    if k == 1:
        sig = torch.tensor([float(sigma_max)], dtype=torch.float64)
    else:
        ramp = torch.linspace(0.0, 1.0, k, dtype=torch.float64)
        lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
        sig = (hi + ramp * (lo - hi)) ** rho
    t = 1.0 / (1.0 + sig)
    one = torch.ones(1, dtype=torch.float64)
    parts = ([torch.zeros(1, dtype=torch.float64)] if start_at_zero else []) + [t, one]
    return torch.cat(parts)


def logsnr_grid(
    n: int, schedule: Any, t0: float = 0.0, t1: float = 1.0, clip: float = 1e-3, iters: int = 60
) -> Tensor:
    """Nodes uniform in log-SNR ``lambda(t) = 2 log(alpha_t / sigma_t)`` (Kingma et al., "Variational
    Diffusion Models", 2021; Lu et al., "DPM-Solver", 2022).

    ``lambda`` is infinite at t = 0 and t = 1 for the standard schedules, so the uniform spacing is taken
    between ``lambda(clip_t0)`` and ``lambda(clip_t1)`` with the ends clipped into ``[clip, 1 - clip]``;
    the first and last nodes are exactly ``t0`` and ``t1``. Interior nodes invert ``lambda`` by bisection
    (``lambda`` must be increasing in t, as for every schedule that moves noise -> data).
    """
    n = _check_steps(n)
    _check_ends(t0, t1)
    if not 0 < clip < 0.5:
        raise FewflowError(f"clip must lie in (0, 0.5), got {clip}")

    def lam(t: Tensor) -> Tensor:
        if callable(getattr(schedule, "log_snr", None)):  # a schedule's own (more precise) log-SNR
            return schedule.log_snr(t)
        return 2.0 * (torch.log(schedule.alpha(t)) - torch.log(schedule.sigma(t)))

    lo_t, hi_t = min(t0, t1), max(t0, t1)
    ends = torch.tensor([min(max(lo_t, clip), 1 - clip), min(max(hi_t, clip), 1 - clip)], dtype=torch.float64)
    lam_ends = lam(ends)
    if not bool(torch.isfinite(lam_ends).all()) or float(lam_ends[1]) <= float(lam_ends[0]):
        raise FewflowError("log-SNR of the schedule must be finite and increasing in t on the clipped range")
    targets = torch.linspace(float(lam_ends[0]), float(lam_ends[1]), n + 1, dtype=torch.float64)[1:-1]
    a = torch.full_like(targets, float(ends[0]))
    b = torch.full_like(targets, float(ends[1]))
    for _ in range(iters):
        mid = 0.5 * (a + b)
        below = lam(mid) < targets
        a = torch.where(below, mid, a)
        b = torch.where(below, b, mid)
    inner = 0.5 * (a + b)
    f64 = torch.float64
    g = torch.cat([torch.tensor([lo_t], dtype=f64), inner, torch.tensor([hi_t], dtype=f64)])
    if t0 > t1:
        g = g.flip(0)
    return as_grid(g)


#: time grids by name (``fewflow sample --grid``); ``boss`` is fitted to a model (``fewflow.solvers.boss``)
GRIDS = ("uniform", "shift", "edm", "logsnr", "boss")


def get_grid(name: str, steps: int, *, schedule: Any = None, **kw: Any) -> Tensor:
    """The ``steps``-step time grid ``name`` from t = 0 to t = 1: ``uniform``; ``shift`` (SD3's shift,
    ``shift=3``); ``edm`` (Karras et al.'s rho-spacing, ``rho=7``, starting at t = 0; uniform for one
    step); ``logsnr`` (uniform in the log-SNR of ``schedule``, default linear). ``boss`` depends on the
    model: build it with :func:`fewflow.solvers.boss.boss_schedule` and pass the grid itself."""
    steps = _check_steps(steps)
    if name == "uniform":
        return uniform_grid(steps)
    if name == "shift":
        return shifted_grid(steps, float(kw.get("shift", 3.0)))
    if name == "edm":
        rho = {"rho": float(kw["rho"])} if "rho" in kw else {}
        return edm_grid(steps, start_at_zero=True, **rho) if steps >= 2 else uniform_grid(1)
    if name == "logsnr":
        if schedule is None:
            from fewflow.paths.schedules import LinearSchedule

            schedule = LinearSchedule()
        return logsnr_grid(steps, schedule)
    if name == "boss":
        raise FewflowError("the BOSS grid is fitted to a model: use fewflow.solvers.boss.boss_schedule")
    from fewflow._validate import unknown_name

    raise unknown_name("time grid", str(name), GRIDS)
