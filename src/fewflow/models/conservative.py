"""Conservative velocity models: ``v(x, t) = grad_x phi(x, t)`` for a learned scalar potential ``phi``.

A true score ``grad_x log p_t`` and the marginal velocity of a Gaussian flow with commuting covariances are
gradient fields; an unconstrained network trained to regress them need not be ("Are We Really Learning the
Score Function? Reinterpreting Diffusion Models Through Wasserstein Gradient Flow Matching", Vuong, McCann,
Santos, Lin; TMLR 2025). These networks are conservative by construction: the velocity is the gradient of a
scalar network, so its Jacobian ``J = Hess_x phi`` is symmetric and every loop integral vanishes (up to
float rounding). :mod:`fewflow.metrics.diagnostics` measures both.

The gradient is taken with :func:`torch.func.grad`, which composes with ordinary autograd (training
back-propagates through ``grad_x phi`` into the weights: a double backward) and with the ``torch.func``
transforms fewflow's diagnostics and objectives use (``jvp``, ``vjp``, ``vmap``), and it works under
``torch.no_grad`` (sampling). Use it from the CLI as a user network::

    fewflow train --data moons --method cfm --model fewflow.models.conservative:ConservativeMLP

(``shape`` and ``num_classes`` are filled in from the data; ``--set model.hidden=128`` and friends reach the
other arguments). Flow-map methods are not supported (a flow map's average velocity is not a gradient).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from fewflow._validate import FewflowError, check_batch
from fewflow.models.embeddings import Conditioning, default_time_scale
from fewflow.models.mlp import _ResBlock

__all__ = ["ConservativeMLP"]

_PATH = "fewflow.models.conservative:ConservativeMLP"


class ConservativeMLP(nn.Module):
    """``v(x, t, y=None) = grad_x phi(x, t, y)`` with a residual-MLP potential.

    ``phi(x, t, y) = w^T SiLU(LN(h_L)) + b + 1/2 a(t, y) ||x||^2`` where ``h_0 = W_in flatten(x)`` and
    ``h_{l+1}`` is fewflow's FiLM residual block conditioned on ``e = emb(t) [+ emb(y)]`` (the same blocks
    as :class:`fewflow.models.MLP`), and ``a(t, y)`` a learned scalar of the embedding (the quadratic term
    lets the field be linear in ``x`` far from the data, as the Gaussian marginal velocity is). Hence
    ``v = grad_x phi`` is a gradient field for every weight setting and ``J_x v = Hess_x phi`` is symmetric.

    Args:
        shape: one sample's shape (vectors ``(D,)`` or images ``(C, H, W)``; flattened internally).
        hidden, depth: width and number of residual blocks of the potential network.
        num_classes: class-conditional potential (``y = num_classes`` is the null class of guidance).
        time_features: ``"sinusoidal"`` or ``"fourier"`` time features
            (:class:`fewflow.models.TimeEmbedding`).
        flow_map: refused (present so fewflow reports the reason clearly).
    """

    is_flow_map: bool = False

    def __init__(
        self,
        shape: tuple[int, ...] | list[int],
        hidden: int = 256,
        depth: int = 3,
        num_classes: int | None = None,
        time_features: str = "sinusoidal",
        flow_map: bool = False,
    ) -> None:
        super().__init__()
        if flow_map:
            raise FewflowError("ConservativeMLP is a velocity model v = grad phi; flow-map methods need "
                               "u(x, s, t), which is not a gradient field")
        shape = tuple(int(v) for v in shape)
        if not shape or any(v < 1 for v in shape):
            raise FewflowError(f"ConservativeMLP shape must be positive sizes, got {shape}")
        for name, v in (("hidden", hidden), ("depth", depth)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise FewflowError(f"ConservativeMLP {name} must be a positive int, got {v!r}")
        self.shape, self.dim, self.num_classes = shape, int(math.prod(shape)), num_classes
        self.config: dict[str, Any] = {
            "type": _PATH, "shape": list(shape), "hidden": hidden, "depth": depth,
            "num_classes": num_classes, "time_features": time_features,
        }
        self.cond = Conditioning(hidden, time_features, default_time_scale(time_features, False),
                                 num_classes, False)
        self.inp = nn.Linear(self.dim, hidden)
        self.blocks = nn.ModuleList(_ResBlock(hidden) for _ in range(depth))
        self.out_norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, 1)
        self.quad = nn.Linear(hidden, 1)
        nn.init.zeros_(self.quad.weight)
        nn.init.zeros_(self.quad.bias)

    def potential(self, x: Tensor, t: Tensor | float, y: Tensor | None = None) -> Tensor:
        """The scalar potential ``phi(x, t, y)``, shape ``(B,)``."""
        check_batch("x", x)
        flat = x.reshape(x.shape[0], -1)
        if flat.shape[1] != self.dim:
            got = tuple(x.shape)
            raise FewflowError(f"ConservativeMLP expects {self.dim} features per sample, got shape {got}")
        t = torch.as_tensor(t, device=x.device, dtype=x.dtype)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        emb = self.cond(t.to(x.dtype), None, y)
        h = self.inp(flat)
        for blk in self.blocks:
            h = blk(h, emb)
        phi = self.out(torch.nn.functional.silu(self.out_norm(h)))[:, 0]
        return phi + 0.5 * self.quad(emb)[:, 0] * flat.pow(2).sum(1)

    def forward(self, x: Tensor, t: Tensor | float, y: Tensor | None = None) -> Tensor:
        """``grad_x phi(x, t, y)``, shaped like ``x`` (rows are independent, so the gradient of the batch
        sum is each row's own gradient)."""
        if not torch.is_tensor(x) or not x.is_floating_point():
            raise FewflowError("x must be a floating-point tensor")
        p = next(self.parameters())
        xin = x.to(p.dtype) if x.dtype != p.dtype else x

        def total(z: Tensor) -> Tensor:
            return self.potential(z, t, y).sum()

        with torch.enable_grad():
            v = torch.func.grad(total)(xin)
        return v.to(x.dtype)
