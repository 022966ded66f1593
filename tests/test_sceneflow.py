"""Synthetic scene-flow pairs, the scene-flow metrics and the nearest-neighbour baseline."""

from __future__ import annotations

import math

import pytest
import torch

from fewflow._validate import FewflowError
from fewflow.points.sceneflow import (
    Motion,
    SceneFlowPairs,
    end_point_error,
    make_pair,
    make_pairs,
    mesh_sampler,
    nn_flow,
    random_motion,
    scene_flow_metrics,
)

torch.set_num_threads(1)


def test_true_flow_is_perfect():
    p = make_pairs(3, n_points=64, seed=3)
    m = scene_flow_metrics(p.flow, p.flow)
    assert m == {"epe3d": 0.0, "acc_strict": 1.0, "acc_relax": 1.0, "outliers": 0.0}
    assert float(end_point_error(p.flow, p.flow).abs().max()) == 0.0


def test_metrics_hand_computed():
    gt = torch.zeros(1, 5, 3)
    gt[..., 0] = 1.0  # |f| = 1: relative error = EPE / 1.0001
    gt[0, 4, 0] = 10.0  # |f| = 10
    err = torch.tensor([0.0, 0.04, 0.08, 0.2, 0.4])
    pred = gt.clone()
    pred[0, :, 1] += err
    m = scene_flow_metrics(pred, gt)
    assert m["epe3d"] == pytest.approx(float(err.mean()), abs=1e-7)
    # strict (EPE < .05 or rel < .05): 0, .04, and .4/10 = .04 -> 3 / 5
    assert m["acc_strict"] == pytest.approx(3 / 5)
    # relax (EPE < .1 or rel < .1): 0, .04, .08, .4/10 -> 4 / 5
    assert m["acc_relax"] == pytest.approx(4 / 5)
    # outliers (EPE > .3 or rel > .1): .2 (rel .2) and .4 (EPE > .3) -> 2 / 5
    assert m["outliers"] == pytest.approx(2 / 5)
    # mask: only the first two points; unbatched input gives the same numbers
    mk = torch.tensor([[True, True, False, False, False]])
    assert scene_flow_metrics(pred, gt, mk)["epe3d"] == pytest.approx(0.02, abs=1e-7)
    assert scene_flow_metrics(pred[0], gt[0]) == pytest.approx(m)


def test_metrics_average_over_scenes():
    gt = torch.ones(2, 4, 3)
    pred = gt.clone()
    pred[0] += torch.tensor([1.0, 0, 0])  # scene 0: EPE 1 everywhere; scene 1: exact
    m = scene_flow_metrics(pred, gt)
    assert m["epe3d"] == pytest.approx(0.5)
    assert m["outliers"] == pytest.approx(0.5)


def test_rigid_translation_of_a_sphere():
    p = make_pair("sphere", 200, 150, max_angle=0.0, max_translation=0.5, nonrigid=0.0, seed=5)
    assert p.source.shape == (1, 200, 3) and p.target.shape == (1, 150, 3)
    t = p.flow[0, 0]
    assert torch.allclose(p.flow[0], t.expand(200, 3), atol=1e-6)  # one translation
    assert 0 < float(t.norm()) <= 0.5 + 1e-6
    # source and target lie on one sphere (before / after the translation): fit |x|^2 = 2 c.x + (r^2 - |c|^2)
    src, back = p.source[0].double(), (p.target[0] - t).double()
    both = torch.cat([src, back])
    a = torch.cat([2 * both, torch.ones(len(both), 1, dtype=both.dtype)], 1)
    sol = torch.linalg.lstsq(a, both.pow(2).sum(1, keepdim=True)).solution[:, 0]
    c = sol[:3]
    r = (sol[3] + c.pow(2).sum()).sqrt()
    assert torch.allclose((both - c).norm(dim=-1), r.expand(len(both)), atol=1e-5)
    assert 0.9 < float(src.norm(dim=-1).max()) <= 1.0 + 1e-6  # bounding radius 1 (of both samples)
    # the target is an independent sample: no target point equals a moved source point
    d = torch.cdist(p.source[0] + p.flow[0], p.target[0]).min()
    assert float(d) > 1e-4


def test_motion_closed_forms():
    x = torch.randn(50, 3, dtype=torch.float64)
    mo = random_motion(x, max_angle=0.7, max_translation=0.0, nonrigid=0.0,
                       generator=torch.Generator().manual_seed(0))
    r = mo.rotation
    assert torch.allclose(r @ r.T, torch.eye(3, dtype=r.dtype), atol=1e-10)
    assert float(torch.linalg.det(r)) == pytest.approx(1.0, abs=1e-10)
    angle = math.acos((float(torch.trace(r)) - 1) / 2)
    assert 0 < angle <= 0.7 + 1e-9
    # distances are preserved by the rigid part
    assert torch.allclose(torch.pdist(mo(x)), torch.pdist(x), atol=1e-10)
    # one RBF: at its centre the displacement is the amplitude (no rigid motion)
    c = torch.tensor([[0.2, 0.1, -0.3]], dtype=torch.float64)
    a = torch.tensor([[0.05, -0.02, 0.01]], dtype=torch.float64)
    one = Motion(torch.eye(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64),
                 torch.zeros(3, dtype=torch.float64), c, a, 0.5)
    assert torch.allclose(one.flow(c), a)
    far = c + 10.0
    assert float(one.flow(far).abs().max()) < 1e-12


