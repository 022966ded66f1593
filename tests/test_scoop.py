"""SCOOP (arXiv 2211.14020): Sinkhorn plan, losses, correspondence model, refinement, training, files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fewflow._validate import FewflowError
from fewflow.points.sceneflow import make_pair, make_pairs, scene_flow_metrics
from fewflow.points.scoop import (
    ScoopConfig,
    ScoopNet,
    estimate_flow,
    load_scoop,
    refine_flow,
    save_scoop,
    scoop_loss,
    sinkhorn_plan,
    smoothness_loss,
    train_scoop,
    weighted_chamfer,
)

torch.set_num_threads(1)

TINY = {"channels": 8, "graph_k": 8, "smooth_k": 8, "cross_recon_k": 8}


def test_smoothness_of_rigid_translation_is_zero():
    x = torch.rand(2, 40, 3)
    from fewflow.points.knn import knn_graph

    nbr = knn_graph(x, 6)
    flow = torch.tensor([0.3, -0.1, 0.2]).expand(2, 40, 3)
    assert float(smoothness_loss(flow, nbr)) == 0.0
    # two points, each the other's neighbour, flows differing by (1, 2, 0): mean L1 = 3
    f = torch.tensor([[[0.0, 0.0, 0.0], [1.0, 2.0, 0.0]]])
    assert float(smoothness_loss(f, torch.tensor([[[1], [0]]]))) == pytest.approx(3.0)


def test_weighted_chamfer_against_brute_force():
    from scipy.spatial import cKDTree

    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(1, 30, 3, generator=g, dtype=torch.float64), torch.rand(1, 25, 3, generator=g,
                                                                              dtype=torch.float64)
    w = torch.rand(1, 30, generator=g, dtype=torch.float64)
    d1 = cKDTree(b[0].numpy()).query(a[0].numpy())[0] ** 2
    d2 = cKDTree(a[0].numpy()).query(b[0].numpy())[0] ** 2
    want = float(np.mean(w[0].numpy() * d1) + 0.5 * np.mean(d2))
    assert float(weighted_chamfer(a, b, w, 0.5)) == pytest.approx(want, rel=1e-10)
    a.requires_grad_(True)
    weighted_chamfer(a, b).backward()
    assert torch.isfinite(a.grad).all()


@pytest.mark.filterwarnings("ignore:If reg_type = entropy")
def test_sinkhorn_matches_pot_unbalanced():
    import ot

    g = torch.Generator().manual_seed(1)
    f1, f2 = torch.randn(1, 12, 5, generator=g, dtype=torch.float64), torch.randn(1, 9, 5, generator=g,
                                                                                 dtype=torch.float64)
    p1, p2 = torch.rand(1, 12, 3, dtype=torch.float64), torch.rand(1, 9, 3, dtype=torch.float64)
    eps, gamma = 0.3, 0.7
    plan, sim = sinkhorn_plan(f1, f2, p1, p2, eps, gamma, iters=2000)
    cost = (1.0 - sim[0]).numpy()
    want = ot.unbalanced.sinkhorn_unbalanced(np.full(12, 1 / 12), np.full(9, 1 / 9), cost, eps, gamma,
                                             reg_type="entropy", numItermax=5000, stopThr=1e-14)
    assert np.allclose(plan[0].numpy(), want, rtol=1e-5, atol=1e-6 * want.max())
    # iters = 0: the Gibbs kernel
    k, _ = sinkhorn_plan(f1, f2, p1, p2, eps, gamma, iters=0)
    assert torch.allclose(k[0], torch.exp(-torch.from_numpy(cost) / eps))


def test_sinkhorn_recovers_a_permutation():
    g = torch.Generator().manual_seed(2)
    n = 40
    feat = torch.randn(1, n, 16, generator=g)
    pos = torch.rand(1, n, 3, generator=g)
    perm = torch.randperm(n, generator=g)
    plan, _ = sinkhorn_plan(feat, feat[:, perm], pos, pos[:, perm], 0.05, 10.0, iters=50)
    # source point i sits at target index j with perm[j] = i
    inv = torch.argsort(perm)
    assert torch.equal(plan[0].argmax(1), inv)
    assert float(plan.sum()) == pytest.approx(1.0, abs=0.05)


def test_features_are_permutation_equivariant():
    torch.manual_seed(0)
    net = ScoopNet(ScoopConfig(**TINY)).eval()
    x = make_pair("superquadric", 96, seed=4).source
    perm = torch.randperm(96)
    with torch.no_grad():
        h, _ = net.features(x)
        hp, _ = net.features(x[:, perm])
        out = net(x, x[:, perm])
    assert h.shape == (1, 96, 32)
    assert torch.allclose(hp, h[:, perm], atol=1e-5)
    assert out.flow.shape == (1, 96, 3) and out.conf.shape == (1, 96)
    assert float(out.conf.min()) >= 0.0 and float(out.conf.max()) <= 1.0 + 1e-6


def test_refinement_lowers_epe_on_a_rigid_case():
    from fewflow.points.surfaces import Sphere

    g = torch.Generator().manual_seed(0)
    shift = torch.tensor([0.3, 0.1, 0.0])
    src, tgt = Sphere().sample(256, g)[None], Sphere().sample(256, g)[None] + shift
    gt = shift.expand(1, 256, 3)
    keep = src.clone()
    zero = torch.zeros_like(gt)
    res = refine_flow(src, tgt, zero, steps=100, lr=0.05, smooth_k=16, gt_flow=gt)
    before = scene_flow_metrics(zero, gt)["epe3d"]
    after = scene_flow_metrics(res.flow, gt)["epe3d"]
    assert before == pytest.approx(float(shift.norm()), rel=1e-6)
    assert after < 0.15 * before
    assert res.epe is not None and len(res.epe) == 101 and res.epe[0] == pytest.approx(before, rel=1e-5)
    assert res.loss[-1] < res.loss[0]
    assert torch.equal(keep, src) and float(zero.abs().max()) == 0.0  # inputs untouched
    # unbatched input gives an unbatched result
    one = refine_flow(src[0], tgt[0], zero[0], torch.ones(256), steps=3)
    assert one.flow.shape == (256, 3)


def test_train_estimate_save_load(tmp_path):
    pairs = make_pairs(4, n_points=64, seed=0)
    cfg = ScoopConfig(**TINY, epochs=12, batch_size=2, refine_steps=5)
    seen: list[float] = []
    net = train_scoop(cfg, pairs, seed=0, log=lambda s, d: seen.append(d["loss"]))
    assert len(seen) == 24 and all(np.isfinite(seen))
    assert np.mean(seen[-4:]) < np.mean(seen[:4])  # the self-supervised loss decreases
    est = estimate_flow(net, pairs.source, pairs.target)
    assert est.flow.shape == pairs.flow.shape and est.conf.shape == (4, 64)
    assert len(est.refine_loss) == 5
    save_scoop(net, tmp_path / "m")
    back = load_scoop(tmp_path / "m")
    assert back.config == cfg
    est2 = estimate_flow(back, pairs.source, pairs.target, refine=False)
    assert torch.allclose(est2.flow, est.flow0, atol=1e-6)
    # a loss from a tuple (source, target) works the same
    out = net(pairs.source[:1], pairs.target[:1])
    loss, terms = scoop_loss(out, pairs.target[:1], cfg)
    assert np.isfinite(float(loss.detach())) and {"recon", "conf", "smooth", "loss"} <= set(terms)


def test_errors(tmp_path):
    with pytest.raises(FewflowError, match="channels"):
        ScoopConfig(channels=0)
    with pytest.raises(FewflowError, match="refine_lr"):
        ScoopConfig(refine_lr=float("nan"))
    with pytest.raises(FewflowError, match="refine_lr must be a number"):
        ScoopConfig(refine_lr="fast")
    with pytest.raises(FewflowError, match="use_corr_conf"):
        ScoopConfig(use_corr_conf="yes")
    assert ScoopConfig(refine_lr=1).refine_lr == 1.0 and isinstance(ScoopConfig(refine_lr=1).refine_lr, float)
    with pytest.raises(FewflowError, match="smooth_k"):
        ScoopConfig.from_dict({"smooth_kk": 3})
    x = torch.rand(1, 10, 3)
    with pytest.raises(FewflowError, match="flow must match"):
        refine_flow(x, x, torch.zeros(1, 9, 3))
    with pytest.raises(FewflowError, match="non-finite"):
        refine_flow(x, x, torch.full((1, 10, 3), float("nan")))
    with pytest.raises(FewflowError, match="conf must have shape"):
        refine_flow(x, x, torch.zeros(1, 10, 3), torch.ones(1, 9))
    with pytest.raises(FewflowError, match="point cloud"):
        ScoopNet(ScoopConfig(**TINY))(torch.rand(1, 10, 2), x)
    with pytest.raises(FewflowError, match="SceneFlowPairs"):
        train_scoop(ScoopConfig(**TINY), x)
    with pytest.raises(FewflowError, match="not a saved SCOOP model"):
        load_scoop(tmp_path / "nothing")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_cuda():
    pairs = make_pairs(2, n_points=64, seed=0).to("cuda")
    net = ScoopNet(ScoopConfig(**TINY, refine_steps=3)).to("cuda")
    est = estimate_flow(net, pairs.source, pairs.target)
    assert est.flow.device.type == "cuda" and torch.isfinite(est.flow).all()
    res = refine_flow(pairs.source, pairs.target, est.flow0, est.conf, steps=3)
    assert res.flow.device.type == "cuda"
