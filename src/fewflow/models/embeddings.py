"""Time and class embeddings shared by the reference networks.

* ``"sinusoidal"`` -- the Transformer / DDPM positional code (Vaswani et al., "Attention Is All You Need";
  Ho et al., "Denoising Diffusion Probabilistic Models"): for ``k = 0 .. d/2 - 1``,
  ``f_k = max_period^(-k / (d/2))`` and ``phi(t) = [cos(s t f_k), sin(s t f_k)]`` with a time scale
  ``s``. With ``t in [0, 1]``, ``s = 1000`` (the DDPM / DiT convention for integer timesteps) spreads the
  frequencies over ``[0.1, 1000]`` rad per unit time so that nearby times are distinguishable.
  Flow-map models differentiate the network in ``t`` (MeanFlow's JVP), and very high frequencies make
  ``d u / d t`` explode; MeanFlow ("Mean Flows for One-step Generative Modeling", Geng et al. 2025) embeds
  ``t in [0, 1]`` unscaled, so flow-map models default to ``s = 1``.
* ``"fourier"`` -- deterministic low-frequency Fourier features ``[t, cos(pi 2^j t), sin(pi 2^j t)]``,
  ``j = 0 .. num_frequencies - 1`` (Tancik et al., "Fourier Features Let Networks Learn High Frequency
  Functions in Low Dimensional Domains"), well conditioned on ``[0, 1]`` and under differentiation.

Each is followed by ``Linear -> SiLU -> Linear`` to the network width (as in DiT's ``TimestepEmbedder``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from fewflow._validate import FewflowError, unknown_name

TIME_FEATURES = ("sinusoidal", "fourier")


def default_time_scale(time_features: str, flow_map: bool) -> float:
    """``1000`` for sinusoidal features of velocity models, ``1`` for flow-map models and Fourier features."""
    return 1000.0 if (time_features == "sinusoidal" and not flow_map) else 1.0


class TimeFeatures(nn.Module):
    """Fixed (parameter-free) features of a ``(B,)`` time: sinusoidal or low-frequency Fourier."""

    def __init__(
        self, kind: str = "sinusoidal", dim: int = 64, scale: float = 1000.0, max_period: float = 10_000.0,
        num_frequencies: int = 4,
    ) -> None:
        super().__init__()
        if kind not in TIME_FEATURES:
            raise unknown_name("time_features", kind, TIME_FEATURES)
        if kind == "sinusoidal" and (dim < 2 or dim % 2):
            raise FewflowError(f"sinusoidal time feature dim must be even and >= 2, got {dim}")
        if num_frequencies < 1:
            raise FewflowError(f"num_frequencies must be >= 1, got {num_frequencies}")
        self.kind, self.scale = kind, float(scale)
        if kind == "sinusoidal":
            half = dim // 2
            freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64) / half)
            self.out_dim = dim
        else:
            freqs = math.pi * 2.0 ** torch.arange(num_frequencies, dtype=torch.float64)
            self.out_dim = 1 + 2 * num_frequencies
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t: Tensor) -> Tensor:
        """``(B,) -> (B, out_dim)`` in ``t``'s dtype."""
        arg = (self.scale * t)[:, None] * self.freqs.to(t.dtype)[None, :]
        feats = [torch.cos(arg), torch.sin(arg)]
        if self.kind == "fourier":
            feats.insert(0, self.scale * t[:, None])
        return torch.cat(feats, dim=-1)


