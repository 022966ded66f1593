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
