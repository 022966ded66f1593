"""FlowVid: flow matching of a video frame conditioned on the flow-warped edited first frame.

"FlowVid: Taming Imperfect Optical Flows for Consistent Video-to-Video Synthesis" (Liang et al., CVPR 2024,
arXiv 2312.17681). The first frame is edited by any image editor; optical flow from each later frame ``t``
back to frame 0 warps the edited first frame to ``t``; a generative model then produces frame ``t`` from
noise, conditioned on the warped frame, an occlusion (visibility) mask and a spatial control (FlowVid uses
depth maps). The flow is a *soft* condition: the model is trained to reconstruct real frames from warps
made with imperfect flow, so it learns to keep what the warp gets right and to repair what it gets wrong
(disocclusions, flow errors) from the spatial control.

In fewflow's time (t = 0 noise, t = 1 data) this is conditional flow matching with an image condition
``c`` concatenated to the network input (``UNet(cond_channels=...)``):

    c = [ w * m, m, s ]   (channels: C warped, 1 visibility, S in {0, 1} structure),
    L(theta) = E_{t, x0 ~ N(0, I), (x1, c)} || v_theta(x_t, t, c~) - (x1 - x0) ||^2,   x_t = t x1 + (1 - t) x0

(on the run's affine path in general), where ``w`` is the warped edited first frame, ``m`` its visibility
(1 = the pixel is seen in frame 0 under the flow, 0 = occluded or outside), ``s`` a colour-free structure
map of the source frame and ``c~`` the condition after dropout:

- flow dropout (probability ``flow_dropout`` per row): ``w * m`` and ``m`` set to 0, i.e. "nothing is
  visible" -- the model learns the structure-only branch ``v(x, t | s)``, which :mod:`fewflow.motion.editing`
  also uses as the toy image editor, and never trusts the warp blindly;
- structure dropout (``structure_dropout``): ``s`` set to 0;
- classifier-free-guidance dropout of the whole condition (``label_dropout``, the learned null condition).

The paper's spatial control and occlusion masks are kept; the latent video U-Net with spatial-temporal
attention is replaced by a per-frame image U-Net (frames are independent given their condition), and the
dropout rates are fewflow's choice (the paper does not state them). Without a condition (``c`` absent, e.g.
2-D toys) the loss is plain CFM. Training pairs come from :func:`fewflow.motion.editing.training_pairs`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fewflow._validate import FewflowError, check_batch, check_finite
from fewflow.couplings.base import rand
from fewflow.methods.registry import BuildContext, DefaultSampler, MethodSpec, Needs, Stage, register
from fewflow.objectives.base import LossOutput
from fewflow.objectives.cfm import CFMLoss
from fewflow.objectives.time_samplers import TimeSampler

__all__ = ["FlowVidConfig", "FlowVidLoss", "condition_layout"]


def condition_layout(x_channels: int, c_channels: int) -> tuple[slice, slice, slice]:
    """The channel slices ``(warped, visibility, structure)`` of a FlowVid condition for images with
    ``x_channels`` channels: ``c`` holds ``C`` warped channels, one visibility channel and zero or one
    structure channel (so ``c_channels`` is ``C + 1`` or ``C + 2``)."""
    if c_channels not in (x_channels + 1, x_channels + 2):
        raise FewflowError(
            f"a FlowVid condition has {x_channels} warped + 1 visibility (+ 1 structure) channels for "
            f"{x_channels}-channel frames, got {c_channels} channels"
        )
    return slice(0, x_channels), slice(x_channels, x_channels + 1), slice(x_channels + 1, c_channels)


class FlowVidLoss(CFMLoss):
    """CFM on ``(frame, condition)`` pairs with FlowVid's condition dropout (module docstring).

    Args:
        path: the run's affine path; source: ``x0`` draws (``None``: N(0, I)); time_sampler: t draws.
        flow_dropout: probability that a row's warped frame and visibility mask are zeroed (the model then
            sees only the structure map).
        structure_dropout: probability that a row's structure channel is zeroed.
        label_dropout, num_classes: classifier-free-guidance dropout of the whole condition (and labels).

    ``c`` must be ``(B, C + 1 or C + 2, H, W)`` for frames ``x1`` of shape ``(B, C, H, W)``; without ``c`` the
    loss is CFM. The inputs are never modified. Diagnostics: CFM's plus ``flow_dropped`` (fraction of rows).
    """

    def __init__(
        self,
        path: Any,
        source: Any = None,
        time_sampler: TimeSampler | None = None,
        flow_dropout: float = 0.1,
        structure_dropout: float = 0.0,
        label_dropout: float = 0.0,
        num_classes: int | None = None,
    ) -> None:
        for name, p in (("flow_dropout", flow_dropout), ("structure_dropout", structure_dropout)):
            if not (0.0 <= float(p) <= 1.0):
                raise FewflowError(f"{name} must lie in [0, 1], got {p}")
        super().__init__(path, source=source, time_sampler=time_sampler, label_dropout=label_dropout,
                         num_classes=num_classes)
        self.flow_dropout = float(flow_dropout)
        self.structure_dropout = float(structure_dropout)

    def drop_conditions(self, x1: Tensor, c: Tensor, generator: torch.Generator | None = None
                        ) -> tuple[Tensor, Tensor]:
        """``(c~, flow_dropped (B,) bool)``: a copy of ``c`` with the warped + visibility channels zeroed on
        rows drawn with probability ``flow_dropout`` and the structure channel on rows drawn with
        ``structure_dropout``."""
        if not torch.is_tensor(c) or c.dim() != 4 or x1.dim() != 4:
            got = tuple(c.shape) if torch.is_tensor(c) else type(c).__name__
            raise FewflowError(f"FlowVid needs frames (B, C, H, W) and an image condition c (B, C', H, W), "
                               f"got x {tuple(x1.shape)} and c {got}")
        if c.shape[0] != x1.shape[0] or c.shape[2:] != x1.shape[2:]:
            raise FewflowError(f"condition c {tuple(c.shape)} must match frames {tuple(x1.shape)} in B, H, W")
        check_finite("c", c)
        warped, vis, struct = condition_layout(x1.shape[1], c.shape[1])
        b = c.shape[0]
        keep_flow = (rand(b, x1, generator) >= self.flow_dropout).to(c.device)
        keep_struct = (rand(b, x1, generator) >= self.structure_dropout).to(c.device)
        scale = torch.ones(b, c.shape[1], 1, 1, device=c.device, dtype=c.dtype)
        scale[:, warped] = keep_flow.to(c.dtype)[:, None, None, None]
        scale[:, vis] = keep_flow.to(c.dtype)[:, None, None, None]
        scale[:, struct] = keep_struct.to(c.dtype)[:, None, None, None]
        return c * scale, ~keep_flow

    def __call__(
        self, model: Any, x1: Tensor, *, generator: torch.Generator | None = None, x0: Tensor | None = None,
        **cond: Any,
    ) -> LossOutput:
        check_finite("x1", x1)
        check_batch("x1", x1)
        c = cond.get("c")
        if c is None:
            return super().__call__(model, x1, generator=generator, x0=x0, **cond)
        c_new, dropped = self.drop_conditions(x1, c, generator)
        out = super().__call__(model, x1, generator=generator, x0=x0, **{**cond, "c": c_new})
        out.diagnostics["flow_dropped"] = float(dropped.float().mean())
        return out

    def __repr__(self) -> str:
        return (f"FlowVidLoss(path={self.path!r}, flow_dropout={self.flow_dropout:g}, "
                f"structure_dropout={self.structure_dropout:g}, label_dropout={self.label_dropout:g})")


@dataclass
class FlowVidConfig:
    """Settings of :class:`FlowVidLoss` (fewflow's defaults; the paper does not state dropout rates)."""

    flow_dropout: float = field(
        default=0.1, metadata={"help": "probability of zeroing a row's warped frame and visibility mask"}
    )
    structure_dropout: float = field(
        default=0.0, metadata={"help": "probability of zeroing a row's structure (spatial control) channel"}
    )


def _build(cfg: FlowVidConfig, ctx: BuildContext) -> list[Stage]:
    loss = FlowVidLoss(ctx.path, source=ctx.source, time_sampler=ctx.time_sampler,
                       flow_dropout=cfg.flow_dropout, structure_dropout=cfg.structure_dropout,
                       **ctx.conditioning())
    return [Stage("flowvid", loss)]


register(MethodSpec(
    name="flowvid",
    label="FlowVid",
    paper="Liang et al., FlowVid: Taming Imperfect Optical Flows for Consistent Video-to-Video Synthesis "
    "(2312.17681)",
    summary="flow matching of video frames conditioned on the flow-warped edited first frame, its occlusion "
    "mask and a structure map (flow as a soft condition)",
    config=FlowVidConfig,
    loss=FlowVidLoss,
    build=_build,
    needs=Needs(coupling="fixed"),
    sampler=DefaultSampler("euler", nfe=20),
))
