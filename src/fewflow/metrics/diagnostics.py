"""Is a learned field a gradient? Conservativity diagnostics of a velocity (or score) model ``v(x, t)``.

"Are We Really Learning the Score Function? Reinterpreting Diffusion Models Through Wasserstein Gradient
Flow Matching" (Vuong, McCann, Santos, Lin; TMLR 2025) observes that a true score ``grad_x log p_t`` is a
gradient field, hence *conservative*, while trained diffusion networks are not, and that this need not harm
sampling: adding to the velocity a field ``r`` with ``div(p_t r) = 0`` leaves every marginal ``p_t``
unchanged, so training is better read as flow matching to the velocity of a Wasserstein gradient flow. The
same question applies to fewflow's velocity models: in fewflow's time (t = 0 source, t = 1 data) the
marginal velocity of a Gaussian-to-Gaussian flow, ``v = d_alpha m + Q diag(k) Q^T (x - alpha m)``, is
the gradient of a quadratic, while an MLP trained on it need not be.

A ``C^1`` field on a simply connected domain is a gradient iff its Jacobian ``J = d v / d x`` is symmetric
everywhere (differential test), iff its circulation around every closed loop vanishes (integral test).
This module measures both, per time:

* :func:`jacobian_asymmetry`: ``A(x) = ||J - J^T||_F / ||J||_F``, exact (``torch.func`` VJPs vmapped
  over the basis: ``D`` reverse passes batched into one), for small ``D``. ``0`` for a gradient field and
  ``2`` for a pure rotation (``J = -J^T``, so ``J - J^T = 2 J``): ``A`` lies in ``[0, 2]``.
* :func:`hutchinson_asymmetry`: for large ``D``, ``||J - J^T||_F^2 = E_e ||J e - J^T e||^2`` and
  ``||J||_F^2 = E_e ||J e||^2`` for probes with ``E[e e^T] = I`` (Hutchinson, "A stochastic estimator of
  the trace of the influence matrix for Laplacian smoothing splines", 1990): one JVP and one VJP per probe.
  Both squared norms are unbiased; their ratio (the reported asymmetry) is consistent.
* :func:`loop_circulation`: the line integral ``oint v . dl`` around a circle of radius ``r`` in a random
  2-plane ``span(u, w)`` (orthonormal) through ``x``, by the trapezoidal rule on ``n_points`` nodes (exact
  for fields linear in ``x``). By Stokes, for small loops ``oint v . dl ~ pi r^2 w^T (J - J^T) u``. The
  *normalised* circulation divides by ``oint |v - v(x)| |dl|``: the constant part of ``v`` integrates to
  zero around a closed loop, so the ratio lies in ``[-1, 1]``, does not shrink with ``r`` for smooth fields,
  is ``0`` for a gradient field and ``+-1`` for a rigid rotation in the loop's plane.
* :func:`path_curvature` and the rectified-flow straightness (:func:`fewflow.metrics.straightness`) of the
  model's ODE paths, because a non-conservative field can still transport the right marginals.

:func:`field_diagnostics` collects them at a few times on points of the model's own ODE paths;
``fewflow eval RUN --diagnostics`` prints that block.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from fewflow._validate import FewflowError, check_finite
from fewflow.metrics.straightness import straightness

__all__ = [
    "MixtureVelocity",
    "field_diagnostics",
    "format_diagnostics",
    "hutchinson_asymmetry",
    "jacobian",
    "jacobian_asymmetry",
    "loop_circulation",
    "matrix_asymmetry",
    "path_curvature",
    "random_planes",
]

Field = Callable[..., Tensor]


# --------------------------------------------------------------------------- helpers


def _check_x(x: Tensor) -> None:
    if not torch.is_tensor(x) or not x.is_floating_point():
        raise FewflowError("x must be a floating-point tensor (B, ...)")
    if x.dim() < 2 or x.shape[0] < 1:
        raise FewflowError(f"x must be batched (B, ...) with B >= 1, got shape {tuple(x.shape)}")
    check_finite("x", x)


def _times(t: Tensor | float, x: Tensor) -> Tensor:
    tt = torch.as_tensor(t, device=x.device, dtype=x.dtype)
    if tt.dim() == 0:
        tt = tt.expand(x.shape[0])
    if tt.shape != (x.shape[0],):
        raise FewflowError(f"t must be a number or a ({x.shape[0]},) tensor, got shape {tuple(tt.shape)}")
    return tt


def _field_at(
    model: Field, t: Tensor, cond: Mapping[str, Any] | None, rows: int
) -> Callable[[Tensor], Tensor]:
    """``z -> v(z, t)`` on a batch shaped like ``z`` (``t`` and the condition repeated to ``z``'s rows).

    A flow-map model ``u(x, s, t)`` is read as its instantaneous velocity ``u(x, t, t)``."""
    flow_map = bool(getattr(model, "is_flow_map", False))
    cond = dict(cond or {})

    def f(z: Tensor) -> Tensor:
        reps = z.shape[0] // rows
        tt = t.repeat(reps) if reps > 1 else t
        cc = {k: (v.repeat(reps, *([1] * (v.dim() - 1))) if torch.is_tensor(v) and reps > 1 else v)
              for k, v in cond.items()}
        out = model(z, tt, tt, **cc) if flow_map else model(z, tt, **cc)
        if not torch.is_tensor(out) or out.shape != z.shape:
            got = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
            raise FewflowError(f"the model must return a field shaped like x {tuple(z.shape)}, got {got}")
        return out

    return f


def _gen_device(generator: torch.Generator | None, device: Any) -> Any:
    """Draw on the generator's device (then move), so a CPU generator serves a CUDA model."""
    return generator.device if generator is not None else device


def matrix_asymmetry(jac: Tensor) -> Tensor:
    """``||J - J^T||_F / ||J||_F`` of a batch of square matrices ``(B, D, D)`` -> ``(B,)`` (0 where J = 0)."""
    if jac.dim() != 3 or jac.shape[1] != jac.shape[2]:
        raise FewflowError(f"expected square matrices (B, D, D), got shape {tuple(jac.shape)}")
    num = (jac - jac.transpose(1, 2)).flatten(1).norm(dim=1)
    den = jac.flatten(1).norm(dim=1)
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(jac.dtype).tiny), torch.zeros_like(num))


