"""ReynoldsFlow: a training-free flow from the continuity equation, and its ReynoldsFlow+ encoding.

Y.-H. Chen and C.-T. Wu, "ReynoldsFlow: Exquisite Flow Estimation via Reynolds Transport Theorem"
(arXiv:2503.04500). The paper treats intensity ``f`` as a density carried by the motion: by the
Reynolds transport theorem the intensity of a material region is conserved when

    f_t + div(f v) = 0        (continuity),     i.e.   f_t + v . grad f + f div v = 0,

which generalises brightness constancy ``f_t + v . grad f = 0`` by the compression term ``f div v``.
The motion is split (Helmholtz) into a conventional flow ``v_o`` and an irrotational Reynolds flow
``v_r = grad phi`` that carries what brightness constancy leaves unexplained.

The equations below are fewflow's reconstruction from the paper's abstract and summary (no code was
published), made concrete as follows (see ``docs/methods/reynoldsflow.md``):

1. ``v_o`` is the Horn–Schunck flow (:func:`fewflow.motion.horn_schunck.horn_schunck`);
2. the continuity residual of ``v_o`` on the grey level ``f`` (channel mean) is
   ``r = (f1(p + v_o) - f0(p)) + f div v_o`` with ``f = (f0 + f1) / 2``;
3. ``phi`` solves the variable-coefficient Poisson problem ``div(f grad phi) = -r`` with zero-flux
   (Neumann) borders, so ``v_o + grad phi`` satisfies the linearised continuity equation; the mean of
   ``r`` (a net intensity change that no zero-flux flow can carry) is dropped;
4. the Reynolds flow is ``v = v_o + v_r``; ReynoldsFlow+ stacks ``[|v_o|, |v_r|, f1]`` as a
   three-channel image for downstream networks.

Time here is the video's frame index (``frame0`` at t, ``frame1`` at t + 1), unrelated to fewflow's
generative time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from fewflow._validate import FewflowError, check_finite
from fewflow.motion.horn_schunck import check_frames, horn_schunck
from fewflow.motion.warp import warp

# --------------------------------------------------------------------------- Poisson solver


def _dct_matrix(n: int, like: Tensor) -> Tensor:
    """Orthonormal DCT-II matrix ``(n, n)``: it diagonalises the 1-D Neumann second difference."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None]
    m = torch.cos(math.pi * k * (i + 0.5) / n) * math.sqrt(2.0 / n)
    m[0] = m[0] / math.sqrt(2.0)
    return m.to(device=like.device, dtype=like.dtype)


def neumann_eigenvalues(h: int, w: int, like: Tensor) -> Tensor:
    """Eigenvalues ``(2 cos(pi k / H) - 2) + (2 cos(pi l / W) - 2)`` of the Neumann 5-point Laplacian."""
    ky = torch.arange(h, dtype=torch.float64)
    kx = torch.arange(w, dtype=torch.float64)
    lam = (2 * torch.cos(math.pi * ky / h) - 2)[:, None] + (2 * torch.cos(math.pi * kx / w) - 2)[None]
    return lam.to(device=like.device, dtype=like.dtype)


def div_coeff_grad(phi: Tensor, coeff: Tensor | None = None) -> Tensor:
    """``div(c grad phi)`` on the pixel grid ``(..., H, W)`` with zero flux through the border.

    Differences between neighbours, weighted by the face coefficient ``(c_p + c_q) / 2``; with
    ``c = 1`` this is the 5-point Laplacian with reflecting (Neumann) ghost pixels.
    """
    gx = phi[..., :, 1:] - phi[..., :, :-1]
    gy = phi[..., 1:, :] - phi[..., :-1, :]
    if coeff is not None:
        gx = gx * (coeff[..., :, 1:] + coeff[..., :, :-1]) / 2
        gy = gy * (coeff[..., 1:, :] + coeff[..., :-1, :]) / 2
    out = torch.zeros_like(phi)
    out[..., :, :-1] += gx
    out[..., :, 1:] -= gx
    out[..., :-1, :] += gy
    out[..., 1:, :] -= gy
    return out


