"""Flow-driven video editing: edit the first frame, propagate it along the source video's motion, generate.

The pipeline of "FlowVid: Taming Imperfect Optical Flows for Consistent Video-to-Video Synthesis" (Liang et
al., CVPR 2024, arXiv 2312.17681) at toy scale, with the baselines it is compared against:

1. **edit the first frame** with any image editor (:func:`recolor`, a colour change of the foreground, or
   :func:`sdedit` / :func:`structure_editor`, generative edits through a trained fewflow model);
2. **propagate**: compose the source video's backward flows into flows ``F_{t->0}`` from every frame back to
   frame 0 and warp the edited first frame, ``w_t(p) = e_0(p + F_{t->0}(p))``, with a visibility mask
   ``m_t`` (forward-backward consistency chained along the video, :func:`propagate`);
3. **generate** each frame with a flow-matching model conditioned on ``[w_t m_t, m_t, s_t]`` (``s_t``, a
   colour-free structure map of the source frame, is the spatial control; :func:`flowvid_edit`), the model
   trained by the ``flowvid`` method on :func:`training_pairs`.

Baselines: **pure warping** (:func:`warp_video`, the propagated frames themselves) and **per-frame editing**
(:func:`per_frame_edit`: the image editor on every frame independently). Metrics (:func:`video_metrics`):
the warping error of an output video under the source video's true flow, temporal consistency, fidelity
to a reference edited video, and the structure error against the source video.

Frames are ``(T, C, H, W)`` in any value range (the model's, for the generative steps); flows follow
:mod:`fewflow.motion.warp`: ``flow_bw[t]`` sends a point of frame ``t + 1`` to frame ``t`` and
``flow_fw[t]`` a point of frame ``t`` to frame ``t + 1``, in pixels ``(dx, dy)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fewflow._validate import FewflowError, check_finite
from fewflow.data.base import Dataset
from fewflow.motion.warp import occlusion_mask, pixel_grid, warp

__all__ = [
    "chained_visibility",
    "compose_flows",
    "compose_forward",
    "corrupt_flow",
    "edit_fidelity",
    "estimated_flows",
    "flowvid_condition",
    "flowvid_edit",
    "per_frame_edit",
    "propagate",
    "recolor",
    "sdedit",
    "structure_editor",
    "structure_error",
    "structure_map",
    "temporal_consistency",
    "training_pairs",
    "video_metrics",
    "warp_video",
    "warping_error",
]

Model = Callable[..., Tensor]


# --------------------------------------------------------------------------- checks


def _check_frames(name: str, frames: Tensor) -> None:
    if not torch.is_tensor(frames) or frames.dim() != 4:
        got = tuple(frames.shape) if torch.is_tensor(frames) else type(frames).__name__
        raise FewflowError(f"{name} must be a video (T, C, H, W), got {got}")
    if frames.shape[0] == 0 or frames.numel() == 0:
        raise FewflowError(f"{name} is empty (shape {tuple(frames.shape)})")
    if not frames.is_floating_point():
        raise FewflowError(f"{name} must be floating point, got {frames.dtype}")
    check_finite(name, frames)


def _check_flows(name: str, flows: Tensor, frames: Tensor, n: int | None = None) -> None:
    _check_frames(name, flows)
    want_n = frames.shape[0] - 1 if n is None else n
    if flows.shape[1] != 2 or flows.shape[0] != want_n or flows.shape[2:] != frames.shape[2:]:
        raise FewflowError(
            f"{name} must have shape ({want_n}, 2, {frames.shape[2]}, {frames.shape[3]}) for frames "
            f"{tuple(frames.shape)}, got {tuple(flows.shape)}"
        )


def _check_same(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    if a.shape != b.shape:
        raise FewflowError(f"{name_a} {tuple(a.shape)} and {name_b} {tuple(b.shape)} must have the same "
                           "shape")


# --------------------------------------------------------------------------- flows


def compose_flows(flows: Tensor) -> Tensor:
    """Chain consecutive backward flows into the flows from every frame back to frame 0.

    For backward flows ``B_t`` (frame ``t + 1`` -> ``t``), ``(T-1, 2, H, W)``, returns ``F`` ``(T, 2, H, W)``
    with ``F_0 = 0`` and ``F_{t+1}(p) = B_t(p) + F_t(p + B_t(p))``: the flow from frame ``t + 1`` to frame 0
    (``F_t`` sampled bilinearly in between pixels). Exact for the material points seen in every frame."""
    _check_frames("flows", flows)
    if flows.shape[1] != 2:
        raise FewflowError(f"flows must have shape (T-1, 2, H, W), got {tuple(flows.shape)}")
    out = [torch.zeros_like(flows[:1])]
    for t in range(flows.shape[0]):
        b = flows[t : t + 1]
        out.append(b + warp(out[-1], b))
    return torch.cat(out)


def compose_forward(flows_fw: Tensor) -> Tensor:
    """Chain forward flows ``f_t`` (frame ``t`` -> ``t + 1``), ``(T-1, 2, H, W)``, into ``G``
    ``(T, 2, H, W)``, the flows from frame 0 to frame ``t``: ``G_0 = 0``,
    ``G_{t+1}(p) = G_t(p) + f_t(p + G_t(p))``."""
    _check_frames("flows_fw", flows_fw)
    if flows_fw.shape[1] != 2:
        raise FewflowError(f"flows_fw must have shape (T-1, 2, H, W), got {tuple(flows_fw.shape)}")
    out = [torch.zeros_like(flows_fw[:1])]
    for t in range(flows_fw.shape[0]):
        g = out[-1]
        out.append(g + warp(flows_fw[t : t + 1], g))
    return torch.cat(out)


def estimated_flows(frames: Tensor, estimator: Callable[[Tensor, Tensor], Tensor] | None = None
                    ) -> tuple[Tensor, Tensor]:
    """Flows between every frame and frame 0 from an optical-flow estimator, as FlowVid estimates them
    (directly between frame 0 and each frame, not chained): ``(to_first, from_first)``, each
    ``(T, 2, H, W)``, with ``to_first[t] = estimator(frames[t], frames[0])`` and ``from_first[t] =
    estimator(frames[0], frames[t])``. ``estimator(f0, f1)`` returns the flow ``(B, 2, H, W)`` from ``f0`` to
    ``f1`` (``f0(p) = f1(p + v(p))``); default: Horn-Schunck with three re-linearisations
    (:func:`fewflow.motion.horn_schunck.horn_schunck`)."""
    _check_frames("frames", frames)
    if estimator is None:
        from fewflow.motion.horn_schunck import horn_schunck

        def estimator(f0: Tensor, f1: Tensor) -> Tensor:
            return horn_schunck(f0, f1, n_warps=3)

    first = frames[:1].expand_as(frames)
    to_first, from_first = estimator(frames, first), estimator(first, frames)
    want = (frames.shape[0], 2, *frames.shape[2:])
    for name, f in (("to_first", to_first), ("from_first", from_first)):
        if not torch.is_tensor(f) or f.shape != want:
            got = tuple(f.shape) if torch.is_tensor(f) else type(f).__name__
            raise FewflowError(f"the estimator must return flows of shape {want}, got {got} ({name})")
    return to_first, from_first


def corrupt_flow(flow: Tensor, sigma: float, *, smooth: int = 3, generator: torch.Generator | None = None
                 ) -> Tensor:
    """``flow + sigma * n``: a flow error of standard deviation ``sigma`` pixels per component, spatially
    correlated over ``smooth x smooth`` pixels (box-filtered Gaussian noise rescaled to unit variance), the
    kind of error an estimator makes. A new tensor; ``sigma = 0`` returns a copy."""
    _check_frames("flow", flow)
    if not (float(sigma) >= 0.0):
        raise FewflowError(f"sigma must be a number >= 0, got {sigma}")
    if int(smooth) != smooth or smooth < 1 or smooth % 2 == 0:
        raise FewflowError(f"smooth must be an odd integer >= 1, got {smooth}")
    if sigma == 0:
        return flow.clone()
    noise = torch.randn(flow.shape, generator=generator, dtype=flow.dtype,
                        device="cpu" if generator is None else generator.device).to(flow.device)
    if smooth > 1:
        noise = F.avg_pool2d(noise, smooth, stride=1, padding=smooth // 2, count_include_pad=False) * smooth
    return flow + float(sigma) * noise


def _inside(flow: Tensor) -> Tensor:
    h, w = flow.shape[-2:]
    pos = pixel_grid(h, w, flow) + flow
    ok = (pos[:, :1] >= -0.5) & (pos[:, :1] <= w - 0.5) & (pos[:, 1:] >= -0.5) & (pos[:, 1:] <= h - 0.5)
    return ok.to(flow.dtype)


def chained_visibility(flow_bw: Tensor, flow_fw: Tensor, fb_tolerance: float = 0.5) -> Tensor:
    """Which pixels of frame ``t`` were seen in frame 0, ``(T, 1, H, W)``: the forward-backward test of each
    consecutive pair chained along the video, ``m_{t+1}(p) = v_t(p) m_t(p + B_t(p))`` rounded to {0, 1},
    ``m_0 = 1`` (reliable for true flows; estimated flows are tested directly, :func:`propagate`)."""
    _check_frames("flow_bw", flow_bw)
    _check_same("flow_fw", flow_fw, "flow_bw", flow_bw)
    check_finite("flow_fw", flow_fw)
    vis = [torch.ones_like(flow_bw[:1, :1])]
    for t in range(flow_bw.shape[0]):
        b = flow_bw[t : t + 1]
        step = occlusion_mask(b, flow_fw[t : t + 1].to(b.dtype), beta=fb_tolerance)
        vis.append(((step * warp(vis[-1], b, padding="zeros")) > 0.5).to(b.dtype))
    return torch.cat(vis) * _inside(compose_flows(flow_bw))


def propagate(first: Tensor, to_first: Tensor, from_first: Tensor | None = None, *,
              fb_tolerance: float = 2.0) -> tuple[Tensor, Tensor]:
    """Warp the (edited) first frame to every frame of the video.

    Args:
        first: ``(C, H, W)`` the edited first frame.
        to_first: ``(T, 2, H, W)`` flows ``F_{t->0}`` from frame ``t`` back to frame 0 (true ones from
            :func:`compose_flows`, or estimated directly between frame ``t`` and frame 0 as FlowVid does).
        from_first: ``(T, 2, H, W)`` flows ``G_{0->t}`` (:func:`compose_forward`) for the occlusion test;
            ``None``: a pixel is visible when ``p + F_{t->0}(p)`` lies inside the image.
        fb_tolerance: the constant ``beta`` (pixels squared) of the forward-backward test
            :func:`fewflow.motion.warp.occlusion_mask` (``alpha = 0.01``); fewflow's default 2 accepts
            estimates that agree to about a pixel.

    Returns ``(warped (T, C, H, W), visibility (T, 1, H, W))`` with ``warped[t](p) = first(p + F_{t->0}(p))``
    and ``visibility[t](p) = 1`` where ``F_{t->0}`` and ``G_{0->t}`` agree (and the target is inside)."""
    if not torch.is_tensor(first) or first.dim() != 3:
        got = tuple(first.shape) if torch.is_tensor(first) else type(first).__name__
        raise FewflowError(f"first must be one frame (C, H, W), got {got}")
    _check_frames("first", first[None])
    _check_frames("to_first", to_first)
    if to_first.shape[1] != 2 or to_first.shape[2:] != first.shape[1:]:
        raise FewflowError(f"to_first must have shape (T, 2, {first.shape[1]}, {first.shape[2]}) for a first "
                           f"frame {tuple(first.shape)}, got {tuple(to_first.shape)}")
    to_first = to_first.to(first.dtype)
    if from_first is not None:
        _check_same("from_first", from_first, "to_first", to_first)
        check_finite("from_first", from_first)
        vis = occlusion_mask(to_first, from_first.to(first.dtype), beta=fb_tolerance)
    else:
        vis = _inside(to_first)
    warped = warp(first[None].expand(to_first.shape[0], *first.shape), to_first)
    return warped, vis


def warp_video(first: Tensor, to_first: Tensor) -> Tensor:
    """The pure-warping baseline: the edited first frame warped to every frame along ``to_first``
    ``(T, 2, H, W)`` (occluded pixels keep what bilinear warping with border padding puts there)."""
    return propagate(first, to_first)[0]


# --------------------------------------------------------------------------- structure, edits


def structure_map(frames: Tensor, threshold: float = 0.47) -> Tensor:
    """A colour-free spatial control: ``1`` where the channel mean exceeds ``threshold`` (the bright sprites
    of :func:`fewflow.motion.sprites.sprite_video` over their darker background), else ``0``;
    ``(T, 1, H, W)``.
    It plays the role of FlowVid's depth map: the shape of the scene, not its colours (a channel permutation
    of the frame leaves it unchanged)."""
    _check_frames("frames", frames)
    return (frames.mean(1, keepdim=True) > threshold).to(frames.dtype)


def recolor(frames: Tensor, mask: Tensor, perm: tuple[int, ...] | list[int] = (2, 0, 1)) -> Tensor:
    """A colour edit: the channels of the masked (foreground) pixels permuted by ``perm``, the rest kept.

    ``frames`` ``(T, C, H, W)``, ``mask`` ``(T, 1, H, W)`` in [0, 1] (e.g. :func:`structure_map`). Returns a
    new tensor. Applied to every frame it is the reference edited video of a pixel-wise colour edit."""
    _check_frames("frames", frames)
    _check_frames("mask", mask)
    if mask.shape != (frames.shape[0], 1, *frames.shape[2:]):
        raise FewflowError(f"mask must have shape {(frames.shape[0], 1, *frames.shape[2:])}, got "
                           f"{tuple(mask.shape)}")
    perm = [int(p) for p in perm]
    if sorted(perm) != list(range(frames.shape[1])):
        raise FewflowError(f"perm must be a permutation of range({frames.shape[1]}), got {perm}")
    m = mask.to(frames.dtype)
    return m * frames[:, perm] + (1 - m) * frames


def flowvid_condition(warped: Tensor, visibility: Tensor, structure: Tensor | None = None) -> Tensor:
    """The FlowVid condition ``c = [warped * visibility, visibility, structure]`` ``(T, C + 1 (+ 1), H, W)``
    that :class:`fewflow.objectives.flowvid.FlowVidLoss` trains on (occluded pixels carry no colour)."""
    _check_frames("warped", warped)
    _check_frames("visibility", visibility)
    if visibility.shape != (warped.shape[0], 1, *warped.shape[2:]):
        raise FewflowError(f"visibility must have shape {(warped.shape[0], 1, *warped.shape[2:])}, got "
                           f"{tuple(visibility.shape)}")
    parts = [warped * visibility, visibility]
    if structure is not None:
        _check_frames("structure", structure)
        _check_same("structure", structure, "visibility", visibility)
        parts.append(structure.to(warped.dtype))
    return torch.cat(parts, 1)


def training_pairs(
    videos: list[Any], *, max_flow_noise: float = 2.0, structure_threshold: float | None = 0.47,
    fb_tolerance: float = 2.0, scale: tuple[float, float] = (2.0, -1.0),
    generator: torch.Generator | None = None,
) -> Dataset:
    """FlowVid's training data from videos with known flow (:class:`fewflow.motion.sprites.SpriteVideo`s).

    For each video and each frame ``t``: the video's own first frame is warped to ``t`` along its flows to
    frame 0 corrupted by :func:`corrupt_flow` with ``sigma ~ U[0, max_flow_noise]`` (independent errors for
    the flows to and from frame 0, one ``sigma`` per video), and the model learns to reconstruct the real
    frame ``t`` from ``[warped * visibility, visibility, structure]`` -- the flow is imperfect on purpose,
    so that it becomes a soft condition. ``scale = (a, b)`` maps the videos' values ``v`` to the model's
    range ``a v + b`` (default: [0, 1] -> [-1, 1]); the structure map is computed before scaling
    (``structure_threshold``; ``None``: no structure channel). Returns a :class:`fewflow.data.Dataset` with
    ``x`` the frames and ``c`` the conditions."""
    if not videos:
        raise FewflowError("training_pairs needs at least one video")
    xs, cs = [], []
    a, b = float(scale[0]), float(scale[1])
    for k, v in enumerate(videos):
        frames = getattr(v, "frames", None)
        if frames is None:
            raise FewflowError(f"video {k} has no frames (expected a SpriteVideo)")
        _check_frames(f"video {k} frames", frames)
        sig = float(torch.rand((), generator=generator)) * max_flow_noise
        to_first = corrupt_flow(compose_flows(v.flow_bw), sig, generator=generator)
        from_first = corrupt_flow(compose_forward(v.flow_fw), sig, generator=generator)
        x = a * frames + b
        warped, vis = propagate(x[0], to_first, from_first, fb_tolerance=fb_tolerance)
        struct = structure_map(frames, structure_threshold) if structure_threshold is not None else None
        xs.append(x)
        cs.append(flowvid_condition(warped, vis, struct))
    x = torch.cat(xs).float()
    c = torch.cat(cs).float()
    return Dataset(x, None, "flowvid_pairs", value_range=(b, a + b), c=c,
                   description=f"FlowVid training pairs from {len(videos)} videos (max flow noise "
                   f"{max_flow_noise:g} px)")


# --------------------------------------------------------------------------- generation


def _euler(model: Model, x: Tensor, c: Tensor, steps: int, t0: float = 0.0) -> Tensor:
    """Euler integration of ``dx/dt = v(x, t, c=c)`` from ``t0`` to 1 in ``steps`` steps."""
    if int(steps) != steps or steps < 1:
        raise FewflowError(f"steps must be a positive integer, got {steps}")
    ts = torch.linspace(t0, 1.0, int(steps) + 1, dtype=torch.float64)
    with torch.no_grad():
        for i in range(int(steps)):
            t = torch.full((x.shape[0],), float(ts[i]), device=x.device, dtype=x.dtype)
            x = x + float(ts[i + 1] - ts[i]) * model(x, t, c=c)
    return x


def _noise(like: Tensor, generator: torch.Generator | None) -> Tensor:
    dev = "cpu" if generator is None else generator.device
    return torch.randn(like.shape, generator=generator, dtype=like.dtype, device=dev).to(like.device)


def flowvid_edit(
    model: Model, edited_first: Tensor, to_first: Tensor, from_first: Tensor | None = None, *,
    structure: Tensor | None = None, steps: int = 20, fb_tolerance: float = 2.0, keep_first: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Flow-conditioned generation of the edited video (FlowVid's step 3).

    Warps ``edited_first`` ``(C, H, W)`` along the flows ``to_first`` / ``from_first`` ``(T, 2, H, W)``
    (:func:`propagate`), builds the condition with ``structure`` ``(T, 1, H, W)`` (or none, for a model
    trained without it) and integrates the model's ODE from Gaussian noise for ``steps`` Euler steps, one
    frame per batch row. ``keep_first``: frame 0 of the output is the edited first frame itself. Returns
    ``(T, C, H, W)``."""
    warped, vis = propagate(edited_first, to_first, from_first, fb_tolerance=fb_tolerance)
    c = flowvid_condition(warped, vis, structure)
    out = _euler(model, _noise(warped, generator), c, steps)
    if keep_first:
        out = torch.cat([edited_first[None].to(out.dtype), out[1:]])
    return out