# --------------------------------------------------------------------------- differential test


def jacobian(model: Field, x: Tensor, t: Tensor | float, *, cond: Mapping[str, Any] | None = None) -> Tensor:
    """The exact per-sample Jacobian ``J_b = d v(x_b, t_b) / d x_b`` as ``(B, D, D)``, ``D`` = features.

    One forward pass and ``D`` reverse passes (the VJP with each basis vector, batched by
    :func:`torch.func.vmap`; a plain loop if the model does not support ``vmap``). Rows of the batch must
    not interact (no BatchNorm), which holds for fewflow's networks."""
    _check_x(x)
    b, d = x.shape[0], x[0].numel()
    f = _field_at(model, _times(t, x), cond, b)
    out, vjp_fn = torch.func.vjp(f, x)
    basis = torch.eye(d, device=x.device, dtype=out.dtype).reshape(d, 1, *x.shape[1:]).expand(d, *x.shape)
    try:
        (rows,) = torch.func.vmap(vjp_fn)(basis.contiguous())
    except (RuntimeError, NotImplementedError):
        rows = torch.stack([vjp_fn(basis[i].contiguous())[0] for i in range(d)])
    # rows[i, b] = e_i^T J_b  ->  J_b[i, :]
    return rows.reshape(d, b, d).transpose(0, 1).detach()


def jacobian_asymmetry(
    model: Field, x: Tensor, t: Tensor | float, *, cond: Mapping[str, Any] | None = None
) -> Tensor:
    """Exact ``||J - J^T||_F / ||J||_F`` per sample, ``(B,)``: 0 for a gradient field, 2 for an
    antisymmetric Jacobian (a rotation). Costs ``D`` reverse passes: use for ``D`` up to a few hundred."""
    return matrix_asymmetry(jacobian(model, x, t, cond=cond))


