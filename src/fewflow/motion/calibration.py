"""Shape-consistent flow calibration for edits that change an object's shape (FlowV2V's idea).

FlowV2V ("video editing as flow-driven image-to-video generation", Wang et al. 2025) propagates a first-frame
edit along the source video's optical flow; when the edit changes an object's shape (a larger or smaller
sprite), the source flow does not cover the edited shape: pixels the edited object now occupies carry the
background's motion, and the edited object leaves part of itself behind. FlowV2V therefore *calibrates*
the flow: it simulates a pseudo-flow sequence aligned with the edited shape from the source motion.

The paper's calibration uses a learned network; fewflow's version is parametric and training-free (what
follows is fewflow's reading, not the authors' procedure). For each object ``k`` and each frame pair, in
backward-flow form (``B_t`` sends a point of frame ``t + 1`` to frame ``t``):

1. fit the object's motion as an affine field ``d_k(p) = A_k [x, y, 1]^T`` to the source flow over the
   source object's pixels ``S_{t+1, k}`` (weighted least squares; a translation when fewer than three
   pixels, or collinear ones, are available), and the background's motion the same way over the pixels
   outside every source object;
2. move the edited shape with its object's motion: ``E_{t+1, k}(p) = [E_{t, k}(p + d_k(p)) > 1/2]`` starting
   from the edited first-frame mask ``E_{0, k}``;
3. the calibrated flow is ``d_k`` on ``E_{t+1, k}``, the background motion on source-object pixels that the
   edited objects no longer cover, and the source flow everywhere else (later objects drawn on top).

When the edit keeps every shape (``E_0 = S_0``) and the objects move affinely (translations, rotations,
scalings), the calibrated flow equals the source flow and the propagated masks are the source masks.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fewflow._validate import FewflowError, check_finite
from fewflow.motion.warp import pixel_grid, warp

__all__ = ["affine_field", "calibrate_flows", "fit_affine_motion", "mask_iou"]


def fit_affine_motion(flow: Tensor, weight: Tensor) -> Tensor:
    """Least-squares affine fit ``flow(p) ~ A [x, y, 1]^T`` over the pixels weighted by ``weight``.

    ``flow`` ``(2, H, W)``, ``weight`` ``(H, W)`` (or ``(1, H, W)``) >= 0. Returns ``A`` ``(2, 3)`` in the
    flow's dtype: the affine fit with at least three non-collinear pixels, the weighted mean flow (a
    translation) otherwise, and zeros when no pixel has weight."""
    if not torch.is_tensor(flow) or flow.dim() != 3 or flow.shape[0] != 2:
        raise FewflowError(f"flow must have shape (2, H, W), got {tuple(getattr(flow, 'shape', ()))}")
    w = weight.reshape(flow.shape[1:]) if weight.numel() == flow.shape[1] * flow.shape[2] else None
    if w is None:
        raise FewflowError(f"weight must have H x W = {tuple(flow.shape[1:])} entries, got "
                           f"{tuple(weight.shape)}")
    check_finite("flow", flow)
    h, wd = flow.shape[1:]
    grid = pixel_grid(h, wd, flow)[0].reshape(2, -1)
    design = torch.cat([grid, torch.ones_like(grid[:1])]).T.to(torch.float64)  # (N, 3)
    target = flow.reshape(2, -1).T.to(torch.float64)  # (N, 2)
    ww = w.reshape(-1).to(torch.float64).clamp_min(0)
    total = float(ww.sum())
    out = torch.zeros(2, 3, dtype=torch.float64, device=flow.device)
    if total <= 0:
        return out.to(flow.dtype)
    sel = ww > 0
    a, b, sw = design[sel], target[sel], ww[sel].sqrt()[:, None]
    if int(sel.sum()) >= 3 and torch.linalg.matrix_rank(a[:, :2] - a[:, :2].mean(0)) >= 2:
        sol = torch.linalg.lstsq(a * sw, b * sw).solution  # (3, 2)
        return sol.T.to(flow.dtype)
    out[:, 2] = (b * ww[sel][:, None]).sum(0) / total
    return out.to(flow.dtype)


def affine_field(a: Tensor, h: int, w: int) -> Tensor:
    """The displacement field ``A [x, y, 1]^T`` ``(2, H, W)`` of a ``(2, 3)`` affine motion."""
    grid = pixel_grid(h, w, a)[0]
    return torch.einsum("ij,jhw->ihw", a[:, :2], grid) + a[:, 2, None, None]


def _as_masks(name: str, m: Tensor, n_lead: int | None) -> Tensor:
    if not torch.is_tensor(m):
        raise FewflowError(f"{name} must be a tensor, got {type(m).__name__}")
    want = 4 if n_lead is not None else 3
    if m.dim() != want:
        shape = "(T, K, H, W)" if n_lead is not None else "(K, H, W)"
        raise FewflowError(f"{name} must have shape {shape}, got {tuple(m.shape)}")
    check_finite(name, m.float())
    return m


def calibrate_flows(flow_bw: Tensor, source_masks: Tensor, edited_first: Tensor, *, threshold: float = 0.5
                    ) -> tuple[Tensor, Tensor]:
    """Shape-consistent calibration of a video's backward flows for an edited first frame (module docstring).

    Args:
        flow_bw: ``(T-1, 2, H, W)`` the source video's backward flows (frame ``t + 1`` -> ``t``).
        source_masks: ``(T, K, H, W)`` the source objects' masks in every frame (K objects, values in [0, 1]).
        edited_first: ``(K, H, W)`` the edited objects' masks in frame 0.
        threshold: a warped mask value above it counts as inside.

    Returns ``(calibrated flow_bw (T-1, 2, H, W), edited masks (T, K, H, W))``; the inputs are not modified.
    """
    if not torch.is_tensor(flow_bw) or flow_bw.dim() != 4 or flow_bw.shape[1] != 2:
        got = tuple(getattr(flow_bw, "shape", ()))
        raise FewflowError(f"flow_bw must have shape (T-1, 2, H, W), got {got}")
    check_finite("flow_bw", flow_bw)
    src = _as_masks("source_masks", source_masks, 1).to(flow_bw.dtype)
    e0 = _as_masks("edited_first", edited_first, None).to(flow_bw.dtype)
    n, _, h, w = flow_bw.shape
    if src.shape[0] != n + 1 or src.shape[2:] != (h, w):
        raise FewflowError(f"source_masks must have shape ({n + 1}, K, {h}, {w}) for flows "
                           f"{tuple(flow_bw.shape)}, got {tuple(src.shape)}")
    if e0.shape != src.shape[1:]:
        raise FewflowError(f"edited_first must have shape {tuple(src.shape[1:])}, got {tuple(e0.shape)}")
    k_obj = src.shape[1]
    edited = [(e0 > threshold).to(flow_bw.dtype)]
    out = []
    for t in range(n):
        b = flow_bw[t]
        s_next = src[t + 1] > threshold  # (K, H, W)
        any_src = s_next.any(0)
        bg = affine_field(fit_affine_motion(b, (~any_src).to(b.dtype)), h, w)
        cal = torch.where(any_src[None], bg, b)
        e_next = []
        for k in range(k_obj):
            field = affine_field(fit_affine_motion(b, s_next[k].to(b.dtype)), h, w)
            moved = warp(edited[-1][k][None, None], field[None], padding="zeros")[0, 0] > threshold
            e_next.append(moved.to(b.dtype))
            cal = torch.where(moved[None], field, cal)
        edited.append(torch.stack(e_next))
        out.append(cal)
    return torch.stack(out), torch.stack(edited)


def mask_iou(a: Tensor, b: Tensor, threshold: float = 0.5) -> float:
    """Intersection over union of two masks of the same shape (thresholded); 1 when both are empty."""
    if a.shape != b.shape:
        raise FewflowError(f"masks {tuple(a.shape)} and {tuple(b.shape)} must have the same shape")
    x, y = a > threshold, b > threshold
    union = int((x | y).sum())
    return 1.0 if union == 0 else int((x & y).sum()) / union
