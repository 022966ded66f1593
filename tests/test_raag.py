"""RAAG: reduces to CFG at alpha = 0, per-sample ratio and scale, one batched forward, ratio plot."""

from __future__ import annotations

import math

import pytest
import torch
from fewstep_helpers import GaussianMixtureFlow

from fewflow import FewflowError
from fewflow.guidance.cfg import CFG
from fewflow.guidance.raag import RAAG, plot_ratio_history, raag_ratio, raag_scale
from fewflow.solvers import solve

K = 3  # classes; label 3 is the null class


class ToyConditional:
    """v(x, t, y) = x * (1 + t) + shift[y]: a class-dependent shift, null class y = K. Counts forwards."""

    def __init__(self, dtype=torch.float64):
        g = torch.Generator().manual_seed(7)
        self.shift = torch.randn(K + 1, 2, generator=g, dtype=dtype)
        self.calls: list[int] = []

    def __call__(self, x, t, y):
        self.calls.append(x.shape[0])
        return x * (1 + t)[:, None] + self.shift[y]


def test_alpha_zero_is_constant_cfg(gen):
    model = ToyConditional()
    x = torch.randn(10, 2, generator=gen, dtype=torch.float64)
    t = torch.rand(10, generator=gen, dtype=torch.float64)
    y = torch.randint(0, K, (10,), generator=gen)
    for w_max in (1.0, 2.5, 7.0):
        raag = RAAG(model, w_max=w_max, alpha=0.0, num_classes=K)
        assert torch.allclose(raag(x, t, y=y), CFG(model, w_max, K)(x, t, y=y), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("squared", [False, True])
def test_ratio_and_scale_per_sample(gen, squared):
    model = ToyConditional()
    b = 6
    spread = torch.linspace(0.1, 3.0, b, dtype=torch.float64)[:, None]
    x = torch.randn(b, 2, generator=gen, dtype=torch.float64) * spread
    t = torch.full((b,), 0.4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    w_max, alpha = 5.0, 2.0
    raag = RAAG(model, w_max=w_max, alpha=alpha, num_classes=K, squared=squared, record=True)
    out = raag(x, t, y=y)
    # independent per-sample computation with plain Python floats
    for i in range(b):
        vc = x[i] * 1.4 + model.shift[int(y[i])]
        vu = x[i] * 1.4 + model.shift[K]
        r = math.sqrt(float(((vc - vu) ** 2).sum())) / math.sqrt(float((vu**2).sum()))
        r = r * r if squared else r
        w = 1 + (w_max - 1) * math.exp(-alpha * r)
        rec = raag.ratio_history[0]
        assert float(rec.ratio[i]) == pytest.approx(r, rel=1e-10)
        assert float(rec.scale[i]) == pytest.approx(w, rel=1e-10)
        assert torch.allclose(out[i], vu + w * (vc - vu), rtol=1e-10)
    ratios = raag.ratio_history[0].ratio
    assert ratios.unique().numel() == b  # genuinely per sample, not one number for the batch
    assert torch.allclose(raag_ratio(out, out), torch.zeros(b, dtype=out.dtype))
    assert torch.allclose(raag_scale(torch.zeros(3), 4.0, 1.0), torch.full((3,), 4.0))


def test_one_batched_forward_per_call_and_solve(gen):
    model = ToyConditional()
    raag = RAAG(model, w_max=4.0, alpha=3.0, num_classes=K, record=True)
    x0 = torch.randn(5, 2, generator=gen, dtype=torch.float64)
    y = torch.randint(0, K, (5,), generator=gen)
    res = solve(raag, x0, steps=4, cond={"y": y})
    assert res.nfe == 4 and model.calls == [10, 10, 10, 10]  # one forward of the 2B batch per call
    assert [float(r.t[0]) for r in raag.ratio_history] == pytest.approx([0.0, 0.25, 0.5, 0.75])
    assert all(r.ratio.shape == (5,) for r in raag.ratio_history)
    off = RAAG(model, w_max=4.0, alpha=3.0, num_classes=K)  # recording is opt-in
    off(x0, 0.5, y=y)
    assert off.ratio_history == []


def test_denominator_floor_and_errors(gen):
    def zero_uncond(x, t, y):
        return torch.where((y == K)[:, None], torch.zeros_like(x), torch.ones_like(x))

    raag = RAAG(zero_uncond, w_max=3.0, alpha=1.0, num_classes=K, record=True)
    out = raag(torch.zeros(2, 2), 0.5, y=torch.tensor([0, 1]))
    assert bool(torch.isfinite(out).all())
    assert torch.allclose(out, torch.ones(2, 2))  # huge ratio -> w = 1 -> conditional prediction
    with pytest.raises(FewflowError, match="alpha"):
        RAAG(zero_uncond, w_max=3.0, alpha=-1.0, num_classes=K)
    with pytest.raises(FewflowError, match="w_max"):
        RAAG(zero_uncond, w_max=float("nan"), alpha=1.0, num_classes=K)
    with pytest.raises(FewflowError, match="labels"):
        raag(torch.zeros(2, 2), 0.5)


def test_plot_ratio_history(tmp_path, gen):
    model = ToyConditional()
    runs = {}
    for squared in (False, True):
        raag = RAAG(model, w_max=4.0, alpha=2.0, num_classes=K, squared=squared, record=True)
        solve(raag, torch.randn(16, 2, generator=gen, dtype=torch.float64), steps=6,
              cond={"y": torch.randint(0, K, (16,), generator=gen)})
        runs["squared" if squared else "ratio"] = raag.ratio_history
    path = plot_ratio_history(runs, tmp_path / "ratio.png", title="RAAG ratio")
    assert path.is_file() and path.stat().st_size > 1000
    with pytest.raises(FewflowError, match="empty"):
        plot_ratio_history([], tmp_path / "none.png")


def test_default_ratio_is_squared_and_spikes_at_the_first_step(gen):
    """The paper's RATIO ||v_c - v_u||^2 / ||v_u||^2 (default). At t = 0 the state is pure noise x0 and the
    exact velocities are v_c = mu_y - x0, v_u = mu_bar - x0, so RATIO_0 = ||mu_y - mu_bar||^2 /
    ||mu_bar - x0||^2 per sample; once the class posterior sharpens v_c ~ v_u and the ratio collapses."""
    d, n = 8, 2000
    mu = torch.zeros(3, d, dtype=torch.float64)
    mu[0, 0] = mu[1, 1] = mu[2, 2] = 6.0  # ||mu_y - mu_bar||^2 = 24, ||mu_bar||^2 = 12
    model = GaussianMixtureFlow(mu, sigma=0.3)  # exact v(x, t, y); null label 3 = the mixture
    x0 = torch.randn(n, d, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=gen)
    raag = RAAG(model, w_max=4.0, alpha=2.0, num_classes=3, record=True)
    assert raag.squared  # the paper's form is the default
    solve(raag, x0, steps=4, cond={"y": y})
    first = raag.ratio_history[0]
    mu_bar = mu.mean(0)
    expected = ((mu[y] - mu_bar) ** 2).sum(1) / ((mu_bar - x0) ** 2).sum(1)
    torch.testing.assert_close(first.ratio.double(), expected, rtol=1e-9, atol=0)
    torch.testing.assert_close(first.scale.double(), 1 + 3 * torch.exp(-2 * expected), rtol=1e-9, atol=0)
    # the spike: median ratio 1.25 at t = 0 (24 over a noncentral chi^2_8(12) of mean 20), then < 0.05
    med = [float(r.ratio.median()) for r in raag.ratio_history]
    assert 1.1 < med[0] < 1.4, med
    assert all(m < 0.05 * med[0] for m in med[1:]), med
    # so guidance is damped at the first step only: median scale ~1.25 there, ~w_max = 4 afterwards
    scales = [float(r.scale.median()) for r in raag.ratio_history]
    assert scales[0] < 1.5 and all(s > 3.5 for s in scales[1:]), scales
    # the unsquared option is the square root of the same quantity
    raw = RAAG(model, w_max=4.0, alpha=2.0, num_classes=3, squared=False, record=True)
    raw(x0, torch.zeros(n, dtype=torch.float64), y=y)
    torch.testing.assert_close(raw.ratio_history[0].ratio.double(), expected.sqrt(), rtol=1e-9, atol=0)
