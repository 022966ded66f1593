"""The ``flowvid`` method: CFM with FlowVid's image condition and its dropout, a tiny train step, the
flow-conditioned pipeline on a trained-for-seconds model, and errors."""

from __future__ import annotations

import pytest
import torch

from fewflow import FewflowError
from fewflow.couplings.base import rand
from fewflow.methods import get_method
from fewflow.models import UNet
from fewflow.motion.editing import (
    compose_flows,
    compose_forward,
    flowvid_edit,
    sdedit,
    structure_editor,
    structure_map,
    training_pairs,
)
from fewflow.motion.sprites import sprite_video
from fewflow.objectives.cfm import CFMLoss
from fewflow.objectives.flowvid import FlowVidLoss, condition_layout
from fewflow.paths import AffinePath, LinearSchedule

torch.set_num_threads(1)
PATH = AffinePath(LinearSchedule())


class Spy(torch.nn.Module):
    """A velocity model that records the condition it was called with."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.5))
        self.seen: list[torch.Tensor] = []

    def forward(self, x, t, c=None, c_mask=None):
        self.seen.append(c)
        return self.w * x + (0.0 if c is None else c[:, : x.shape[1]])


def _batch(b: int = 6, ch: int = 3, size: int = 8, structure: bool = True):
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(b, ch, size, size, generator=g)
    c = torch.rand(b, ch + 1 + int(structure), size, size, generator=g) + 0.5
    return x1, c


def test_loss_is_cfm_after_condition_dropout():
    x1, c = _batch()
    c_before = c.clone()
    model = Spy()
    out = FlowVidLoss(PATH, flow_dropout=0.0)(model, x1, generator=torch.Generator().manual_seed(3), c=c)
    g2 = torch.Generator().manual_seed(3)
    rand(6, x1, g2), rand(6, x1, g2)  # the two dropout draws
    ref = CFMLoss(PATH)(model, x1, generator=g2, c=c)
    assert float(out.loss.detach()) == pytest.approx(float(ref.loss.detach()), rel=1e-6)
    assert torch.equal(c, c_before) and torch.equal(model.seen[0], c)  # nothing dropped, input intact
    assert out.diagnostics["flow_dropped"] == 0.0


def test_flow_dropout_zeroes_warp_and_mask_keeps_structure():
    x1, c = _batch()
    model = Spy()
    FlowVidLoss(PATH, flow_dropout=1.0)(model, x1, generator=torch.Generator().manual_seed(0), c=c)
    seen = model.seen[0]
    assert torch.equal(seen[:, :4], torch.zeros_like(seen[:, :4])) and torch.equal(seen[:, 4], c[:, 4])
    model = Spy()
    FlowVidLoss(PATH, flow_dropout=0.0, structure_dropout=1.0)(model, x1, c=c)
    assert torch.equal(model.seen[0][:, :4], c[:, :4]) and float(model.seen[0][:, 4].abs().sum()) == 0
    # the rate: about half the rows at 0.5
    loss = FlowVidLoss(PATH, flow_dropout=0.5)
    _, dropped = loss.drop_conditions(torch.zeros(4000, 3, 2, 2), torch.ones(4000, 5, 2, 2),
                                      torch.Generator().manual_seed(0))
    assert float(dropped.float().mean()) == pytest.approx(0.5, abs=0.03)


def test_without_a_condition_it_is_plain_cfm():
    x = torch.randn(8, 2)
    model = Spy()
    a = FlowVidLoss(PATH)(model, x, generator=torch.Generator().manual_seed(1))
    b = CFMLoss(PATH)(model, x, generator=torch.Generator().manual_seed(1))
    assert float(a.loss.detach()) == float(b.loss.detach())


def test_condition_layout_and_errors():
    assert condition_layout(3, 5) == (slice(0, 3), slice(3, 4), slice(4, 5))
    assert condition_layout(1, 2)[2] == slice(2, 2)
    x1, c = _batch()
    loss = FlowVidLoss(PATH)
    with pytest.raises(FewflowError, match="warped"):
        loss(Spy(), x1, c=c[:, :3])
    with pytest.raises(FewflowError, match="must match frames"):
        loss(Spy(), x1, c=c[:, :, :4, :4])
    with pytest.raises(FewflowError, match="image condition"):
        loss(Spy(), x1, c=c.flatten(1))
    with pytest.raises(FewflowError, match="flow_dropout"):
        FlowVidLoss(PATH, flow_dropout=1.5)


def test_registered_with_its_config():
    spec = get_method("flowvid")
    cfg = spec.make_config({"flow_dropout": 0.2})
    assert cfg.flow_dropout == 0.2 and spec.needs.coupling == "fixed"


def _tiny_setup(steps: int):
    vids = [sprite_video(4, 16, 1, 3, seed=s) for s in (1, 2, 3, 5)]
    data = training_pairs(vids, max_flow_noise=1.0, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    net = UNet(in_channels=3, base=8, mults=(1, 2), size=16, attention=False, cond_channels=5)
    loss = FlowVidLoss(PATH, flow_dropout=0.1)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        out = loss(net, data.x, generator=g, c=data.c)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
    return vids, net, losses


def test_tiny_train_step_and_pipeline():
    vids, net, losses = _tiny_setup(25)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5  # it learns
    v = vids[0]
    x = 2 * v.frames - 1
    s = structure_map(v.frames)
    g = torch.Generator().manual_seed(0)
    out = flowvid_edit(net, x[0], compose_flows(v.flow_bw), compose_forward(v.flow_fw), structure=s, steps=4,
                       generator=g)
    assert out.shape == x.shape and torch.isfinite(out).all() and torch.equal(out[0], x[0])
    assert structure_editor(net, s, 3, steps=3, generator=g).shape == x.shape
    edited = sdedit(net, x, s, strength=0.5, steps=4, generator=g)
    assert edited.shape == x.shape and not torch.equal(edited, x)
