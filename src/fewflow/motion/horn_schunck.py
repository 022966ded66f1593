"""Horn–Schunck optical flow: brightness constancy plus a quadratic smoothness prior.

B. K. P. Horn and B. G. Schunck, "Determining optical flow", Artificial Intelligence 17 (1981).
For frames ``f0, f1`` the flow ``v = (u, w)`` from ``f0`` to ``f1`` (``f0(p) = f1(p + v(p))``, the
convention of :mod:`fewflow.motion.warp`) minimises

    E(v) = sum_p sum_c (f_x,c u + f_y,c w + f_t,c)^2 + alpha^2 (|grad u|^2 + |grad w|^2),

with ``f_t = f1 - f0`` and the spatial derivatives of ``(f0 + f1) / 2`` (central differences,
replicated border), summed over the ``C`` channels. The Euler–Lagrange equations are solved by the
paper's Jacobi iteration: with ``v_bar`` the weighted neighbour average of the paper's 3x3 stencil
(``1/6`` on the 4 edges, ``1/12`` on the corners), each step solves per pixel the 2x2 system

    (alpha^2 I + sum_c grad f_c grad f_c^T) v = alpha^2 v_bar - sum_c f_t,c grad f_c,

which for one channel is the paper's closed-form update. ``n_warps > 1`` re-linearises around the
current estimate (``f1`` warped back by ``v``; the standard incremental refinement, not in the 1981
paper), which extends the range beyond about one pixel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fewflow._validate import FewflowError
from fewflow.motion.warp import _check_image, warp


def check_frames(f0: Tensor, f1: Tensor) -> None:
    """Two frames ``(B, C, H, W)`` of one shape, finite, floating point, at least 2x2."""
    _check_image("frame0", f0)
    _check_image("frame1", f1)
    if f0.shape != f1.shape:
        raise FewflowError(
            f"frames must have the same shape, got {tuple(f0.shape)} and {tuple(f1.shape)}"
        )
    if f0.shape[-1] < 2 or f0.shape[-2] < 2:
        raise FewflowError(f"frames must be at least 2x2 pixels, got {tuple(f0.shape)}")
    if f0.dtype != f1.dtype or f0.device != f1.device:
        raise FewflowError(f"frames must share dtype and device, got {f0.dtype}/{f0.device} and "
                           f"{f1.dtype}/{f1.device}")


def spatial_gradient(f: Tensor) -> tuple[Tensor, Tensor]:
    """Central differences ``(f_x, f_y)`` of ``(B, C, H, W)`` with replicated borders."""
    p = F.pad(f, (1, 1, 1, 1), mode="replicate")
    fx = (p[..., 1:-1, 2:] - p[..., 1:-1, :-2]) / 2
    fy = (p[..., 2:, 1:-1] - p[..., :-2, 1:-1]) / 2
    return fx, fy


_HS_KERNEL = [[1 / 12, 1 / 6, 1 / 12], [1 / 6, 0.0, 1 / 6], [1 / 12, 1 / 6, 1 / 12]]


def neighbour_average(v: Tensor) -> Tensor:
    """The Horn–Schunck neighbour average of each channel (replicated border)."""
    k = torch.tensor(_HS_KERNEL, dtype=v.dtype, device=v.device)[None, None].repeat(v.shape[1], 1, 1, 1)
    return F.conv2d(F.pad(v, (1, 1, 1, 1), mode="replicate"), k, groups=v.shape[1])


def horn_schunck(frame0: Tensor, frame1: Tensor, alpha: float = 0.05, n_iter: int = 200,
                 n_warps: int = 1, init: Tensor | None = None) -> Tensor:
    """Horn–Schunck flow ``(B, 2, H, W)`` (channels ``dx, dy`` in pixels) from ``frame0`` to ``frame1``.

    Args:
        frame0, frame1: ``(B, C, H, W)`` frames (intensities in any units; ``alpha`` is in the same
            units per pixel, so for frames in ``[0, 1]`` the default 0.05 weighs smoothness like a
            gradient of 5% of the range per pixel).
        alpha: smoothness weight (the paper's ``alpha``; larger = smoother).
        n_iter: Jacobi iterations per linearisation.
        n_warps: linearisations (1 = the classic method).
        init: optional initial flow ``(B, 2, H, W)``.
    """
    check_frames(frame0, frame1)
    if not alpha > 0:
        raise FewflowError(f"alpha must be > 0, got {alpha}")
    if int(n_iter) != n_iter or n_iter < 1 or int(n_warps) != n_warps or n_warps < 1:
        raise FewflowError(f"n_iter and n_warps must be integers >= 1, got {n_iter}, {n_warps}")
    b, _, h, w = frame0.shape
    if init is None:
        v = frame0.new_zeros(b, 2, h, w)
    else:
        _check_image("init", init)
        if tuple(init.shape) != (b, 2, h, w):
            raise FewflowError(f"init must have shape {(b, 2, h, w)}, got {tuple(init.shape)}")
        v = init.to(frame0.dtype).clone()
    a2 = float(alpha) ** 2
    for _ in range(int(n_warps)):
        f1w = warp(frame1, v) if bool(v.abs().max() > 0) else frame1
        fx, fy = spatial_gradient((frame0 + f1w) / 2)
        # linearised residual around v: f1w + grad f . (v_new - v) - f0
        ft = f1w - frame0 - fx * v[:, :1] - fy * v[:, 1:]
        jxx, jxy, jyy = (fx * fx).sum(1), (fx * fy).sum(1), (fy * fy).sum(1)
        bx, by = (ft * fx).sum(1), (ft * fy).sum(1)
        axx, ayy = a2 + jxx, a2 + jyy
        det = axx * ayy - jxy * jxy
        for _ in range(int(n_iter)):
            vb = neighbour_average(v)
            rx = a2 * vb[:, 0] - bx
            ry = a2 * vb[:, 1] - by
            v = torch.stack([(ayy * rx - jxy * ry) / det, (axx * ry - jxy * rx) / det], dim=1)
    return v
