"""Flow-driven video editing (fewflow.motion.editing) and shape-consistent flow calibration
(fewflow.motion.calibration): metrics on known cases, propagation along true flow, errors."""

from __future__ import annotations

import pytest
import torch

from fewflow import FewflowError
from fewflow.motion.calibration import affine_field, calibrate_flows, fit_affine_motion, mask_iou
from fewflow.motion.editing import (
    chained_visibility,
    compose_flows,
    compose_forward,
    corrupt_flow,
    edit_fidelity,
    estimated_flows,
    flowvid_condition,
    per_frame_edit,
    propagate,
    recolor,
    structure_map,
    temporal_consistency,
    training_pairs,
    video_metrics,
    warp_video,
    warping_error,
)
from fewflow.motion.sprites import sprite_video
from fewflow.motion.warp import occlusion_mask

torch.set_num_threads(1)


def _square_video(T: int = 6, size: int = 16, step: int = 1) -> tuple[torch.Tensor, ...]:
    """A bright textured 4x4 square translating right by ``step`` px per frame over a dark ramp; returns
    (frames (T, 3, H, W), flow_bw, source masks (T, 1, H, W), flow_fw)."""
    g = torch.Generator().manual_seed(0)
    tex = 0.6 + 0.2 * torch.rand(3, 4, 4, generator=g)
    bg = torch.linspace(0.1, 0.3, size)[None, None, :].expand(3, size, size)
    frames = torch.empty(T, 3, size, size)
    masks = torch.zeros(T, 1, size, size)
    bw = torch.zeros(T - 1, 2, size, size)
    for t in range(T):
        frames[t] = bg
        frames[t, :, 5:9, 3 + step * t : 7 + step * t] = tex
        masks[t, 0, 5:9, 3 + step * t : 7 + step * t] = 1
    fw = torch.zeros_like(bw)
    for t in range(T - 1):
        bw[t, 0][masks[t + 1, 0] > 0] = -float(step)
        fw[t, 0][masks[t, 0] > 0] = float(step)
    return frames, bw, masks, fw


def test_static_video_is_perfectly_consistent():
    v = sprite_video(5, 24, 2, 3, seed=3)
    static = v.frames[:1].expand(5, -1, -1, -1).clone()
    zero = torch.zeros(4, 2, 24, 24)
    assert temporal_consistency(static) == pytest.approx(1.0, abs=1e-6)
    assert warping_error(static, zero) == pytest.approx(0.0, abs=1e-12)
    # a flickering video is not
    flick = static + 0.6 * (torch.arange(5) % 2).float()[:, None, None, None]
    assert temporal_consistency(flick) < 0.99 and warping_error(flick, zero) == pytest.approx(0.36, rel=1e-5)


def test_true_warp_has_zero_warping_error_on_visible_pixels():
    frames, bw, _, fw = _square_video()
    vis = occlusion_mask(bw, fw, beta=0.5)
    assert warping_error(frames, bw, vis) == pytest.approx(0.0, abs=1e-12)  # integer flow: exact
    assert warping_error(frames, bw) > 1e-3  # the pixels the square uncovers are not predictable
    v = sprite_video(6, 24, 2, 3, seed=4)  # textured sprites, sub-pixel motion: bilinear error only
    vis = occlusion_mask(v.flow_bw, v.flow_fw)
    assert warping_error(v.frames, v.flow_bw, vis) < 2e-3
    # the frames in the wrong order are far off
    assert warping_error(v.frames.flip(0), v.flow_bw, vis) > 10 * warping_error(v.frames, v.flow_bw, vis)