def test_occlusion_marks_hidden_points():
    p = make_pair("torus", 300, 200, occlusion=0.3, seed=2)
    assert p.target.shape == (1, 200, 3)
    frac = float(p.visible.float().mean())
    assert 0.4 < frac < 0.95
    # occluded source points have no target point near their moved position; visible ones do
    d = torch.cdist(p.source[0] + p.flow[0], p.target[0]).min(1).values
    assert float(d[~p.visible[0]].median()) > float(d[p.visible[0]].median())


def test_pairs_reproducible_and_shapes():
    a = make_pairs(4, n_points=32, seed=7)
    b = make_pairs(4, n_points=32, seed=7)
    c = make_pairs(4, n_points=32, seed=8)
    assert torch.equal(a.source, b.source) and torch.equal(a.flow, b.flow)
    assert not torch.equal(a.source, c.source)
    assert a.shapes == ["sphere", "torus", "superquadric", "sphere"]
    assert len(a[1:3]) == 2 and a[2].shapes == ["superquadric"]
    assert a.to(dtype=torch.float64).source.dtype == torch.float64


def test_custom_sampler():
    def plane(n: int, g: torch.Generator) -> torch.Tensor:
        xy = torch.rand(n, 2, generator=g, dtype=torch.float64)
        return torch.cat([xy, torch.zeros(n, 1, dtype=torch.float64)], 1)

    p = make_pair(plane, 40, seed=1)
    assert p.shapes == ["custom"] and p.source.shape == (1, 40, 3)
    assert float(p.source[..., 2].abs().max()) < 1e-6  # the normalised plane stays at z = 0


def test_mesh_sampler():
    # a tetrahedron: every sample lies on one of its four faces
    v = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=torch.float64)
    f = torch.tensor([[0, 1, 2], [0, 1, 3], [0, 2, 3], [1, 2, 3]])
    p = make_pair(mesh_sampler(v, f), 64, max_angle=0.0, max_translation=0.0, nonrigid=0.0, seed=0,
                  dtype=torch.float64, name="tetra")
    assert p.shapes == ["tetra"] and float(p.flow.abs().max()) < 1e-12
    x = p.source[0]
    x = x - x.min(0).values  # undo the centring; the scale is one number for every axis
    on_face = (x.min(1).values < 1e-9) | ((x.sum(1) - x.sum(1).max()).abs() < 1e-9)
    assert bool(on_face.all())
    with pytest.raises(FewflowError, match="mesh"):
        make_pair("mesh:no-such-mesh")


def test_nn_flow():
    x = torch.rand(1, 30, 3)
    perm = torch.randperm(30)
    assert float(nn_flow(x, x[:, perm]).abs().max()) == 0.0
    shift = torch.tensor([0.001, 0.0, 0.0])
    f = nn_flow(x[0], x[0, perm] + shift)  # unbatched; tiny shift keeps the nearest neighbour
    assert f.shape == (30, 3)
    assert torch.allclose(f, shift.expand(30, 3), atol=1e-6)
    src = x.clone()
    nn_flow(src, x)
    assert torch.equal(src, x)


def test_errors():
    with pytest.raises(FewflowError, match="shape mismatch"):
        scene_flow_metrics(torch.zeros(1, 4, 3), torch.zeros(1, 5, 3))
    with pytest.raises(FewflowError, match="non-finite"):
        scene_flow_metrics(torch.full((1, 4, 3), float("nan")), torch.zeros(1, 4, 3))
    with pytest.raises(FewflowError, match="empty"):
        nn_flow(torch.zeros(1, 0, 3), torch.zeros(1, 4, 3))
    with pytest.raises(FewflowError, match="shape"):
        nn_flow(torch.zeros(1, 4, 2), torch.zeros(1, 4, 2))
    with pytest.raises(FewflowError, match="sphere"):
        make_pair("spher")
    with pytest.raises(FewflowError, match="occlusion"):
        make_pair("sphere", occlusion=1.0)
    with pytest.raises(FewflowError, match="mask"):
        scene_flow_metrics(torch.zeros(1, 4, 3), torch.zeros(1, 4, 3), torch.zeros(1, 4, dtype=torch.bool))
    with pytest.raises(FewflowError, match="flow must match"):
        SceneFlowPairs(torch.zeros(1, 4, 3), torch.zeros(1, 4, 3), torch.zeros(1, 5, 3),
                       torch.ones(1, 4, dtype=torch.bool))
