"""Source distributions (fewflow.sources)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from fewflow import FewflowError
from fewflow.sources import DataSource, GaussianSource, NormAlignedGaussian, Source, gaussian_mean_norm


def test_gaussian_log_prob_matches_scipy():
    src = GaussianSource((2, 3), scale=1.7)
    x = torch.randn(5, 2, 3, dtype=torch.float64) * 2
    ref = stats.multivariate_normal(mean=np.zeros(6), cov=1.7**2 * np.eye(6)).logpdf(x.reshape(5, 6).numpy())
    lp = src.log_prob(x)
    assert lp.shape == (5,) and lp.dtype == torch.float64
    np.testing.assert_allclose(lp.numpy(), ref, rtol=1e-12)


def test_gaussian_sample_shape_dtype_generator_and_scale():
    src = GaussianSource(4, scale=0.5)
    assert isinstance(src, Source)
    a = src.sample(3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    b = src.sample(3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert a.shape == (3, 4) and a.dtype == torch.float64
    torch.testing.assert_close(a, b)
    x1 = torch.zeros(7, 4, dtype=torch.float64)
    like = src.sample_like(x1, generator=torch.Generator().manual_seed(2))
    assert like.shape == x1.shape and like.dtype == x1.dtype and like.device == x1.device
    big = src.sample(20000, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert big.std().item() == pytest.approx(0.5, rel=0.02)


def test_gaussian_errors():
    src = GaussianSource((2, 3))
    with pytest.raises(FewflowError, match="sample shape"):
        src.sample_like(torch.zeros(4, 6))
    with pytest.raises(FewflowError, match="sample shape"):
        src.log_prob(torch.zeros(4, 3, 2))
    with pytest.raises(FewflowError, match="scale"):
        GaussianSource(3, scale=-1.0)
    with pytest.raises(FewflowError, match="shape"):
        GaussianSource((3, 0))
    with pytest.raises(FewflowError, match="non-negative int"):
        src.sample(-1)


@pytest.mark.parametrize("d", [1, 2, 5, 64, 3072])
def test_gaussian_mean_norm_is_chi_mean(d):
    assert gaussian_mean_norm(d) == pytest.approx(stats.chi(d).mean(), rel=1e-10)


@pytest.mark.parametrize("d", [2, 64])
def test_norm_alignment_hits_target_mean_norm(d):
    g = torch.Generator().manual_seed(0)
    data = (torch.rand(5000, d, generator=g, dtype=torch.float64) - 0.3) * 3.0
    target = data.norm(dim=1).mean().item()
    src = NormAlignedGaussian.fit(data)  # class-level call builds and fits a new source
    assert src.shape == (d,) and src.data_mean_norm == pytest.approx(target)
    n = 40000
    norms = src.sample(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64).norm(dim=1)
    se = norms.std().item() / math.sqrt(n)
    assert abs(norms.mean().item() - target) < 4 * se
    # the sqrt(d) shortcut would be visibly off in low dimension (12% at d = 2)
    if d == 2:
        naive = target / math.sqrt(d)
        assert abs(naive * gaussian_mean_norm(d) - target) > 20 * se


def test_norm_aligned_fit_in_place_and_dataset_object():
    class _DS:  # anything with .x, like fewflow.data.Dataset
        x = torch.randn(100, 1, 4, 4) * 3

    src = NormAlignedGaussian()
    assert src.fit(_DS()) is src and src.shape == (1, 4, 4)
    assert src.scale == pytest.approx(_DS.x.flatten(1).norm(dim=1).mean().item() / gaussian_mean_norm(16))
    with pytest.raises(FewflowError, match="no shape"):
        NormAlignedGaussian().sample(3)
    with pytest.raises(FewflowError, match="non-empty"):
        NormAlignedGaussian.fit(torch.zeros(0, 3))
    with pytest.raises(FewflowError, match="zero mean norm"):
        NormAlignedGaussian.fit(torch.zeros(5, 3))


def test_norm_aligned_accept_hook_rejection_sampling():
    class HalfSpace(NormAlignedGaussian):
        def accept(self, x0):
            return x0[:, 0] > 0

    src = HalfSpace(shape=3, scale=2.0)
    x = src.sample(500, generator=torch.Generator().manual_seed(0))
    assert x.shape == (500, 3) and bool((x[:, 0] > 0).all())

    class Never(NormAlignedGaussian):
        def accept(self, x0):
            return torch.zeros(x0.shape[0], dtype=torch.bool)

    with pytest.raises(FewflowError, match="too strict"):
        Never(shape=2, max_tries=5).sample(10)


def test_data_source_never_repeats_within_epoch():
    data = torch.arange(10, dtype=torch.float32)[:, None] * torch.ones(1, 2)
    src = DataSource(data, generator=torch.Generator().manual_seed(0))
    epoch1 = torch.cat([src.sample(3), src.sample(3), src.sample(3), src.sample(1)])
    assert sorted(epoch1[:, 0].tolist()) == list(range(10)) and src.epoch == 1
    # a draw that crosses the boundary: the rest of epoch 2, then epoch 3 starts
    both = torch.cat([src.sample(7), src.sample(5)])
    e2 = both[:10]
    assert sorted(e2[:, 0].tolist()) == list(range(10)) and src.epoch == 3
    assert not torch.equal(e2, epoch1)  # a new permutation each epoch
    # reproducible from the generator
    again = DataSource(data, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(again.sample(10), epoch1)


def test_data_source_like_and_errors():
    data = torch.randn(20, 3)
    src = DataSource(data)
    x1 = torch.zeros(4, 3, dtype=torch.float64)
    out = src.sample_like(x1)
    assert out.shape == (4, 3) and out.dtype == torch.float64
    assert all(any(torch.allclose(r.float(), d) for d in data) for r in out)
    with pytest.raises(FewflowError, match="sample shape"):
        src.sample_like(torch.zeros(4, 2))
    with pytest.raises(FewflowError, match="no density"):
        src.log_prob(data)
    with pytest.raises(FewflowError, match="non-finite"):
        DataSource(torch.full((3, 2), float("nan")))