def test_propagation_along_the_true_flow_reproduces_the_video():
    frames, bw, masks, _ = _square_video()
    fw = torch.zeros_like(bw)
    for t in range(bw.shape[0]):
        fw[t, 0][masks[t, 0] > 0] = 1.0
    to0, from0 = compose_flows(bw), compose_forward(fw)
    # composition of integer translations: the square's pixels point 1 px further back each frame
    assert torch.allclose(to0[3, 0][masks[3, 0] > 0], torch.full((16,), -3.0))
    warped, vis = propagate(frames[0], to0, from0, fb_tolerance=0.5)
    assert vis.shape == (6, 1, 16, 16) and vis[0].min() == 1
    err = (warped - frames).pow(2).sum(1, keepdim=True)
    assert float((err * vis).sum()) == pytest.approx(0.0, abs=1e-10)
    assert float(vis.mean()) < 1  # the uncovered background behind the square is not visible in frame 0
    assert torch.equal(warp_video(frames[0], to0), warped)
    chained = chained_visibility(bw, fw)
    assert chained.shape == vis.shape and float((err * chained).sum()) == pytest.approx(0.0, abs=1e-10)


def test_corrupted_flow_has_the_asked_error_and_leaves_the_input():
    flow = torch.zeros(4, 2, 32, 32)
    before = flow.clone()
    g = torch.Generator().manual_seed(0)
    noisy = corrupt_flow(flow, 1.5, generator=g)
    assert torch.equal(flow, before)
    assert float(noisy.std()) == pytest.approx(1.5, rel=0.1)
    assert torch.equal(corrupt_flow(flow, 0.0), flow)


def test_estimated_flows_go_to_and_from_the_first_frame():
    v = sprite_video(4, 16, 2, 3, seed=5000)
    calls = []

    def spy(f0, f1):
        calls.append((f0.clone(), f1.clone()))
        return torch.zeros(f0.shape[0], 2, *f0.shape[2:])

    to0, from0 = estimated_flows(v.frames, spy)
    assert to0.shape == (4, 2, 16, 16) and torch.equal(calls[0][0], v.frames)
    assert torch.equal(calls[0][1], v.frames[:1].expand(4, -1, -1, -1)) and torch.equal(calls[1][1], v.frames)
    with pytest.raises(FewflowError, match="estimator must return"):
        estimated_flows(v.frames, lambda a, b: a)
    hs_to, hs_from = estimated_flows(v.frames[:2])  # the default estimator (Horn-Schunck) runs
    assert hs_to.shape == (2, 2, 16, 16) and torch.isfinite(hs_from).all()
    assert float(hs_to[0].abs().max()) < 1e-6


def test_structure_and_recolor():
    frames, _, masks, _ = _square_video()
    s = structure_map(frames)
    assert torch.equal(s, masks)
    edited = recolor(frames, s, (1, 2, 0))
    assert torch.equal(edited[:, :, :5], frames[:, :, :5])  # background untouched
    assert torch.equal(edited[:, 0, 5:9, 3:7][0], frames[0, 1, 5:9, 3:7])
    assert torch.equal(structure_map(edited), s)  # a channel permutation keeps the structure
    c = flowvid_condition(frames, s, s)
    assert c.shape == (6, 5, 16, 16) and torch.equal(c[:, :3], frames * s)


def test_metrics_dictionary_and_fidelity():
    frames, bw, masks, fw = _square_video()
    m = video_metrics(frames, bw, occlusion_mask(bw, fw, beta=0.5), reference=frames, source_structure=masks)
    assert m["fidelity_mse"] == 0 and m["structure_error"] == 0 and m["warping_error"] == pytest.approx(0.0)
    assert edit_fidelity(frames + 0.1, frames) == pytest.approx(0.01, rel=1e-5)
    assert edit_fidelity(frames + masks * 0.2, frames, masks) == pytest.approx(0.04, rel=1e-5)


def test_per_frame_edit_applies_the_editor_to_each_frame():
    frames, _, _, _ = _square_video()
    out = per_frame_edit(frames, lambda f: f.flip(1))
    assert torch.equal(out, frames.flip(1))
    with pytest.raises(FewflowError, match="editor must return"):
        per_frame_edit(frames, lambda f: f[:2])


