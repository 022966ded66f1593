"""FixedGridSampler: the same samples as the general loop, compiled, in bf16, and its errors."""

from __future__ import annotations

import pytest
import torch

from fewflow._validate import FewflowError
from fewflow.analytic import GaussianFlow
from fewflow.models import MLP
from fewflow.paths import LinearSchedule
from fewflow.solvers import FixedGridSampler, Stepper, get_grid, solve

torch.set_num_threads(1)


@pytest.fixture
def net():
    torch.manual_seed(0)
    return MLP(dim=3, hidden=32, depth=2, num_classes=4).eval()


@pytest.mark.parametrize("stepper", ["euler", "heun", "midpoint", "rk4"])
def test_equals_the_general_loop(net, stepper):
    grid = get_grid("shift", 4, shift=3.0)
    x0 = torch.randn(64, 3, generator=torch.Generator().manual_seed(1))
    y = torch.arange(64) % 4
    want = solve(net, x0, grid=grid, stepper=stepper, cond={"y": y}).x
    fast = FixedGridSampler(net, grid, stepper=stepper)
    got = fast(x0, y=y)
    assert torch.allclose(got, want, atol=1e-6, rtol=1e-6)
    assert fast.nfe == 4 * {"euler": 1, "heun": 2, "midpoint": 2, "rk4": 4}[stepper]
    assert got.data_ptr() != x0.data_ptr() and torch.equal(x0, torch.randn(
        64, 3, generator=torch.Generator().manual_seed(1)))  # the input is not modified


@pytest.fixture
def gaussian():
    return GaussianFlow(torch.tensor([1.0, -2.0], dtype=torch.float64),
                        torch.tensor([0.25, 4.0], dtype=torch.float64), LinearSchedule())


def test_exact_flow_of_a_gaussian_with_rk4(gaussian):
    """N(0, I) -> N(m, S) along the linear path has a closed-form velocity and flow map; RK4 on 64 steps
    lands on the exact endpoint."""
    x0 = torch.randn(256, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    got = FixedGridSampler(gaussian.velocity, steps=64, stepper="rk4")(x0)
    assert torch.allclose(got, gaussian.flow_map(x0, 0.0, 1.0), atol=1e-7)


def test_exact_flow_map_jumps_in_one_step(gaussian):
    x0 = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got = FixedGridSampler(gaussian.as_flow_map_model(), steps=1)(x0)
    assert torch.allclose(got, gaussian.flow_map(x0, 0.0, 1.0), atol=1e-10)


def test_bf16_autocast_is_close_and_keeps_the_dtype(net):
    x0 = torch.randn(32, 3, generator=torch.Generator().manual_seed(2))
    y = torch.zeros(32, dtype=torch.long)
    full = FixedGridSampler(net, steps=4)(x0, y=y)
    half = FixedGridSampler(net, steps=4, autocast="bfloat16")(x0, y=y)
    assert half.dtype == torch.float32
    assert (half - full).abs().max() < 0.1 and not torch.equal(half, full)


@pytest.mark.slow
def test_compiled_matches_eager(net):
    x0 = torch.randn(16, 3, generator=torch.Generator().manual_seed(3))
    y = torch.ones(16, dtype=torch.long)
    eager = FixedGridSampler(net, steps=2, stepper="heun")(x0, y=y)
    compiled = FixedGridSampler(net, steps=2, stepper="heun", compile=True)
    assert torch.allclose(compiled(x0, y=y), eager, atol=1e-5)
    assert torch.allclose(compiled(x0 * 2, y=y), FixedGridSampler(net, steps=2, stepper="heun")(x0 * 2, y=y),
                          atol=1e-5)


class Noisy(Stepper):
    stochastic = True


def test_errors(net):
    with pytest.raises(FewflowError, match="increasing"):
        FixedGridSampler(net, [0.0, 0.5, 0.5, 1.0])
    with pytest.raises(FewflowError, match="grid or a positive"):
        FixedGridSampler(net)
    with pytest.raises(FewflowError, match="deterministic"):
        FixedGridSampler(net, steps=2, stepper=Noisy())
    with pytest.raises(FewflowError, match="autocast"):
        FixedGridSampler(net, steps=2, autocast="int8")
    with pytest.raises(FewflowError, match="CUDA"):
        FixedGridSampler(net, steps=2, cuda_graph=True)(torch.randn(4, 3), y=torch.zeros(4, dtype=torch.long))
    with pytest.raises(FewflowError, match="float16 autocast needs a CUDA"):
        FixedGridSampler(net, steps=2, autocast="float16")(torch.randn(4, 3),
                                                           y=torch.zeros(4, dtype=torch.long))
