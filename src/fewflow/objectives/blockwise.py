"""Blockwise Flow Matching objectives: segment-stratified CFM + feature alignment, and the FRN loss.

Paper: *Blockwise Flow Matching: Improving Flow Matching Models For Efficient High-Quality Generation*
(Park, Lee, Joo, Kim; NeurIPS 2025, arXiv 2510.21167; code ``mlvlab/Blockwise-Flow-Matching``,
``src/scheduler/flow_matching.py``: ``compute_loss``, ``compute_loss_ft``). Time: t = 0 noise, t = 1 data
(the code's ``sigma = 1 - t``); the model is a :class:`fewflow.models.blockwise.BlockwiseVelocity` with
segments ``S_k = [b_k, b_{k+1})``.

**Stage 1** (:class:`BlockwiseFMLoss`). The batch is split evenly and deterministically over the K
segments (first ``B mod K`` segments get one extra sample, :class:`SegmentTime`), ``t`` is uniform inside
each segment, and each sample's velocity comes from its segment's block, so the velocity term is the CFM
loss (:class:`fewflow.objectives.CFMLoss`, which computes it here) with ``t`` stratified over segments; its
restriction to segment ``k`` is CFM on ``t ~ U(S_k)`` for block ``k`` alone. The feature-alignment term
(REPA-style "Semantic Feature Guidance") pulls a projection of the feature network's output towards a frozen
encoder's features of the clean data ``x1``:

    L = E || v_theta(x_t, t) - u_t ||^2  +  lambda_proj * E[ -cos( P(h_phi(x_t, t)), E(x1) ) ],

with ``lambda_proj = 0.05`` (code default ``proj_loss_weight``). The paper's encoder is DINOv2-B; at our
scale the frozen digits classifier's penultimate features (:mod:`fewflow.metrics.features`,
``encoder="digits"``) stand in.

**Stage 2** (:class:`FRNLoss`). Everything but the FRN ``r_psi`` is frozen. For ``t`` in segment
``[a, b)`` and ``x_a``, ``x_t`` on the path from the same ``(x0, x1)``:

    L_FRN = E || sg(h_phi(x_a, a)) + alpha(t) r_psi(x_t, t) - sg(h_phi(x_t, t)) ||^2,
    alpha(t) = (t - a) / (b - a),

the same ``alpha`` (same segment edges) that :class:`fewflow.models.blockwise.FRNVelocity` uses at sampling.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fewflow._validate import FewflowError, check_batch, check_finite, check_same_shape
from fewflow.couplings import Coupling, IndependentCoupling
from fewflow.couplings.base import randn_like
from fewflow.methods.registry import (
    BuildContext,
    MethodSpec,
    Needs,
    Stage,
    register,
)
from fewflow.models.blockwise import BlockwiseVelocity, segment_boundaries, segment_grid, segment_index
from fewflow.objectives.base import LossOutput
from fewflow.objectives.cfm import CFMLoss
from fewflow.objectives.time_samplers import TimeSampler

__all__ = ["BlockwiseFMLoss", "FRNLoss", "SegmentTime", "digits_encoder", "segment_split_sizes"]


def segment_split_sizes(n: int, segments: int) -> list[int]:
    """The code's deterministic even split of ``n`` samples over ``segments``: ``n // K`` each, one more
    for the first ``n mod K`` segments."""
    base, rem = divmod(int(n), int(segments))
    return [base + 1 if i < rem else base for i in range(segments)]


class SegmentTime(TimeSampler):
    """Segment-stratified times: a contiguous run of ``segment_split_sizes(n, K)[k]`` draws uniform in
    each segment ``[b_k, b_{k+1})``, segment 0 first (BFM's ``compute_loss``)."""

    def __init__(self, boundaries: Tensor | list[float] | None = None, segments: int | None = None) -> None:
        self.boundaries = segment_boundaries(segments if boundaries is None else None, boundaries)

    def sample(self, n, *, device=None, dtype=None, generator=None) -> Tensor:  # noqa: D102
        k = self.boundaries.numel() - 1
        dtype = dtype if dtype is not None else torch.get_default_dtype()
        sizes = segment_split_sizes(n, k)
        seg = torch.repeat_interleave(torch.arange(k), torch.tensor(sizes))
        if generator is None:
            u = torch.rand(n, dtype=torch.float64)
        else:
            u = torch.rand(n, generator=generator, device=generator.device, dtype=torch.float64).cpu()
        lo, hi = self.boundaries[seg], self.boundaries[seg + 1]
        t = (lo + (hi - lo) * u).to(dtype)
        # rounding to a low-precision dtype may land on the next segment's edge: keep each draw in its own
        t = torch.where(segment_index(t, self.boundaries) != seg, lo.to(dtype), t)
        return t.to(device) if device is not None else t

    def __repr__(self) -> str:
        return f"SegmentTime(segments={self.boundaries.numel() - 1})"


class _RecordingPath:
    """Forwards ``sample`` to a path and keeps the last :class:`PathSample` (for per-segment diagnostics)."""

    def __init__(self, path: Any, store: dict[str, Any]) -> None:
        self.path, self.store = path, store

    def sample(self, x0: Tensor, x1: Tensor, t: Tensor) -> Any:
        ps = self.path.sample(x0, x1, t)
        self.store["sample"] = ps
        return ps


class _FixedTime(TimeSampler):
    """Returns given times (for :meth:`BlockwiseFMLoss.pair_loss` with explicit ``t``)."""

    def __init__(self, t: Tensor) -> None:
        self.t = t

    def sample(self, n, *, device=None, dtype=None, generator=None) -> Tensor:  # noqa: D102
        if self.t.shape != (n,):
            raise FewflowError(f"t must have shape ({n},), got {tuple(self.t.shape)}")
        return self.t.to(device=device, dtype=dtype)


def digits_encoder(cache_dir: Any = None) -> Callable[[Tensor], Tensor]:
    """The frozen DINOv2 stand-in at our scale: penultimate features (64-d) of the cached digits
    classifier (:func:`fewflow.metrics.features.get_feature_classifier`); accepts ``(B, 1, 8, 8)`` or
    flattened ``(B, 64)`` digits in ``[-1, 1]``."""
    from fewflow.metrics.features import classifier_features, get_feature_classifier

    clf = get_feature_classifier("digits", cache_dir=cache_dir)

    def encode(x1: Tensor) -> Tensor:
        img = x1.reshape(x1.shape[0], 1, clf.size, clf.size)
        return classifier_features(img, "digits", clf).to(x1.dtype)

    return encode


def _check_model(model: Any) -> BlockwiseVelocity:
    if not isinstance(model, BlockwiseVelocity):
        raise FewflowError(f"blockwise objectives need a BlockwiseVelocity model, got {type(model).__name__}")
    return model


class BlockwiseFMLoss:
    """Stage-1 BFM loss ``loss(model, x1, generator=None, **cond) -> LossOutput`` (see the module docstring).

    Args:
        path: affine path (default ``AffinePath("linear")``, the paper's).
        source: ``source.sample_like(x1, generator=...)`` for ``x0`` (default standard normal).
        coupling: pairs ``x0`` with ``x1`` (default independent).
        encoder: frozen ``encoder(x1) -> (B, E)`` features of the clean data, ``"digits"`` for
            :func:`digits_encoder`, or ``None`` (no alignment term). ``E`` must equal the model's
            ``proj_dim``.
        lambda_proj: weight of the alignment term (0.05, the code's ``proj_loss_weight``).
        label_dropout, num_classes: classifier-free guidance training, as in :class:`CFMLoss`.
        weighting: optional time weighting ``lambda(t) -> (B,)`` for the velocity term.

    Diagnostics: ``loss``, ``mse`` (velocity term), ``mse_seg{k}`` (mean per-sample MSE of segment ``k``),
    ``n_seg{k}``, and with an encoder ``proj`` (mean negative cosine) and ``cos_sim``.
    """

    def __init__(
        self,
        path: Any = None,
        source: Any = None,
        coupling: Coupling | None = None,
        encoder: Callable[[Tensor], Tensor] | str | None = None,
        lambda_proj: float = 0.05,
        label_dropout: float = 0.0,
        num_classes: int | None = None,
        weighting: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        if path is None:
            from fewflow.paths.affine import AffinePath

            path = AffinePath("linear")
        if not (isinstance(lambda_proj, int | float) and lambda_proj >= 0):
            raise FewflowError(f"lambda_proj must be a number >= 0, got {lambda_proj!r}")
        if isinstance(encoder, str):
            if encoder != "digits":
                raise FewflowError(f"unknown encoder {encoder!r}; give 'digits' or a callable x1 -> features")
            encoder = digits_encoder()
        if encoder is not None and not callable(encoder):
            raise FewflowError(
                f"encoder must be callable x1 -> (B, E) features, got {type(encoder).__name__}"
            )
        self.path, self.source = path, source
        self.coupling = coupling if coupling is not None else IndependentCoupling()
        self.encoder = encoder
        self.lambda_proj = float(lambda_proj)
        self.label_dropout, self.num_classes, self.weighting = label_dropout, num_classes, weighting
        # validate the CFM arguments now (a CFMLoss is rebuilt per call with the model's segments)
        CFMLoss(path, source, self.coupling, SegmentTime(segments=1), weighting, label_dropout, num_classes)

    def __call__(
        self, model: Any, x1: Tensor, *, generator: torch.Generator | None = None, **cond: Any
    ) -> LossOutput:
        """Draw ``x0``, couple it with ``x1``, stratify ``t`` over the model's segments; return the loss."""
        m = _check_model(model)
        return self._loss(m, x1, lambda cfm, f: cfm(f, x1, generator=generator, **cond))

    def pair_loss(
        self, model: Any, x0: Tensor, x1: Tensor, t: Tensor | None = None, weights: Tensor | None = None, *,
        generator: torch.Generator | None = None, **cond: Any,
    ) -> LossOutput:
        """The loss on given pairs (no source draw, no coupling); ``t`` given or segment-stratified."""
        m = _check_model(model)
        sampler: TimeSampler | None = None if t is None else _FixedTime(t)
        return self._loss(
            m, x1, lambda cfm, f: cfm.pair_loss(f, x0, x1, weights, generator=generator, **cond), sampler
        )

    def _loss(
        self,
        model: BlockwiseVelocity,
        x1: Tensor,
        run: Callable[[CFMLoss, Callable[..., Tensor]], LossOutput],
        time_sampler: TimeSampler | None = None,
    ) -> LossOutput:
        seen: dict[str, Any] = {}
        path = _RecordingPath(self.path, seen)
        sampler = time_sampler if time_sampler is not None else SegmentTime(model.boundaries)
        cfm = CFMLoss(path, self.source, self.coupling, sampler, self.weighting, self.label_dropout,
                      self.num_classes, sigma_path_noise=0.0)

        def velocity(x_t: Tensor, t: Tensor, **c: Any) -> Tensor:
            # one feature-network forward serves both the velocity and the alignment term
            ctx = model.context(t, c.get("y"))
            h = model.features(x_t, t, c.get("y"), context=ctx)
            pred = model.velocity(x_t, t, h, c.get("y"), context=ctx)
            seen.update(h=h, pred=pred)
            return pred

        out = run(cfm, velocity)
        loss, diag = out.loss, dict(out.diagnostics)
        ps, h, pred = seen["sample"], seen["h"], seen["pred"]
        with torch.no_grad():
            per = (pred.detach() - ps.velocity).pow(2).reshape(x1.shape[0], -1).mean(1)
            seg = model.segment_of(ps.t)
            for k in range(model.num_segments):
                mask = seg == k
                n_k = int(mask.sum())
                diag[f"n_seg{k}"] = float(n_k)
                if n_k:
                    diag[f"mse_seg{k}"] = float(per[mask].mean())
        if self.encoder is not None and self.lambda_proj > 0:
            with torch.no_grad():
                z = self.encoder(x1)
            if not torch.is_tensor(z) or z.dim() != 2 or z.shape[0] != x1.shape[0]:
                shape = tuple(z.shape) if torch.is_tensor(z) else type(z).__name__
                raise FewflowError(f"encoder must return (B, E) features for B={x1.shape[0]}, got {shape}")
            if model.proj_dim != z.shape[1]:
                raise FewflowError(
                    f"encoder features have dimension {z.shape[1]} but the model's projection head has "
                    f"proj_dim={model.proj_dim}; build the model with proj_dim={z.shape[1]}"
                )
            cos = F.cosine_similarity(model.project(h), z.detach().to(h.dtype), dim=-1)
            proj = -cos.mean()
            loss = loss + self.lambda_proj * proj
            diag.update(proj=float(proj.detach()), cos_sim=float(cos.detach().mean()),
                        loss=float(loss.detach()))
        return LossOutput(loss=loss, diagnostics=diag)

    def __repr__(self) -> str:
        return (f"BlockwiseFMLoss(path={self.path!r}, lambda_proj={self.lambda_proj:g}, "
                f"encoder={self.encoder!r})")


class FRNLoss:
    """Stage-2 loss ``loss(model, x1, generator=None, **cond) -> LossOutput``: trains only ``model.frn``.

    The feature network, conditioning and blocks run under ``torch.no_grad``, so gradients reach the FRN
    only; optimise ``model.frn.parameters()``. Times are segment-stratified (:class:`SegmentTime`) and the
    anchor of each sample is its segment start ``b_k``. Diagnostics: ``loss``; ``baseline`` = the loss of
    a zero FRN (``|| h(x_a) - h(x_t) ||^2``, what sampling without the residual would incur); ``alpha_mean``.
    """

    def __init__(self, path: Any = None, source: Any = None) -> None:
        if path is None:
            from fewflow.paths.affine import AffinePath

            path = AffinePath("linear")
        if not hasattr(path, "sample"):
            raise FewflowError(f"path needs .sample(x0, x1, t) (e.g. AffinePath), got {type(path).__name__}")
        if source is not None and not hasattr(source, "sample_like"):
            raise FewflowError(f"source needs .sample_like(x1, generator=...), got {type(source).__name__}")
        self.path, self.source = path, source

    def __call__(
        self, model: Any, x1: Tensor, *, generator: torch.Generator | None = None, **cond: Any
    ) -> LossOutput:
        m = _check_model(model)
        if m.frn is None:
            raise FewflowError("FRNLoss needs a BlockwiseVelocity built with frn_depth >= 1")
        check_finite("x1", x1)
        check_batch("x1", x1)
        if self.source is None:
            x0 = randn_like(x1, generator)
        else:
            x0 = self.source.sample_like(x1, generator=generator)
            check_same_shape("source sample x0", x0, "x1", x1)
        b = x1.shape[0]
        t = SegmentTime(m.boundaries).sample(b, device=x1.device, dtype=x1.dtype, generator=generator)
        seg = m.segment_of(t)
        t_start = m.boundaries.to(device=x1.device, dtype=x1.dtype)[seg]
        y = cond.get("y")
        with torch.no_grad():
            x_t = self.path.sample(x0, x1, t).x_t
            x_a = self.path.sample(x0, x1, t_start).x_t
            h_start = m.features(x_a, t_start, y)
            ctx = m.context(t, y)
            target = m.features(x_t, t, y, context=ctx)
        approx = m.frn_features(x_t, t, h_start, t_start, y, context=ctx)
        loss = (approx - target).pow(2).mean(1).mean()
        baseline = (h_start - target).pow(2).mean(1).mean()
        return LossOutput(loss=loss, diagnostics={
            "loss": float(loss.detach()), "baseline": float(baseline),
            "alpha_mean": float(m.frn_alpha(t, t_start).mean()),
        })

    def __repr__(self) -> str:
        return f"FRNLoss(path={self.path!r})"


def blockwise_sample(
    model: BlockwiseVelocity,
    x0: Tensor,
    steps_per_segment: int = 4,
    *,
    use_frn: bool = False,
    stepper: Any = "euler",
    cond: Mapping[str, Any] | None = None,
    **solve_kw: Any,
) -> Any:
    """The BFM sampler: ``steps_per_segment`` steps in each segment on :func:`segment_grid`, through
    :func:`fewflow.solvers.solve` (so NFE counting, trajectories and callbacks are the shared loop's).
    With ``use_frn`` the feature network runs once per segment (:class:`FRNVelocity`)."""
    from fewflow.solvers import solve

    grid = segment_grid(model.boundaries, steps_per_segment)
    f: Callable[..., Tensor] = model.frn_sampler() if use_frn else model
    return solve(f, x0, grid=grid, stepper=stepper, cond=cond, **solve_kw)


# --------------------------------------------------------------------------- registration


@dataclass
class BlockwiseConfig:
    """Blockwise FM's loss (feature alignment weight from the paper) and its segmented network."""

    segments: int = field(default=4, metadata={"help": "time segments, one velocity block each"})
    lambda_proj: float = field(default=0.05, metadata={"help": "feature-alignment weight"})
    encoder: str | None = field(default=None, metadata={"help": "null | digits: features to align to"})
    block_hidden: int = 64
    block_depth: int = 2
    feature_hidden: int = 64
    feature_depth: int = 2


def _build_blockwise(cfg: BlockwiseConfig, ctx: BuildContext) -> list[Stage]:
    loss = BlockwiseFMLoss(
        path=ctx.path, source=ctx.source, coupling=ctx.coupling, encoder=cfg.encoder,
        lambda_proj=cfg.lambda_proj if cfg.encoder else 0.0, **ctx.conditioning(),
    )
    return [Stage("blockwise", loss)]


def _make_blockwise(cfg: BlockwiseConfig, meta: dict) -> BlockwiseVelocity:
    import math

    k = meta.get("num_classes") if meta.get("conditional") else None
    return BlockwiseVelocity(
        int(math.prod(meta["shape"])), segments=cfg.segments, block_hidden=cfg.block_hidden,
        block_depth=cfg.block_depth, feature_hidden=cfg.feature_hidden, feature_depth=cfg.feature_depth,
        num_classes=k, proj_dim=None if cfg.encoder is None else 64,
    )


register(MethodSpec(
    name="blockwise",
    label="Blockwise FM",
    paper="Park et al., Blockwise Flow Matching: Improving Flow Matching Models for Efficient High-Quality "
    "Generation (2510.21167)",
    summary="one small velocity block per time segment on shared features; cheaper per sample",
    config=BlockwiseConfig,
    loss=BlockwiseFMLoss,
    build=_build_blockwise,
    needs=Needs(model="custom"),
    make_model=_make_blockwise,
    recipe_fields=("segments", "encoder", "block_hidden", "block_depth", "feature_hidden", "feature_depth"),
))