def _dct_solve(rhs: Tensor, scale: Tensor | float = 1.0) -> Tensor:
    h, w = rhs.shape[-2:]
    ch, cw = _dct_matrix(h, rhs), _dct_matrix(w, rhs)
    lam = neumann_eigenvalues(h, w, rhs)
    hat = ch @ rhs @ cw.T
    lam = lam.clone()
    lam[0, 0] = 1.0
    hat = hat / lam
    hat[..., 0, 0] = 0.0
    if torch.is_tensor(scale):
        hat = hat / scale[..., None, None]
    else:
        hat = hat / scale
    return ch.T @ hat @ cw


def solve_poisson(rhs: Tensor, coeff: Tensor | None = None, tol: float = 1e-8, max_iter: int = 500) -> Tensor:
    """Zero-mean ``phi`` with ``div(coeff grad phi) = rhs - mean(rhs)`` and zero flux through the border.

    Args:
        rhs: ``(..., H, W)`` source (each leading index is its own problem).
        coeff: optional positive coefficient of the same shape; ``None`` is the Laplacian, solved exactly
            in the cosine (DCT-II) basis that diagonalises it. With a coefficient, conjugate gradients
            preconditioned by that exact solve with the mean coefficient run until the relative residual
            is below ``tol`` (or ``max_iter`` steps).

    The solve runs in float64 and returns ``rhs``'s dtype. The mean of ``rhs`` is removed first: with
    zero flux the integral of ``div(c grad phi)`` vanishes, so only zero-mean sources are solvable.
    """
    if not torch.is_tensor(rhs) or rhs.dim() < 2 or rhs.numel() == 0:
        raise FewflowError(f"rhs must be a non-empty tensor (..., H, W), got {getattr(rhs, 'shape', rhs)}")
    if not rhs.is_floating_point():
        raise FewflowError(f"rhs must be floating point, got {rhs.dtype}")
    check_finite("rhs", rhs)
    out_dtype = rhs.dtype
    rhs = rhs.double()  # the solve runs in float64 (CG in float32 stalls far above useful tolerances)
    b = rhs - rhs.mean(dim=(-2, -1), keepdim=True)
    if coeff is None:
        return _dct_solve(b).to(out_dtype)
    if coeff.shape != rhs.shape:
        raise FewflowError(f"coeff shape {tuple(coeff.shape)} must match rhs shape {tuple(rhs.shape)}")
    check_finite("coeff", coeff)
    if bool((coeff <= 0).any()):
        raise FewflowError("coeff must be positive everywhere")
    coeff = coeff.double()
    cbar = coeff.mean(dim=(-2, -1))

    def apply(x: Tensor) -> Tensor:  # positive definite on zero-mean fields
        return -div_coeff_grad(x, coeff)

    def precond(r: Tensor) -> Tensor:
        return -_dct_solve(r, cbar)

    dims = (-2, -1)
    x = torch.zeros_like(b)
    r = -b  # solve A x = -b with A = -div(c grad .)
    z = precond(r)
    p = z
    rz = (r * z).sum(dims, keepdim=True)
    bnorm = b.pow(2).sum(dims, keepdim=True).sqrt().clamp_min(torch.finfo(b.dtype).tiny)
    for _ in range(int(max_iter)):
        if bool(((r.pow(2).sum(dims, keepdim=True).sqrt() / bnorm) < tol).all()):
            break
        ap = apply(p)
        denom = (p * ap).sum(dims, keepdim=True)
        step = rz / torch.where(denom == 0, torch.ones_like(denom), denom)
        x = x + step * p
        r = r - step * ap
        z = precond(r)
        rz_new = (r * z).sum(dims, keepdim=True)
        p = z + rz_new / torch.where(rz == 0, torch.ones_like(rz), rz) * p
        rz = rz_new
    return (x - x.mean(dim=dims, keepdim=True)).to(out_dtype)


def grad_centered(phi: Tensor) -> Tensor:
    """Central-difference gradient ``(..., 2, H, W)`` (channels ``d/dx, d/dy``), zero at the borders."""
    gx = torch.zeros_like(phi)
    gy = torch.zeros_like(phi)
    gx[..., :, 1:-1] = (phi[..., :, 2:] - phi[..., :, :-2]) / 2
    gy[..., 1:-1, :] = (phi[..., 2:, :] - phi[..., :-2, :]) / 2
    return torch.stack([gx, gy], dim=-3)


