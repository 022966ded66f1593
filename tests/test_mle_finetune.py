"""MLE fine-tuning of reconstructions (Li et al., arXiv 2510.02081): gradients through the solver, memory-
bounded backprop, the contractive residual, the Lipschitz estimate, and the effect at tiny scale."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fewflow import FewflowError
from fewflow.data import load_dataset
from fewflow.methods import BuildContext, get_method
from fewflow.metrics.stiffness import lipschitz_estimate
from fewflow.models import MLP
from fewflow.models.residual import ContractiveResidual, ResidualVelocity
from fewflow.objectives.cfm import CFMLoss
from fewflow.objectives.mle_finetune import MLEFinetuneLoss, euler_rollout, reconstruction_nll
from fewflow.paths import AffinePath

torch.set_num_threads(1)


class LinearField(nn.Module):
    """``v(x, t) = A x + t b + c``."""

    def __init__(self, d: int, gen: torch.Generator) -> None:
        super().__init__()
        self.A = nn.Parameter(0.5 * torch.randn(d, d, generator=gen, dtype=torch.float64))
        self.b = nn.Parameter(torch.randn(d, generator=gen, dtype=torch.float64))
        self.c = nn.Parameter(torch.randn(d, generator=gen, dtype=torch.float64))

    def forward(self, x, t, **_):
        return x @ self.A.T + t[:, None] * self.b + self.c


def _recon_loss(field, x0, x1, n, **kw):
    return reconstruction_nll(euler_rollout(field, x0, n, **kw), x1, sigma=0.3).mean()


def test_rollout_is_euler_and_gradient_matches_finite_differences():
    g = torch.Generator().manual_seed(0)
    f = LinearField(3, g)
    x0 = torch.randn(5, 3, generator=g, dtype=torch.float64)
    x1 = torch.randn(5, 3, generator=g, dtype=torch.float64)
    n = 3
    # closed form of 3 Euler steps of a linear field: x <- (I + A/n) x + (t_k b + c)/n
    with torch.no_grad():
        m = torch.eye(3, dtype=torch.float64) + f.A / n
        x = x0.clone()
        for k in range(n):
            x = x @ m.T + ((k / n) * f.b + f.c) / n
        torch.testing.assert_close(euler_rollout(f, x0, n), x)
    loss = _recon_loss(f, x0, x1, n)
    grads = torch.autograd.grad(loss, list(f.parameters()))
    eps = 1e-6
    for p, gr in zip(f.parameters(), grads):
        fd = torch.zeros_like(p)
        for i in range(p.numel()):
            with torch.no_grad():
                p.view(-1)[i] += eps
                up = _recon_loss(f, x0, x1, n)
                p.view(-1)[i] -= 2 * eps
                dn = _recon_loss(f, x0, x1, n)
                p.view(-1)[i] += eps
            fd.view(-1)[i] = (up - dn) / (2 * eps)
        torch.testing.assert_close(gr, fd, rtol=1e-6, atol=1e-8)


def test_checkpointed_and_truncated_backprop_against_full():
    torch.manual_seed(0)
    net = MLP(2, hidden=16, depth=2).double()
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(8, 2, generator=g, dtype=torch.float64)
    x1 = torch.randn(8, 2, generator=g, dtype=torch.float64)
    params = list(net.parameters())

    def grad(**kw):
        return torch.autograd.grad(_recon_loss(net, x0, x1, 4, **kw), params)

    full = grad(backprop="full")
    for a, b in zip(full, grad(backprop="checkpoint")):  # recomputation: the same gradient
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for a, b in zip(full, grad(backprop="truncated", truncate_k=4)):  # k = N: nothing truncated
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # k = 1: the gradient of the last step alone, from the (detached) state after three steps
    with torch.no_grad():
        x3 = x0
        for k in range(3):
            x3 = x3 + 0.25 * net(x3, torch.full((8,), k / 4, dtype=torch.float64))
    last = torch.autograd.grad(
        reconstruction_nll(x3 + 0.25 * net(x3, torch.full((8,), 0.75, dtype=torch.float64)), x1, 0.3).mean(),
        params,
    )
    trunc = grad(backprop="truncated", truncate_k=1)
    for a, b in zip(last, trunc):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    assert any((a - b).abs().max() > 1e-6 for a, b in zip(full, trunc))  # truncation is a biased gradient


def test_lipschitz_estimate_is_exact_on_a_linear_field():
    g = torch.Generator().manual_seed(2)
    f = LinearField(6, g)
    x = torch.randn(4, 6, generator=g, dtype=torch.float64)
    x_before = x.clone()
    est = lipschitz_estimate(f, x, 0.3, iters=200, generator=g)
    exact = torch.linalg.matrix_norm(f.A.detach(), ord=2)
    torch.testing.assert_close(est, exact.expand(4), rtol=1e-8, atol=0)
    assert torch.equal(x, x_before) and f.A.grad is None
    # a scaled orthogonal Jacobian: exact after one iteration
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    with torch.no_grad():
        f.A.copy_(2.5 * q)
    one = lipschitz_estimate(f, x, 0.0, iters=1)
    torch.testing.assert_close(one, torch.full((4,), 2.5, dtype=torch.float64))


def test_residual_is_contractive_with_its_lipschitz_bound():
    torch.manual_seed(3)
    r = ContractiveResidual(3, hidden=32, depth=3, alpha_max=2.0, lip=0.8, num_classes=4).double()
    with torch.no_grad():  # push alpha up to its cap and give the weights large, uneven scales
        r.gate[1].bias.fill_(0.4)
        for w in r.weights:
            w.mul_(torch.logspace(-1, 2, w.shape[1], dtype=torch.float64))
    x = 3 * torch.randn(16, 3, dtype=torch.float64)
    t, y = torch.rand(16, dtype=torch.float64), torch.arange(16) % 4
    est = lipschitz_estimate(r, x, t, y=y, iters=50)
    assert float(est.max()) < r.lipschitz_bound == pytest.approx(3.6)
    assert float(est.max()) > 0.5 * r.alpha_max  # and the bound is not vacuous
    # one-sided Lipschitz constant (log-norm) mu(J) = lambda_max((J + J^T) / 2) <= alpha (lip - 1) < 0
    alpha = r.alpha(t, y).detach()
    for i in range(4):
        ti, yi = t[i:i + 1], y[i:i + 1]
        jac = torch.autograd.functional.jacobian(lambda z, ti=ti, yi=yi: r(z[None], ti, y=yi)[0], x[i])
        mu = torch.linalg.eigvalsh((jac + jac.T) / 2).max()
        assert float(mu) <= float(alpha[i]) * (r.lip - 1) + 1e-9 < 0
        assert float(torch.linalg.matrix_norm(jac, 2)) <= r.lipschitz_bound
    with pytest.raises(FewflowError, match="lip"):
        ContractiveResidual(2, lip=1.0)


# ------------------------------------------------------------------------------ the effect at tiny scale


def _recon_errors(field, x0, x1, y):
    with torch.no_grad():
        return {n: float((euler_rollout(field, x0, n, y=y) - x1).pow(2).sum(1).mean()) for n in (1, 2, 4)}


def _train(model, loss, data, steps, lr, seed):
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(data.x.shape[0], (256,), generator=g)
        out = loss(model, data.x[idx], generator=g, y=data.y[idx])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    return model


@pytest.fixture(scope="module")
def pretrained():
    """A class-conditional field on the 8 Gaussians (one tight mode per label), trained briefly by CFM."""
    data = load_dataset("8gaussians", n=4000, seed=0)
    torch.manual_seed(0)
    net = MLP(2, hidden=64, depth=2, num_classes=8)
    _train(net, CFMLoss(AffinePath("linear")), data, 300, 2e-3, 0)
    net.requires_grad_(False).eval()
    g = torch.Generator().manual_seed(5)
    y = torch.arange(1024) % 8
    ev = load_dataset("8gaussians", n=8000, seed=1)
    x1 = torch.cat([ev.x[ev.y == k][:128] for k in range(8)])
    y = torch.cat([torch.full((128,), k) for k in range(8)])
    return net, data, torch.randn(1024, 2, generator=g), x1, y


def _excess(err, x1, y):
    """Reconstruction error above its floor, the within-class variance E||x1 - E[x1 | y]||^2 (what the
    conditional mean, the MLE decoder of a random x0, reaches)."""
    means = torch.stack([x1[y == k].mean(0) for k in range(8)])
    floor = float((x1 - means[y]).pow(2).sum(1).mean())
    return {n: e - floor for n, e in err.items()}


def test_straightforward_finetuning_lowers_few_step_reconstruction_error(pretrained):
    net, data, x0, x1, y = pretrained
    before = _recon_errors(net, x0, x1, y)
    student = copy.deepcopy(net).requires_grad_(True).train()
    loss = MLEFinetuneLoss(AffinePath("linear"), teacher=net, steps=(1, 2, 4), sigma=0.1, fm_weight=1.0)
    _train(student, loss, data, 120, 5e-4, 1)
    after = _recon_errors(student.eval(), x0, x1, y)
    b, a = _excess(before, x1, y), _excess(after, x1, y)
    for n in (1, 2, 4):
        assert a[n] < 0.6 * b[n], (n, b, a)


def test_residual_finetuning_lowers_few_step_reconstruction_error_and_stays_contractive(pretrained):
    net, data, x0, x1, y = pretrained
    before = _recon_errors(net, x0, x1, y)
    torch.manual_seed(1)
    res = ContractiveResidual(2, hidden=32, depth=2, alpha_max=4.0, lip=0.9, num_classes=8)
    loss = MLEFinetuneLoss(AffinePath("linear"), teacher=net, variant="residual", steps=(1, 2, 4))
    start = _recon_errors(ResidualVelocity(net, res), x0, x1, y)
    for n in (1, 2, 4):  # alpha starts near 0: the corrected field starts next to the pretrained one
        assert start[n] == pytest.approx(before[n], rel=0.1)
    frozen = copy.deepcopy(net.state_dict())
    _train(res, loss, data, 120, 2e-3, 1)
    for k, v in net.state_dict().items():  # the pretrained field stays frozen
        assert torch.equal(v, frozen[k]), k
    after = _recon_errors(ResidualVelocity(net, res.eval()), x0, x1, y)
    b, a = _excess(before, x1, y), _excess(after, x1, y)
    for n in (1, 2, 4):
        assert a[n] < 0.6 * b[n], (n, b, a)
    est = lipschitz_estimate(res, x0[:64], torch.rand(64), y=y[:64], iters=30)
    assert float(est.max()) < res.lipschitz_bound


def test_pairing_variant_and_settings_are_checked(pretrained):
    net, data, *_ = pretrained
    loss = MLEFinetuneLoss(AffinePath("linear"), teacher=net, pairing="inverse", inverse_steps=8,
                           fm_weight=0.0)
    x1 = data.x[:64]
    y = data.y[:64]
    x0 = loss.pair(x1, y=y)
    with torch.no_grad():  # the inverse ODE encodes x1: decoding it on a fine grid gives x1 back
        back = euler_rollout(net, x0, 64, y=y)
    assert float((back - x1).pow(2).sum(1).mean()) < 0.05 * float(x1.pow(2).sum(1).mean())
    for kw, msg in [({"variant": "viscous"}, "variant"), ({"sigma": 0.0}, "sigma"),
                    ({"steps": (0,)}, "steps"), ({"backprop": "adjoint"}, "backprop")]:
        with pytest.raises(FewflowError, match=msg):
            MLEFinetuneLoss(AffinePath("linear"), teacher=net, **kw)
    with pytest.raises(FewflowError, match="teacher"):
        MLEFinetuneLoss(AffinePath("linear"), variant="residual")
    spec = get_method("mle_finetune")
    ctx = BuildContext(data=data, path=AffinePath("linear"), teacher=net, num_classes=8)
    with pytest.raises(FewflowError, match="mle_finetune_residual"):
        spec.build(spec.make_config({"variant": "residual"}), ctx)
    stages = get_method("mle_finetune_residual").build(get_method("mle_finetune_residual").make_config(), ctx)
    assert stages[0].lr == 1e-3 and stages[0].objective.variant == "residual"