def hutchinson_asymmetry(
    model: Field,
    x: Tensor,
    t: Tensor | float,
    *,
    probes: int = 16,
    cond: Mapping[str, Any] | None = None,
    generator: torch.Generator | None = None,
    distribution: str = "rademacher",
) -> dict[str, Tensor]:
    """Hutchinson estimates of ``||J - J^T||_F^2`` and ``||J||_F^2`` per sample from ``probes`` random
    probes ``e`` (``E[e e^T] = I``): ``||J e - J^T e||^2`` and ``||J e||^2`` (one JVP, one VJP each).

    Returns ``{"asym_sq": (B,), "jac_sq": (B,), "asymmetry": (B,)}`` where the first two are the probe means
    (unbiased) and ``asymmetry = sqrt(asym_sq / jac_sq)`` (consistent as ``probes`` grows).
    ``distribution``: ``"rademacher"`` (+-1 entries, lower variance) or ``"gaussian"``."""
    _check_x(x)
    if not isinstance(probes, int) or probes < 1:
        raise FewflowError(f"probes must be a positive int, got {probes!r}")
    if distribution not in ("rademacher", "gaussian"):
        raise FewflowError(f"distribution must be 'rademacher' or 'gaussian', got {distribution!r}")
    f = _field_at(model, _times(t, x), cond, x.shape[0])
    _, vjp_fn = torch.func.vjp(f, x)
    asym = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
    jsq = torch.zeros_like(asym)
    for _ in range(probes):
        if distribution == "gaussian":
            e = torch.randn(x.shape, generator=generator, device=_gen_device(generator, x.device),
                            dtype=x.dtype).to(x.device)
        else:
            e = torch.randint(0, 2, x.shape, generator=generator, device=_gen_device(generator, x.device))
            e = e.to(device=x.device, dtype=x.dtype) * 2 - 1
        _, je = torch.func.jvp(f, (x,), (e,))
        (jte,) = vjp_fn(e)
        asym = asym + (je - jte).detach().flatten(1).pow(2).sum(1)
        jsq = jsq + je.detach().flatten(1).pow(2).sum(1)
    asym, jsq = asym / probes, jsq / probes
    tiny = torch.finfo(x.dtype).tiny
    ratio = torch.where(jsq > 0, (asym / jsq.clamp_min(tiny)).sqrt(), torch.zeros_like(asym))
    return {"asym_sq": asym, "jac_sq": jsq, "asymmetry": ratio}


# --------------------------------------------------------------------------- integral test