class TimeEmbedding(nn.Module):
    """``TimeFeatures`` followed by ``Linear -> SiLU -> Linear`` to ``width``."""

    def __init__(self, width: int, kind: str, scale: float, feature_dim: int = 64, num_frequencies: int = 4):
        super().__init__()
        self.features = TimeFeatures(kind, feature_dim, scale, num_frequencies=num_frequencies)
        self.mlp = nn.Sequential(nn.Linear(self.features.out_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(self.features(t))


class Conditioning(nn.Module):
    """Sum of the embeddings a network is conditioned on: ``emb(t) [+ emb_h(t - s)] [+ emb_y(y)]
    [+ emb_c(c)]``.

    Flow-map models embed the end time ``t`` and the interval ``h = t - s`` with separate embedders, as
    MeanFlow's DiT does ("Mean Flows for One-step Generative Modeling"). Class labels use ``K + 1``
    embeddings: row ``K`` is the null class used for classifier-free guidance, and ``y=None`` means null.

    **Condition tensors** ``c`` (one per row, any shape ``(B, ...)``):

    * ``cond_dim = D`` (a vector condition, ``D`` = the flattened size of one row of ``c``):
      ``emb_c(c) = W2 SiLU(W1 flatten(c) + b1) + b2``, added to the time/class embedding.
    * ``cond_channels = C'`` (an image condition ``(B, C', H, W)`` of the input's ``H, W``): the network
      concatenates ``c`` to its input channels (:meth:`concat_channels`); ``emb_c`` is then 0.

    **Null condition** (what classifier-free guidance and RAAG use as the unconditional branch): a
    learned vector ``e_null`` (zero-initialised, ``width`` entries). ``c_mask`` is an optional boolean
    ``(B,)``: rows with ``c_mask = False`` are *null* rows, and ``c=None`` makes every row null, the way
    ``y=None`` means the null class. For a null row ``emb_c = e_null`` replaces ``W2 SiLU(W1 c + b1) + b2``
    (vector condition), or ``emb_c = e_null`` is added and the concatenated channels are zeros
    (channel condition), so an all-zero image stays distinguishable from "no condition". Training drops
    ``c`` by setting ``c_mask`` (:func:`fewflow.objectives.common.drop_labels`); CFG calls the model with
    ``c_mask = False`` on its unconditional half. No operation is in place, so ``torch.func.jvp`` works.
    """

    def __init__(
        self, width: int, time_features: str, time_scale: float, num_classes: int | None, flow_map: bool,
        feature_dim: int = 64, num_frequencies: int = 4, cond_dim: int | None = None,
        cond_channels: int | None = None,
    ) -> None:
        super().__init__()
        self.t_embed = TimeEmbedding(width, time_features, time_scale, feature_dim, num_frequencies)
        self.h_embed = None
        if flow_map:
            self.h_embed = TimeEmbedding(width, time_features, time_scale, feature_dim, num_frequencies)
        if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
            raise FewflowError(f"num_classes must be a positive int or None, got {num_classes!r}")
        self.num_classes = num_classes
        self.y_embed = nn.Embedding(num_classes + 1, width) if num_classes is not None else None
        for name, v in (("cond_dim", cond_dim), ("cond_channels", cond_channels)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise FewflowError(f"{name} must be a positive int or None, got {v!r}")
        if cond_dim is not None and cond_channels is not None:
            raise FewflowError("set cond_dim (a vector condition c) or cond_channels (an image condition), "
                               "not both: a model takes one condition tensor c")
        self.cond_dim, self.cond_channels = cond_dim, cond_channels
        self.c_embed = None
        if cond_dim is not None:
            self.c_embed = nn.Sequential(nn.Linear(cond_dim, width), nn.SiLU(), nn.Linear(width, width))
        self.c_null = None
        if cond_dim is not None or cond_channels is not None:
            self.c_null = nn.Parameter(torch.zeros(width))

    def forward(
        self, t: Tensor, s: Tensor | None = None, y: Tensor | None = None, c: Tensor | None = None,
        c_mask: Tensor | None = None,
    ) -> Tensor:
        emb = self.t_embed(t)
        if self.h_embed is not None:
            if s is None:
                raise FewflowError("flow-map model needs both s and t")
            emb = emb + self.h_embed(t - s)
        if self.y_embed is not None:
            assert self.num_classes is not None
            if y is None:
                y = torch.full((t.shape[0],), self.num_classes, dtype=torch.long, device=t.device)
            y = torch.as_tensor(y, device=t.device)
            if y.dim() == 0:
                y = y.expand(t.shape[0])
            if y.shape != (t.shape[0],) or y.is_floating_point():
                raise FewflowError(
                    f"y must be an integer tensor of shape ({t.shape[0]},), got {tuple(y.shape)}"
                )
            if bool((y < 0).any()) or bool((y > self.num_classes).any()):
                raise FewflowError(
                    f"class labels must lie in [0, {self.num_classes}] ({self.num_classes} = null class)"
                )
            emb = emb + self.y_embed(y.long())
        elif y is not None:
            raise FewflowError("model was built without num_classes but received class labels y")
        if self.c_null is not None:
            emb = emb + self.condition_embedding(c, c_mask, t)
        elif c is not None or c_mask is not None:
            raise FewflowError(
                "model was built without cond_dim / cond_channels but received a condition c; build it "
                "with cond_dim=<flattened size of one row of c> (or cond_channels for an image condition)"
            )
        return emb

    def _keep(self, c_mask: Tensor | None, b: int, device: torch.device) -> Tensor | None:
        """``c_mask`` as a ``(B,)`` bool tensor (True = the row keeps its condition), or None (all kept)."""
        if c_mask is None:
            return None
        if not torch.is_tensor(c_mask) or c_mask.shape != (b,) or c_mask.is_floating_point():
            got = tuple(c_mask.shape) if torch.is_tensor(c_mask) else type(c_mask).__name__
            raise FewflowError(
                f"c_mask must be a bool tensor of shape ({b},) (False = null condition), got {got}"
            )
        return c_mask.to(device) if c_mask.dtype == torch.bool else c_mask.to(device) != 0

    def _check_c(self, c: Any, b: int, device: torch.device) -> Tensor:
        if not torch.is_tensor(c):
            raise FewflowError(
                f"condition c must be a torch.Tensor of shape ({b}, ...), got {type(c).__name__}"
            )
        if c.device != device:
            raise FewflowError(f"condition c is on {c.device} but the input is on {device}")
        return c

    def condition_embedding(self, c: Tensor | None, c_mask: Tensor | None, t: Tensor) -> Tensor:
        """``emb_c``, ``(B, width)``: ``MLP(flatten(c))`` on kept rows and ``e_null`` on null rows (vector
        condition), or ``e_null`` on null rows and 0 elsewhere (channel condition)."""
        assert self.c_null is not None
        b = t.shape[0]
        null = self.c_null.to(t.dtype)[None, :].expand(b, -1)
        if c is None:
            return null
        c = self._check_c(c, b, t.device)
        keep = self._keep(c_mask, b, t.device)
        if self.c_embed is None:  # channel condition: only the null flag enters the embedding
            if keep is None:
                return torch.zeros_like(null)
            return torch.where(keep[:, None], torch.zeros_like(null), null)
        if c.dim() < 1 or c.shape[0] != b or c[0].numel() != self.cond_dim:
            raise FewflowError(
                f"condition c must have shape ({b}, ...) with cond_dim={self.cond_dim} values per row, got "
                f"{tuple(c.shape)}"
            )
        e = self.c_embed(c.reshape(b, -1).to(t.dtype))
        return e if keep is None else torch.where(keep[:, None], e, null)

    def concat_channels(self, x: Tensor, c: Tensor | None, c_mask: Tensor | None) -> Tensor:
        """``cat([x, c], dim=1)`` for a channel condition (``cond_channels``), ``c`` zeroed on null rows and
        all zeros when ``c=None``; ``x`` unchanged for other models."""
        if self.cond_channels is None:
            return x
        b = x.shape[0]
        want = (b, self.cond_channels, *x.shape[2:])
        if c is None:
            return torch.cat([x, x.new_zeros(want)], dim=1)
        c = self._check_c(c, b, x.device)
        if tuple(c.shape) != want:
            raise FewflowError(
                f"image condition c must have shape {want} (cond_channels={self.cond_channels} and the "
                f"input's H, W), got {tuple(c.shape)}"
            )
        c = c.to(x.dtype)
        keep = self._keep(c_mask, b, x.device)
        if keep is not None:
            c = torch.where(keep.reshape(b, *([1] * (c.dim() - 1))), c, torch.zeros_like(c))
        return torch.cat([x, c], dim=1)


def parse_times(x: Tensor, args: tuple, flow_map: bool) -> tuple[Tensor | None, Tensor]:
    """Turn the positional times of ``forward(x, t)`` / ``forward(x, s, t)`` into ``(B,)`` tensors."""
    from fewflow._validate import as_batch_time

    if flow_map:
        if len(args) != 2:
            raise FewflowError(f"flow-map model expects forward(x, s, t), got {len(args)} time argument(s)")
        return as_batch_time(args[0], x), as_batch_time(args[1], x)
    if len(args) != 1:
        raise FewflowError(f"velocity model expects forward(x, t), got {len(args)} time arguments")
    return None, as_batch_time(args[0], x)
