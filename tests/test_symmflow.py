"""SymmFlow: the two opposite interpolants, the exact field's classification on a Gaussian toy, a short
digits training that classifies and segments, generation shapes and the labels requirement."""

from __future__ import annotations

import math

import pytest
import torch

from fewflow import FewflowError
from fewflow.data import load_dataset
from fewflow.models.symm import SymmCodec, SymmFlowNet, digit_masks
from fewflow.objectives.symmflow import (
    SymmFlowConfig,
    SymmFlowLoss,
    SymmJointStepper,
    SymmJointVelocity,
    make_symmflow_model,
    mask_iou,
    symm_classify,
    symm_generate,
    symm_segment,
)
from fewflow.solvers import solve, uniform_grid

torch.set_num_threads(1)


def test_interpolants_ends_and_targets():
    loss = SymmFlowLoss(sigma_min=1e-4)
    g = torch.Generator().manual_seed(0)
    x, m = torch.randn(4, 1, 3, 3, generator=g), torch.randn(4, 2, 3, 3, generator=g)
    nx, nm = torch.randn(x.shape, generator=g), torch.randn(m.shape, generator=g)
    ones, zeros = torch.ones(4), torch.zeros(4)
    x0, m0, _, _ = loss.targets(x, m, nx, nm, zeros)
    x1, m1, _, _ = loss.targets(x, m, nx, nm, ones)
    # data channels: noise at t = 0, data at t = 1; semantic channels the other way round
    torch.testing.assert_close(x0, nx)
    torch.testing.assert_close(m0, m)
    torch.testing.assert_close(x1, x + 1e-4 * nx)
    torch.testing.assert_close(m1, nm + 1e-4 * m)
    # the targets are the time derivatives of the paths (central differences)
    t, h = torch.full((4,), 0.37, dtype=torch.float64), 1e-6
    xd, md, nxd, nmd = (v.double() for v in (x, m, nx, nm))
    lo, hi = loss.targets(xd, md, nxd, nmd, t - h), loss.targets(xd, md, nxd, nmd, t + h)
    _, _, ux, um = loss.targets(xd, md, nxd, nmd, t)
    torch.testing.assert_close(ux, (hi[0] - lo[0]) / (2 * h), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(um, (hi[1] - lo[1]) / (2 * h), rtol=1e-6, atol=1e-6)
    assert float((um * (nmd - md)).sum()) > 0  # the label channel moves towards its noise


def test_codec_round_trip_and_absent_parts():
    codec = SymmCodec(10, "onehot", beta=2.0, segment=True)
    x = torch.rand(6, 1, 4, 4) * 2 - 1
    y = torch.tensor([0, 3, 9, 10, 5, 1])
    mask = digit_masks(x)
    m, flags = codec.encode(y, x, mask)
    assert m.shape == (6, 11, 4, 4)
    assert flags.tolist() == [0, 0, 0, 1, 0, 0]  # y = K: no class
    assert codec.class_logits(m)[[0, 1, 2, 4, 5]].argmax(1).tolist() == [0, 3, 9, 5, 1]
    assert torch.equal(codec.mask(m), mask)
    assert bool((m[3, :10] == 0).all())
    _, flags = codec.encode(y.clamp(max=9), x, None)
    assert bool((flags == 2).all())
    scalar = SymmCodec(4, "scalar", beta=2.0)
    ms, _ = scalar.encode(torch.arange(4), x[:4], jitter=True, generator=torch.Generator().manual_seed(1))
    assert ms[:, 0].mean((1, 2)).sub(torch.tensor([-1.0, -1 / 3, 1 / 3, 1.0])).abs().max() < 1 / 3 / 2 + 1e-6
    assert scalar.class_logits(ms).argmax(1).tolist() == [0, 1, 2, 3]


class _ExactField:
    """The exact SymmFlow velocity of a Gaussian mixture (x | k ~ N(mu_k, s_k^2 I), class code c_k with
    N(0, tau^2) jitter), written out from the per-component Gaussian posteriors."""

    def __init__(self, mu, s, pk, codes, tau=0.05, smin=1e-4):
        self.mu, self.s, self.pk, self.codes, self.tau, self.smin = mu, s, pk, codes, tau, smin

    def __call__(self, z, t, y=None):
        d = self.mu.shape[1]
        x, m = z[:, :d], z[:, d:]
        t = t[:, None]
        a, da = 1 - (1 - self.smin) * t, -(1 - self.smin)
        vm = a * a * self.tau**2 + t * t
        logw, ux, um = [], [], []
        for k in range(len(self.pk)):
            vx = a * a + t * t * self.s[k] ** 2
            logw.append(-((x - t * self.mu[k]) ** 2).sum(1, keepdim=True) / (2 * vx) - d / 2 * torch.log(vx)
                        - ((m - a * self.codes[k]) ** 2).sum(1, keepdim=True) / (2 * vm)
                        + math.log(self.pk[k]))
            ux.append(self.mu[k] + (t * self.s[k] ** 2 + da * a) / vx * (x - t * self.mu[k]))
            um.append(da * self.codes[k] + (t + da * a * self.tau**2) / vm * (m - a * self.codes[k]))
        w = torch.softmax(torch.stack(logw), 0)
        return torch.cat([(w * torch.stack(ux)).sum(0), (w * torch.stack(um)).sum(0)], 1)


def test_exact_field_classification_on_a_gaussian_toy():
    dt = torch.float64
    mu = torch.tensor([[-1.0, 0.0], [1.0, 0.3], [0.0, 1.2]], dtype=dt)
    s, pk = [0.5, 0.8, 0.6], [0.5, 0.3, 0.2]
    codec = SymmCodec(3, "onehot", beta=2.0)
    field = _ExactField(mu, s, pk, codec.codes(mu))
    g = torch.Generator().manual_seed(0)
    n = 1500
    k = torch.multinomial(torch.tensor(pk, dtype=dt), n, replacement=True, generator=g)
    x = mu[k] + torch.tensor(s, dtype=dt)[k, None] * torch.randn(n, 2, generator=g, dtype=dt)
    logp = torch.stack([-((x - mu[j]) ** 2).sum(1) / (2 * s[j] ** 2) - 2 * math.log(s[j]) + math.log(pk[j])
                        for j in range(3)], 1)
    bayes = logp.argmax(1)
    bayes_acc = float((bayes == k).double().mean())
    pm = symm_classify(field, x, 60, stepper="rk4", codec=codec)
    acc_mean = float((pm.argmax(1) == k).double().mean())
    agree = float((pm.argmax(1) == bayes).double().mean())
    pn = symm_classify(field, x, 60, stepper="rk4", codec=codec, start="noise", generator=g)
    acc_noise = float((pn.argmax(1) == k).double().mean())
    # from the noise mean the exact field's decision is the Bayes classifier's up to a few percent
    assert abs(acc_mean - bayes_acc) < 0.02 and agree > 0.93, (acc_mean, bayes_acc, agree)
    # one noise draw loses the cross-time coupling: far below Bayes, still far above chance (0.5)
    assert 0.6 < acc_noise < bayes_acc - 0.08, (acc_noise, bayes_acc)
    torch.testing.assert_close(pm.sum(1), torch.ones(n, dtype=dt))


def _train_digits(steps: int = 250, seed: int = 0):
    torch.manual_seed(seed)
    tr = load_dataset("digits")
    meta = {"shape": [1, 8, 8], "num_classes": 10, "conditional": True, "value_range": [-1.0, 1.0]}
    net = make_symmflow_model(SymmFlowConfig(base=16), meta)
    loss = SymmFlowLoss(mask_dropout=0.1)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, tr.x.shape[0], (64,), generator=g)
        out = loss(net, tr.x[idx], y=tr.y[idx], generator=g)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    return net.eval(), tr


