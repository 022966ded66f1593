"""Transition Matching (DTM, ARTM, FHTM): the supervising processes' Gaussian moments, DTM's mean update =
the flow-matching Euler step with the exact marginal velocity (Theorem 1), the two-mode effect at one
transition against one Euler step of FM, exact evaluation counts, tokens, causality, and short runs."""

from __future__ import annotations

import pytest
import torch

from fewflow import FewflowError
from fewflow.analytic import GaussianFlow
from fewflow.methods import get_method
from fewflow.models import MLP
from fewflow.models.transition import Tokenizer, TransitionNet, tokenize, untokenize
from fewflow.objectives import CFMLoss
from fewflow.objectives.transition_matching import (
    ARTMLoss,
    DTMLoss,
    FHTMLoss,
    TMStepper,
    dtm_process,
    independent_process,
    make_transition_model,
    tm_sample,
)
from fewflow.paths import AffinePath, LinearSchedule
from fewflow.solvers import solve

M = torch.tensor([1.0, -0.5], dtype=torch.float64)
S = torch.tensor([[0.5, 0.2], [0.2, 0.3]], dtype=torch.float64)


def _gauss(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x0 = torch.randn(n, 2, generator=g, dtype=torch.float64)
    x1 = M + torch.randn(n, 2, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(S).T
    return x0, x1


def _cov(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - a.mean(0)).T @ (b - b.mean(0)) / (a.shape[0] - 1)


def _conditional(tau: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Closed form of Y = X_T - X_0 given X_t under DTM's process: E[Y | x] = m + A (x - tau m), Cov C."""
    eye = torch.eye(2, dtype=torch.float64)
    cov_x = (1 - tau) ** 2 * eye + tau**2 * S
    cov_yx = tau * S - (1 - tau) * eye
    a = cov_yx @ torch.linalg.inv(cov_x)
    c = (S + eye) - a @ cov_yx.T
    return a, c, cov_x


# --------------------------------------------------------------------------- supervising processes


@pytest.mark.parametrize("t,T", [(0, 4), (1, 4), (3, 4)])
def test_dtm_and_artm_share_marginals_but_not_transitions(t, T):
    """X_t ~ N(tau m, (1-tau)^2 I + tau^2 S) for both processes; Cov(X_t, X_{t+1}) differs: DTM keeps the
    same noise ((1-tau)(1-tau') I + tau tau' S), ARTM draws a fresh one (tau tau' S)."""
    g = torch.Generator().manual_seed(t)
    n = 200_000
    x0, x1 = _gauss(n, g)
    x0b = torch.randn(n, 2, generator=g, dtype=torch.float64)
    tau, tau2 = t / T, (t + 1) / T
    eye = torch.eye(2, dtype=torch.float64)
    xd, y = dtm_process(x0, x1, torch.full((n,), tau, dtype=torch.float64))
    xd_next = xd + y / T  # DTM's transition
    xa, xa_next = independent_process(x0, x0b, x1, torch.full((n,), float(t), dtype=torch.float64), T)
    want = (1 - tau) ** 2 * eye + tau**2 * S
    for x in (xd, xa):
        assert torch.allclose(x.mean(0), tau * M, atol=0.01)
        assert torch.allclose(_cov(x, x), want, atol=0.015)
    # the next state of both is the next marginal
    want2 = (1 - tau2) ** 2 * eye + tau2**2 * S
    for x in (xd_next, xa_next):
        assert torch.allclose(_cov(x, x), want2, atol=0.015)
    assert torch.allclose(_cov(xd, xd_next), (1 - tau) * (1 - tau2) * eye + tau * tau2 * S, atol=0.015)
    assert torch.allclose(_cov(xa, xa_next), tau * tau2 * S, atol=0.015)
    assert torch.allclose(y, x1 - x0)


def test_conditional_mean_of_the_difference_is_the_marginal_velocity():
    """E[Y | X_t = x] of DTM's process (closed form, and a least-squares fit on samples of dtm_process) is
    GaussianFlow's exact FM velocity at tau = t / T."""
    flow = GaussianFlow(M, S, LinearSchedule())
    g = torch.Generator().manual_seed(1)
    x = 0.5 * torch.randn(64, 2, generator=g, dtype=torch.float64)
    for tau in (0.0, 0.25, 0.6):
        a, _, _ = _conditional(tau)
        mean = M + (x - tau * M) @ a.T
        assert torch.allclose(mean, flow.velocity(x, tau), atol=1e-10)
        x0, x1 = _gauss(100_000, g)
        xt, y = dtm_process(x0, x1, torch.full((x0.shape[0],), tau, dtype=torch.float64))
        design = torch.cat([xt, torch.ones(xt.shape[0], 1, dtype=torch.float64)], 1)
        coef = torch.linalg.lstsq(design, y).solution
        fit = torch.cat([x, torch.ones(64, 1, dtype=torch.float64)], 1) @ coef
        assert torch.allclose(fit, flow.velocity(x, tau), atol=0.03)
        assert not torch.allclose(fit, flow.velocity(x, min(tau + 0.2, 0.9)), atol=0.03)


@pytest.mark.parametrize("T", [2, 8])
def test_dtm_step_mean_is_the_euler_step(T):
    """Theorem 1: with a head that samples Y | X_t exactly (the inner flow of N(mu(x), C)), one DTM
    transition of TMStepper has mean x + v(x, t/T) / T (the FM Euler step) and covariance C / T^2."""
    flow = GaussianFlow(M, S, LinearSchedule())
    t = 1
    tau = t / T
    _, c, _ = _conditional(tau)
    x = torch.tensor([[0.3, -1.2]], dtype=torch.float64)
    mu = flow.velocity(x, tau)[0]
    inner = GaussianFlow(torch.zeros(2, dtype=torch.float64), c, LinearSchedule())

    model = TransitionNet((2,), kind="dtm", patch=2, width=8, depth=1, head_hidden=8).double()

    def exact_head(y_s, s, h):  # velocity of the inner flow N(0, I) -> N(mu, C), per token (one token)
        ys, ss = y_s[:, 0], s[:, 0]
        return (mu + inner.velocity(ys - ss[:, None] * mu, ss))[:, None]

    model.head = exact_head
    n = 40_000
    xs = x.expand(n, 2).clone()
    stepper = TMStepper(model, steps=T, head_steps=16)
    g = torch.Generator().manual_seed(T)
    tt = torch.full((n,), tau, dtype=torch.float64)
    out = stepper.step(lambda z, s: model(z, s), xs, tt, tt + 1 / T, g)
    euler = x[0] + flow.velocity(x, tau)[0] / T
    assert torch.allclose(out.mean(0), euler, atol=4 * (c.diagonal().max().sqrt() / T) / n**0.5 + 1e-3)
    # the covariance is that of 16 Euler steps of the inner linear flow: y_K = A y_0, Cov = A A^T / T^2
    z = torch.eye(2, dtype=torch.float64)
    for k in range(16):
        z = z + inner.velocity(z, torch.full((2,), k / 16, dtype=torch.float64)) / 16
    assert torch.allclose(_cov(out, out) * T**2, z.T @ z, atol=0.04)
    assert torch.equal(xs, x.expand(n, 2))  # the input is not modified


# --------------------------------------------------------------------------- the paper's effect (tiny)


def _two_modes(n: int, g: torch.Generator) -> torch.Tensor:
    sign = torch.randint(0, 2, (n, 1), generator=g).float() * 2 - 1
    return torch.cat([2.0 * sign, torch.zeros(n, 1)], 1) + 0.2 * torch.randn(n, 2, generator=g)


def test_one_transition_dtm_keeps_both_modes_where_one_euler_step_collapses():
    """Two Gaussians at (+-2, 0): DTM with T = 1 is a conditional generator of X_T - X_0 and draws both
    modes; FM with one Euler step returns E[x1] = 0 for every x0 (the mean)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    dtm = TransitionNet((2,), kind="dtm", patch=2, width=64, depth=2, head_hidden=64)
    fm = MLP(2, hidden=64, depth=2)
    losses = (DTMLoss(T=1, continuous_time=False), CFMLoss(AffinePath(LinearSchedule())))
    for net, loss in zip((dtm, fm), losses):
        opt = torch.optim.Adam(net.parameters(), lr=2e-3)
        for _ in range(1000):
            out = loss(net, _two_modes(256, g), generator=g)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
    x0 = torch.randn(2000, 2, generator=g)
    xd, counts = tm_sample(dtm, 2000, T=1, head_steps=16, generator=g, x0=x0)
    with torch.no_grad():
        xf = solve(fm, x0, steps=1).x

    def near(x, sign):
        return float(((x - torch.tensor([2.0 * sign, 0.0])).norm(dim=1) < 0.8).float().mean())

    d_left, d_right, f_left, f_right = near(xd, -1), near(xd, 1), near(xf, -1), near(xf, 1)
    assert d_left > 0.3 and d_right > 0.3 and d_left + d_right > 0.8, (d_left, d_right)
    assert f_left + f_right < 0.1, (f_left, f_right)
    assert float(xf.norm(dim=1).median()) < 0.7  # FM's one step lands near the mean
    assert counts == {"backbone": 1, "head": 16, "context": 0}


# --------------------------------------------------------------------------- counts, tokens, causality


@pytest.mark.parametrize("kind,T,hs", [("dtm", 5, 3), ("artm", 2, 2), ("fhtm", 3, 2)])
def test_evaluation_counts_are_exact(kind, T, hs):
    shape = (1, 4, 4)
    model = TransitionNet(shape, kind=kind, patch=2, arch="transformer", width=16, depth=1,
                          head_hidden=16, transitions=T)
    calls = {"backbone": 0, "head": 0, "context": 0}
    model.register_forward_hook(lambda *a: calls.__setitem__("backbone", calls["backbone"] + 1))
    head, ctx = model.head, getattr(model, "context", None)

    def counted_head(*a):
        calls["head"] += 1
        return head(*a)

    def counted_ctx(*a):
        calls["context"] += 1
        return ctx(*a)

    model.head = counted_head
    model.context = counted_ctx
    x, counts = tm_sample(model, 3, T=T, head_steps=hs, generator=torch.Generator().manual_seed(0))
    n_tok = 4
    ar = kind != "dtm"
    assert x.shape == (3, *shape)
    assert counts == calls
    assert counts == {"backbone": T, "head": T * hs * (n_tok if ar else 1), "context": T * n_tok if ar else 0}
    # through the registry's sampling plan and the shared solver loop: the loop's NFE is the backbone count
    spec = get_method(kind)
    cfg = spec.make_config({"T": T, "head_steps": hs})
    plan = spec.sampling(model, cfg, nfe=T, meta={})
    res = solve(plan.model, torch.randn(3, *shape), grid=plan.grid, stepper=plan.stepper,
                generator=torch.Generator().manual_seed(1))
    assert res.nfe == T and res.x.shape == (3, *shape) and bool(torch.isfinite(res.x).all())


def test_continuous_dtm_samples_with_the_nfe_budget():
    spec = get_method("dtm")
    cfg = spec.make_config({"width": 16, "depth": 1})
    model = make_transition_model("dtm", cfg, {"shape": [2]})
    plan = spec.sampling(model, cfg, nfe=4, meta={})
    assert plan.grid == [0.0, 0.25, 0.5, 0.75, 1.0] and plan.stepper.steps == 4
    discrete = spec.make_config({"continuous_time": False, "T": 6})
    assert spec.sampling(model, discrete, nfe=4, meta={}).stepper.steps == 6


def test_digit_tokens_are_2x2_patches_and_round_trip():
    x = torch.arange(2 * 64, dtype=torch.float32).reshape(2, 1, 8, 8)
    tok = tokenize(x, 2)
    assert tok.shape == (2, 16, 4)
    assert tok[0, 0].tolist() == [0.0, 1.0, 8.0, 9.0]  # top-left 2x2 square, row-major
    assert tok[0, 1].tolist() == [2.0, 3.0, 10.0, 11.0]
    assert tok[1, 4].tolist() == (64 + torch.tensor([16.0, 17.0, 24.0, 25.0])).tolist()
    assert torch.equal(untokenize(tok, (1, 8, 8), 2), x)
    rgb = torch.randn(3, 3, 4, 6)
    assert torch.equal(Tokenizer((3, 4, 6), 2).untokenize(Tokenizer((3, 4, 6), 2).tokenize(rgb)), rgb)
    v = torch.randn(5, 6)
    assert tokenize(v, 3).shape == (5, 2, 3) and torch.equal(untokenize(tokenize(v, 3), (6,), 3), v)
    with pytest.raises(FewflowError, match="does not divide"):
        Tokenizer((1, 8, 8), 3)
    model = make_transition_model("dtm", get_method("dtm").make_config(), {"shape": [1, 8, 8]})
    assert model.arch == "transformer" and model(x, torch.zeros(2)).shape == (2, 16, 128)
    head = sum(p.numel() for p in model.head_net.parameters())
    assert head < 0.2 * sum(p.numel() for p in model.parameters())


def test_autoregressive_context_and_history_are_causal():
    torch.manual_seed(0)
    m = TransitionNet((1, 4, 4), kind="fhtm", patch=2, width=16, depth=2, transitions=3)
    y, h = torch.randn(2, 4, 4), torch.randn(2, 4, 16)
    ctx = m.context(y, h)
    y2 = y.clone()
    y2[:, 2:] += 1.0  # tokens 2, 3 change: contexts of tokens 0..2 may not
    ctx2 = m.context(y2, h)
    assert torch.allclose(ctx[:, :3], ctx2[:, :3], atol=1e-6) and not torch.allclose(ctx[:, 3], ctx2[:, 3])
    hist = torch.randn(2, 3, 1, 4, 4)
    f = m.history_features(hist)
    hist2 = hist.clone()
    hist2[:, 2] += 1.0  # the last state changes: features of states 0, 1 may not
    f2 = m.history_features(hist2)
    assert torch.allclose(f[:, :2], f2[:, :2], atol=1e-6) and not torch.allclose(f[:, 2], f2[:, 2])
    assert torch.allclose(m(hist[:, :2]), f[:, 1], atol=1e-6)  # forward = features of the last state


@pytest.mark.parametrize("kind,loss_cls", [("artm", ARTMLoss), ("fhtm", FHTMLoss), ("dtm", DTMLoss)])
def test_short_training_lowers_the_loss_and_samples(kind, loss_cls):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    spec = get_method(kind)
    cfg = spec.make_config({"T": 2, "width": 32, "depth": 1, "head_hidden": 32})
    model = make_transition_model(kind, cfg, {"shape": [2]})
    loss = loss_cls(T=2)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    hist = []
    for _ in range(60):
        out = loss(model, _two_modes(128, g), generator=g)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        hist.append(float(out.loss.detach()))
    assert sum(hist[-10:]) < sum(hist[:10])
    x, counts = tm_sample(model, 16, T=2, head_steps=2, generator=g)
    assert x.shape == (16, 2) and bool(torch.isfinite(x).all()) and counts["backbone"] == 2


def test_user_errors():
    with pytest.raises(FewflowError, match="positive integer"):
        DTMLoss(T=0)
    m = TransitionNet((2,), kind="dtm", patch=2, width=8, depth=1)
    with pytest.raises(FewflowError, match="ARTM needs a TransitionNet"):
        ARTMLoss()(m, torch.randn(4, 2))
    with pytest.raises(FewflowError, match="head_steps"):
        tm_sample(m, 2, T=2, head_steps=0)
    f = TransitionNet((2,), kind="fhtm", patch=1, width=8, depth=1, transitions=3)
    with pytest.raises(FewflowError, match="T=3"):
        tm_sample(f, 2, T=2, head_steps=1)
    with pytest.raises(FewflowError, match="linear path"):
        spec = get_method("dtm")
        from fewflow.methods import BuildContext
        from fewflow.paths import get_schedule

        spec.build(spec.make_config(), BuildContext(data=None, path=AffinePath(get_schedule("cosine"))))


def test_class_conditional_backbone_and_label_dropout():
    torch.manual_seed(0)
    m = TransitionNet((2,), kind="dtm", patch=2, width=16, depth=1, num_classes=3)
    x, t = torch.randn(4, 2), torch.zeros(4)
    h0, h1 = m(x, t, y=torch.zeros(4, dtype=torch.long)), m(x, t, y=torch.ones(4, dtype=torch.long))
    null = m(x, t)
    assert not torch.allclose(h0, h1) and torch.allclose(null, m(x, t, y=torch.full((4,), 3)))
    y = torch.tensor([0, 1, 2, 0])
    out = DTMLoss(T=4, label_dropout=0.5, num_classes=3)(m, torch.randn(4, 2), y=y)
    assert torch.isfinite(out.loss) and torch.equal(y, torch.tensor([0, 1, 2, 0]))
    with pytest.raises(FewflowError, match="without num_classes"):
        TransitionNet((2,), kind="dtm", patch=2, width=8, depth=1)(x, t, y=y)
    with pytest.raises(FewflowError, match="condition tensor c"):
        DTMLoss()(m, torch.randn(4, 2), c=torch.randn(4, 3))
