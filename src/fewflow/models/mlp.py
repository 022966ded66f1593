"""Time-conditioned residual MLP: the reference network for 2-D toys and flattened small images."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from fewflow._validate import FewflowError, check_batch
from fewflow.models._dtype import param_dtype_inputs
from fewflow.models.embeddings import Conditioning, default_time_scale, parse_times


class _ResBlock(nn.Module):
    """``h + W2 act(W1 (LN(h) (1 + a(c)) + b(c)))``: pre-norm residual block with FiLM conditioning
    (Perez et al., "FiLM: Visual Reasoning with a General Conditioning Layer"); ``act`` is SiLU, or Mish
    for the action-chunk policy head (as in the diffusion-policy literature)."""

    def __init__(self, width: int, activation: str = "silu") -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.film = nn.Linear(width, 2 * width)
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)
        self.act = {"silu": torch.nn.functional.silu, "mish": torch.nn.functional.mish}[activation]

    def forward(self, h: Tensor, c: Tensor) -> Tensor:
        a, b = self.film(c).chunk(2, dim=-1)
        z = self.norm(h) * (1 + a) + b
        return h + self.fc2(self.act(self.fc1(z)))


class MLP(nn.Module):
    """Residual MLP ``v(x, t, y=None, c=None)`` (flow map ``u(x, s, t, y=None, c=None)`` with
    ``flow_map=True``).

    ``x -> Linear -> depth x [FiLM residual block conditioned on e] -> LN -> SiLU -> Linear``, where
    ``e = emb(t) [+ emb(t - s)] [+ emb(y)] [+ emb_c(c)]`` (:class:`fewflow.models.embeddings.Conditioning`).
    ``dim`` is the number of features per sample; inputs ``(B, C, H, W)`` with ``C H W = dim`` are flattened
    and the output is reshaped back. Class labels use ``num_classes + 1`` embeddings (``y = num_classes`` is
    the null class for classifier-free guidance; ``y=None`` means null). ``cond_dim = D`` adds a condition
    tensor ``c`` of any shape ``(B, ...)`` with ``D`` values per row, embedded by a small MLP; rows with
    ``c_mask = False`` (or ``c=None``) get the learned null embedding instead.
    """

    is_flow_map: bool = False

    def __init__(
        self,
        dim: int,
        hidden: int = 256,
        depth: int = 4,
        time_features: str = "sinusoidal",
        num_classes: int | None = None,
        flow_map: bool = False,
        time_scale: float | None = None,
        num_frequencies: int = 4,
        cond_dim: int | None = None,
    ) -> None:
        super().__init__()
        for name, v in (("dim", dim), ("hidden", hidden), ("depth", depth)):
            if not isinstance(v, int) or v < 1:
                raise FewflowError(f"MLP {name} must be a positive int, got {v!r}")
        if time_scale is None:
            time_scale = default_time_scale(time_features, flow_map)
        self.config: dict[str, Any] = {
            "type": "MLP", "dim": dim, "hidden": hidden, "depth": depth, "time_features": time_features,
            "num_classes": num_classes, "flow_map": flow_map, "time_scale": float(time_scale),
            "num_frequencies": num_frequencies, "cond_dim": cond_dim,
        }
        self.dim, self.num_classes = dim, num_classes
        self.is_flow_map = bool(flow_map)
        self.cond = Conditioning(hidden, time_features, time_scale, num_classes, flow_map,
                                 num_frequencies=num_frequencies, cond_dim=cond_dim)
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(_ResBlock(hidden) for _ in range(depth))
        self.out_norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, dim)
        nn.init.normal_(self.out.weight, std=1.0 / math.sqrt(hidden))

    def forward(self, x: Tensor, *times: Tensor | float, y: Tensor | None = None, c: Tensor | None = None,
                c_mask: Tensor | None = None) -> Tensor:
        """``forward(x, t, y=None, c=None)`` or, for flow maps, ``forward(x, s, t, y=None, c=None)``; same
        shape as x. ``c_mask`` (bool ``(B,)``, False = null condition) marks rows whose ``c`` is dropped."""
        x, c = param_dtype_inputs(self, x, c)  # float16 / float64 inputs: cast to the weights' dtype
        check_batch("x", x)
        s, t = parse_times(x, times, self.is_flow_map)
        flat = x.reshape(x.shape[0], -1)
        if flat.shape[1] != self.dim:
            raise FewflowError(f"MLP expects {self.dim} features per sample, got shape {tuple(x.shape)}")
        emb = self.cond(t, s, y, c, c_mask)
        h = self.inp(flat)
        for blk in self.blocks:
            h = blk(h, emb)
        return self.out(torch.nn.functional.silu(self.out_norm(h))).reshape(x.shape)