def structure_editor(model: Model, structure: Tensor, x_channels: int, *, steps: int = 20,
                     generator: torch.Generator | None = None) -> Tensor:
    """The structure-only branch of a FlowVid model as a generative image editor: new appearances for the
    shapes in ``structure`` ``(N, 1, H, W)`` (nothing visible through the warp). Returns ``(N, C, H, W)``."""
    _check_frames("structure", structure)
    n, _, h, w = structure.shape
    zeros = torch.zeros(n, x_channels + 1, h, w, device=structure.device, dtype=structure.dtype)
    c = torch.cat([zeros, structure], 1)
    x0 = _noise(torch.empty(n, x_channels, h, w, device=structure.device, dtype=structure.dtype), generator)
    return _euler(model, x0, c, steps)


def sdedit(model: Model, images: Tensor, structure: Tensor, *, strength: float = 0.5, steps: int = 20,
           generator: torch.Generator | None = None) -> Tensor:
    """A stochastic image editor in the manner of SDEdit ("SDEdit: Guided Image Synthesis and Editing with
    Stochastic Differential Equations", Meng et al., arXiv 2108.01073), in fewflow's time: the target
    ``images`` (e.g. a :func:`recolor` of the frame) are noised to ``t_s = 1 - strength``,
    ``x_{t_s} = t_s x + (1 - t_s) z``, and integrated to t = 1 by the structure-only branch of the model.
    Independent noise per image: editing frames one by one gives plausible but inconsistent frames."""
    _check_frames("images", images)
    if not (0.0 < float(strength) <= 1.0):
        raise FewflowError(f"strength must lie in (0, 1], got {strength}")
    n, ch, h, w = images.shape
    if structure.shape != (n, 1, h, w):
        raise FewflowError(f"structure must have shape {(n, 1, h, w)}, got {tuple(structure.shape)}")
    ts = 1.0 - float(strength)
    x = ts * images + (1 - ts) * _noise(images, generator)
    zeros = torch.zeros(n, ch + 1, h, w, device=images.device, dtype=images.dtype)
    c = torch.cat([zeros, structure.to(images.dtype)], 1)
    return _euler(model, x, c, max(1, round(steps * float(strength))), t0=ts)


