"""Classifier-free guidance in one batched forward (fewflow.guidance)."""

from __future__ import annotations

import pytest
import torch

from fewflow import FewflowError
from fewflow.guidance import CFG
from fewflow.solvers import solve

K = 3  # classes 0..2, null class 3
A = torch.tensor([0.5, -1.0, 2.0, 0.1])  # per-label slope (index 3 = null)
B = torch.tensor([1.0, 3.0, -2.0, 0.0])  # per-label offset


class ToyVelocity:
    """v(x, t, y) = A[y] x + B[y] t + e, with e an optional extra keyword tensor; counts forwards."""

    is_flow_map = False

    def __init__(self):
        self.batches = []

    def __call__(self, x, t, y=None, extra=None):
        self.batches.append(x.shape[0])
        out = A[y][:, None] * x + (B[y] * t)[:, None]
        return out if extra is None else out + extra

    @staticmethod
    def reference(x, t, y, extra=None):
        out = A[y][:, None] * x + (B[y] * t)[:, None]
        return out if extra is None else out + extra


class ToyFlowMap:
    """u(x, s, t, y) = B[y] (t - s) + A[y] x (a flow-map model)."""

    is_flow_map = True

    def __init__(self):
        self.batches = []

    def __call__(self, x, s, t, y=None):
        self.batches.append(x.shape[0])
        return A[y][:, None] * x + (B[y] * (t - s))[:, None]


def _inputs(b=5):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, 2, generator=g)
    t = torch.rand(b, generator=g)
    y = torch.randint(0, K, (b,), generator=g)
    return x, t, y


@pytest.mark.parametrize("w", [0.0, 2.5, -1.0])
def test_cfg_formula_and_one_forward(w):
    model = ToyVelocity()
    cfg = CFG(model, w, num_classes=K)
    x, t, y = _inputs()
    out = cfg(x, t, y=y)
    v_c = ToyVelocity.reference(x, t, y)
    v_u = ToyVelocity.reference(x, t, torch.full_like(y, K))
    assert torch.allclose(out, v_u + w * (v_c - v_u), atol=1e-6)
    assert model.batches == [2 * x.shape[0]]  # exactly one batched forward
    assert not cfg.is_flow_map


def test_scale_one_is_conditional_with_half_batch():
    model = ToyVelocity()
    x, t, y = _inputs()
    out = CFG(model, 1.0, K)(x, t, y=y)
    assert torch.allclose(out, ToyVelocity.reference(x, t, y))
    assert model.batches == [x.shape[0]]


def test_extra_cond_is_duplicated():
    """A keyword other than y / c (which have null values) reaches both halves unchanged."""
    model = ToyVelocity()
    x, t, y = _inputs()
    e = torch.randn(x.shape[0], 2)
    out = CFG(model, 3.0, K)(x, t, y=y, extra=e)
    v_c = ToyVelocity.reference(x, t, y, e)
    v_u = ToyVelocity.reference(x, t, torch.full_like(y, K), e)
    assert torch.allclose(out, v_u + 3.0 * (v_c - v_u), atol=1e-6)


def test_interval():
    model = ToyVelocity()
    cfg = CFG(model, 4.0, K, interval=(0.2, 0.6))
    x, _, y = _inputs(4)
    v_c = lambda t: ToyVelocity.reference(x, t, y)  # noqa: E731
    v_u = lambda t: ToyVelocity.reference(x, t, torch.full_like(y, K))  # noqa: E731
    inside = torch.full((4,), 0.4)
    assert torch.allclose(cfg(x, inside, y=y), v_u(inside) + 4.0 * (v_c(inside) - v_u(inside)), atol=1e-6)
    outside = torch.full((4,), 0.9)
    assert torch.allclose(cfg(x, outside, y=y), v_c(outside))
    assert model.batches == [8, 4]  # outside the interval only the conditional half runs
    mixed = torch.tensor([0.1, 0.3, 0.5, 0.7])
    out = cfg(x, mixed, y=y)
    guided = v_u(mixed) + 4.0 * (v_c(mixed) - v_u(mixed))
    keep = torch.tensor([False, True, True, False])[:, None]
    assert torch.allclose(out, torch.where(keep, guided, v_c(mixed)), atol=1e-6)
    assert model.batches[-1] == 8


def test_callable_scale_per_sample():
    model = ToyVelocity()
    x, t, y = _inputs()

    def scale(tt, v_c, v_u):
        return 1.0 + tt  # a per-sample weight

    out = CFG(model, scale, K)(x, t, y=y)
    v_c = ToyVelocity.reference(x, t, y)
    v_u = ToyVelocity.reference(x, t, torch.full_like(y, K))
    assert torch.allclose(out, v_u + (1 + t)[:, None] * (v_c - v_u), atol=1e-6)


def test_flow_map_model_in_solver():
    model = ToyFlowMap()
    cfg = CFG(model, 2.0, K)
    assert cfg.is_flow_map
    x, _, y = _inputs()
    s, t = torch.full((5,), 0.2), torch.full((5,), 0.7)
    out = cfg(x, s, t, y=y)
    u_c = A[y][:, None] * x + (B[y] * 0.5)[:, None]
    null = torch.full_like(y, K)
    u_u = A[null][:, None] * x + (B[null] * 0.5)[:, None]
    assert torch.allclose(out, u_u + 2.0 * (u_c - u_u), atol=1e-6)
    model.batches.clear()
    res = solve(cfg, x, steps=2, cond={"y": y})  # auto flow-map stepping through the wrapper
    assert res.nfe == 2 and model.batches == [10, 10]
    # the same two jumps by hand
    h = 0.5
    z = x
    for _ in range(2):
        uc = A[y][:, None] * z + (B[y] * h)[:, None]
        uu = A[null][:, None] * z + (B[null] * h)[:, None]
        z = z + h * (uu + 2.0 * (uc - uu))
    assert torch.allclose(res.x, z, atol=1e-6)


def test_velocity_cfg_in_solver_counts_one_forward_per_nfe():
    model = ToyVelocity()
    x, _, y = _inputs()
    res = solve(CFG(model, 1.5, K), x, steps=4, stepper="heun", cond={"y": y})
    assert res.nfe == 8 == len(model.batches) and set(model.batches) == {10}


def test_bad_input():
    model = ToyVelocity()
    cfg = CFG(model, 2.0, K)
    x, t, y = _inputs()
    with pytest.raises(FewflowError, match="labels y"):
        cfg(x, t)
    with pytest.raises(FewflowError, match="shape"):
        cfg(x, t, y=y[:2])
    with pytest.raises(FewflowError, match="lie in"):
        cfg(x, t, y=torch.full_like(y, K + 1))
    with pytest.raises(FewflowError, match="time arguments"):
        cfg(x, t, t, y=y)
    with pytest.raises(FewflowError, match="num_classes"):
        CFG(model, 2.0, 0)
    with pytest.raises(FewflowError, match="interval"):
        CFG(model, 2.0, K, interval=(0.8, 0.2))
    with pytest.raises(FewflowError, match="scale"):
        CFG(model, "big", K)