def divergence(v: Tensor) -> Tensor:
    """Central-difference divergence ``d u/dx + d w/dy`` of a flow ``(B, 2, H, W)`` -> ``(B, H, W)``."""
    u, w = v[:, 0], v[:, 1]
    du = torch.zeros_like(u)
    dw = torch.zeros_like(w)
    du[..., :, 1:-1] = (u[..., :, 2:] - u[..., :, :-2]) / 2
    dw[..., 1:-1, :] = (w[..., 2:, :] - w[..., :-2, :]) / 2
    return du + dw


# --------------------------------------------------------------------------- ReynoldsFlow


@dataclass
class ReynoldsFlowResult:
    """The parts of a Reynolds flow, all ``(B, ., H, W)`` on the frames' device and dtype.

    Attributes:
        flow: ``v_o + v_r`` ``(B, 2, H, W)``, from ``frame0`` to ``frame1`` in pixels.
        v_o: the conventional (Horn–Schunck) flow.
        v_r: the irrotational Reynolds flow ``grad phi``.
        phi: the potential ``(B, 1, H, W)``.
        residual: the continuity residual of ``v_o`` that ``phi`` absorbs ``(B, 1, H, W)``.
    """

    flow: Tensor
    v_o: Tensor
    v_r: Tensor
    phi: Tensor
    residual: Tensor


def reynolds_flow(frame0: Tensor, frame1: Tensor, alpha: float = 0.05, n_iter: int = 200, n_warps: int = 1,
                  variable_coeff: bool = True, min_intensity: float = 1e-2) -> ReynoldsFlowResult:
    """ReynoldsFlow from ``frame0`` to ``frame1`` (both ``(B, C, H, W)``, intensities >= 0).

    ``alpha``, ``n_iter``, ``n_warps`` go to the Horn–Schunck flow ``v_o``. ``variable_coeff=True``
    solves ``div(f grad phi) = -r`` (``f`` clamped below at ``min_intensity`` times its mean);
    ``False`` solves ``f_bar lap phi = -r`` with the mean grey level ``f_bar`` (one exact DCT solve).
    """
    check_frames(frame0, frame1)
    if not min_intensity > 0:
        raise FewflowError(f"min_intensity must be > 0, got {min_intensity}")
    v_o = horn_schunck(frame0, frame1, alpha=alpha, n_iter=n_iter, n_warps=n_warps)
    g0 = frame0.mean(1, keepdim=True)
    g1w = warp(frame1, v_o).mean(1, keepdim=True)
    f = ((frame0 + frame1) / 2).mean(1)
    fbar = f.mean(dim=(-2, -1), keepdim=True)
    if bool((fbar <= 0).any()):
        raise FewflowError("ReynoldsFlow needs frames with positive mean intensity")
    residual = (g1w - g0)[:, 0] + f * divergence(v_o)
    if variable_coeff:
        coeff = torch.maximum(f, min_intensity * fbar)
        phi = solve_poisson(-residual, coeff)
    else:
        phi = solve_poisson(-residual / fbar)
    v_r = grad_centered(phi)
    return ReynoldsFlowResult(v_o + v_r, v_o, v_r, phi[:, None], residual[:, None])


def _unit(x: Tensor) -> Tensor:
    hi = x.amax(dim=(-2, -1), keepdim=True)
    return x / torch.where(hi > 0, hi, torch.ones_like(hi))


def reynolds_plus(frame0: Tensor, frame1: Tensor, result: ReynoldsFlowResult | None = None,
                  **kwargs: float) -> Tensor:
    """ReynoldsFlow+ encoding ``(B, 3, H, W)`` in ``[0, 1]``: ``[|v_o|, |v_r|, f1]``.

    Each magnitude channel is divided by its per-image maximum and the grey level of ``frame1``
    (channel mean) by its own maximum (fewflow's choice of normalisation). ``kwargs`` go to
    :func:`reynolds_flow` when ``result`` is not given.
    """
    check_frames(frame0, frame1)
    if result is None:
        result = reynolds_flow(frame0, frame1, **kwargs)
    mo = result.v_o.pow(2).sum(1, keepdim=True).sqrt()
    mr = result.v_r.pow(2).sum(1, keepdim=True).sqrt()
    g = frame1.mean(1, keepdim=True).clamp_min(0)
    return torch.cat([_unit(mo), _unit(mr), _unit(g)], dim=1)
