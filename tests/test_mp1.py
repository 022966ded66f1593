"""MP1 (MeanFlow action-chunk policy, arXiv 2507.10543) with DM1's dispersive term (arXiv 2510.07865):
the loss is MeanFlow's plus the weighted regulariser, and one network evaluation reproduces both modes of
a bimodal action distribution."""

from __future__ import annotations

import pytest
import torch

from fewflow import FewflowError
from fewflow.methods import get_method
from fewflow.models.policy import ActionChunkNet
from fewflow.objectives.meanflow import MeanFlowLoss, TimePairSampler
from fewflow.objectives.mp1 import MP1Loss, dispersive_loss, representations


def _net(dim: int = 4, cond: int = 3, depth: int = 3) -> ActionChunkNet:
    torch.manual_seed(0)
    net = ActionChunkNet((dim,), cond_shape=(cond,), flow_map=True, hidden=32, depth=depth)
    with torch.no_grad():  # randomise the zero-initialised FiLM maps so times and c matter
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net


def test_without_dispersion_it_is_meanflow(gen: torch.Generator) -> None:
    net = _net()
    x1, c = torch.randn(16, 4, generator=gen), torch.randn(16, 3, generator=gen)
    kw = dict(time_sampler=TimePairSampler.uniform(), ratio=0.5, adaptive_p=0.5, reduction="mean")
    a = MP1Loss(**kw)(net, x1, generator=torch.Generator().manual_seed(3), c=c)
    b = MeanFlowLoss(**kw)(net, x1, generator=torch.Generator().manual_seed(3), c=c)
    assert float(a.loss.detach()) == pytest.approx(float(b.loss.detach()), rel=1e-6)


@pytest.mark.parametrize("kind", ["infonce_l2", "infonce_cosine", "hinge", "covariance"])
def test_dispersive_term_is_added_at_the_training_points(kind: str) -> None:
    net = _net()
    g = torch.Generator().manual_seed(1)
    x0, x1 = torch.randn(12, 4, generator=g), torch.randn(12, 4, generator=g)
    c = torch.randn(12, 3, generator=g)
    s, t = torch.sort(torch.rand(2, 12, generator=g), dim=0).values
    plain = MeanFlowLoss(ratio=0.5, adaptive_p=0.5, reduction="mean").loss_at(net, x0, x1, s, t, c=c)
    loss = MP1Loss(dispersive=kind, dispersive_weight=0.3).loss_at(net, x0, x1, s, t, c=c)
    x_s = s[:, None] * x1 + (1 - s[:, None]) * x0
    disp = sum(dispersive_loss(f, kind) for f in representations(net, x_s, s, t, c=c))
    want = float(plain.loss.detach()) + 0.3 * float(disp.detach())
    assert float(loss.loss.detach()) == pytest.approx(want, rel=1e-5)
    assert loss.diagnostics["dispersive"] == pytest.approx(float(disp.detach()), rel=1e-5)
    loss.loss.backward()
    assert all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in net.parameters())


def test_bimodal_actions_in_one_step() -> None:
    """Actions +1 or -1 with equal probability for the same observation: the 1-NFE samples must cover both
    modes (a regressor would predict their mean, 0). Settings: fewflow's small-scale MP1 (uniform time
    pairs, 75% of rows with s != t, MeanFlow's adaptive weight p = 1)."""
    torch.manual_seed(0)
    net = ActionChunkNet((1,), cond_shape=(2,), flow_map=True, hidden=64, depth=2)
    loss = MP1Loss(time_sampler=TimePairSampler.uniform(), ratio=0.75, adaptive_p=1.0)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    obs = torch.tensor([[0.3, -0.2]])
    for _ in range(120):
        x1 = torch.where(torch.rand(256, 1, generator=g) < 0.5, -1.0, 1.0)
        out = loss(net, x1, generator=g, c=obs.expand(256, 2))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    with torch.no_grad():
        x0 = torch.randn(4000, 1, generator=g)
        a = x0 + net(x0, torch.zeros(4000), torch.ones(4000), c=obs.expand(4000, 2))
    pos, neg = float((a > 0.5).float().mean()), float((a < -0.5).float().mean())
    assert pos > 0.35 and neg > 0.35, (pos, neg)  # both modes, each near half of the samples
    assert float((a.abs() < 0.3).float().mean()) < 0.08  # little mass between them


def test_method_registration_and_settings() -> None:
    spec = get_method("mp1")
    assert spec.flow_map and spec.sampler.nfe == 1 and spec.sampler.stepper == "flow_map"
    cfg = spec.make_config({"dispersive": "hinge", "dispersive_weight": "0.25"})
    assert cfg.dispersive == "hinge" and cfg.dispersive_weight == 0.25
    d = spec.make_config()
    assert (d.ratio, d.adaptive_p, d.dispersive_weight, d.dispersive_tau, d.reduction) == (
        0.5, 0.5, 0.5, 1.0, "mean")  # MP1's flow_ratio 0.5, gamma 0.5, lambda 0.5, tau 1
    with pytest.raises(FewflowError, match="dispersive"):
        MP1Loss(dispersive="infonce")
    with pytest.raises(FewflowError, match="dispersive_tau"):
        MP1Loss(dispersive="infonce_l2", dispersive_tau=0.0)


def test_policy_net_errors_and_inputs_untouched(gen: torch.Generator) -> None:
    net = _net()
    x, c = torch.randn(3, 4, generator=gen), torch.randn(3, 3, generator=gen)
    xc, cc = x.clone(), c.clone()
    out = net(x, torch.zeros(3), torch.ones(3), c=c)
    assert out.shape == x.shape and torch.equal(x, xc) and torch.equal(c, cc)
    with pytest.raises(FewflowError, match="observation condition c"):
        net(x, torch.zeros(3), torch.ones(3), c=torch.randn(3, 5))
    with pytest.raises(FewflowError, match="action chunks of 4"):
        net(torch.randn(3, 5), torch.zeros(3), torch.ones(3), c=c)
    with pytest.raises(FewflowError, match="flow-map model"):
        net(x, torch.ones(3), c=c)
    # a null condition (c_mask False) differs from the real one only through the learned null embedding
    null = net(x, torch.zeros(3), torch.ones(3), c=c, c_mask=torch.zeros(3, dtype=torch.bool))
    assert null.shape == x.shape
