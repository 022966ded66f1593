"""Backward warping, forward-backward occlusion masks and the endpoint error of optical flow.

Conventions shared by all of :mod:`fewflow.motion`:

- images are ``(B, C, H, W)``; a flow is ``(B, 2, H, W)`` with channel 0 the horizontal displacement
  ``dx`` (along W, columns) and channel 1 the vertical displacement ``dy`` (along H, rows), in pixels;
- pixel ``(row i, column j)`` sits at the point ``p = (x, y) = (j, i)``;
- the **forward flow** ``f_fw`` of frames ``(I_t, I_{t+1})`` sends the point ``p`` of frame ``t`` to
  ``p + f_fw(p)`` in frame ``t + 1``, the **backward flow** ``f_bw`` sends ``q`` of frame ``t + 1`` to
  ``q + f_bw(q)`` in frame ``t``. Brightness constancy reads ``I_t(p) = I_{t+1}(p + f_fw(p))``, so
  ``warp(I_{t+1}, f_fw)`` reconstructs ``I_t`` wherever ``p`` stays visible.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fewflow._validate import FewflowError, check_finite

PADDING_MODES = ("border", "zeros", "reflection")


def _check_image(name: str, x: Tensor) -> None:
    if not torch.is_tensor(x):
        raise FewflowError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise FewflowError(f"{name} must have shape (B, C, H, W), got {tuple(x.shape)}")
    if x.numel() == 0:
        raise FewflowError(f"{name} is empty (shape {tuple(x.shape)})")
    if not x.is_floating_point():
        raise FewflowError(f"{name} must be a floating-point tensor, got {x.dtype}")
    check_finite(name, x)


def _check_flow(name: str, flow: Tensor) -> None:
    _check_image(name, flow)
    if flow.shape[1] != 2:
        raise FewflowError(
            f"{name} must have shape (B, 2, H, W) with channels (dx, dy), got {tuple(flow.shape)}"
        )


def _check_pair(image: Tensor, flow: Tensor, image_name: str = "image", flow_name: str = "flow") -> None:
    _check_image(image_name, image)
    _check_flow(flow_name, flow)
    if image.shape[0] != flow.shape[0] or image.shape[-2:] != flow.shape[-2:]:
        raise FewflowError(
            f"{image_name} {tuple(image.shape)} and {flow_name} {tuple(flow.shape)} "
            "must share batch size and H, W"
        )


def pixel_grid(h: int, w: int, like: Tensor) -> Tensor:
    """The pixel coordinates ``(1, 2, H, W)``: channel 0 the column ``x``, channel 1 the row ``y``."""
    ys = torch.arange(h, device=like.device, dtype=like.dtype)
    xs = torch.arange(w, device=like.device, dtype=like.dtype)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx, gy])[None]


def warp(image: Tensor, flow: Tensor, padding: str = "border") -> Tensor:
    """Backward-warp ``image`` by ``flow``: ``out(p) = image(p + flow(p))``, bilinear in between pixels.

    Args:
        image: ``(B, C, H, W)``.
        flow: ``(B, 2, H, W)`` displacements ``(dx, dy)`` in pixels.
        padding: what ``image`` is outside its pixel centres ``[0, W-1] x [0, H-1]``: ``"border"`` (the
            default) repeats the nearest edge pixel, ``"zeros"`` reads 0, ``"reflection"`` mirrors.

    With the forward flow ``f_fw`` of ``(I_t, I_{t+1})``, ``warp(I_{t+1}, f_fw) = I_t`` on the pixels of
    frame ``t`` that stay visible (exactly for integer flow, up to bilinear interpolation otherwise).
    The input is not modified; the output has the image's dtype and device.
    """
    _check_pair(image, flow)
    if padding not in PADDING_MODES:
        raise FewflowError(f"unknown padding {padding!r}; choose one of {', '.join(PADDING_MODES)}")
    _, _, h, w = image.shape
    flow = flow.to(image.dtype)
    pos = pixel_grid(h, w, image) + flow
    # grid_sample with align_corners=True maps -1 / +1 to the first / last pixel centre
    gx = 2.0 * pos[:, 0] / max(w - 1, 1) - 1.0
    gy = 2.0 * pos[:, 1] / max(h - 1, 1) - 1.0
    grid = torch.stack([gx, gy], dim=-1)
    return F.grid_sample(image, grid, mode="bilinear", padding_mode=padding, align_corners=True)


def occlusion_mask(flow_fw: Tensor, flow_bw: Tensor, alpha: float = 0.01, beta: float = 0.5) -> Tensor:
    """Forward-backward consistency mask of the forward flow (1 = visible in the next frame, 0 = occluded).

    A pixel ``p`` of frame ``t`` is kept when following ``f_fw`` and then ``f_bw`` brings it back:

        |f_fw(p) + f_bw~(p)|^2 < alpha (|f_fw(p)|^2 + |f_bw~(p)|^2) + beta,   f_bw~ = warp(f_bw, f_fw),

    the test of Sundaram, Brox & Keutzer, "Dense point trajectories by GPU-accelerated large
    displacement optical flow" (ECCV 2010) with the constants of Meister, Hur & Roth, "UnFlow"
    (arXiv:1711.07837). Pixels whose target ``p + f_fw(p)`` leaves the box of pixel centres
    ``[0, W-1] x [0, H-1]`` are marked occluded.

    Returns a float mask ``(B, 1, H, W)`` in the flow's dtype.
    """
    _check_flow("flow_fw", flow_fw)
    _check_flow("flow_bw", flow_bw)
    if flow_fw.shape != flow_bw.shape:
        raise FewflowError(
            f"shape mismatch: flow_fw has shape {tuple(flow_fw.shape)} "
            f"but flow_bw has shape {tuple(flow_bw.shape)}"
        )
    if alpha < 0 or beta < 0:
        raise FewflowError(f"alpha and beta must be >= 0, got alpha={alpha}, beta={beta}")
    flow_bw = flow_bw.to(flow_fw.dtype)
    bw_at = warp(flow_bw, flow_fw)
    diff = (flow_fw + bw_at).pow(2).sum(1, keepdim=True)
    mag = flow_fw.pow(2).sum(1, keepdim=True) + bw_at.pow(2).sum(1, keepdim=True)
    ok = diff < alpha * mag + beta
    _, _, h, w = flow_fw.shape
    pos = pixel_grid(h, w, flow_fw) + flow_fw
    inside = (pos[:, :1] >= 0) & (pos[:, :1] <= w - 1) & (pos[:, 1:] >= 0) & (pos[:, 1:] <= h - 1)
    return (ok & inside).to(flow_fw.dtype)


def endpoint_error(flow: Tensor, ref: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean endpoint error ``mean_p |flow(p) - ref(p)|_2`` in pixels (a 0-dim tensor).

    ``mask`` ``(B, 1, H, W)`` (or ``(B, H, W)``), if given, weights the pixels (e.g. the visible ones);
    the mean is over the mask's weight, which must be positive.
    """
    _check_flow("flow", flow)
    _check_flow("ref", ref)
    if flow.shape != ref.shape:
        raise FewflowError(
            f"shape mismatch: flow has shape {tuple(flow.shape)} but ref has shape {tuple(ref.shape)}"
        )
    epe = (flow - ref.to(flow.dtype)).pow(2).sum(1, keepdim=True).sqrt()
    if mask is None:
        return epe.mean()
    if not torch.is_tensor(mask):
        raise FewflowError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dim() == 3:
        mask = mask[:, None]
    b, _, h, w = flow.shape
    if tuple(mask.shape) != (b, 1, h, w):
        raise FewflowError(f"mask must have shape {(b, 1, h, w)}, got {tuple(mask.shape)}")
    check_finite("mask", mask.float())
    m = mask.to(epe.dtype)
    total = m.sum()
    if float(total) <= 0:
        raise FewflowError("mask selects no pixels; endpoint error is undefined")
    return (epe * m).sum() / total
