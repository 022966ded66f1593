"""Directional source pruning: analytic acceptance rate, rejection criterion, exact sample counts, fitting."""

from __future__ import annotations

import math

import pytest
import torch

from fewflow import FewflowError
from fewflow.source_pruning import (
    DirectionalPruning,
    PrunedNormAlignedGaussian,
    PrunedSource,
    analytic_acceptance_rate,
    fit_pruning_axes,
)
from fewflow.sources import GaussianSource, NormAlignedGaussian


def test_analytic_rate_closed_forms():
    for tau in (-0.7, -0.1, 0.0, 0.3, 0.9):
        assert analytic_acceptance_rate(2, tau) == pytest.approx(1 - math.acos(tau) / math.pi, abs=1e-12)
        assert analytic_acceptance_rate(3, tau) == pytest.approx((1 + tau) / 2, abs=1e-12)
        # |cos| <= tau for tau >= 0 in 3-D: the band between two caps
        if tau >= 0:
            assert analytic_acceptance_rate(3, tau, two_sided=True) == pytest.approx(tau, abs=1e-12)
    with pytest.raises(FewflowError):
        analytic_acceptance_rate(1, 0.0)
    with pytest.raises(FewflowError):
        analytic_acceptance_rate(3, 1.5)


@pytest.mark.parametrize("dim,tau", [(2, 0.5), (3, 0.2), (2, -0.9), (16, 0.1)])
def test_empirical_acceptance_matches_analytic(gen, dim, tau):
    axis = torch.randn(1, dim, generator=gen)  # any direction: the Gaussian is isotropic
    src = PrunedSource(GaussianSource(dim, scale=3.0), DirectionalPruning(axis, tau))
    draw = src.sample_with_rate(20_000, generator=gen)
    p = analytic_acceptance_rate(dim, tau)
    sd = math.sqrt(p * (1 - p) / draw.n_drawn)
    assert abs(draw.acceptance_rate - p) < 5 * sd, (draw.acceptance_rate, p)
    assert draw.x.shape == (20_000, dim)


def test_rejected_draws_violate_criterion(gen):
    axes = torch.randn(3, 5, generator=gen)
    tau = 0.3
    pruning = DirectionalPruning(axes, tau)
    x = torch.randn(4000, 5, generator=gen)
    ok = pruning.accept(x)
    # independent cosine computation
    cos = torch.stack([torch.nn.functional.cosine_similarity(x, a[None], dim=1) for a in axes], 1)
    assert bool((cos[~ok].max(1).values > tau).all())
    assert bool((cos[ok].max(1).values <= tau + 1e-6).all())
    assert 0 < int(ok.sum()) < 4000
    out = PrunedSource(GaussianSource(5), pruning).sample(1000, generator=gen)
    assert bool(pruning.accept(out).all())


def test_exact_sample_count_device_dtype(gen):
    src = PrunedSource(GaussianSource((2, 2)), DirectionalPruning(torch.randn(2, 4, generator=gen), -0.2))
    for n in (0, 1, 7, 513):
        x = src.sample(n, generator=gen, dtype=torch.float64)
        assert x.shape == (n, 2, 2) and x.dtype == torch.float64
    like = src.sample_like(torch.zeros(9, 2, 2))
    assert like.shape == (9, 2, 2) and like.dtype == torch.float32


def test_collapse_raises(gen):
    src = PrunedSource(GaussianSource(2), DirectionalPruning(torch.tensor([[1.0, 0.0]]), -1.0),
                       max_draws_per_sample=20)
    with pytest.raises(FewflowError, match="accepted only"):
        src.sample(10, generator=gen)


def _cone_data(gen, n=500):
    # unit-ish vectors around +e1 in 3-D: -e1 is a data-sparse direction, +-e2, +-e3 and +e1 are not
    uv = 0.4 * torch.randn(n, 2, generator=gen, dtype=torch.float64)
    r = 1 + 0.5 * torch.rand(n, 1, generator=gen, dtype=torch.float64)
    return torch.cat([torch.ones(n, 1, dtype=torch.float64), uv], 1) * r


def test_fit_finds_data_sparse_axis(gen):
    data = _cone_data(gen)
    axes = fit_pruning_axes(data, rejection_threshold=0.01)
    assert axes.shape == (1, 3)
    assert float(axes[0] @ torch.tensor([-1.0, 0.0, 0.0], dtype=torch.float64)) > 0.98
    # by definition no data point has cosine above the threshold with a returned axis
    cos = torch.nn.functional.normalize(data, dim=1) @ axes.T
    assert float(cos.max()) <= 0.01
    # 2-D Gaussian blob around the origin covers every direction: nothing is pruned
    assert fit_pruning_axes(torch.randn(300, 2, generator=gen)).shape[0] == 0


def test_compose_with_norm_aligned_gaussian(gen):
    data = _cone_data(gen, 1000).float() * 4.0
    src = PrunedSource.fit(data, tau=0.0)
    assert isinstance(src.base, NormAlignedGaussian)
    draw = src.sample_with_rate(4000, generator=gen)
    assert draw.acceptance_rate == pytest.approx(analytic_acceptance_rate(3, 0.0), abs=0.03)
    data_norm = float(data.norm(dim=1).mean())
    assert float(draw.x.norm(dim=1).mean()) == pytest.approx(data_norm, rel=0.05)  # norms unchanged

    hooked = PrunedNormAlignedGaussian.fit(data, pruning=src.pruning)
    x = hooked.sample(500, generator=gen)
    assert x.shape == (500, 3) and bool(src.pruning.accept(x).all())
    # density renormalised to the accepted cone; zero (log -inf) outside it
    probe = torch.tensor([[-1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])  # along the sparse axis -e1; away from it
    lp = hooked.log_prob(probe)
    base_lp = NormAlignedGaussian.fit(data).log_prob(probe)
    assert lp[0] == float("-inf")
    assert float(lp[1] - base_lp[1]) == pytest.approx(-math.log(analytic_acceptance_rate(3, 0.0)), abs=0.01)
    assert float(src.log_prob(probe)[1]) == pytest.approx(float(lp[1]), abs=0.01)