def test_short_digits_training_classifies_segments_and_generates():
    net, tr = _train_digits()
    te = load_dataset("digits", split="test")
    x, y = te.x[:200], te.y[:200]
    acc = float((symm_classify(net, x, 10).argmax(1) == y).float().mean())
    target = digit_masks(x)
    iou = float(mask_iou(symm_segment(net, x, 10), target).mean())
    prior = digit_masks(tr.x).float().mean(0, keepdim=True) > 0.5  # the mean training mask
    trivial = float(mask_iou(prior.expand_as(target), target).mean())
    assert acc > 0.5, acc  # chance: 0.1
    assert iou > trivial + 0.1, (iou, trivial)
    # generation: the data's shape, finite, and the stepper inside the shared loop is the joint ODE
    x0 = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    labels = torch.arange(8)
    direct = symm_generate(net, labels, 6, x0=x0)
    with torch.no_grad():
        looped = solve(SymmJointVelocity(net), x0, grid=uniform_grid(6), stepper=SymmJointStepper("euler"),
                       cond={"y": labels})
    assert direct.shape == (8, 1, 8, 8) and bool(torch.isfinite(direct).all())
    assert looped.nfe == 6
    torch.testing.assert_close(looped.x, direct)
    withmask = symm_generate(net, labels, 6, x0=x0, masks=digit_masks(x[:8]))
    assert withmask.shape == (8, 1, 8, 8) and not torch.allclose(withmask, direct)


def test_labels_are_required():
    meta = {"shape": [1, 8, 8], "num_classes": 10, "conditional": False, "value_range": [-1.0, 1.0]}
    with pytest.raises(FewflowError, match="labels"):
        make_symmflow_model(SymmFlowConfig(base=8), meta)
    net = make_symmflow_model(SymmFlowConfig(base=8), {**meta, "conditional": True})
    with pytest.raises(FewflowError, match="labels"):
        SymmFlowLoss()(net, torch.zeros(2, 1, 8, 8))
    with pytest.raises(FewflowError, match="labels must lie"):
        SymmFlowLoss()(net, torch.zeros(2, 1, 8, 8), y=torch.tensor([0, 11]))
    with pytest.raises(FewflowError, match="image"):
        SymmFlowNet([2], SymmCodec(2, segment=True))