def per_frame_edit(frames: Tensor, editor: Callable[[Tensor], Tensor]) -> Tensor:
    """The per-frame baseline: ``editor`` applied to every frame independently (one batched call; the editor
    must treat rows independently). Returns ``(T, C, H, W)``."""
    _check_frames("frames", frames)
    out = editor(frames)
    if not torch.is_tensor(out) or out.shape != frames.shape:
        raise FewflowError(f"editor must return frames of shape {tuple(frames.shape)}, got "
                           f"{tuple(out.shape) if torch.is_tensor(out) else type(out).__name__}")
    return out


# --------------------------------------------------------------------------- metrics


def warping_error(frames: Tensor, flow_bw: Tensor, visible: Tensor | None = None) -> float:
    """Mean squared difference between each frame and the previous one warped to it by the (source) flow,
    on the pixels visible in both:

        E_warp = sum_t sum_p m_t(p) ||O_{t+1}(p) - O_t(p + B_t(p))||^2 / (C sum_t sum_p m_t(p)),

    ``visible`` ``(T-1, 1, H, W)`` the visibility of frame ``t + 1``'s pixels in frame ``t`` (``None``: all
    pixels whose flow stays inside the image). 0 for a video that moves exactly with its flow."""
    _check_frames("frames", frames)
    if frames.shape[0] < 2:
        raise FewflowError("warping_error needs at least two frames")
    _check_flows("flow_bw", flow_bw, frames)
    bw = flow_bw.to(frames.dtype)
    m = _inside(bw) if visible is None else visible.to(frames.dtype)
    if m.shape != (frames.shape[0] - 1, 1, *frames.shape[2:]):
        raise FewflowError(f"visible must have shape {(frames.shape[0] - 1, 1, *frames.shape[2:])}, got "
                           f"{tuple(m.shape)}")
    pred = warp(frames[:-1], bw)
    err = ((frames[1:] - pred).pow(2) * m).sum()
    total = m.sum() * frames.shape[1]
    if float(total) <= 0:
        raise FewflowError("warping_error: no visible pixels")
    return float(err / total)


