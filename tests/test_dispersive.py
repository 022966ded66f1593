"""The dispersive regularisers of MP1 / DM1 ("Diffuse and Disperse", arXiv 2506.09027) against independent
numpy / scipy computations, their invariances, and the hooks that read a network's representation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist
from scipy.special import logsumexp

from fewflow import FewflowError
from fewflow.models import MLP
from fewflow.models.policy import ActionChunkNet
from fewflow.objectives.mp1 import (
    DISPERSIVE,
    dispersive_covariance,
    dispersive_hinge,
    dispersive_infonce_cosine,
    dispersive_infonce_l2,
    dispersive_loss,
    representations,
)


@pytest.fixture
def z(gen: torch.Generator) -> torch.Tensor:
    return torch.randn(7, 5, generator=gen, dtype=torch.float64)


def test_infonce_l2_hand_computed() -> None:
    # three points on a line: squared distances 0, 1, 4 -> L = log mean exp(-D / tau)
    z = torch.tensor([[0.0], [1.0], [2.0]], dtype=torch.float64)
    d = np.array([[0, 1, 4], [1, 0, 1], [4, 1, 0]], dtype=float)
    want = math.log(np.exp(-d / 2.0).mean())
    assert float(dispersive_infonce_l2(z, tau=2.0, normalize=False)) == pytest.approx(want, rel=1e-12)
    want_norm = math.log(np.exp(-(d / 4.0) / 0.5).mean())  # MP1's D / max D
    assert float(dispersive_infonce_l2(z, tau=0.5, normalize=True)) == pytest.approx(want_norm, rel=1e-12)


def test_infonce_l2_against_scipy(z: torch.Tensor) -> None:
    a = z.numpy()
    d = cdist(a, a, "sqeuclidean")
    for tau in (0.1, 1.0, 3.0):
        want = logsumexp(-d / tau) - 2 * math.log(len(a))
        assert float(dispersive_infonce_l2(z, tau, normalize=False)) == pytest.approx(want, rel=1e-10)
        want_n = logsumexp(-d / d.max() / tau) - 2 * math.log(len(a))
        assert float(dispersive_infonce_l2(z, tau, normalize=True)) == pytest.approx(want_n, rel=1e-10)


def test_infonce_cosine_against_scipy(z: torch.Tensor) -> None:
    a = z.numpy()
    d = cdist(a, a, "cosine")  # 1 - cos
    want = logsumexp(-d / 0.5) - 2 * math.log(len(a))
    assert float(dispersive_infonce_cosine(z, 0.5)) == pytest.approx(want, rel=1e-10)


def test_hinge_against_scipy(z: torch.Tensor) -> None:
    a = z.numpy()
    d = cdist(a, a, "sqeuclidean")
    off = ~np.eye(len(a), dtype=bool)
    for margin in (1.0, 20.0):
        want = (np.maximum(0.0, margin - d[off]) ** 2).mean()
        assert float(dispersive_hinge(z, margin)) == pytest.approx(want, rel=1e-10)
    # two points 0.5 apart (D = 0.25) with margin 1: (1 - 0.25)^2 on both ordered pairs
    two = torch.tensor([[0.0, 0.0], [0.5, 0.0]], dtype=torch.float64)
    assert float(dispersive_hinge(two, 1.0)) == pytest.approx(0.75**2)


def test_covariance_against_numpy(z: torch.Tensor) -> None:
    a = z.numpy()
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    cov = np.cov(a, rowvar=False)  # unbiased, features in columns
    want = (cov**2).sum() - (np.diag(cov) ** 2).sum()
    assert float(dispersive_covariance(z)) == pytest.approx(want, rel=1e-10)


def test_invariances(z: torch.Tensor, gen: torch.Generator) -> None:
    perm = torch.randperm(z.shape[0], generator=gen)
    shift = torch.randn(1, z.shape[1], generator=gen, dtype=z.dtype)
    q, _ = torch.linalg.qr(torch.randn(z.shape[1], z.shape[1], generator=gen, dtype=z.dtype))
    for kind in DISPERSIVE[1:]:
        base = float(dispersive_loss(z, kind))
        assert float(dispersive_loss(z[perm], kind)) == pytest.approx(base, rel=1e-10), kind
    for kind in ("infonce_l2", "hinge"):  # pairwise distances: translations and rotations
        base = float(dispersive_loss(z, kind))
        assert float(dispersive_loss(z + shift, kind)) == pytest.approx(base, rel=1e-9), kind
        assert float(dispersive_loss(z @ q, kind)) == pytest.approx(base, rel=1e-9), kind
    # normalised InfoNCE-L2 and the cosine and covariance forms do not see the overall scale
    for kind in ("infonce_l2", "infonce_cosine", "covariance"):
        base = float(dispersive_loss(z, kind))
        assert float(dispersive_loss(3.7 * z, kind)) == pytest.approx(base, rel=1e-9), kind
    # the cosine form does not see each row's own scale either
    rows = torch.rand(z.shape[0], 1, generator=gen, dtype=z.dtype) + 0.5
    assert float(dispersive_infonce_cosine(rows * z)) == pytest.approx(float(dispersive_infonce_cosine(z)))
    # ... while the unnormalised InfoNCE-L2 does: spreading the batch lowers it
    wide, narrow = dispersive_infonce_l2(2 * z, normalize=False), dispersive_infonce_l2(z, normalize=False)
    assert float(wide) < float(narrow)


def test_gradient_spreads_points() -> None:
    # one gradient step on every loss moves two close points apart (or decorrelates)
    z = torch.tensor([[0.0, 0.0], [0.1, 0.0], [0.0, 2.0]], dtype=torch.float64, requires_grad=True)
    for kind in ("infonce_l2", "hinge"):
        loss = dispersive_loss(z, kind, normalize=False)
        (g,) = torch.autograd.grad(loss, z)
        moved = z.detach() - 0.1 * g
        assert float((moved[0] - moved[1]).norm()) > 0.1, kind


def test_degenerate_and_bad_inputs(z: torch.Tensor) -> None:
    one = z[:1].clone().requires_grad_(True)
    for kind in DISPERSIVE:
        out = dispersive_loss(one, kind)
        assert float(out.detach()) == 0.0 and out.requires_grad
    # identical rows: finite values and finite gradients (no sqrt at zero distance)
    same = torch.ones(4, 3, dtype=torch.float64, requires_grad=True)
    for kind in DISPERSIVE[1:]:
        (g,) = torch.autograd.grad(dispersive_loss(same, kind), same, allow_unused=True)
        assert g is None or bool(torch.isfinite(g).all()), kind
    with pytest.raises(FewflowError, match="dispersive loss"):
        dispersive_loss(z, "infonce")
    with pytest.raises(FewflowError, match="tau"):
        dispersive_infonce_l2(z, tau=0.0)
    with pytest.raises(FewflowError, match="empty"):
        dispersive_hinge(z[:0])
    z_in = z.clone()
    dispersive_covariance(z)
    assert torch.equal(z, z_in)


def test_representations_of_policy_net_and_mlp(gen: torch.Generator) -> None:
    x, c = torch.randn(5, 16, generator=gen), torch.randn(5, 4, generator=gen)
    s, t = torch.zeros(5), torch.ones(5)
    net = ActionChunkNet((16,), cond_shape=(4,), flow_map=True, hidden=32, depth=3)
    feats = representations(net, x, s, t, c=c)
    assert len(feats) == 2 and all(f.shape == (5, 32) for f in feats)
    out, same = net.forward_features(x, s, t, c=c)
    assert torch.allclose(out, net(x, s, t, c=c)) and torch.allclose(same[0], feats[0])
    mlp = MLP(16, hidden=24, depth=4, flow_map=True, time_features="fourier", cond_dim=4)
    hooked = representations(mlp, x, s, t, c=c)
    assert len(hooked) == 3 and hooked[0].shape == (5, 24)
    assert not any(b._forward_hooks for b in mlp.blocks)  # hooks removed

    class Bare(torch.nn.Module):
        def forward(self, x, s, t, **kw):
            return x

    with pytest.raises(FewflowError, match="intermediate representation"):
        representations(Bare(), x, s, t)
