"""Blockwise Flow Matching: K temporal segments, each with its own small velocity block.

Paper: *Blockwise Flow Matching: Improving Flow Matching Models For Efficient High-Quality Generation*
(Park, Lee, Joo, Kim; NeurIPS 2025, arXiv 2510.21167; code ``mlvlab/Blockwise-Flow-Matching``).

Time runs from t = 0 (noise) to t = 1 (data); the code's ``sigma = 1 - t``. The unit interval is cut at
``0 = b_0 < b_1 < ... < b_K = 1`` into **half-open** segments ``S_k = [b_k, b_{k+1})`` (the last one is
``[b_{K-1}, 1]``), so every time belongs to exactly one segment. The velocity is

    v_theta(x, t, y) = V_{k(t)}( x, [c(t, y), h_phi(x, t, y)] ),     k(t) = the k with t in S_k,

where ``c`` is a shared time/class embedding, ``h_phi`` the shared **feature network** (Semantic Feature
Guidance: its output is aligned to a frozen encoder's features of the clean data by
:class:`fewflow.objectives.blockwise.BlockwiseFMLoss`) and ``V_k`` the small velocity block of segment
``k``. Routing is per sample, so a batch may mix segments; sampling with a grid whose nodes include the
boundaries (:func:`segment_grid`) evaluates one block per step.

**Feature Residual Approximation (FRN).** Inside segment ``[a, b)`` the features at later times are
approximated from the features computed once at the segment start:

    h_phi(x_t, t) ~= h_phi(x_a, a) + alpha(t) r_psi(x_t, t),       alpha(t) = (t - a) / (b - a) in [0, 1],

with a small residual network ``r_psi`` (zero-initialised output, trained by
:class:`fewflow.objectives.blockwise.FRNLoss` with everything else frozen). :class:`FRNVelocity` wraps a
model into an ordinary velocity model ``v(x, t, y=None)`` that runs the feature network once per segment
and ``r_psi`` on the other steps, so the shared solver loop samples it unchanged.

At our scale each piece is a FiLM residual MLP (:class:`fewflow.models.mlp.MLP`'s block) on flattened
inputs, in place of the paper's transformers (feature network depth 20, blocks depth 5, FRN depth 4).

Longer than fewflow's ~400-line guide on purpose: the segmented network, its cached FRN sampler view and
its cost counting are one model.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from fewflow._validate import FewflowError, as_batch_time, check_batch, check_finite, check_time
from fewflow.models.embeddings import Conditioning, default_time_scale, parse_times
from fewflow.models.mlp import _ResBlock

__all__ = [
    "BlockwiseVelocity",
    "FRNVelocity",
    "count_linear_macs",
    "count_parameters",
    "segment_boundaries",
    "segment_grid",
    "segment_index",
]


# ------------------------------------------------------------------------------------------------ segments
def segment_boundaries(
    segments: int | None = None, boundaries: Sequence[float] | Tensor | None = None
) -> Tensor:
    """Segment edges ``0 = b_0 < ... < b_K = 1`` as a float64 CPU tensor.

    Give ``segments`` (K equal segments, the paper's ``linspace``) or explicit ``boundaries``.
    """
    if boundaries is None:
        if not isinstance(segments, int) or segments < 1:
            raise FewflowError(f"segments must be a positive int, got {segments!r}")
        return torch.linspace(0.0, 1.0, segments + 1, dtype=torch.float64)
    b = torch.as_tensor(boundaries, dtype=torch.float64).detach().cpu().reshape(-1)
    if b.numel() < 2:
        raise FewflowError(f"boundaries need at least 2 edges (0 and 1), got {b.tolist()}")
    check_finite("boundaries", b)
    if float(b[0]) != 0.0 or float(b[-1]) != 1.0:
        raise FewflowError(f"boundaries must start at 0 and end at 1, got {b.tolist()}")
    if not bool((b[1:] > b[:-1]).all()):
        raise FewflowError(f"boundaries must be strictly increasing, got {b.tolist()}")
    if segments is not None and segments != b.numel() - 1:
        raise FewflowError(f"segments={segments} disagrees with {b.numel() - 1} segments in boundaries")
    return b


def segment_index(t: Tensor, boundaries: Tensor) -> Tensor:
    """The segment ``k`` with ``t in [b_k, b_{k+1})`` (``t = 1`` -> ``K - 1``), as int64 shaped like ``t``.

    Boundaries are compared in ``t``'s dtype, so a grid node equal to ``b_k`` in that dtype belongs to
    segment ``k`` (the one that starts there) and to no other.
    """
    k = boundaries.numel() - 1
    inner = boundaries[1:-1].to(device=t.device, dtype=t.dtype).contiguous()
    idx = torch.searchsorted(inner, t.contiguous(), right=True)
    return idx.clamp_(0, k - 1)


def segment_grid(boundaries: Tensor | Sequence[float], steps_per_segment: int) -> Tensor:
    """A time grid (1-D float64) with ``steps_per_segment`` uniform steps in each segment, including every
    boundary as a node: the BFM sampler's grid (``linspace`` per segment), usable as ``solve(grid=...)``."""
    if not isinstance(steps_per_segment, int) or steps_per_segment < 1:
        raise FewflowError(f"steps_per_segment must be a positive int, got {steps_per_segment!r}")
    b = segment_boundaries(boundaries=boundaries)
    parts = [torch.linspace(float(b[i]), float(b[i + 1]), steps_per_segment + 1, dtype=torch.float64)[:-1]
             for i in range(b.numel() - 1)]
    return torch.cat([*parts, b[-1:]])


# ------------------------------------------------------------------------------------------------ networks
class _ResidualNet(nn.Module):
    """``Linear(d_in, w) -> depth x FiLM residual block (conditioned on Linear(ctx)) -> LN``."""

    def __init__(self, d_in: int, width: int, depth: int, ctx_dim: int) -> None:
        super().__init__()
        self.ctx = nn.Sequential(nn.SiLU(), nn.Linear(ctx_dim, width))
        self.inp = nn.Linear(d_in, width)
        self.blocks = nn.ModuleList(_ResBlock(width) for _ in range(depth))
        self.norm = nn.LayerNorm(width, elementwise_affine=False)

    def forward(self, flat: Tensor, ctx: Tensor) -> Tensor:
        c = self.ctx(ctx)
        h = self.inp(flat)
        for blk in self.blocks:
            h = blk(h, c)
        return self.norm(h)


class _VelocityBlock(nn.Module):
    """One segment's velocity network: a residual MLP conditioned on ``[c(t, y), h]``, then ``LN, SiLU,
    Linear`` to the data dimension."""

    def __init__(self, dim: int, width: int, depth: int, ctx_dim: int) -> None:
        super().__init__()
        self.body = _ResidualNet(dim, width, depth, ctx_dim)
        self.out = nn.Linear(width, dim)
        nn.init.normal_(self.out.weight, std=1.0 / math.sqrt(width))

    def forward(self, flat: Tensor, ctx: Tensor) -> Tensor:
        return self.out(torch.nn.functional.silu(self.body(flat, ctx)))


def _positive_int(name: str, v: Any, allow_zero: bool = False) -> None:
    lo = 0 if allow_zero else 1
    if not isinstance(v, int) or isinstance(v, bool) or v < lo:
        raise FewflowError(f"BlockwiseVelocity {name} must be an int >= {lo}, got {v!r}")


class BlockwiseVelocity(nn.Module):
    """Blockwise velocity model ``v(x, t, y=None)``: ``K`` segment blocks + a shared feature network.

    Args:
        dim: features per sample (inputs ``(B, C, H, W)`` with ``C H W = dim`` are flattened and the output
            is reshaped back, as in :class:`fewflow.models.MLP`).
        segments: number of equal temporal segments ``K`` (paper: 6); or give ``boundaries``.
        block_hidden, block_depth: width and residual depth of each segment's velocity block.
        feature_hidden, feature_depth: width (= feature dimension) and depth of the shared feature network;
            the shared conditioning ``c(t, y)`` also has this width.
        frn_hidden, frn_depth: the Feature Residual Approximation network (``frn_depth=0``: none).
            ``frn_hidden`` defaults to ``feature_hidden``.
        proj_dim: output size of the projection head aligned with the frozen encoder's features
            (``None``: no head, no alignment term); ``proj_hidden`` its hidden width (default
            ``2 * feature_hidden``).
        time_features, time_scale, num_frequencies, num_classes: as for :class:`fewflow.models.MLP`.
        boundaries: explicit segment edges ``0 = b_0 < ... < b_K = 1`` (overrides equal segments).

    Pieces (used by the objectives and by :class:`FRNVelocity`): ``context(t, y) -> c``,
    ``features(x, t, y) -> h``, ``velocity(x, t, h, y)``, ``project(h)``, ``frn_features(x, t, h_start,
    t_start, y)``, ``segment_of(t)``; ``blocks[k]`` is segment ``k``'s block.
    """

    is_flow_map: bool = False

    def __init__(
        self,
        dim: int,
        segments: int = 4,
        block_hidden: int = 64,
        block_depth: int = 2,
        feature_hidden: int = 64,
        feature_depth: int = 2,
        frn_hidden: int | None = None,
        frn_depth: int = 1,
        proj_dim: int | None = None,
        proj_hidden: int | None = None,
        time_features: str = "sinusoidal",
        num_classes: int | None = None,
        time_scale: float | None = None,
        num_frequencies: int = 4,
        boundaries: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        _positive_int("dim", dim)
        _positive_int("block_hidden", block_hidden)
        _positive_int("block_depth", block_depth)
        _positive_int("feature_hidden", feature_hidden)
        _positive_int("feature_depth", feature_depth)
        _positive_int("frn_depth", frn_depth, allow_zero=True)
        frn_hidden = feature_hidden if frn_hidden is None else frn_hidden
        _positive_int("frn_hidden", frn_hidden)
        if proj_dim is not None:
            _positive_int("proj_dim", proj_dim)
        proj_hidden = 2 * feature_hidden if proj_hidden is None else proj_hidden
        _positive_int("proj_hidden", proj_hidden)
        b = segment_boundaries(segments if boundaries is None else None, boundaries)
        if time_scale is None:
            time_scale = default_time_scale(time_features, False)
        self.config: dict[str, Any] = {
            "type": "BlockwiseVelocity", "dim": dim, "segments": b.numel() - 1, "block_hidden": block_hidden,
            "block_depth": block_depth, "feature_hidden": feature_hidden, "feature_depth": feature_depth,
            "frn_hidden": frn_hidden, "frn_depth": frn_depth, "proj_dim": proj_dim,
            "proj_hidden": proj_hidden,
            "time_features": time_features, "num_classes": num_classes, "time_scale": float(time_scale),
            "num_frequencies": num_frequencies, "boundaries": b.tolist(),
        }
        self.dim, self.num_classes, self.num_segments = dim, num_classes, b.numel() - 1
        self.feature_dim, self.proj_dim = feature_hidden, proj_dim
        self.register_buffer("boundaries", b, persistent=False)
        self.cond = Conditioning(feature_hidden, time_features, time_scale, num_classes, False,
                                 num_frequencies=num_frequencies)
        self.feature_net = _ResidualNet(dim, feature_hidden, feature_depth, feature_hidden)
        self.blocks = nn.ModuleList(
            _VelocityBlock(dim, block_hidden, block_depth, 2 * feature_hidden)
            for _ in range(self.num_segments)
        )
        self.frn: nn.Module | None = None
        if frn_depth > 0:
            frn = _VelocityBlock(dim, frn_hidden, frn_depth, feature_hidden)
            frn.out = nn.Linear(frn_hidden, feature_hidden)
            nn.init.zeros_(frn.out.weight)  # starts as "features stay at the segment start"
            nn.init.zeros_(frn.out.bias)
            self.frn = frn
        self.proj: nn.Module | None = None
        if proj_dim is not None:
            self.proj = nn.Sequential(nn.Linear(feature_hidden, proj_hidden), nn.SiLU(),
                                      nn.Linear(proj_hidden, proj_hidden), nn.SiLU(),
                                      nn.Linear(proj_hidden, proj_dim))

    # -- pieces -------------------------------------------------------------------------------------------
    def _flat(self, x: Tensor) -> Tensor:
        check_batch("x", x)
        flat = x.reshape(x.shape[0], -1)
        if flat.shape[1] != self.dim:
            raise FewflowError(
                f"BlockwiseVelocity expects {self.dim} features per sample, got {tuple(x.shape)}"
            )
        return flat

    def _time(self, t: Tensor | float, x: Tensor) -> Tensor:
        tb = as_batch_time(t, x)
        check_time(tb)
        return tb

    def segment_of(self, t: Tensor) -> Tensor:
        """Segment index per time (see :func:`segment_index`)."""
        return segment_index(t, self.boundaries)

    def context(self, t: Tensor, y: Tensor | None = None) -> Tensor:
        """The shared time/class embedding ``c(t, y)``, ``(B, feature_hidden)``."""
        return self.cond(t, None, y)

    def features(self, x: Tensor, t: Tensor | float, y: Tensor | None = None,
                 context: Tensor | None = None) -> Tensor:
        """The feature network's output ``h_phi(x, t, y)``, ``(B, feature_dim)``."""
        tb = self._time(t, x)
        c = self.context(tb, y) if context is None else context
        return self.feature_net(self._flat(x), c)

    def velocity(self, x: Tensor, t: Tensor | float, h: Tensor, y: Tensor | None = None,
                 context: Tensor | None = None) -> Tensor:
        """``V_{k(t)}(x, [c(t, y), h])`` routed per sample by the segment of ``t``; shaped like ``x``."""
        flat = self._flat(x)
        tb = self._time(t, x)
        if h.shape != (x.shape[0], self.feature_dim):
            raise FewflowError(f"features h must have shape ({x.shape[0]}, {self.feature_dim}), "
                               f"got {tuple(h.shape)}")
        c = self.context(tb, y) if context is None else context
        ctx = torch.cat([c, h.to(c.dtype)], dim=-1)
        seg = self.segment_of(tb)
        first = int(seg[0])
        if bool((seg == first).all()):  # one segment (every sampling step): no gather/scatter
            return self.blocks[first](flat, ctx).reshape(x.shape)
        out = flat.new_empty(flat.shape)
        for k in torch.unique(seg).tolist():
            idx = (seg == k).nonzero(as_tuple=True)[0]
            out[idx] = self.blocks[k](flat[idx], ctx[idx]).to(out.dtype)
        return out.reshape(x.shape)

    def project(self, h: Tensor) -> Tensor:
        """The projection head applied to features (for the alignment term)."""
        if self.proj is None:
            raise FewflowError("this BlockwiseVelocity has no projection head (build it with proj_dim=...)")
        return self.proj(h)

    def frn_alpha(self, t: Tensor, t_start: Tensor) -> Tensor:
        """``alpha = (t - t_start) / (b_{k+1} - b_k)`` with ``k`` the segment of ``t`` (the paper's
        ``(t_s - t) / (t_s - t_e)`` in fewflow time when ``t_start = b_k``)."""
        seg = self.segment_of(t)
        b = self.boundaries.to(device=t.device, dtype=t.dtype)
        return (t - t_start) / (b[seg + 1] - b[seg])

    def frn_features(self, x: Tensor, t: Tensor | float, h_start: Tensor, t_start: Tensor | float,
                     y: Tensor | None = None, context: Tensor | None = None) -> Tensor:
        """FRN approximation ``h(x_t, t) ~= h_start + alpha(t) r_psi(x_t, t)`` (``h_start`` computed by the
        feature network at ``t_start``, the segment start)."""
        if self.frn is None:
            raise FewflowError("this BlockwiseVelocity has no FRN (build it with frn_depth >= 1)")
        tb = self._time(t, x)
        ts = as_batch_time(t_start, x)
        c = self.context(tb, y) if context is None else context
        alpha = self.frn_alpha(tb, ts)
        return h_start + alpha[:, None] * self.frn(self._flat(x), c)

    def forward(self, x: Tensor, *times: Tensor | float, y: Tensor | None = None) -> Tensor:
        """``forward(x, t, y=None)``: the velocity, shaped like ``x`` (runs the feature network)."""
        _, t = parse_times(x, times, False)
        check_time(t)
        c = self.context(t, y)
        h = self.feature_net(self._flat(x), c)
        return self.velocity(x, t, h, y, context=c)

    # -- bookkeeping --------------------------------------------------------------------------------------
    def parameter_counts(self) -> dict[str, int]:
        """Parameters of each part: ``total``, ``conditioning``, ``feature_net``, ``block`` (one segment
        block), ``blocks`` (all), ``frn``, ``proj``, and ``sampling`` = what one sampling step touches
        without FRN (conditioning + feature network + one block; the projection head is training-only)."""
        counts = {
            "total": count_parameters(self),
            "conditioning": count_parameters(self.cond),
            "feature_net": count_parameters(self.feature_net),
            "block": count_parameters(self.blocks[0]),
            "blocks": count_parameters(self.blocks),
            "frn": count_parameters(self.frn) if self.frn is not None else 0,
            "proj": count_parameters(self.proj) if self.proj is not None else 0,
        }
        counts["sampling"] = counts["conditioning"] + counts["feature_net"] + counts["block"]
        return counts

    def frn_sampler(self) -> FRNVelocity:
        """A velocity model that runs the feature network once per segment (see :class:`FRNVelocity`)."""
        return FRNVelocity(self)


# ------------------------------------------------------------------------------------------- FRN sampling
class FRNVelocity:
    """``v(x, t, y=None)`` of a :class:`BlockwiseVelocity` with the feature network run once per segment.

    On the first call in a segment the feature network computes ``h_start = h_phi(x, t_e, y)`` at that
    call's time ``t_e`` (the segment start ``b_k`` on a :func:`segment_grid`); later calls in the same
    segment use ``h_start + alpha(t) r_psi(x, t)`` with ``alpha = (t - t_e) / (b_{k+1} - b_k)``. The FRN was
    trained with ``t_e = b_k``, so use a grid whose nodes include the boundaries. A new anchor is taken
    when the segment changes, when time goes backwards or returns to a segment start (a new solve),
    or when the batch shape changes; :meth:`reset` forgets it explicitly. All samples of a call must share
    one time (as in :func:`fewflow.solvers.solve`). ``feature_calls`` / ``frn_calls`` count evaluations.
    """

    is_flow_map: bool = False

    def __init__(self, model: BlockwiseVelocity) -> None:
        if not isinstance(model, BlockwiseVelocity):
            raise FewflowError(f"FRNVelocity needs a BlockwiseVelocity, got {type(model).__name__}")
        if model.frn is None:
            raise FewflowError("FRN sampling needs a BlockwiseVelocity built with frn_depth >= 1")
        self.model = model
        self.feature_calls = 0
        self.frn_calls = 0
        self._cache: tuple[int, float, float, tuple[int, ...], Tensor] | None = None

    def reset(self) -> None:
        """Forget the cached segment-start features."""
        self._cache = None

    def __call__(self, x: Tensor, t: Tensor | float, y: Tensor | None = None) -> Tensor:
        m = self.model
        tb = m._time(t, x)
        t0 = float(tb[0])
        if not bool((tb == tb[0]).all()):
            raise FewflowError("FRN sampling needs one time for the whole batch (as in solve)")
        k = int(m.segment_of(tb[:1])[0])
        seg_start = float(m.boundaries[k].to(tb.dtype))
        c = m.context(tb, y)
        cache = self._cache
        fresh = (
            cache is None or cache[0] != k or t0 < cache[2] or t0 == seg_start
            or cache[3] != tuple(x.shape)
        )
        if fresh:
            h = m.feature_net(m._flat(x), c)
            self.feature_calls += 1
            self._cache = (k, t0, t0, tuple(x.shape), h)
        else:
            assert cache is not None
            _, t_anchor, _, shape, h_start = cache
            self.frn_calls += 1
            h = m.frn_features(x, tb, h_start, t_anchor, y, context=c)
            self._cache = (k, t_anchor, t0, shape, h_start)
        return m.velocity(x, tb, h, y, context=c)


# ------------------------------------------------------------------------------------------ cost counting
def count_parameters(module: nn.Module | None, trainable_only: bool = False) -> int:
    """Number of parameters of ``module`` (0 for ``None``)."""
    if module is None:
        return 0
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


@contextmanager
def count_linear_macs(module: nn.Module) -> Iterator[dict[str, int]]:
    """Count the multiply-accumulates of every ``nn.Linear`` call inside ``module`` while the block runs.

    Yields a dict whose ``"macs"`` entry grows by ``rows x in_features x out_features`` per call (rows =
    all leading dimensions). For MLP-type networks this is the FLOP count up to a factor 2 and the
    bias/activation/normalisation terms; divide by the batch size for a per-sample cost.
    """
    stats = {"macs": 0, "calls": 0}

    def hook(mod: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        rows = inputs[0].numel() // inputs[0].shape[-1]
        stats["macs"] += rows * mod.in_features * mod.out_features  # type: ignore[operator]
        stats["calls"] += 1

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, nn.Linear)]
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()