def test_training_pairs_condition_layout():
    vids = [sprite_video(4, 24, 1, 3, seed=s) for s in (1, 2)]
    d = training_pairs(vids, max_flow_noise=0.0, generator=torch.Generator().manual_seed(0))
    assert d.x.shape == (8, 3, 24, 24) and d.c.shape == (8, 5, 24, 24)
    assert d.x.min() >= -1 and d.x.max() <= 1
    # frame 0 is its own warp, fully visible, and the structure is that of the frame
    assert torch.allclose(d.c[0, :3], d.x[0], atol=1e-5) and d.c[0, 3].min() == 1
    assert torch.equal(d.c[:4, 4:], structure_map(vids[0].frames))


def test_errors_are_one_line():
    frames, bw, masks, _ = _square_video()
    with pytest.raises(FewflowError, match="flow_bw must have shape"):
        warping_error(frames, bw[:, :, :8])
    with pytest.raises(FewflowError, match="same shape"):
        edit_fidelity(frames, frames[:, :, :8])
    with pytest.raises(FewflowError, match="video"):
        temporal_consistency(frames[0])
    with pytest.raises(FewflowError, match="first must be one frame"):
        propagate(frames, compose_flows(bw))
    with pytest.raises(FewflowError, match="to_first must have shape"):
        propagate(frames[0], compose_flows(bw)[:, :, :8])
    with pytest.raises(FewflowError, match="non-finite|NaN|nan"):
        warping_error(frames * float("nan"), bw)
    with pytest.raises(FewflowError, match="at least one video"):
        training_pairs([])
    with pytest.raises(FewflowError, match="permutation"):
        recolor(frames, masks, (0, 0, 1))


# --------------------------------------------------------------------------- calibration


def test_affine_fit_recovers_an_affine_field():
    a = torch.tensor([[0.05, -0.1, 1.5], [0.1, 0.02, -0.7]], dtype=torch.float64)
    field = affine_field(a, 12, 10)
    w = torch.zeros(12, 10)
    w[2:9, 3:8] = 1
    assert torch.allclose(fit_affine_motion(field, w), a, atol=1e-10)
    one = torch.zeros(12, 10)
    one[4, 4] = 1  # one pixel: a translation
    assert torch.allclose(fit_affine_motion(field, one)[:, 2], field[:, 4, 4])


def test_calibration_is_the_identity_when_the_shape_is_kept():
    _, bw, masks, _ = _square_video()
    cal, edited = calibrate_flows(bw, masks, masks[0])
    assert torch.allclose(cal, bw, atol=1e-5) and torch.equal(edited, masks)
    assert torch.equal(bw, _square_video()[1])  # the input is untouched


def test_calibration_moves_a_grown_shape_with_its_object():
    _, bw, masks, _ = _square_video()
    big = torch.zeros(1, 16, 16)
    big[0, 4:10, 2:8] = 1  # the square grown by one pixel on every side
    truth = torch.zeros(6, 1, 16, 16)
    for t in range(6):
        truth[t, 0, 4:10, 2 + t : 8 + t] = 1
    cal, edited = calibrate_flows(bw, masks, big)
    assert all(mask_iou(edited[t], truth[t]) == 1.0 for t in range(6))
    plain = (warp_video(big, compose_flows(bw)) > 0.5).float()  # the source flow leaves the ring behind
    assert mask_iou(plain[-1], truth[-1]) < 0.5
    assert torch.allclose(cal[:, 0][truth[1:, 0] > 0], torch.tensor(-1.0))


def test_calibration_errors():
    _, bw, masks, _ = _square_video()
    with pytest.raises(FewflowError, match="source_masks must have shape"):
        calibrate_flows(bw, masks[:3], masks[0])
    with pytest.raises(FewflowError, match="edited_first must have shape"):
        calibrate_flows(bw, masks, masks[0, :, :8])
    with pytest.raises(FewflowError, match="same shape"):
        mask_iou(masks[0], masks[0, :, :8])
