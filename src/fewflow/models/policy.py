"""An action-chunk policy network: ``v(a, t, c=obs)`` (flow matching) or ``u(a, s, t, c=obs)`` (MeanFlow).

A visuomotor flow policy ("MP1: MeanFlow Tames Policy Learning in 1-step for Robotic Manipulation",
arXiv 2507.10543; "DM1: MeanFlow with Dispersive Regularization for 1-Step Robotic Manipulation",
arXiv 2510.07865) generates a whole *chunk* of future actions ``a`` (``act_horizon x act_dim`` numbers,
normalised to ``[-1, 1]``) conditioned on the recent observations ``c`` (``obs_horizon x obs_dim``
numbers). Here both are flat vectors: ``x`` is the flattened chunk and ``c`` the flattened observation
history, passed with fewflow's standard condition keyword ``c=`` (``c_mask`` marks null rows), so the
network works with every velocity or flow-map method of fewflow (``fewflow train --method cfm`` or
``--method mp1`` on demonstration chunks, ``--model fewflow.models.policy:ActionChunkNet``).

Architecture (fewflow's residual FiLM MLP, sized for low-dimensional state)::

    e   = emb(t) [+ emb(t - s)] + emb_c(c)               (fewflow.models.embeddings.Conditioning)
    h_0 = W_in x
    h_k = h_{k-1} + W2 Mish(W1 (LN(h_{k-1}) (1 + a_k(e)) + b_k(e)))      k = 1..depth
    out = W_out SiLU(LN(h_depth))

The hidden states ``h_1 .. h_{depth-1}`` (all blocks but the last; the single block when ``depth = 1``)
are the intermediate representation the dispersive regularisers of MP1 / DM1 spread apart
(:func:`fewflow.objectives.mp1.representations`): :meth:`ActionChunkNet.forward_features` returns them
beside the output. MP1 spreads the outputs of its U-Net's down blocks (all but the last) in the same way.
DM1's MLP uses Mish activations; fewflow keeps that choice inside the blocks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from fewflow._validate import FewflowError, check_batch
from fewflow.models._dtype import param_dtype_inputs
from fewflow.models.embeddings import Conditioning, default_time_scale, parse_times
from fewflow.models.mlp import _ResBlock

__all__ = ["ActionChunkNet"]


def _size(shape: Sequence[int] | int, what: str) -> int:
    dims = (shape,) if isinstance(shape, int) else tuple(shape)
    if not dims or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in dims):
        raise FewflowError(f"ActionChunkNet {what} must be positive integers, got {shape!r}")
    return int(math.prod(dims))


class ActionChunkNet(nn.Module):
    """Action-chunk network ``v(x, t, c=...)`` or, with ``flow_map=True``, ``u(x, s, t, c=...)``.

    Args:
        shape: one sample's shape, ``(act_horizon * act_dim,)`` or ``(act_horizon, act_dim)``; the output
            has the input's shape.
        cond_shape: one row of the observation condition ``c`` (``(obs_horizon * obs_dim,)``); ``None``
            builds an unconditional network (a prior over chunks).
        flow_map: a flow-map network ``u(x, s, t)`` (MeanFlow / MP1) instead of a velocity ``v(x, t)``.
        hidden, depth: width and number of residual FiLM blocks (defaults 256 x 3: DM1's MLP head is
            3 x 768 on image features, smaller here for 2-D state).
        time_features: ``"sinusoidal"`` or ``"fourier"``; default: Fourier (3 low frequencies) for a flow
            map, whose ``d u / d s`` the MeanFlow identity differentiates, sinusoidal otherwise.
        num_frequencies: Fourier frequencies of the time features.

    ``fewflow train --model fewflow.models.policy:ActionChunkNet`` fills ``shape``, ``cond_shape`` and
    ``flow_map`` from the data and the method.
    """

    is_flow_map: bool = False

    def __init__(
        self,
        shape: Sequence[int] | int,
        cond_shape: Sequence[int] | int | None = None,
        flow_map: bool = False,
        hidden: int = 256,
        depth: int = 3,
        time_features: str | None = None,
        num_frequencies: int = 3,
    ) -> None:
        super().__init__()
        self.dim = _size(shape, "shape")
        cond_dim = _size(cond_shape, "cond_shape") if cond_shape is not None else None
        for name, v in (("hidden", hidden), ("depth", depth)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise FewflowError(f"ActionChunkNet {name} must be a positive int, got {v!r}")
        if time_features is None:
            time_features = "fourier" if flow_map else "sinusoidal"
        scale = default_time_scale(time_features, bool(flow_map))
        self.config: dict[str, Any] = {
            "type": "fewflow.models.policy:ActionChunkNet",
            "shape": [int(s) for s in ((shape,) if isinstance(shape, int) else shape)],
            "cond_shape": None if cond_shape is None else [
                int(s) for s in ((cond_shape,) if isinstance(cond_shape, int) else cond_shape)],
            "flow_map": bool(flow_map), "hidden": hidden, "depth": depth, "time_features": time_features,
            "num_frequencies": num_frequencies,
        }
        self.is_flow_map = bool(flow_map)
        self.cond_dim = cond_dim
        self.cond = Conditioning(hidden, time_features, scale, None, bool(flow_map),
                                 num_frequencies=num_frequencies, cond_dim=cond_dim)
        self.inp = nn.Linear(self.dim, hidden)
        self.blocks = nn.ModuleList(_ResBlock(hidden, activation="mish") for _ in range(depth))
        self.out_norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, self.dim)
        nn.init.normal_(self.out.weight, std=1.0 / math.sqrt(hidden))

    def forward_features(
        self, x: Tensor, *times: Tensor | float, c: Tensor | None = None, c_mask: Tensor | None = None,
        y: Tensor | None = None,
    ) -> tuple[Tensor, list[Tensor]]:
        """``(output, [h_1, ..., h_{depth-1}])``: the output of :meth:`forward` and the hidden states the
        dispersive losses act on (all blocks but the last; ``[h_1]`` when ``depth = 1``), each ``(B,
        hidden)``."""
        if y is not None:
            raise FewflowError("ActionChunkNet takes no class labels y (condition it on observations c)")
        x, c = param_dtype_inputs(self, x, c)
        check_batch("x", x)
        s, t = parse_times(x, times, self.is_flow_map)
        flat = x.reshape(x.shape[0], -1)
        if flat.shape[1] != self.dim:
            raise FewflowError(
                f"ActionChunkNet expects action chunks of {self.dim} numbers, got shape {tuple(x.shape)}")
        if c is not None:
            if self.cond_dim is None:
                raise FewflowError("this ActionChunkNet was built without cond_shape; it takes no c")
            if c.shape[0] != x.shape[0] or c[0].numel() != self.cond_dim:
                raise FewflowError(
                    f"observation condition c must have {x.shape[0]} rows of {self.cond_dim} numbers, got "
                    f"shape {tuple(c.shape)}")
        e = self.cond(t, s, None, c, c_mask)
        h = self.inp(flat)
        feats: list[Tensor] = []
        for k, blk in enumerate(self.blocks):
            h = blk(h, e)
            if k < len(self.blocks) - 1 or len(self.blocks) == 1:
                feats.append(h)
        out = self.out(nn.functional.silu(self.out_norm(h))).reshape(x.shape)
        return out, feats

    def forward(
        self, x: Tensor, *times: Tensor | float, c: Tensor | None = None, c_mask: Tensor | None = None,
        y: Tensor | None = None,
    ) -> Tensor:
        """``forward(x, t, c=obs)`` or, for a flow map, ``forward(x, s, t, c=obs)``; shaped like ``x``."""
        return self.forward_features(x, *times, c=c, c_mask=c_mask, y=y)[0]
