"""Mechanics of the MeanFlow objective (fewflow time: t = 0 noise, t = 1 data)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fewstep_helpers import train_on
from torch import nn

from fewflow import FewflowError
from fewflow.analytic import GaussianFlow
from fewflow.models import MLP
from fewflow.objectives.cfm import CFMLoss
from fewflow.objectives.meanflow import (
    TANGENTS,
    MeanFlowLoss,
    TimePairSampler,
    adaptive_weighted_loss,
    meanflow_target,
)
from fewflow.paths import AffinePath, CosineSchedule, LinearSchedule


def _flow_map_mlp(dim: int = 3, **kw) -> MLP:
    """A small flow-map MLP with every weight randomised: reference networks zero-initialise their
    conditioning (FiLM) layers, which would make u independent of (s, t) and the time tangents vacuous."""
    torch.manual_seed(0)
    model = MLP(dim, hidden=32, depth=2, flow_map=True, time_features="fourier", num_frequencies=3, **kw)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


def _batch(gen: torch.Generator, b: int = 16, d: int = 3, dtype=torch.float64):
    x = torch.randn(b, d, generator=gen, dtype=dtype)
    v = torch.randn(b, d, generator=gen, dtype=dtype)
    a = torch.rand(b, generator=gen, dtype=dtype)
    c = torch.rand(b, generator=gen, dtype=dtype)
    return x, v, torch.minimum(a, c), torch.maximum(a, c)


# --------------------------------------------------------------------------------------------- (a) the JVP


@pytest.mark.parametrize("tangents", sorted(TANGENTS))
def test_jvp_target_equals_central_finite_difference(gen, tangents):
    """u_tgt = v + (t - s) d/dh u(x + h v, s + a h, t + b h) at h = 0, (a, b) = the tangent's time part."""
    model = _flow_map_mlp().double()
    x, v, s, t = _batch(gen)
    u, u_tgt = meanflow_target(model, x, s, t, v, tangents=tangents)
    a, b = TANGENTS[tangents]
    h = 1e-5
    with torch.no_grad():
        up = model(x + h * v, s + a * h, t + b * h)
        um = model(x - h * v, s - a * h, t - b * h)
    du_fd = (up - um) / (2 * h)
    expected = v + (t - s)[:, None] * du_fd
    torch.testing.assert_close(u_tgt, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(u, model(x, s, t))
    assert not u_tgt.requires_grad and u.requires_grad


def test_tangent_ablation_changes_the_target(gen):
    model = _flow_map_mlp().double()
    x, v, s, t = _batch(gen)
    tg = {k: meanflow_target(model, x, s, t, v, tangents=k)[1] for k in TANGENTS}
    scale = (tg["correct"] - v).norm()
    for wrong in ("no_time", "end_time"):
        assert (tg[wrong] - tg["correct"]).norm() > 0.4 * scale  # measured 0.99 and 2.2


# ------------------------------------------------------------------------------------ (b) s = t is plain CFM


class _FixedTime:
    """A time sampler that returns given times (to feed CFMLoss the same t)."""

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t

    def sample(self, n, *, device=None, dtype=None, generator=None):
        return self.t.to(device=device, dtype=dtype)


def test_s_equal_t_is_exactly_cfm(gen):
    model = _flow_map_mlp().double()
    x0 = torch.randn(32, 3, generator=gen, dtype=torch.float64)
    x1 = torch.randn(32, 3, generator=gen, dtype=torch.float64) + 2.0
    t = torch.rand(32, generator=gen, dtype=torch.float64)
    mf = MeanFlowLoss(ratio=0.0, adaptive_p=0.0, reduction="mean")
    out = mf.loss_at(model, x0, x1, t, t)
    g_mf = torch.autograd.grad(out.loss, list(model.parameters()))

    cfm = CFMLoss(AffinePath(LinearSchedule()), time_sampler=_FixedTime(t))
    ref = cfm.pair_loss(lambda x, tt: model(x, tt, tt), x0, x1)
    g_ref = torch.autograd.grad(ref.loss, list(model.parameters()))
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-12, atol=1e-14)
    for a, b in zip(g_mf, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # independent formula: the default per-sample *sum* over dims (official code) is D times the mean
    per = (model(x0 + t[:, None] * (x1 - x0), t, t) - (x1 - x0)).pow(2).sum(1)
    p1 = MeanFlowLoss(ratio=0.0, adaptive_p=1.0, adaptive_c=1e-3).loss_at(model, x0, x1, t, t)
    torch.testing.assert_close(p1.loss, (per / (per.detach() + 1e-3)).mean())


def test_ratio_controls_the_fraction_with_s_ne_t(gen):
    x1 = torch.randn(64, 2, generator=gen)
    for ratio, n_neq in ((0.0, 0), (0.25, 16), (0.75, 48), (1.0, 64)):
        s, t = MeanFlowLoss(ratio=ratio).sample_times(64, x1, generator=gen)
        assert int((s != t).sum()) == n_neq
        assert bool((s <= t).all()) and float(s.min()) >= 0 and float(t.max()) <= 1


# -------------------------------------------------------------------- (c) the exact flow map is a fixed point


def _gaussian_flow(dtype=torch.float64) -> GaussianFlow:
    g = torch.Generator().manual_seed(3)
    a = torch.randn(3, 3, generator=g, dtype=dtype)
    cov = a @ a.T * 0.3 + 0.2 * torch.eye(3, dtype=dtype)
    return GaussianFlow(torch.tensor([1.5, -1.0, 0.5], dtype=dtype), cov, LinearSchedule())


def test_exact_average_velocity_is_the_fixed_point_of_the_meanflow_target(gen):
    flow = _gaussian_flow()
    model = flow.as_flow_map_model()
    x, _, s, t = _batch(gen, b=64)
    v = flow.velocity(x, s)  # exact marginal velocity at the start point
    u, u_tgt = meanflow_target(model, x, s, t, v)
    torch.testing.assert_close(u, flow.average_velocity(x, s, t))
    torch.testing.assert_close(u_tgt, u, rtol=1e-9, atol=1e-10)
    # the ablated tangents do not give a fixed point
    for wrong in ("no_time", "end_time"):
        _, bad = meanflow_target(model, x, s, t, v, tangents=wrong)
        assert (bad - u).abs().max() > 0.5  # measured 2.9 and 3.2


def test_exact_flow_map_minimises_the_population_meanflow_loss(gen):
    """The target is linear in v, so its mean over x1 | x_s uses the marginal velocity: at the exact u the
    averaged target equals u, so no other prediction can have a lower expected squared error.
    Check it by Monte Carlo: E[u_tgt | x_s] from many (x0, x1) pairs through the same x_s."""
    flow = _gaussian_flow()
    model = flow.as_flow_map_model()
    s0, t0 = 0.3, 0.8
    xs = flow.sample(1, t=s0, generator=gen)
    # posterior of x1 given x_s for the linear path: draw x1 ~ p(x1 | x_s) through the Gaussian joint
    m, cov = flow.mean.double(), flow.cov.double()
    cov_s = s0**2 * cov + (1 - s0) ** 2 * torch.eye(3, dtype=torch.float64)
    gain = s0 * cov @ torch.linalg.inv(cov_s)
    post_mean = m + (gain @ (xs[0] - s0 * m))
    post_cov = cov - gain @ (s0 * cov)
    n = 200_000
    chol = torch.linalg.cholesky(post_cov + 1e-12 * torch.eye(3, dtype=torch.float64))
    x1 = post_mean + torch.randn(n, 3, generator=gen, dtype=torch.float64) @ chol.T
    x0 = (xs - s0 * x1) / (1 - s0)
    x = xs.expand(n, 3)
    s = torch.full((n,), s0, dtype=torch.float64)
    t = torch.full((n,), t0, dtype=torch.float64)
    u, u_tgt = meanflow_target(model, x, s, t, x1 - x0)
    err = (u_tgt.mean(0) - u[0]).norm()
    assert float(err) < 5 * float(u_tgt.std(0).norm()) / n**0.5 + 1e-6


# ---------------------------------------------------------------------------------- loss, guidance, plumbing


def test_adaptive_weighting_formula():
    sq = torch.tensor([0.0, 1.0, 4.0], requires_grad=True)
    loss, w = adaptive_weighted_loss(sq, p=1.0, c=1e-3)
    torch.testing.assert_close(w, 1.0 / (sq.detach() + 1e-3))
    loss.backward()
    torch.testing.assert_close(sq.grad, w / 3)  # weight is stop-gradient
    assert adaptive_weighted_loss(sq, 0.0, 1e-3)[0].item() == pytest.approx(5 / 3)


def test_training_time_cfg_velocity(gen):
    model = _flow_map_mlp(num_classes=4).double()
    x, v, s, _ = _batch(gen, b=8)
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    dropped = torch.tensor([False] * 6 + [True, True])
    loss = MeanFlowLoss(omega=2.0, kappa=0.5, interval=(0.0, 0.6), num_classes=4, label_dropout=0.1)
    vt = loss.guided_velocity(model, x, s, v, {"y": y}, dropped)
    with torch.no_grad():
        u_c = model(x, s, s, y=y)
        u_u = model(x, s, s, y=torch.full_like(y, 4))
    expected = 2.0 * v + 0.5 * u_c + (1 - 2.0 - 0.5) * u_u
    use = (s <= 0.6) & ~dropped
    assert 0 < int(use.sum()) < 8
    torch.testing.assert_close(vt[use], expected[use])
    torch.testing.assert_close(vt[~use], v[~use])
    # omega = 1, kappa = 0 is no guidance
    same = MeanFlowLoss(omega=1.0, kappa=0.0, num_classes=4, label_dropout=0.1).guided_velocity(
        model, x, s, v, {"y": y}, None
    )
    torch.testing.assert_close(same, v)


def test_full_call_with_labels_backprops_and_keeps_dtype(gen):
    model = _flow_map_mlp(num_classes=3)
    x1 = torch.randn(32, 3, generator=gen)
    y = torch.randint(0, 3, (32,), generator=gen)
    loss = MeanFlowLoss(omega=1.5, kappa=0.2, label_dropout=0.2, num_classes=3)
    out = loss(model, x1, generator=gen, y=y)
    assert out.loss.dtype == torch.float32 and out.loss.dim() == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert out.diagnostics["frac_s_ne_t"] == pytest.approx(0.25)
    # same generator state -> same loss (all randomness goes through the generator)
    a = MeanFlowLoss()(model, x1, generator=torch.Generator().manual_seed(1)).loss
    b = MeanFlowLoss()(model, x1, generator=torch.Generator().manual_seed(1)).loss
    assert float(a.detach()) == float(b.detach())


class _TinyAttentionFlowMap(nn.Module):
    """Tokens = coordinates; one self-attention layer conditioned on (t, t - s); uses fused SDPA."""

    is_flow_map = True

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.inp = nn.Linear(3, width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, 1)

    def forward(self, x, s, t, y=None):
        tok = torch.stack([x, t[:, None].expand_as(x), (t - s)[:, None].expand_as(x)], dim=-1)
        h = self.inp(tok)
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        h = h + F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return self.out(torch.tanh(h))[..., 0]


def test_attention_model_jvp_matches_finite_difference(gen):
    torch.manual_seed(0)
    model = _TinyAttentionFlowMap().double()
    x, v, s, t = _batch(gen, b=8)
    _, u_tgt = meanflow_target(model, x, s, t, v)
    h = 1e-5
    with torch.no_grad():
        du = (model(x + h * v, s + h, t) - model(x - h * v, s - h, t)) / (2 * h)
    torch.testing.assert_close(u_tgt, v + (t - s)[:, None] * du, rtol=1e-5, atol=1e-6)


def test_split_jvp_mode_equals_fused(gen):
    """The DDP code path (no-grad JVP + a separate differentiated forward) gives the same loss and grads."""
    model = _flow_map_mlp().double()
    x1 = torch.randn(16, 3, generator=gen, dtype=torch.float64)
    grads = {}
    for mode in ("fused", "split"):
        model.zero_grad()
        out = MeanFlowLoss(jvp_mode=mode, ratio=0.5)(model, x1, generator=torch.Generator().manual_seed(2))
        out.loss.backward()
        grads[mode] = (out.loss.detach(), [p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(grads["fused"][0], grads["split"][0])
    for a, b in zip(grads["fused"][1], grads["split"][1]):
        torch.testing.assert_close(a, b)


def test_ddp_wrapped_model(tmp_path, gen):
    """A DDP wrapper (1-process gloo group) trains through the split path with the unwrapped gradients."""
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model = _flow_map_mlp()
        ddp = nn.parallel.DistributedDataParallel(model)
        x1 = torch.randn(16, 3, generator=gen)
        out = MeanFlowLoss(ratio=0.5)(ddp, x1, generator=torch.Generator().manual_seed(4))
        out.loss.backward()
        g_ddp = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        ref = MeanFlowLoss(ratio=0.5)(model, x1, generator=torch.Generator().manual_seed(4))
        ref.loss.backward()
        torch.testing.assert_close(out.loss, ref.loss)
        for a, p in zip(g_ddp, model.parameters()):
            torch.testing.assert_close(a, p.grad, rtol=1e-5, atol=1e-6)
    finally:
        dist.destroy_process_group()


def test_time_pair_samplers(gen):
    for smp in (TimePairSampler.uniform(), TimePairSampler.logit_normal(), TimePairSampler.meanflow_cifar()):
        s, t = smp.sample(2000, dtype=torch.float64, generator=gen)
        assert s.dtype == torch.float64 and bool((s <= t).all())
        assert float(s.min()) >= 0 and float(t.max()) <= 1
    # ImageNet's logit-normal(-0.4, 1) over noise time has mean noise level < 0.5: fewflow times lean to data
    s, t = TimePairSampler.logit_normal().sample(20000, generator=gen)
    assert float(torch.cat([s, t]).mean()) > 0.55
    # CIFAR v1: the end time (paper's r) sits close to data
    s, t = TimePairSampler.meanflow_cifar().sample(20000, generator=gen)
    assert float(t.median()) > 0.95 and float(s.median()) < float(t.median())


def test_bad_inputs_raise_fewflow_error(gen):
    with pytest.raises(FewflowError, match="linear path"):
        MeanFlowLoss(path=AffinePath(CosineSchedule()))
    MeanFlowLoss(path=AffinePath(LinearSchedule()))  # fine
    with pytest.raises(FewflowError, match="ratio"):
        MeanFlowLoss(ratio=1.5)
    with pytest.raises(FewflowError, match="tangents"):
        MeanFlowLoss(tangents="sideways")
    with pytest.raises(FewflowError, match="num_classes"):
        MeanFlowLoss(omega=2.0)


def test_training_time_cfg_refuses_zero_label_dropout():
    """With omega set the target mixes in u(x, s, s | null), which only rows with a dropped label train:
    label_dropout = 0 would fold an untrained branch into every guided target."""
    for omega, kappa in ((2.0, 0.0), (1.0, 0.5), (1.0, 0.0)):
        with pytest.raises(FewflowError, match="label_dropout=0.0 trains no unconditional branch"):
            MeanFlowLoss(omega=omega, kappa=kappa, num_classes=4)
    with pytest.raises(FewflowError) as err:
        MeanFlowLoss(omega=2.0, num_classes=4, label_dropout=0.0)
    assert "label_dropout" in str(err.value) and "omega" in str(err.value)
    MeanFlowLoss(omega=2.0, num_classes=4, label_dropout=0.1)  # the paper's setting is accepted
    MeanFlowLoss(num_classes=4)  # no training-time guidance: no dropout needed
    velocity_model = MLP(3, hidden=16, depth=1)
    with pytest.raises(FewflowError, match="flow-map"):
        MeanFlowLoss()(velocity_model, torch.randn(4, 3))
    model = _flow_map_mlp()
    x = torch.randn(4, 3)
    with pytest.raises(FewflowError, match="s <= t"):
        meanflow_target(model, x, torch.full((4,), 0.9), torch.full((4,), 0.1), x)
    with pytest.raises(FewflowError, match="non-finite"):
        MeanFlowLoss()(model, torch.full((4, 3), float("nan")))


# ------------------------------------------------------------------------------- (e) small-scale training


@pytest.mark.slow
def test_meanflow_one_step_beats_cfm_euler_on_moons():
    from fewflow.data import load_dataset
    from fewflow.metrics.distances import sliced_wasserstein

    data = load_dataset("moons", n=4000, seed=0).x.float()
    test = load_dataset("moons", n=2000, seed=1).x.float()
    x0 = torch.randn(2000, 2, generator=torch.Generator().manual_seed(5))

    def train(model, objective, steps=600):
        return train_on(model, objective, data, steps)

    def swd(a):
        return sliced_wasserstein(a, test, generator=torch.Generator().manual_seed(1))

    torch.manual_seed(0)
    cfm = train(MLP(2, hidden=64, depth=2), CFMLoss(AffinePath(LinearSchedule())))
    torch.manual_seed(0)
    mf_model = MLP(2, hidden=64, depth=2, flow_map=True, time_features="fourier", num_frequencies=3)
    # toy-scale settings from calibration runs: uniform (s, t), 75% s != t, plain MSE
    mf = train(mf_model, MeanFlowLoss(time_sampler=TimePairSampler.uniform(), ratio=0.75, adaptive_p=0.0))
    zeros, ones = torch.zeros(2000), torch.ones(2000)
    with torch.no_grad():
        w_cfm = swd(x0 + cfm(x0, zeros))  # 1-step Euler
        w_mf = swd(x0 + mf(x0, zeros, ones))  # 1-NFE flow map
    # measured 0.23 vs 1.21; the untrained flow map (x0 + u ~ x0) scores 0.96, x0 itself 0.59
    assert w_mf * 3 < w_cfm, (w_mf, w_cfm)
    assert w_mf < 0.4, (w_mf, w_cfm)
