"""PUFM++ (fewflow.objectives.pufm): pairs, schedule, manifold step, training signal, sampling, CLI."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist

from fewflow._validate import FewflowError
from fewflow.methods import BuildContext, get_method
from fewflow.models.pointnet import PointVelocity
from fewflow.objectives.pufm import (
    PUFMConfig,
    PUFMLoss,
    PUFMRefineLoss,
    adaptive_schedule,
    crop_patches,
    make_pairs,
    make_pufm_model,
    manifold_step,
    pufm_upsample,
    run_schedule,
)
from fewflow.points.datasets import surface_clouds

torch.set_num_threads(1)


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_adaptive_schedule_inverts_the_loss_cdf():
    grid = np.linspace(0, 1, 51)
    np.testing.assert_allclose(adaptive_schedule(np.ones(51), grid, 4), [0, 0.25, 0.5, 0.75, 1.0], atol=1e-12)
    # loss l(t) = t: F(t) = t^2, so t_k = sqrt(k / K) (the trapezoid rule is exact for a linear loss)
    got = adaptive_schedule(grid, grid, 4)
    np.testing.assert_allclose(got, np.sqrt(np.arange(5) / 4), atol=1e-3)
    with pytest.raises(FewflowError, match="non-negative"):
        adaptive_schedule(-np.ones(51), grid, 4)


def test_pairs_are_the_exact_emd_assignment():
    x1 = surface_clouds(2, 64, seed=3).x.double()
    x0, x1a, y = make_pairs(x1, 4, 0.02, _g(1))
    assert x0.shape == x1a.shape == y.shape == (2, 64, 3)
    for b in range(2):
        c = cdist(x0[b].numpy(), y[b].numpy())
        r, k = linear_sum_assignment(c)
        got = (x0[b] - x1a[b]).norm(dim=-1).sum()
        assert float(got) == pytest.approx(c[r, k].sum(), rel=1e-10)
        # x1a is a permutation of y
        assert torch.allclose(x1a[b][torch.argsort(x1a[b][:, 0])], y[b][torch.argsort(y[b][:, 0])])


def test_manifold_step_is_the_point_normalised_gradient_of_the_l1_distance():
    ref = torch.zeros(1, 1, 3)
    x = torch.tensor([[[1.0, 0, 0], [0.5, -0.5, 0], [0.2, 0.3, -0.4]]])
    out = manifold_step(x, ref, 0.01)
    # closed form: per coordinate d, step -eta sign(x_d) / sqrt(#points with x_d != 0)
    want = x - 0.01 * torch.sign(x) / torch.tensor([math.sqrt(3), math.sqrt(2), 1.0])
    np.testing.assert_allclose(out.numpy(), want.numpy(), atol=1e-7)
    # independent: autograd gradient of mean |x - NN(x)|_1, normalised over the points axis per coordinate
    xr = x.clone().requires_grad_()
    (xr - ref).abs().mean().backward()
    g = xr.grad / xr.grad.norm(dim=1, keepdim=True)
    np.testing.assert_allclose(out.numpy(), (x - 0.01 * g).numpy(), atol=1e-7)
    assert bool((out.norm(dim=-1) < x.norm(dim=-1)).all())
    # the cloud moves at most eta per coordinate in total (L2 over points)
    assert bool(((out - x).norm(dim=1) <= 0.01 + 1e-7).all())
    on = manifold_step(ref.clone(), ref, 0.01)
    assert torch.equal(on, ref)


def test_spread_points_gives_an_even_cloud():
    from fewflow.points.datasets import spread_points
    from fewflow.points.knn import pairwise_distances

    even = surface_clouds(4, 128, seed=2, kinds=("sphere",)).x.double()
    iid = surface_clouds(4, 128, seed=2, kinds=("sphere",), spread=1).x.double()
    assert even.shape == iid.shape == (4, 128, 3)

    def nn_gap(x: torch.Tensor) -> torch.Tensor:
        d = pairwise_distances(x, x) + torch.eye(x.shape[1], dtype=x.dtype) * 1e9
        return d.min(-1).values.min(-1).values

    # thinning 4x oversampled points by farthest point sampling removes close pairs
    assert bool((nn_gap(even) > 2 * nn_gap(iid)).all())
    big = torch.randn(300, 3, generator=_g(3), dtype=torch.float64)
    before = big.clone()
    sub = spread_points(big, 40)
    assert sub.shape == (40, 3) and torch.equal(big, before)
    # every kept point is one of the inputs
    assert float((sub[:, None] - big[None]).norm(dim=-1).min(-1).values.max()) == 0.0


def test_tiny_training_improves_over_the_untrained_field():
    torch.manual_seed(0)
    data = surface_clouds(32, 64, seed=0, kinds=("sphere",)).x
    held = surface_clouds(8, 64, seed=50, kinds=("sphere",)).x
    model = PointVelocity(k=8, widths=(16, 16, 32), hidden=32, time_dim=32)
    loss = PUFMLoss(4, 0.02)

    def held_loss() -> float:
        with torch.no_grad():
            return float(loss.loss_at(model, held, torch.linspace(0.05, 0.95, 7), _g(9)).mean())

    before = held_loss()  # the zero field: the mean squared displacement of the pairs
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = _g(1)
    for _ in range(60):
        idx = torch.randint(0, 32, (8,), generator=g)
        out = loss(model, data[idx], generator=g)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    after = held_loss()
    assert after < 0.995 * before, (before, after)  # a field uncorrelated with the targets would raise it


def test_refine_loss_is_zero_for_a_field_that_lands_on_the_dense_cloud():
    x1 = surface_clouds(2, 32, seed=4).x.double()

    class Oracle(torch.nn.Module):
        def forward(self, x, t):
            self.x0 = x
            return self.target - x

    oracle = Oracle()
    _, _, y = make_pairs(x1, 4, 0.02, _g(2), align=False)
    oracle.target = y
    out = PUFMRefineLoss(4, 0.02)(oracle, x1, generator=_g(2))
    assert float(out.loss) == pytest.approx(0.0, abs=1e-12)


def test_upsample_shapes_units_and_input_untouched():
    model = make_pufm_model(PUFMConfig(width=8, k=4), {"shape": [64, 3]}).double()
    sparse = (surface_clouds(1, 32, seed=5).x[0].double() * 3.0 + 10.0)
    before = sparse.clone()
    out = pufm_upsample(model, sparse, 4, schedule=3, manifold=0.0)
    assert out.shape == (128, 3) and out.dtype == torch.float64
    assert torch.equal(sparse, before)
    # an untrained (zero) field leaves the midpoint cloud in the input's units (up to FPS merging)
    assert float((out.mean(0) - sparse.mean(0)).norm()) < 1.0
    assert run_schedule(model) == pytest.approx([0, 1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1])
    batch = pufm_upsample(model, torch.stack([sparse, sparse]), 4, schedule=[0.0, 0.5, 1.0])
    assert batch.shape == (2, 128, 3)


def test_crop_patches_are_knn_balls():
    x = surface_clouds(3, 128, seed=11).x.double()
    p = crop_patches(x, 32, _g(4))
    assert p.shape == (3, 32, 3)
    for b in range(3):
        inside = {tuple(v) for v in p[b].tolist()}
        assert len(inside) == 32 and inside <= {tuple(v) for v in x[b].tolist()}
        out = torch.stack([v for v in x[b] if tuple(v.tolist()) not in inside])
        # some patch point (the seed) has all patch points nearer than every point outside the patch
        d_in = torch.cdist(p[b], p[b], compute_mode="donot_use_mm_for_euclid_dist").max(1).values
        d_out = torch.cdist(p[b], out, compute_mode="donot_use_mm_for_euclid_dist").min(1).values
        assert bool((d_in <= d_out).any())
    assert torch.equal(crop_patches(x, 128, _g(4)), x)


def test_patchwise_upsampling_with_the_zero_field_keeps_interpolated_or_input_points():
    from fewflow.points.upsample import midpoint_upsample

    model = make_pufm_model(PUFMConfig(width=8, k=4, patch=32), {"shape": [64, 3]}).double()
    assert int(model.pufm_patch) == 32
    sparse = surface_clouds(1, 64, seed=12).x[0, :32].double() * 2.0 + 1.0
    out = pufm_upsample(model, sparse, 4, schedule=2, manifold=0.0)
    assert out.shape == (128, 3)
    cand = torch.cat([midpoint_upsample(sparse, 4), sparse])
    gap = torch.cdist(out, cand, compute_mode="donot_use_mm_for_euclid_dist").min(1).values
    assert float(gap.max()) < 1e-9
    whole = pufm_upsample(model, sparse, 4, schedule=2, manifold=0.0, patch=0)
    assert whole.shape == (128, 3)
    with pytest.raises(FewflowError, match="patch"):
        PUFMLoss(patch=30)
    with pytest.raises(FewflowError, match="patch"):
        pufm_upsample(model, sparse, 4, patch=-1)


def test_registered_method_builds_trains_and_records_a_schedule():
    from fewflow.train import TrainConfig, train_stages

    spec = get_method("pufm")
    cfg = spec.make_config({"width": 8, "k": 4})
    data = surface_clouds(8, 64, seed=6)
    rec: dict = {}
    model = spec.make_model(cfg, {"shape": [64, 3]})
    ctx = BuildContext(data=data, path=None, record=rec.__setitem__, seed=0)
    stages = spec.build(cfg, ctx)
    assert [s.name for s in stages] == ["pufm_fm", "pufm_refine"]
    model, _, _ = train_stages(model, stages, data, TrainConfig(steps=4, batch_size=4, progress=False,
                                                                 log_every=0, device="cpu"))
    sched = rec["pufm_schedule"]
    assert len(sched) == cfg.steps + 1 and sched[0] == 0.0 and sched[-1] == 1.0
    assert all(b > a for a, b in zip(sched, sched[1:]))
    assert run_schedule(model) == pytest.approx(sched)
    # on patches: the losses see kNN patches, the network remembers the patch size
    cfg = spec.make_config({"width": 8, "k": 4, "patch": 32})
    model = spec.make_model(cfg, {"shape": [64, 3]})
    stages = spec.build(cfg, BuildContext(data=data, path=None, record=rec.__setitem__, seed=0))
    model, _, _ = train_stages(model, stages, data, TrainConfig(steps=2, batch_size=4, progress=False,
                                                                 log_every=0, device="cpu"))
    assert int(model.pufm_patch) == 32
    out = pufm_upsample(model.eval(), data.x[0, :16], 4, schedule=run_schedule(model))
    assert out.shape == (64, 3) and torch.isfinite(out).all()


def test_error_lines():
    loss = PUFMLoss()
    model = PointVelocity(k=4, widths=(8,), hidden=8, time_dim=8)
    with pytest.raises(FewflowError, match="divisible"):
        loss(model, torch.randn(2, 66, 3))
    with pytest.raises(FewflowError, match=r"\(B, N, 3\)"):
        loss(model, torch.randn(2, 64))
    with pytest.raises(FewflowError, match="ratio"):
        PUFMLoss(ratio=1)
    with pytest.raises(FewflowError, match="schedule"):
        pufm_upsample(model, torch.randn(32, 3), 4, schedule=[0.5, 0.2])
    with pytest.raises(FewflowError, match="non-finite"):
        pufm_upsample(model, torch.full((32, 3), float("nan")), 4)
    with pytest.raises(FewflowError, match="pufm upsamples"):
        get_method("pufm").sampling(model, PUFMConfig())
    with pytest.raises(FewflowError, match="point clouds"):
        make_pufm_model(PUFMConfig(), {"shape": [2]})


def test_cli_upsample_on_a_trained_run(tmp_path):
    from fewflow.cli.points import read_cloud, upsample_cmd
    from fewflow.points import write_ply
    from fewflow.runs import train_run, user_data_config

    rc = user_data_config("fewflow.points.datasets:surface_clouds", "pufm")
    rc = rc.replace({"method.width": 8, "method.k": 4, "train.steps": 2, "train.batch_size": 2,
                            "train.progress": False, "train.log_every": 0, "train.ckpt_every": 0})
    train_run(rc, tmp_path / "run", figures=False)
    sparse = surface_clouds(1, 64, seed=7).x[0]
    write_ply(tmp_path / "in.ply", sparse)
    r = CliRunner().invoke(upsample_cmd, [str(tmp_path / "run"), "--input", str(tmp_path / "in.ply"),
                                          "--out", str(tmp_path / "out.ply")])
    assert r.exit_code == 0, r.output
    out = read_cloud(tmp_path / "out.ply")
    assert out.shape == (256, 3) and torch.isfinite(out).all()
    r = CliRunner().invoke(upsample_cmd, [str(tmp_path / "run"), "--input", str(tmp_path / "in.ply"),
                                          "--out", str(tmp_path / "o.npy"), "--ratio", "3"])
    assert r.exit_code != 0 and "power" in str(r.exception)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_training_step_and_upsampling_on_cuda():
    model = PointVelocity(k=4, widths=(8, 8), hidden=8, time_dim=8).cuda()
    x1 = surface_clouds(2, 64, seed=8).x.cuda()
    out = PUFMLoss()(model, x1, generator=torch.Generator(device="cuda").manual_seed(0))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    up = pufm_upsample(model, x1[:, :16], 4, schedule=2)
    assert up.device.type == "cuda" and up.shape == (2, 64, 3)
    out = PUFMLoss(patch=32)(model, x1, generator=torch.Generator(device="cuda").manual_seed(1))
    assert torch.isfinite(out.loss)
    up = pufm_upsample(model, x1[:, :16], 4, schedule=2, patch=32)
    assert up.device.type == "cuda" and up.shape == (2, 64, 3) and torch.isfinite(up).all()
