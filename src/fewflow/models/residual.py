"""A contractive residual velocity and the field ``v_pre + r`` it corrects.

Residual fine-tuning in "Fine-Tuning Flow Matching via Maximum Likelihood Estimation of Reconstructions"
(Li, Ding, Li, Li; arXiv 2510.02081) freezes the pretrained field ``v_pre`` and learns a residual ``r`` with
an architecture that keeps the corrected ODE stable (contractive / input-to-state stable; the paper's later
version calls the term a generalised artificial viscosity). fewflow's construction (t = 0 source, t = 1 data):

    r(x, t, c) = b(t, c) + alpha(t, c) * (h(x, t, c) - x),
    h(x, t, c) = lip * W_L' tanh(... tanh(W_1' x + B_1(e)) ...) + B_L(e),   W_i' = W_i / ||W_i||_2,
    alpha(t, c) = alpha_max * sigmoid(10 a(e)) in (0, alpha_max),          e = emb(t) [+ emb(y)] [+ emb(c)].

Every weight acting on ``x`` is divided by its exact spectral norm (largest singular value, computed by
``torch.linalg.matrix_norm(W, 2)`` at every call, so the bound holds exactly rather than up to a power-
iteration estimate as in "Spectral Normalization for Generative Adversarial Networks", Miyato et al. 2018,
arXiv 1802.05957), ``tanh`` is 1-Lipschitz and ``(t, c)`` enter only through biases, so
``Lip_x(h) <= lip < 1``. The forcing ``b(t, c)`` does not depend on ``x`` (a zero-initialised head on the
embedding: the residual starts at ``b = 0``). The Jacobian of the residual is ``J_r = alpha (J_h - I)``,
hence

* ``||J_r||_2 <= alpha_max (1 + lip)`` (:attr:`ContractiveResidual.lipschitz_bound`): the residual is
  globally Lipschitz with a known constant;
* its one-sided Lipschitz constant (log-norm) is ``mu(J_r) <= alpha (lip - 1) < 0``: the flow of
  ``dx/dt = r(x, t) + w(t)`` is contractive and input-to-state stable in any input ``w`` (``b`` is such an
  input); adding ``r`` to
  ``v_pre`` never makes the corrected flow more expansive, ``mu(J_pre + J_r) <= mu(J_pre)``.

The gate's logit is ``10 a(e)`` (a fixed gain, so that an optimiser's parameter steps move the logit ten
times faster; Adam otherwise needs thousands of steps to open a nearly shut gate) and starts at ``-5``, so
``alpha ~ 0.007 alpha_max``: fine-tuning starts next to ``v_pre``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from fewflow._validate import FewflowError, check_batch
from fewflow.models.embeddings import Conditioning, default_time_scale

__all__ = ["ContractiveResidual", "ResidualVelocity"]

GATE_GAIN = 10.0


def _unit_spectral(w: Tensor) -> Tensor:
    """``w / ||w||_2`` (exact largest singular value)."""
    return w / torch.linalg.matrix_norm(w, ord=2).clamp_min(1e-12)


class ContractiveResidual(nn.Module):
    """``r(x, t, y=None, c=None, c_mask=None)`` shaped like ``x`` (module docstring).

    Args:
        dim: features per sample (inputs ``(B, ...)`` are flattened).
        hidden, depth: width and number of ``tanh`` layers of ``h``.
        alpha_max: largest damping rate; lip: Lipschitz bound of ``h`` in ``x`` (``0 <= lip < 1``).
        num_classes, cond_dim: class labels / a condition vector, embedded as in the other networks
            (:class:`fewflow.models.embeddings.Conditioning`, with its null class / null condition).
        time_features: the time embedding's features.
    """

    is_flow_map: bool = False

    def __init__(
        self, dim: int, hidden: int = 64, depth: int = 2, alpha_max: float = 4.0, lip: float = 0.9,
        num_classes: int | None = None, cond_dim: int | None = None, time_features: str = "sinusoidal",
    ) -> None:
        super().__init__()
        for name, v in (("dim", dim), ("hidden", hidden), ("depth", depth)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise FewflowError(f"ContractiveResidual {name} must be a positive int, got {v!r}")
        if not (0.0 <= float(lip) < 1.0):
            raise FewflowError(f"lip must lie in [0, 1) for a contractive residual, got {lip}")
        if not (float(alpha_max) > 0.0 and float(alpha_max) < float("inf")):
            raise FewflowError(f"alpha_max must be a positive finite number, got {alpha_max}")
        self.config: dict[str, Any] = {
            "type": "ContractiveResidual", "dim": dim, "hidden": hidden, "depth": depth,
            "alpha_max": float(alpha_max), "lip": float(lip), "num_classes": num_classes,
            "cond_dim": cond_dim, "time_features": time_features,
        }
        self.dim, self.alpha_max, self.lip = dim, float(alpha_max), float(lip)
        self.num_classes = num_classes  # None: unconditional (the trainer then passes no labels)
        self.cond = Conditioning(hidden, time_features, default_time_scale(time_features, False),
                                 num_classes, False, cond_dim=cond_dim)
        widths = [dim] + [hidden] * depth
        self.weights = nn.ParameterList(
            nn.Parameter(nn.init.orthogonal_(torch.empty(o, i))) for i, o in zip(widths[:-1], widths[1:])
        )
        self.biases = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth))
        self.w_out = nn.Parameter(nn.init.orthogonal_(torch.empty(dim, hidden)))
        self.b_out = nn.Linear(hidden, dim)
        self.gate = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 1))
        self.shift = nn.Sequential(nn.SiLU(), nn.Linear(hidden, dim))
        nn.init.zeros_(self.shift[1].weight)
        nn.init.zeros_(self.shift[1].bias)
        nn.init.zeros_(self.gate[1].weight)
        nn.init.constant_(self.gate[1].bias, -5.0 / GATE_GAIN)

    @property
    def lipschitz_bound(self) -> float:
        """``alpha_max (1 + lip)``: a global bound on ``||d r / d x||_2``."""
        return self.alpha_max * (1.0 + self.lip)

    def alpha(self, t: Tensor, y: Tensor | None = None, c: Tensor | None = None,
              c_mask: Tensor | None = None) -> Tensor:
        """The damping rate ``alpha(t, c)``, shape ``(B,)``."""
        logit = GATE_GAIN * self.gate(self.cond(t, None, y, c, c_mask))
        return self.alpha_max * torch.sigmoid(logit).squeeze(-1)

    def forward(self, x: Tensor, t: Tensor | float, y: Tensor | None = None, c: Tensor | None = None,
                c_mask: Tensor | None = None) -> Tensor:
        check_batch("x", x)
        flat = x.reshape(x.shape[0], -1)
        if flat.shape[1] != self.dim:
            raise FewflowError(f"ContractiveResidual expects {self.dim} features per sample, "
                               f"got shape {tuple(x.shape)}")
        if not torch.is_tensor(t):
            t = torch.full((x.shape[0],), float(t), device=x.device, dtype=x.dtype)
        t = t.to(device=x.device, dtype=flat.dtype)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        emb = self.cond(t, None, y, c, c_mask)
        z = flat
        for w, b in zip(self.weights, self.biases):
            z = torch.tanh(z @ _unit_spectral(w).T + b(emb))
        h = self.lip * (z @ _unit_spectral(self.w_out).T) + self.b_out(emb)
        a = self.alpha_max * torch.sigmoid(GATE_GAIN * self.gate(emb))
        return (self.shift(emb) + a * (h - flat)).reshape(x.shape)


class ResidualVelocity(nn.Module):
    """``v(x, t, **cond) = base(x, t, **cond) + residual(x, t, **cond)``: a frozen pretrained field plus a
    trained residual (what a residual fine-tuned run samples)."""

    is_flow_map: bool = False

    def __init__(self, base: nn.Module, residual: nn.Module) -> None:
        super().__init__()
        if getattr(base, "is_flow_map", False):
            raise FewflowError("ResidualVelocity needs a velocity model v(x, t) as its base, got a flow map")
        self.base, self.residual = base, residual

    def forward(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        return self.base(x, t, **cond) + self.residual(x, t, **cond)
