"""fewflow.points: distances against scipy / brute force, surfaces, meshes, PLY files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist, directed_hausdorff

from fewflow._validate import FewflowError
from fewflow.points import chamfer, emd, hausdorff, knn_graph, nearest_neighbors
from fewflow.points.meshes import check_mesh, face_areas, read_obj, sample_mesh
from fewflow.points.ply import read_ply, read_ply_mesh, write_ply
from fewflow.points.surfaces import sphere, superquadric, torus
from fewflow.points.upsample import farthest_point_sample, midpoint_upsample

torch.set_num_threads(1)


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_chamfer_identical_is_zero_and_matches_brute_force():
    a = torch.randn(200, 3, generator=_g(0))
    assert float(chamfer(a, a)) == 0.0
    assert float(chamfer(a, a[torch.randperm(200, generator=_g(1))])) == 0.0
    b = torch.randn(150, 3, generator=_g(2))
    d = cdist(a.double().numpy(), b.double().numpy())
    ref = d.min(1).mean() + d.min(0).mean()
    assert float(chamfer(a.double(), b.double())) == pytest.approx(ref, rel=1e-12)
    ref2 = (d.min(1) ** 2).mean() + (d.min(0) ** 2).mean()
    assert float(chamfer(a.double(), b.double(), squared=True)) == pytest.approx(ref2, rel=1e-12)
    batched = chamfer(torch.stack([a, a]), torch.stack([a, a.flip(0)]))
    assert batched.shape == (2,) and float(batched.abs().max()) == 0.0
    assert chamfer(a, b, reduction="none").shape == (350,)


def test_emd_equals_scipy_assignment_cost():
    a, b = torch.randn(2, 64, 3, generator=_g(3)).double(), torch.randn(2, 64, 3, generator=_g(4)).double()
    got = emd(a, b)
    for i in range(2):
        c = cdist(a[i].numpy(), b[i].numpy())
        r, k = linear_sum_assignment(c)
        assert float(got[i]) == pytest.approx(c[r, k].mean(), rel=1e-12)
    # a permuted copy has EMD zero; gradients reach the coordinates
    x = a[0].clone().requires_grad_()
    emd(x, b[0]).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert float(emd(a[0], a[0][torch.randperm(64, generator=_g(5))])) == 0.0


def test_hausdorff_known_case_and_scipy():
    a = torch.tensor([[0.0, 0, 0], [1, 0, 0]])
    b = torch.tensor([[0.0, 0, 0], [1, 0, 0], [1, 3, 4]])
    assert float(hausdorff(a, b)) == pytest.approx(5.0)  # (1, 3, 4) is 5 from (1, 0, 0)
    x, y = torch.randn(80, 3, generator=_g(6)).double(), torch.randn(90, 3, generator=_g(7)).double()
    ref = max(directed_hausdorff(x.numpy(), y.numpy())[0], directed_hausdorff(y.numpy(), x.numpy())[0])
    assert float(hausdorff(x, y)) == pytest.approx(ref, rel=1e-12)


def test_knn_graph_and_nearest_neighbors_against_brute_force():
    x = torch.randn(2, 100, 3, generator=_g(8)).double()
    idx = knn_graph(x, 5)
    assert idx.shape == (2, 100, 5)
    for b in range(2):
        d = cdist(x[b].numpy(), x[b].numpy())
        np.fill_diagonal(d, np.inf)
        ref = np.argsort(d, axis=1)[:, :5]
        assert (idx[b].numpy() == ref).all()
    q = torch.randn(30, 3, generator=_g(9)).double()
    dist, nn = nearest_neighbors(q, x[0], k=3)
    d = cdist(q.numpy(), x[0].numpy())
    assert (nn.numpy() == np.argsort(d, 1)[:, :3]).all()
    np.testing.assert_allclose(dist.numpy(), np.sort(d, 1)[:, :3], rtol=1e-12)


def test_surface_distances_and_sampling():
    s = sphere(0.8)
    x = torch.randn(500, 3, generator=_g(10)).double()
    np.testing.assert_allclose(s.distance(x).numpy(), np.abs(np.linalg.norm(x.numpy(), axis=1) - 0.8))
    pts = s.sample(4000, _g(11), torch.float64)
    assert float(s.distance(pts).max()) < 1e-12
    assert float(pts.mean(0).norm()) < 0.05  # uniform on the sphere: mean near the centre
    t = torus(0.7, 0.3)
    tp = t.sample(20000, _g(12), torch.float64)
    assert float(t.distance(tp).max()) < 1e-12
    # uniform area: the outer half (rho > R) holds (pi R + 2 r) / (2 pi R) of the area
    rho = tp[:, :2].norm(dim=1)
    assert float((rho > 0.7).double().mean()) == pytest.approx((np.pi * 0.7 + 2 * 0.3) / (2 * np.pi * 0.7),
                                                               abs=0.02)
    # a superquadric with e1 = e2 = 1 is the ellipsoid / sphere: numerical distance matches the closed form
    q = superquadric(1.0, 1.0)
    y = torch.randn(200, 3, generator=_g(13)).double()
    exact = np.abs(np.linalg.norm(y.numpy(), axis=1) - 1)
    np.testing.assert_allclose(q.distance(y).numpy(), exact, atol=1e-8)
    sq = superquadric(0.6, 1.4, (1.0, 0.7, 0.5))
    assert float(sq.distance(sq.sample(300, _g(14), torch.float64)).max()) < 1e-4


def test_ply_round_trip_ascii_and_binary(tmp_path):
    x = torch.randn(57, 3, generator=_g(15))
    write_ply(tmp_path / "b.ply", x)
    assert torch.equal(read_ply(tmp_path / "b.ply"), x)
    write_ply(tmp_path / "a.ply", x.double(), binary=False)
    assert torch.equal(read_ply(tmp_path / "a.ply", dtype=torch.float64), x.double())
    assert not (tmp_path / "b.ply").read_bytes()[:200].count(b"ascii")


def test_ply_mesh_with_faces_and_extra_properties(tmp_path):
    v = np.array([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]], dtype="<f4")
    head = (b"ply\nformat binary_little_endian 1.0\nelement vertex 4\nproperty float x\nproperty float y\n"
            b"property float z\nproperty uchar red\nelement face 1\nproperty list uchar int vertex_indices\n"
            b"end_header\n")
    body = b"".join(row.tobytes() + b"\x07" for row in v) + b"\x04" + np.array([0, 1, 2, 3], "<i4").tobytes()
    (tmp_path / "q.ply").write_bytes(head + body)
    vv, ff = read_ply_mesh(tmp_path / "q.ply")
    np.testing.assert_array_equal(vv, v)
    np.testing.assert_array_equal(ff, [[0, 1, 2], [0, 2, 3]])  # the quad fanned into two triangles
    text = "v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1/1 2/2 3/3\n"
    ov, of = read_obj(text)
    assert ov.shape == (3, 3) and of.tolist() == [[0, 1, 2]]


def test_sample_mesh_is_area_weighted():
    # two triangles: area 1/2 and 2 -> 20 % / 80 % of the samples
    v = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 5], [2, 0, 5], [0, 2, 5]]).double()
    f = torch.tensor([[0, 1, 2], [3, 4, 5]])
    assert torch.allclose(face_areas(v, f), torch.tensor([0.5, 2.0]).double())
    p = sample_mesh(v, f, 20000, seed=1, dtype=torch.float64)
    assert float((p[:, 2] > 2).double().mean()) == pytest.approx(0.8, abs=0.015)
    assert bool(((p[:, 0] >= -1e-12) & (p[:, 1] >= -1e-12)).all())
    assert torch.equal(sample_mesh(v, f, 10, seed=3), sample_mesh(v, f, 10, seed=3))


def test_midpoint_and_fps():
    x = torch.randn(1, 40, 3, generator=_g(16))
    keep = farthest_point_sample(x, 10)
    assert keep.shape == (1, 10) and len(set(keep[0].tolist())) == 10
    up = midpoint_upsample(x, 4)
    assert up.shape == (1, 160, 3)
    # every output is the midpoint of two input points (or an input point)
    mids = ((x[0][:, None] + x[0][None]) / 2).reshape(-1, 3)
    d = torch.cdist(up[0], mids, compute_mode="donot_use_mm_for_euclid_dist")
    assert float(d.min(1).values.max()) < 1e-6
    before = x.clone()
    midpoint_upsample(x, 2)
    assert torch.equal(x, before)


def test_error_lines(tmp_path):
    with pytest.raises(FewflowError, match="equal size"):
        emd(torch.randn(10, 3), torch.randn(11, 3))
    with pytest.raises(FewflowError, match="empty"):
        chamfer(torch.zeros(0, 3), torch.randn(4, 3))
    with pytest.raises(FewflowError, match="non-finite"):
        hausdorff(torch.tensor([[float("nan"), 0, 0]]), torch.randn(4, 3))
    with pytest.raises(FewflowError, match="k"):
        knn_graph(torch.randn(1, 5, 3), 5)
    v = torch.zeros(3, 3)
    f = torch.tensor([[0, 1, 2]])
    with pytest.raises(FewflowError, match="degenerate"):
        sample_mesh(v, f, 10)
    with pytest.raises(FewflowError, match="empty mesh"):
        sample_mesh(torch.zeros(0, 3), torch.zeros(0, 3, dtype=torch.long), 10)
    fan = torch.tensor([[0, 1, 2], [0, 1, 3], [0, 1, 4]])
    with pytest.raises(FewflowError, match="non-manifold"):
        check_mesh(torch.randn(5, 3, generator=_g(17)), fan, manifold=True)
    with pytest.raises(FewflowError, match="not a PLY"):
        (tmp_path / "x.ply").write_text("hello")
        read_ply(tmp_path / "x.ply")
    with pytest.raises(FewflowError, match=r"\(N, 3\)"):
        write_ply(tmp_path / "y.ply", torch.randn(4, 2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_distances_on_cuda_match_cpu():
    a, b = torch.randn(2, 64, 3, generator=_g(18)), torch.randn(2, 64, 3, generator=_g(19))
    for fn in (chamfer, hausdorff, emd):
        got = fn(a.cuda(), b.cuda())
        assert got.device.type == "cuda"
        torch.testing.assert_close(got.cpu(), fn(a, b), rtol=1e-5, atol=1e-6)
    assert torch.equal(knn_graph(a.cuda(), 4).cpu(), knn_graph(a, 4))
    assert midpoint_upsample(a.cuda(), 2).device.type == "cuda"