def random_planes(
    b: int, d: int, *, generator: torch.Generator | None = None, device: Any = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """``b`` random orthonormal pairs ``(u, w)`` in ``R^d`` (Gram-Schmidt on Gaussian vectors), each
    ``(b, d)``; the planes ``span(u, w)`` are uniformly distributed."""
    if d < 2:
        raise FewflowError(f"a loop needs at least 2 dimensions, got D = {d}")
    g = torch.randn(2, b, d, generator=generator, device=_gen_device(generator, device), dtype=torch.float64)
    g = g.to(device) if device is not None else g
    u = g[0] / g[0].norm(dim=1, keepdim=True)
    w = g[1] - (g[1] * u).sum(1, keepdim=True) * u
    w = w / w.norm(dim=1, keepdim=True)
    return u.to(dtype), w.to(dtype)


def loop_circulation(
    model: Field,
    x: Tensor,
    t: Tensor | float,
    radius: float | Tensor,
    *,
    n_points: int = 64,
    planes: tuple[Tensor, Tensor] | None = None,
    cond: Mapping[str, Any] | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """Circulation of ``v(., t)`` around the circle ``x + r (cos th u + sin th w)`` for each sample.

    ``planes``: orthonormal ``(u, w)``, each ``(B, D)`` (default: :func:`random_planes`). With nodes
    ``th_k = 2 pi k / n`` and ``dl_k = r (-sin th_k u + cos th_k w) 2 pi / n`` (counter-clockwise from u to w)
    the trapezoidal sums are exact for fields linear in x, e.g. ``v = A x``:
    ``oint v . dl = pi r^2 w^T (A - A^T) u``.

    Returns ``{"circulation": oint v . dl, "curl": circulation / (pi r^2), "normalised": circulation /
    oint |v - v(x)| |dl|}``, each ``(B,)``. ``normalised`` lies in ``[-1, 1]``: 0 for a gradient field, 1
    for ``v = A x`` with ``A`` a rotation generator in the loop's plane (``w^T A u = 1 = -u^T A w``).
    ``n_points * B`` model evaluations in one batch (plus ``B`` at the centres)."""
    _check_x(x)
    if not isinstance(n_points, int) or n_points < 4:
        raise FewflowError(f"n_points must be an int >= 4, got {n_points!r}")
    b, d = x.shape[0], x[0].numel()
    r = torch.as_tensor(radius, device=x.device, dtype=x.dtype)
    if r.dim() == 0:
        r = r.expand(b)
    if r.shape != (b,) or not bool((r > 0).all()) or not bool(torch.isfinite(r).all()):
        raise FewflowError("radius must be a positive finite number or a (B,) tensor of them")
    if planes is None:
        u, w = random_planes(b, d, generator=generator, device=x.device, dtype=x.dtype)
    else:
        u, w = (p.reshape(b, d).to(device=x.device, dtype=x.dtype) for p in planes)
    th = torch.arange(n_points, device=x.device, dtype=x.dtype) * (2 * math.pi / n_points)
    cos, sin = th.cos()[:, None, None], th.sin()[:, None, None]
    flat = x.reshape(b, d)
    pts = flat[None] + r[None, :, None] * (cos * u[None] + sin * w[None])  # (n, B, D)
    dl = r[None, :, None] * (-sin * u[None] + cos * w[None]) * (2 * math.pi / n_points)
    tt = _times(t, x)
    f = _field_at(model, tt, cond, b)
    with torch.no_grad():
        v = f(pts.reshape(n_points * b, *x.shape[1:])).detach().reshape(n_points, b, d)
        v0 = f(x).detach().reshape(b, d)
    circ = (v * dl).sum(dim=(0, 2))
    scale = ((v - v0[None]).norm(dim=2) * dl.norm(dim=2)).sum(0)
    tiny = torch.finfo(x.dtype).tiny
    return {
        "circulation": circ,
        "curl": circ / (math.pi * r * r),
        "normalised": torch.where(scale > 0, circ / scale.clamp_min(tiny), torch.zeros_like(circ)),
    }


# --------------------------------------------------------------------------- an exact reference field


class MixtureVelocity:
    """The exact marginal velocity of the linear path from ``N(0, I)`` to an isotropic Gaussian mixture
    ``sum_k pi_k N(mu_k, s^2 I)`` (``s = 0``: the empirical distribution of the points ``mu_k``).

    With ``x_t = t x1 + (1 - t) x0`` the marginal is ``p_t = sum_k pi_k N(t mu_k, sig_t^2 I)``,
    ``sig_t^2 = t^2 s^2 + (1 - t)^2``, and ``v(x, t) = sum_k w_k(x, t) [mu_k + (t s^2 - (1 - t)) / sig_t^2
    (x - t mu_k)]`` with the posterior weights ``w_k ∝ pi_k N(x; t mu_k, sig_t^2 I)`` (each term is the
    Gaussian velocity of :class:`fewflow.analytic.GaussianFlow`). Since ``E[x0 | x_t] = -(1 - t) grad log
    p_t`` (Tweedie), ``v = (x + (1 - t) grad_x log p_t) / t = grad_x (||x||^2 / (2t) + (1 - t)/t log p_t)``:
    a gradient field, the reference a learned field is compared with. ``score(x, t) = grad_x log p_t``.
    Singular at ``t = 1`` when ``s = 0``. ``means``: ``(K, D)``; inputs ``(B, ...)`` with ``D`` features.
    """

    is_flow_map = False

    def __init__(self, means: Tensor, std: float = 0.0, weights: Tensor | None = None) -> None:
        means = torch.as_tensor(means)
        if means.dim() != 2 or means.shape[0] < 1:
            raise FewflowError(f"means must be (K, D) with K >= 1, got shape {tuple(means.shape)}")
        check_finite("means", means)
        if not (math.isfinite(std) and std >= 0):
            raise FewflowError(f"std must be a finite number >= 0, got {std}")
        k = means.shape[0]
        w = torch.full((k,), 1.0 / k, dtype=torch.float64) if weights is None else torch.as_tensor(weights)
        if w.shape != (k,) or bool((w <= 0).any()):
            raise FewflowError(f"weights must be {k} positive numbers")
        self.means, self.std = means.detach().clone(), float(std)
        self.log_w = (w / w.sum()).log().detach()

    def _parts(self, x: Tensor, t: Tensor | float) -> tuple[Tensor, Tensor, Tensor]:
        """``(t (B, 1), sig_t^2 (B, 1), sum_k w_k mu_k (B, D))``, without forming a ``(B, K, D)`` tensor."""
        _check_x(x)
        flat = x.reshape(x.shape[0], -1)
        mu = self.means.to(device=x.device, dtype=x.dtype)
        if flat.shape[1] != mu.shape[1]:
            raise FewflowError(f"x has {flat.shape[1]} features, the mixture {mu.shape[1]}")
        tt = _times(t, x)[:, None]
        var = tt**2 * self.std**2 + (1 - tt) ** 2  # (B, 1)
        d2 = flat.pow(2).sum(1, keepdim=True) - 2 * tt * (flat @ mu.T) + tt**2 * mu.pow(2).sum(1)[None]
        logits = self.log_w.to(device=x.device, dtype=x.dtype)[None] - d2 / (2 * var)
        post_mu = torch.softmax(logits, dim=1) @ mu  # (B, D)
        return tt, var, post_mu

    def score(self, x: Tensor, t: Tensor | float) -> Tensor:
        """``grad_x log p_t(x) = -sum_k w_k (x - t mu_k) / sig_t^2``."""
        tt, var, post_mu = self._parts(x, t)
        return (-(x.reshape(x.shape[0], -1) - tt * post_mu) / var).reshape(x.shape)

    def velocity(self, x: Tensor, t: Tensor | float) -> Tensor:
        """The marginal velocity ``sum_k w_k [mu_k + (t s^2 - (1 - t)) (x - t mu_k) / sig_t^2]``."""
        tt, var, post_mu = self._parts(x, t)
        gain = (tt * self.std**2 - (1 - tt)) / var  # (B, 1)
        return (post_mu + gain * (x.reshape(x.shape[0], -1) - tt * post_mu)).reshape(x.shape)

    __call__ = velocity


# --------------------------------------------------------------------------- paths


def path_curvature(trajectory: Tensor | Sequence[Tensor], times: Tensor | Sequence[float]) -> float:
    """Mean turning angle (radians per unit time) of a ``(K+1, B, ...)`` trajectory on ``times``:
    ``sum_k angle(v_k, v_{k+1}) / (t_K - t_0)`` averaged over samples, with ``v_k`` the chord velocities of
    the steps. 0 for straight paths (in any parametrisation), complementing the rectified-flow straightness
    (:func:`fewflow.metrics.straightness`), which also penalises a changing speed."""
    traj = trajectory if torch.is_tensor(trajectory) else torch.stack(list(trajectory))
    check_finite("trajectory", traj)
    if traj.dim() < 2 or traj.shape[0] < 3:
        raise FewflowError(f"trajectory must be (K+1, B, ...) with K >= 2 steps, got {tuple(traj.shape)}")
    t = torch.as_tensor(times, dtype=torch.float64).reshape(-1).to(traj.device)
    if t.shape[0] != traj.shape[0]:
        raise FewflowError(f"times has {t.shape[0]} entries but the trajectory has {traj.shape[0]} states")
    steps = torch.diff(traj.reshape(traj.shape[0], traj.shape[1], -1).double(), dim=0)  # (K, B, D)
    a, c = steps[:-1], steps[1:]
    cosang = (a * c).sum(-1) / (a.norm(dim=-1) * c.norm(dim=-1)).clamp_min(1e-300)
    ang = torch.arccos(cosang.clamp(-1.0, 1.0)).sum(0)  # (B,)
    return float(ang.mean() / (t[-1] - t[0]).abs())


# --------------------------------------------------------------------------- collection


def _shape_of(cfg_or_shape: Any) -> list[int]:
    meta = getattr(cfg_or_shape, "meta", None)
    if isinstance(meta, Mapping):
        shape = meta.get("shape")
        if not shape:
            raise FewflowError("the run config records no data shape (meta.shape)")
        return [int(v) for v in shape]
    if isinstance(cfg_or_shape, int):
        return [int(cfg_or_shape)]
    try:
        shape = [int(v) for v in cfg_or_shape]
    except TypeError:
        what = type(cfg_or_shape).__name__
        raise FewflowError(f"expected a run config or a sample shape, got {what}") from None
    if not shape or any(v < 1 for v in shape):
        raise FewflowError(f"sample shape must be positive sizes, got {shape}")
    return shape


def _model_device_dtype(model: Any, x0: Tensor | None) -> tuple[torch.device, torch.dtype]:
    """The weights' device and dtype; for a model without weights, ``x0``'s (else CPU, default dtype)."""
    params = getattr(model, "parameters", None)
    if callable(params):
        for p in params():
            if p.is_floating_point():
                return p.device, p.dtype
    if x0 is not None and x0.is_floating_point():
        return x0.device, x0.dtype
    return torch.device("cpu"), torch.get_default_dtype()


def _summ(v: Tensor) -> dict[str, float]:
    v = v.detach().double()
    return {"mean": float(v.mean()), "median": float(v.median()), "max": float(v.max())}


def field_diagnostics(
    model: Field,
    cfg_or_shape: Any,
    ts: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9),
    n: int = 64,
    generator: torch.Generator | None = None,
    *,
    x0: Tensor | None = None,
    cond: Mapping[str, Any] | None = None,
    steps: int = 32,
    exact_max_dim: int = 64,
    probes: int = 16,
    n_points: int = 64,
    radius_scale: float = 0.1,
) -> dict[str, Any]:
    """Conservativity of ``model`` at times ``ts`` on ``n`` points of its own ODE paths, plus the paths'
    straightness and curvature.

    The points: ``x0`` (``(n, *shape)``; default ``N(0, I)`` drawn with ``generator``) integrated with Euler
    on a uniform ``steps``-step grid joined with ``ts`` (:func:`fewflow.solvers.solve`); ``x_t`` is the
    state at ``t``. ``cfg_or_shape``: a run config (its ``meta["shape"]``) or one sample's shape.
    At each ``t``: the Jacobian asymmetry ``||J - J^T||_F / ||J||_F`` (exact when ``D <= exact_max_dim``,
    else Hutchinson with ``probes`` Rademacher probes) and the normalised circulation around one random
    planar loop per point (``n_points`` nodes, radius ``radius_scale`` times the per-coordinate RMS
    spread of ``x_t``). Returns ``{"dim", "n", "jacobian": "exact" | "hutchinson", "per_t": [{"t",
    "asymmetry", "asymmetry_median", "asymmetry_max", "circulation", "circulation_max", "radius"}, ...],
    "asymmetry": mean over t, "circulation": mean over t, "straightness", "relative_straightness",
    "curvature"}`` (``circulation`` = mean |normalised circulation|). Plain floats: JSON-ready."""
    from fewflow.solvers import solve

    shape = _shape_of(cfg_or_shape)
    d = int(math.prod(shape))
    if not isinstance(n, int) or n < 2:
        raise FewflowError(f"n must be an int >= 2, got {n!r}")
    ts_list = sorted({float(t) for t in ts})
    if not ts_list or any(not (0.0 <= t <= 1.0) for t in ts_list):
        raise FewflowError(f"ts must be times in [0, 1], got {list(ts)}")
    if not isinstance(steps, int) or steps < 2:
        raise FewflowError(f"steps must be an int >= 2, got {steps!r}")
    if radius_scale <= 0 or not math.isfinite(radius_scale):
        raise FewflowError(f"radius_scale must be a positive number, got {radius_scale}")
    device, dtype = _model_device_dtype(model, x0)
    if x0 is None:
        x0 = torch.randn(n, *shape, generator=generator, device=_gen_device(generator, device),
                         dtype=dtype).to(device)
    else:
        if tuple(x0.shape) != (n, *shape):
            raise FewflowError(f"x0 must have shape {(n, *shape)}, got {tuple(x0.shape)}")
        x0 = x0.to(device=device, dtype=dtype)
    grid = sorted({round(k / steps, 12) for k in range(steps + 1)} | set(ts_list))
    res = solve(model, x0, grid=grid, stepper="euler", cond=dict(cond or {}), trajectory=True)
    traj = res.trajectory
    if traj is None or not bool(torch.isfinite(traj).all()):
        raise FewflowError("the model's ODE paths are not finite: no diagnostics")
    times = [float(v) for v in res.times]
    exact = d <= exact_max_dim
    per_t: list[dict[str, Any]] = []
    for t in ts_list:
        k = min(range(len(times)), key=lambda i: abs(times[i] - t))
        xt = traj[k].detach().clone()
        if exact:
            asym = jacobian_asymmetry(model, xt, t, cond=cond)
        else:
            est = hutchinson_asymmetry(model, xt, t, probes=probes, cond=cond, generator=generator)
            asym = est["asymmetry"]
        spread = float((xt - xt.mean(0, keepdim=True)).pow(2).mean().sqrt())
        radius = radius_scale * (spread if spread > 0 else 1.0)
        loops = loop_circulation(model, xt, t, radius, n_points=n_points, cond=cond, generator=generator)
        circ = loops["normalised"].abs()
        a = _summ(asym)
        c = _summ(circ)
        per_t.append({"t": t, "asymmetry": a["mean"], "asymmetry_median": a["median"],
                      "asymmetry_max": a["max"], "circulation": c["mean"], "circulation_max": c["max"],
                      "radius": radius})
    s = straightness(traj, res.times)
    chord = (traj[-1] - traj[0]).flatten(1).double().pow(2).sum(1).mean()
    return {
        "dim": d,
        "n": n,
        "jacobian": "exact" if exact else "hutchinson",
        "per_t": per_t,
        "asymmetry": sum(r["asymmetry"] for r in per_t) / len(per_t),
        "circulation": sum(r["circulation"] for r in per_t) / len(per_t),
        "straightness": float(s),
        "relative_straightness": float(s / float(chord)) if float(chord) > 0 else 0.0,
        "curvature": path_curvature(traj, res.times),
    }


def format_diagnostics(diag: Mapping[str, Any]) -> str:
    """A Markdown block for :func:`field_diagnostics`'s result: one row per time, then the path summary."""
    lines = [
        f"field diagnostics (D = {diag['dim']}, {diag['n']} points per t, {diag['jacobian']} Jacobian):",
        "",
        "| t | Jacobian asymmetry (mean) | median | max | normalised loop circulation (mean abs) | max |",
        "|---|---|---|---|---|---|",
    ]
    for r in diag["per_t"]:
        lines.append(f"| {r['t']:.3g} | {r['asymmetry']:.4g} | {r['asymmetry_median']:.4g} | "
                     f"{r['asymmetry_max']:.4g} | {r['circulation']:.4g} | {r['circulation_max']:.4g} |")
    lines.append("")
    lines.append(f"paths: straightness {diag['straightness']:.4g}, relative straightness "
                 f"{diag['relative_straightness']:.4g}, curvature {diag['curvature']:.4g} rad per unit time "
                 "(asymmetry = ||J - J^T||_F / ||J||_F; both are 0 for a gradient field, 2 and 1 for a "
                 "rotation)")
    return "\n".join(lines)
