"""Degradation operators and measurements: exact adjoints, right inverses, batching, purity, errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fewflow._validate import FewflowError
from fewflow.inverse.operators import (
    TASKS,
    AvgPoolSR,
    GaussianBlur,
    Identity,
    Mask,
    Measurement,
    box_mask,
    half_mask,
    make_operator,
    measure,
    random_mask,
)

torch.set_num_threads(1)


def _ops(shape=(3, 8, 8)):
    c, h, w = shape
    g = torch.Generator().manual_seed(0)
    return {
        "identity": Identity(shape),
        "mask_box": box_mask(shape, 2, 1, 3, 4),
        "mask_half": half_mask(shape, "right"),
        "mask_random": random_mask(shape, 0.4, g),
        "mask_hw": Mask(torch.rand(h, w, generator=g) < 0.5, shape=shape),
        "sr2": AvgPoolSR(2, shape),
        "sr4": AvgPoolSR(4),
        "blur": GaussianBlur(1.0, 5),
        "blur_wide": GaussianBlur(1.5, shape=shape),
    }


@pytest.mark.parametrize("name", list(_ops()))
def test_adjoint_identity(name):
    op = _ops()[name]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randn(op(x).shape, generator=g, dtype=torch.float64)
    lhs = (op(x) * y).sum()
    rhs = (x * op.adjoint(y)).sum()
    assert torch.allclose(lhs, rhs, rtol=1e-12, atol=1e-12), (float(lhs), float(rhs))


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28)])
def test_task_operators_adjoint_and_pinv(task, shape):
    op = make_operator(task, shape)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, *shape, generator=g, dtype=torch.float64)
    y = torch.randn(op(x).shape, generator=g, dtype=torch.float64)
    assert torch.allclose((op(x) * y).sum(), (x * op.adjoint(y)).sum(), rtol=1e-12, atol=1e-12)
    if task == "deblur":
        with pytest.raises(FewflowError, match="no pseudo-inverse"):
            op.pinv(y)
    else:
        assert torch.allclose(op(op.pinv(y)), y, atol=1e-12)


def test_avgpool_pinv_is_moore_penrose_and_nearest_upsampling():
    op = AvgPoolSR(2)
    d = 16
    basis = torch.eye(d, dtype=torch.float64).reshape(d, 1, 4, 4)
    mat = op(basis).reshape(d, -1).T  # (4, 16): column j = A e_j
    y = torch.randn(5, 1, 2, 2, dtype=torch.float64)
    ref = (torch.linalg.pinv(mat) @ y.reshape(5, -1).T).T.reshape(5, 1, 4, 4)
    assert torch.allclose(op.pinv(y), ref, atol=1e-12)
    assert torch.equal(op.pinv(y)[:, :, 0, 1], y[:, :, 0, 0])  # nearest neighbour
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    assert torch.allclose(op(x)[0, 0], torch.tensor([[2.5, 4.5], [10.5, 12.5]]))


def test_blur_kernel_matches_gaussian():
    op = GaussianBlur(1.2, 5)
    x = torch.zeros(1, 1, 9, 9, dtype=torch.float64)
    x[0, 0, 4, 4] = 1.0
    out = op(x)[0, 0, 2:7, 2:7]
    r = torch.arange(-2, 3, dtype=torch.float64)
    k = torch.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * 1.2**2))
    assert torch.allclose(out, k / k.sum(), atol=1e-12)
    const = torch.full((2, 3, 9, 9), 0.7, dtype=torch.float64)
    assert torch.allclose(op(const)[:, :, 2:7, 2:7], const[:, :, 2:7, 2:7])  # normalised, interior
    assert GaussianBlur(1.0).size == 7


def test_mask_selects_observed_entries():
    op = box_mask((1, 4, 4), 1, 1, 2, 2)
    assert op.m == 12
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    y = op(x)
    assert y.shape == (1, 12) and 5.0 not in y and 0.0 in y
    back = op.adjoint(y)
    assert back[0, 0, 1, 1] == 0 and back[0, 0, 0, 3] == 3
    assert half_mask((2, 5, 4), "bottom").m == 2 * 3 * 4  # hides the bottom 2 of 5 rows
    assert half_mask((1, 4, 4), "top").mask[0, 0].sum() == 0


def test_batching_and_inputs_unchanged():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 3, 8, 8, generator=g)
    x0 = x.clone()
    for op in _ops().values():
        y = op(x)
        assert torch.equal(x, x0)
        for i in (0, 3):
            assert torch.allclose(op(x[i : i + 1])[0], y[i], atol=1e-6)
        y0 = y.clone()
        a = op.adjoint(y)
        assert torch.equal(y, y0) and a.shape == x.shape
        assert torch.allclose(op.adjoint(y[2:3])[0], a[2], atol=1e-6)


def test_measure_noise_level_and_reproducibility():
    x = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    x0 = x.clone()
    op = make_operator("sr2", (1, 8, 8))
    m1 = measure(x, op, 0.2, generator=torch.Generator().manual_seed(5))
    m2 = measure(x, op, 0.2, generator=torch.Generator().manual_seed(5))
    assert torch.equal(m1.y, m2.y) and torch.equal(x, x0)
    noise = m1.y - op(x)
    assert abs(float(noise.std()) - 0.2) < 0.02
    assert m1.m == 16
    assert abs(float(m1.residual(x).mean()) - 0.2 * math.sqrt(16)) < 0.1
    assert torch.equal(measure(x, op, 0.0).y, op(x))
    d = json.loads(json.dumps(m1.describe()))
    assert d["op"] == {"name": "avgpool_sr", "factor": 2, "shape": [1, 8, 8]} and d["sigma"] == 0.2


def test_random_mask_fraction_and_seed():
    a = random_mask((2, 28, 28), 0.3, torch.Generator().manual_seed(6))
    b = random_mask((2, 28, 28), 0.3, torch.Generator().manual_seed(6))
    assert torch.equal(a.mask, b.mask)
    assert torch.equal(a.mask[0], a.mask[1])  # whole pixels
    assert abs(a.m / a.mask.numel() - 0.3) < 0.05


def test_make_operator_defaults():
    assert make_operator("inpaint", (1, 8, 8)).m == 48  # centred 4x4 box hidden
    assert make_operator("inpaint", (1, 28, 28)).m == 28 * 28 - 14 * 14
    assert make_operator("inpaint", (1, 8, 8), mask="half").m == 32
    x8, x28 = torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 28, 28)
    assert make_operator("sr2", (1, 8, 8))(x8).shape == (1, 1, 4, 4)
    assert make_operator("sr4", (1, 8, 8))(x8).shape == (1, 1, 2, 2)
    assert make_operator("sr4", (1, 28, 28))(x28).shape == (1, 1, 7, 7)
    blur = make_operator("deblur", (1, 8, 8))
    assert isinstance(blur, GaussianBlur) and blur.sigma == 1.0 and blur.size == 7
    assert isinstance(make_operator("denoise", (1, 8, 8)), Identity)


def test_errors():
    op = make_operator("sr2", (1, 8, 8))
    with pytest.raises(FewflowError, match="expects"):
        op(torch.zeros(2, 1, 6, 6))
    with pytest.raises(FewflowError, match="expects"):
        make_operator("inpaint", (1, 8, 8))(torch.zeros(2, 3, 8, 8))
    with pytest.raises(FewflowError, match="not divisible"):
        AvgPoolSR(4)(torch.zeros(1, 1, 6, 6))
    with pytest.raises(FewflowError, match="broadcast"):
        Mask(torch.ones(5, 5), shape=(1, 8, 8))
    with pytest.raises(FewflowError, match="only 0 and 1"):
        Mask(torch.full((1, 4, 4), 2.0))
    with pytest.raises(FewflowError, match=r"\(B, 48\)"):
        make_operator("inpaint", (1, 8, 8)).adjoint(torch.zeros(2, 47))
    with pytest.raises(FewflowError, match="sigma must be >= 0"):
        measure(torch.zeros(1, 1, 8, 8), op, -0.1)
    with pytest.raises(FewflowError, match="non-finite"):
        Measurement(torch.tensor([[float("nan"), 0.0]]), Identity(), 0.1)
    with pytest.raises(FewflowError, match="non-finite"):
        measure(torch.full((1, 1, 8, 8), float("nan")), op, 0.1)
    with pytest.raises(FewflowError, match="unknown inverse task"):
        make_operator("colorize", (1, 8, 8))
    with pytest.raises(FewflowError, match="unknown option"):
        make_operator("sr2", (1, 8, 8), factor=3)
    with pytest.raises(FewflowError, match="inside"):
        box_mask((1, 8, 8), 6, 0, 4, 4)
    with pytest.raises(FewflowError, match="odd"):
        GaussianBlur(1.0, 4)
    with pytest.raises(FewflowError, match="image batch"):
        GaussianBlur(1.0)(torch.zeros(2, 64))
