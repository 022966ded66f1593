"""Fixtures shared by the few-step objective tests: a flow-map MLP, an exact Gaussian flow, fixed times."""

from __future__ import annotations

import torch

from fewflow.analytic import GaussianFlow
from fewflow.models import MLP
from fewflow.paths import LinearSchedule


def flow_map_mlp(dim: int = 3) -> MLP:
    torch.manual_seed(0)
    model = MLP(dim, hidden=32, depth=2, flow_map=True, time_features="fourier", num_frequencies=3)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.double()


def gaussian_flow() -> GaussianFlow:
    g = torch.Generator().manual_seed(3)
    a = torch.randn(3, 3, generator=g, dtype=torch.float64)
    cov = a @ a.T * 0.3 + 0.2 * torch.eye(3, dtype=torch.float64)
    return GaussianFlow(torch.tensor([1.5, -1.0, 0.5], dtype=torch.float64), cov, LinearSchedule())


class FixedTime:
    def __init__(self, t: torch.Tensor) -> None:
        self.t = t

    def sample(self, n, *, device=None, dtype=None, generator=None):
        return self.t.to(device=device, dtype=dtype)


def train_on(model, objective, data: torch.Tensor, steps: int, lr: float = 2e-3, batch: int = 256):
    """Adam on seeded minibatches of ``data`` with ``objective(model, x1, generator=g)``; returns model."""
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        out = objective(model, data[torch.randint(0, data.shape[0], (batch,), generator=g)], generator=g)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    return model


class GaussianMixtureFlow:
    """Exact velocities of the linear path ``x_t = t x1 + (1 - t) x0``, ``x0 ~ N(0, I)``, for data drawn from
    equal-weight classes ``x1 | y=k ~ N(mu_k, sigma^2 I)``: ``v(x, t)`` (the mixture) or ``v(x, t, y=labels)``
    (class ``y``; the null label ``K`` gives the mixture, as for a CFG-trained model).

    Per class ``x_t | k ~ N(t mu_k, s_t^2 I)``, ``s_t^2 = t^2 sigma^2 + (1 - t)^2``, and
    ``v_k(x, t) = E[x1 - x0 | x_t = x, k] = mu_k + (t sigma^2 - (1 - t)) / s_t^2 (x - t mu_k)``; the mixture
    is ``sum_k w_k v_k`` with posterior weights ``w_k ~ N(x; t mu_k, s_t^2 I)``. At ``t = 0`` every class
    has the same weight, so ``v_k = mu_k - x`` and ``v = mean_k mu_k - x``.
    """

    def __init__(self, mu: torch.Tensor, sigma: float) -> None:
        self.mu, self.sigma, self.num_classes = mu, float(sigma), mu.shape[0]

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=x.dtype).expand(x.shape[0])[:, None]
        mu = self.mu.to(x.dtype)
        s2 = t**2 * self.sigma**2 + (1 - t) ** 2
        r = x[:, None, :] - t[:, None] * mu[None]
        v = mu[None] + ((t * self.sigma**2 - (1 - t)) / s2)[:, None] * r  # (B, K, d)
        w = torch.softmax(-(r**2).sum(-1) / (2 * s2), dim=1)
        v_mix = (w[..., None] * v).sum(1)
        if y is None:
            return v_mix
        v_y = v[torch.arange(x.shape[0]), y.clamp_max(self.num_classes - 1)]
        return torch.where((y == self.num_classes)[:, None], v_mix, v_y)

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        k = torch.randint(0, self.num_classes, (n,), generator=generator)
        noise = torch.randn(n, self.mu.shape[1], generator=generator, dtype=self.mu.dtype)
        return self.mu[k] + self.sigma * noise
