"""Meta Flow Matching: the set encoder, the loss, sampling, and MFM's effect on unseen populations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial import cKDTree
from scipy.stats import wasserstein_distance

from fewflow._validate import FewflowError
from fewflow.bench.geo_mfm import population_distances
from fewflow.data.populations import gmm_patients, split_populations
from fewflow.methods import get_method
from fewflow.models.set_encoder import SetEncoder, knn_adjacency
from fewflow.objectives.metaflow import MetaFlowLoss, PopulationFlow, _EmbedAtStart, predict_population

torch.set_num_threads(1)


@pytest.mark.parametrize("kind", ["gcn", "deepsets"])
def test_set_encoder_is_permutation_invariant(kind):
    torch.manual_seed(0)
    enc = SetEncoder(3, embed_dim=8, hidden=16, layers=3, k=5, kind=kind).double()
    x = torch.randn(2, 40, 3, dtype=torch.float64)
    e = enc(x)
    perm = torch.randperm(40)
    torch.testing.assert_close(enc(x[:, perm]), e, atol=1e-12, rtol=0)
    torch.testing.assert_close(enc(x[1]), e[1], atol=1e-12, rtol=0)  # one set = a batch of one
    torch.testing.assert_close(e.norm(dim=1), torch.ones(2, dtype=torch.float64))
    assert not torch.allclose(enc(x[:, :, [1, 0, 2]]), e)  # but it does see the points


def test_knn_adjacency_matches_a_kd_tree():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((30, 2))
    k = 4
    _, idx = cKDTree(x).query(x, k + 1)  # the point itself first
    a = np.eye(30)
    for i, row in enumerate(idx):
        for j in row[1:]:
            a[i, j] = a[j, i] = 1.0
    dinv = 1 / np.sqrt(a.sum(1))
    expect = dinv[:, None] * a * dinv[None, :]
    got = knn_adjacency(torch.tensor(x)[None], k)[0].numpy()
    np.testing.assert_allclose(got, expect, atol=1e-12)


def test_distances_closed_forms():
    a = torch.randn(50, 2, generator=torch.Generator().manual_seed(0))
    d = population_distances(a, a)
    assert d["w2"] == pytest.approx(0.0, abs=1e-6) and d["w1"] == pytest.approx(0.0, abs=1e-9)
    d = population_distances(a, a + torch.tensor([3.0, 4.0]))  # a translation: W1 = W2 = |shift| = 5
    assert d["w1"] == pytest.approx(5.0, rel=1e-6) and d["w2"] == pytest.approx(5.0, rel=1e-6)
    u, v = torch.randn(40, 1), torch.randn(60, 1) + 0.5
    assert population_distances(u, v)["w1"] == pytest.approx(
        wasserstein_distance(u[:, 0].numpy(), v[:, 0].numpy()), rel=1e-6)


class _Const(torch.nn.Module):
    condition = "none"

    def __init__(self, value):
        super().__init__()
        self.value = torch.nn.Parameter(torch.tensor(value))

    def forward(self, x, t, **kw):
        return self.value.expand_as(x)


def test_loss_is_the_flow_matching_regression():
    # x1 = x0 + s: the target velocity of the linear path is s, so a constant field c has loss mean (s - c)^2
    x0 = torch.randn(64, 2)
    s = torch.tensor([1.0, -2.0])
    out = MetaFlowLoss(condition="none")(_Const([0.5, 0.0]), x0 + s, x0=x0,
                                          sets=x0[None], index=torch.zeros(64, dtype=torch.long))
    assert float(out.loss.detach()) == pytest.approx(((0.5 - 1.0) ** 2 + 2.0**2) / 2, rel=1e-6)


def test_encoder_gets_gradients_from_the_loss():
    pops = gmm_patients(patients=3, n=20, seed=0)
    m = PopulationFlow(2, "population", hidden=16, depth=1, embed_dim=4, gnn_hidden=8, gnn_layers=2, k=4)
    batches = pops.batches(3, 8, 20, torch.Generator().manual_seed(0))
    opt = torch.optim.SGD(m.parameters(), 0.1)
    for _ in range(2):  # the condition's embedding starts at zero, so the encoder learns from step 2 on
        b = next(batches)
        opt.zero_grad()
        MetaFlowLoss()(m, b.pop("x1"), **b).loss.backward()
        opt.step()
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in m.encoder.parameters())


def test_sampling_wrapper_embeds_the_start_population():
    torch.manual_seed(0)
    m = PopulationFlow(2, "population", hidden=16, depth=1, embed_dim=4, gnn_hidden=8, gnn_layers=2, k=4)
    x0 = torch.randn(30, 2)
    from fewflow.solvers import solve

    via_wrapper = solve(_EmbedAtStart(m), x0, steps=5, stepper="heun").x
    torch.testing.assert_close(via_wrapper, predict_population(m, x0, steps=5, stepper="heun"))


def test_mfm_beats_fm_on_unseen_patients():
    pops = gmm_patients(patients=16, n=48, types=2, strength=2.0, seed=0)
    tr, te = split_populations(pops, 0.25, seed=0)
    w2 = {}
    for cond in ("population", "none"):
        torch.manual_seed(0)
        m = PopulationFlow(2, cond, hidden=32, depth=2, embed_dim=8, gnn_hidden=16, gnn_layers=2, k=8)
        opt = torch.optim.Adam(m.parameters(), 3e-3)
        g = torch.Generator().manual_seed(0)
        batches, loss = tr.batches(4, 48, 48, g), MetaFlowLoss(condition=cond)
        for _ in range(120):
            b = next(batches)
            out = loss(m, b.pop("x1"), generator=g, **b)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
        w2[cond] = np.mean([population_distances(predict_population(m, te.sources[i], steps=10),
                                                 te.targets[i])["w2"] for i in range(len(te))])
    assert w2["population"] < 0.7 * w2["none"], w2


def test_registry_and_variants():
    spec = get_method("mfm")
    assert spec.needs.model == "custom" and spec.docs == "metaflow"
    assert get_method("mfm_fm").make_config().condition == "none"
    assert get_method("mfm_cgfm").make_config().condition == "id"


def test_errors():
    with pytest.raises(FewflowError, match="condition must be one of"):
        MetaFlowLoss(condition="bogus")
    with pytest.raises(FewflowError, match="--unconditional"):
        MetaFlowLoss(num_classes=3, label_dropout=0.1)
    m = PopulationFlow(2, "population", hidden=8, depth=1, embed_dim=4, gnn_hidden=4, gnn_layers=1, k=3)
    x = torch.randn(6, 2)
    with pytest.raises(FewflowError, match="sets must be"):
        MetaFlowLoss()(m, x, x0=x, sets=torch.randn(1, 6, 3), index=torch.zeros(6, dtype=torch.long))
    with pytest.raises(FewflowError, match="index must"):
        MetaFlowLoss()(m, x, x0=x, sets=x[None], index=torch.ones(6, dtype=torch.long))
    with pytest.raises(FewflowError, match="the model on 'population'"):
        MetaFlowLoss(condition="none")(m, x, x0=x, sets=x[None], index=torch.zeros(6, dtype=torch.long))
    with pytest.raises(FewflowError, match="SetEncoder expects"):
        SetEncoder(2)(torch.randn(5, 3))
    with pytest.raises(FewflowError, match="out of range"):
        PopulationFlow(2, "id", num_populations=3).population_condition(pid=torch.tensor([3]))
    with pytest.raises(FewflowError, match="points"):
        from fewflow.objectives.metaflow import make_population_flow

        make_population_flow(get_method("mfm").make_config(), {"shape": [1, 8, 8]})