def temporal_consistency(frames: Tensor) -> float:
    """Mean cosine similarity of consecutive frames (flattened): 1 for a static video (the pixel analogue
    of the CLIP frame-consistency score)."""
    _check_frames("frames", frames)
    if frames.shape[0] < 2:
        raise FewflowError("temporal_consistency needs at least two frames")
    a, b = frames[:-1].flatten(1), frames[1:].flatten(1)
    return float(F.cosine_similarity(a, b, dim=1, eps=1e-12).mean())


def edit_fidelity(frames: Tensor, reference: Tensor, mask: Tensor | None = None) -> float:
    """Mean squared error to the reference edited video (optionally over ``mask`` ``(T, 1, H, W)``)."""
    _check_frames("frames", frames)
    _check_frames("reference", reference)
    _check_same("frames", frames, "reference", reference)
    err = (frames - reference.to(frames.dtype)).pow(2)
    if mask is None:
        return float(err.mean())
    m = mask.to(frames.dtype).expand_as(frames)
    if float(m.sum()) <= 0:
        raise FewflowError("edit_fidelity: the mask selects no pixels")
    return float((err * m).sum() / m.sum())


def structure_error(frames: Tensor, source_structure: Tensor, threshold: float = 0.47) -> float:
    """Fraction of pixels whose structure (:func:`structure_map` of ``frames``) differs from the source
    video's ``source_structure`` ``(T, 1, H, W)``: did the edit keep the scene's shapes where they are?"""
    s = structure_map(frames, threshold)
    _check_same("structure", s, "source_structure", source_structure)
    return float((s - source_structure.to(s.dtype)).abs().mean())


def video_metrics(frames: Tensor, flow_bw: Tensor, visible: Tensor | None = None, *,
                  reference: Tensor | None = None, source_structure: Tensor | None = None,
                  threshold: float = 0.47) -> dict[str, float]:
    """``warping_error``, ``temporal_consistency`` and, when given their references, ``fidelity`` (MSE to
    ``reference``) and ``structure_error`` (against ``source_structure``, in ``frames``' units)."""
    out = {"warping_error": warping_error(frames, flow_bw, visible),
           "temporal_consistency": temporal_consistency(frames)}
    if reference is not None:
        out["fidelity_mse"] = edit_fidelity(frames, reference)
    if source_structure is not None:
        out["structure_error"] = structure_error(frames, source_structure, threshold)
    return out
