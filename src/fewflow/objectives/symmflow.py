"""Symmetrical Flow Matching (SymmFlow): generation, classification and segmentation with one network.

Caetano et al., "Symmetrical Flow Matching: Unified Image Generation, Segmentation, and Classification
with Score-Based Generative Models" (AAAI 2026, arXiv 2506.10634).

One velocity network ``v_theta(z, t)`` acts on the joint state ``z = [x, m]`` of the data channels ``x``
and the semantic channels ``m`` (class code, mask; see :class:`fewflow.models.symm.SymmCodec`). The two
halves move in **opposite time directions**: in fewflow's time (t = 0 noise, t = 1 data) the data
channels go noise -> data while the semantic channels go semantics -> noise. With ``a_t = 1 - (1 -
sigma_min) t``, noise ``n_x, n_m ~ N(0, I)`` and a training pair ``(x, m)``:

    x_t = a_t n_x + t x,        u_x = x - (1 - sigma_min) n_x        (x_0 = n_x, x_1 = x),
    m_t = a_t m + t n_m,        u_m = n_m - (1 - sigma_min) m        (m_0 = m,   m_1 = n_m + sigma_min m),

    L(theta) = w E || v_x(z_t, t) - u_x ||^2 + (1 - w) E || v_m(z_t, t) - u_m ||^2     (w = image_weight),

the means taken over elements (the authors' code, ``sigma_min = 1e-4``). Inference integrates the joint
ODE ``dz/dt = v_theta(z, t)``:

* **generation** (:func:`symm_generate`): from ``[n_x, m]`` at t = 0 to t = 1, reading ``x``; ``m`` is a
  class code, with a mask if one is given (semantic image synthesis), and absent parts are held at 0 (the
  network was trained with those rows too: ``mask_dropout`` drops the mask, ``label_dropout`` the class);
* **classification / segmentation** (:func:`symm_classify`, :func:`symm_segment`): from ``[x, m_1]`` at
  t = 1 back to t = 0, reading the semantic channels: class probabilities from the class channels'
  spatial mean, the mask from the mask channel's sign. The paper starts from ``m_1 ~ N(0, I)``
  (``start="noise"``); fewflow's default starts from its mean ``m_1 = 0`` (``start="mean"``). The joint ODE
  transports marginals but not the cross-time coupling of ``x_1`` with ``m_0``, so a random start makes
  the decision depend on the draw: on a Gaussian toy with the *exact* velocity the mean start is close to
  the Bayes classifier and a single noise draw is well below it (``tests/test_symmflow.py``);
  ``draws > 1`` averages over noise draws.

``fewflow sample RUN --label K`` integrates the generation ODE through the shared solver loop: the
sampling plan's stepper (:class:`SymmJointStepper`) carries the semantic channels beside the image.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from fewflow._validate import FewflowError, check_batch, check_finite
from fewflow.methods.registry import (
    BuildContext,
    DefaultSampler,
    MethodSpec,
    Needs,
    SamplingPlan,
    Stage,
    register,
)
from fewflow.models.symm import MASK_ABSENT, SymmCodec, SymmFlowNet, digit_masks
from fewflow.objectives.base import LossOutput
from fewflow.objectives.common import check_linear_path, drop_labels, rand, randn_like, sample_source, unwrap
from fewflow.solvers.steppers import Stepper, get_stepper

__all__ = [
    "SymmFlowConfig",
    "SymmFlowLoss",
    "SymmJointStepper",
    "SymmJointVelocity",
    "digit_masks",
    "make_symmflow_model",
    "mask_iou",
    "symm_classify",
    "symm_generate",
    "symm_segment",
    "symm_semantics",
]


def _codec(model: Any, codec: SymmCodec | None) -> SymmCodec:
    c = codec if codec is not None else getattr(unwrap(model), "codec", None)
    if not isinstance(c, SymmCodec):
        raise FewflowError("SymmFlow needs a SymmFlowNet (or pass codec=SymmCodec(...)) for its semantic "
                           "channels")
    return c


class SymmFlowLoss:
    """The SymmFlow loss ``loss(model, x1, *, generator=None, y=labels) -> LossOutput`` (module docstring).

    ``model`` is a :class:`~fewflow.models.symm.SymmFlowNet` (its codec encodes labels and masks; masks are
    :func:`~fewflow.models.symm.digit_masks` of ``x1``). ``label_dropout``: probability a row's class is
    absent (unconditional generation); ``mask_dropout``: probability its mask is absent (generation from a
    label alone). Absent channels are 0 with target velocity 0. Diagnostics: ``loss``, ``mse_x``, ``mse_m``.
    """

    def __init__(self, source: Any = None, image_weight: float = 0.5, sigma_min: float = 1e-4,
                 mask_dropout: float = 0.1, label_dropout: float = 0.0,
                 num_classes: int | None = None) -> None:
        if not 0.0 <= image_weight <= 1.0:
            raise FewflowError(f"image_weight must lie in [0, 1], got {image_weight}")
        if not 0.0 <= sigma_min < 1.0:
            raise FewflowError(f"sigma_min must lie in [0, 1), got {sigma_min}")
        for name, p in (("mask_dropout", mask_dropout), ("label_dropout", label_dropout)):
            if not 0.0 <= p < 1.0:
                raise FewflowError(f"{name} must lie in [0, 1), got {p}")
        self.source, self.image_weight, self.sigma_min = source, float(image_weight), float(sigma_min)
        self.mask_dropout, self.label_dropout = float(mask_dropout), float(label_dropout)
        self.num_classes = num_classes

    def targets(self, x1: Tensor, m: Tensor, nx: Tensor, nm: Tensor, t: Tensor) -> tuple[Tensor, ...]:
        """``(x_t, m_t, u_x, u_m)`` of the two opposite interpolants at times ``t`` ``(B,)``."""
        tx = t.reshape(-1, *([1] * (x1.dim() - 1)))
        a = 1.0 - (1.0 - self.sigma_min) * tx
        return (a * nx + tx * x1, a * m + tx * nm, x1 - (1.0 - self.sigma_min) * nx,
                nm - (1.0 - self.sigma_min) * m)

    def __call__(self, model: Any, x1: Tensor, *, generator: torch.Generator | None = None,
                 y: Tensor | None = None, **cond: Any) -> LossOutput:
        check_finite("x1", x1)
        check_batch("x1", x1)
        if y is None:
            raise FewflowError("symmflow needs class labels y (a conditional run)")
        codec = _codec(model, None)
        b = x1.shape[0]
        y = y.to(x1.device).long()
        if self.label_dropout > 0:
            y = drop_labels({"y": y}, self.label_dropout, codec.num_classes, x1, generator)[0]["y"]
        mask = digit_masks(x1, codec.value_range) if codec.segment else None
        m, flags = codec.encode(y, x1, mask, jitter=True, generator=generator)
        if codec.segment and self.mask_dropout > 0:
            drop = rand(b, x1, generator) < self.mask_dropout
            flags = flags + drop.long() * MASK_ABSENT
        frozen = codec.frozen(flags, m)
        m = torch.where(frozen, torch.zeros_like(m), m)
        t = rand(b, x1, generator)
        nx = sample_source(self.source, x1, generator)
        nm = randn_like(m, generator)
        x_t, m_t, u_x, u_m = self.targets(x1, m, nx, nm, t)
        m_t = torch.where(frozen, torch.zeros_like(m_t), m_t)
        u_m = torch.where(frozen, torch.zeros_like(u_m), u_m)
        v = model(torch.cat([x_t, m_t], 1), t, y=flags)
        c = x1.shape[1]
        if not torch.is_tensor(v) or v.shape != (b, c + m.shape[1], *x1.shape[2:]):
            got = tuple(getattr(v, "shape", ()))
            raise FewflowError(f"model output has shape {got}, expected the joint state's")
        mse_x = (v[:, :c] - u_x).pow(2).mean()
        mse_m = (v[:, c:] - u_m).pow(2).mean()
        loss = self.image_weight * mse_x + (1.0 - self.image_weight) * mse_m
        return LossOutput(loss, {"loss": float(loss.detach()), "mse_x": float(mse_x.detach()),
                                 "mse_m": float(mse_m.detach())})


class SymmJointVelocity(nn.Module):
    """The generation ODE's velocity on ``z = [x, d]``, ``d`` the semantic channels' displacement from
    their start code: ``forward(z, t, y, mask=None)`` encodes ``y`` (``K`` = no class) and ``mask`` (None =
    absent), evaluates the network on ``[x, code + d]`` and returns the joint velocity with the absent
    channels held still. ``z`` may be the data channels alone (``d = 0``)."""

    def __init__(self, net: nn.Module, codec: SymmCodec | None = None) -> None:
        super().__init__()
        self.net, self.codec = net, _codec(net, codec)
        dc = getattr(unwrap(net), "data_channels", None)
        if dc is None:
            raise FewflowError("SymmJointVelocity needs a network with data_channels (a SymmFlowNet)")
        self.data_channels = int(dc)

    def forward(self, z: Tensor, t: Tensor, y: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        if y is None:
            raise FewflowError("SymmFlow generation needs labels y")
        c = self.data_channels
        if z.shape[1] not in (c, c + self.codec.channels):
            raise FewflowError(f"expected {c} data channels (+ {self.codec.channels} semantic), "
                               f"got {z.shape[1]}")
        x = z[:, :c]
        start, flags = self.codec.encode(y, x, mask)
        m = start + z[:, c:] if z.shape[1] > c else start
        frozen = self.codec.frozen(flags, m)
        m = torch.where(frozen, torch.zeros_like(m), m)
        v = self.net(torch.cat([x, m], 1), t, y=flags)
        return torch.cat([v[:, :c], torch.where(frozen, torch.zeros_like(v[:, c:]), v[:, c:])], 1)


class SymmJointStepper(Stepper):
    """Steps the joint generation state inside :func:`fewflow.solvers.solve`'s loop on the data channels:
    the semantic displacement is the carry, ``base`` (euler, heun, midpoint, rk4) steps ``[x, d]``."""

    stateful = True

    def __init__(self, base: str | Stepper = "euler", steps: int | None = None) -> None:
        self.base = get_stepper(base)
        if self.base.stateful or self.base.is_flow_map or self.base.stochastic:
            raise FewflowError(f"SymmFlow samples with a plain ODE stepper, got {self.base!r}")
        self.nfe_per_step = self.base.nfe_per_step
        if steps is not None:
            self.steps = int(steps)

    def init_carry(self) -> object:
        return ()  # no semantic displacement yet (the first step learns the channel count)

    def step_carry(
        self, f: Any, x: Tensor, t: Tensor, t_next: Tensor, carry: object
    ) -> tuple[Tensor, object]:
        if not torch.is_tensor(carry):
            probe = f(x, t)  # joint velocity: its width gives the semantic channels
            d0 = torch.zeros_like(probe[:, x.shape[1]:])
            z = torch.cat([x, d0], 1)
            z = _finish_step(self.base, f, z, t, t_next, probe)
        else:
            z = self.base.step(f, torch.cat([x, carry], 1), t, t_next)  # type: ignore[list-item]
        return z[:, : x.shape[1]], z[:, x.shape[1]:]

    def __repr__(self) -> str:
        return f"SymmJointStepper({self.base!r})"


def _finish_step(base: Stepper, f: Any, z: Tensor, t: Tensor, t_next: Tensor, v0: Tensor) -> Tensor:
    """One ``base`` step from ``z`` whose first velocity ``v0`` is already known (no extra evaluation)."""
    first = [v0]

    def g(zz: Tensor, tt: Tensor) -> Tensor:
        if first:
            return first.pop()
        return f(zz, tt)

    return base.step(g, z, t, t_next)


def symm_generate(model: nn.Module, labels: Tensor, steps: int = 25, *, masks: Tensor | None = None,
                  stepper: str = "euler", x0: Tensor | None = None,
                  generator: torch.Generator | None = None) -> Tensor:
    """Class-conditional samples ``(B, *shape)``: integrate ``[n_x, code(labels)]`` (plus ``masks``, bool
    ``(B, 1, H, W)``, for semantic image synthesis) from t = 0 to 1 and read the data channels.
    ``labels = K`` draws unconditionally (a model trained with ``label_dropout > 0``)."""
    from fewflow.solvers import solve, uniform_grid

    net = unwrap(model)
    if not isinstance(net, SymmFlowNet):
        raise FewflowError(f"symm_generate needs a SymmFlowNet, got {type(net).__name__}")
    labels = torch.as_tensor(labels).long().reshape(-1)
    p = next(net.parameters())
    if x0 is None:
        gdev = generator.device if generator is not None else p.device
        x0 = torch.randn((labels.shape[0], *net.shape), generator=generator, device=gdev, dtype=p.dtype)
        x0 = x0.to(p.device)
    f = SymmJointVelocity(model)
    z0 = torch.cat([x0, x0.new_zeros((x0.shape[0], net.codec.channels, *x0.shape[2:]))], 1)
    cond: dict[str, Any] = {"y": labels.to(x0.device)}
    if masks is not None:
        cond["mask"] = masks.to(x0.device)
    with torch.no_grad():
        res = solve(f, z0, grid=uniform_grid(steps), stepper=stepper, cond=cond)
    return res.x[:, : x0.shape[1]]


def symm_semantics(model: Any, x: Tensor, steps: int = 25, *, start: str = "mean", stepper: str = "euler",
                   codec: SymmCodec | None = None, generator: torch.Generator | None = None) -> Tensor:
    """The semantic channels at t = 0 ``(B, S, *spatial)``: integrate ``[x, m_1]`` from t = 1 to 0 with
    ``m_1 = 0`` (``start="mean"``) or ``m_1 ~ N(0, I)`` (``start="noise"``, the paper's). ``model(z, t,
    y=flags)`` is a SymmFlowNet or any joint velocity (then pass ``codec``)."""
    from fewflow.solvers import solve, uniform_grid

    codec = _codec(model, codec)
    check_finite("x", x)
    check_batch("x", x)
    if start not in ("mean", "noise"):
        raise FewflowError(f"start must be 'mean' or 'noise', got {start!r}")
    shape = (x.shape[0], codec.channels, *x.shape[2:])
    if start == "mean":
        m1 = x.new_zeros(shape)
    else:
        m1 = randn_like(x.new_empty(shape), generator)
    flags = torch.zeros(x.shape[0], device=x.device, dtype=torch.long)
    with torch.no_grad():
        res = solve(model, torch.cat([x, m1], 1), grid=uniform_grid(steps, 1.0, 0.0), stepper=stepper,
                    cond={"y": flags})
    return res.x[:, x.shape[1]:]


def symm_classify(model: Any, x: Tensor, steps: int = 25, *, start: str = "mean", draws: int = 1,
                  temperature: float = 0.1, stepper: str = "euler", codec: SymmCodec | None = None,
                  generator: torch.Generator | None = None) -> Tensor:
    """Class probabilities ``(B, K)`` from the end point of the class channels (:func:`symm_semantics`):
    ``softmax(-||mean(m_0) - code_k||^2 / (2 temperature^2))``, averaged over ``draws`` noise starts."""
    codec = _codec(model, codec)
    if draws < 1 or (start == "mean" and draws != 1):
        raise FewflowError(f"draws must be >= 1 (and 1 with start='mean'), got {draws}")
    xr = x.repeat(draws, *([1] * (x.dim() - 1)))
    m0 = symm_semantics(model, xr, steps, start=start, stepper=stepper, codec=codec, generator=generator)
    p = torch.softmax(codec.class_logits(m0, temperature), -1)
    return p.reshape(draws, x.shape[0], -1).mean(0)


def symm_segment(model: Any, x: Tensor, steps: int = 25, *, start: str = "mean", draws: int = 1,
                 stepper: str = "euler", codec: SymmCodec | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
    """Bool masks ``(B, 1, H, W)``: the sign of the mask channel at t = 0 (majority over ``draws``)."""
    codec = _codec(model, codec)
    if draws < 1 or (start == "mean" and draws != 1):
        raise FewflowError(f"draws must be >= 1 (and 1 with start='mean'), got {draws}")
    xr = x.repeat(draws, *([1] * (x.dim() - 1)))
    m0 = symm_semantics(model, xr, steps, start=start, stepper=stepper, codec=codec, generator=generator)
    votes = codec.mask(m0).reshape(draws, x.shape[0], 1, *x.shape[2:]).float().mean(0)
    return votes > 0.5


def mask_iou(pred: Tensor, target: Tensor) -> Tensor:
    """Per-image intersection over union ``(B,)`` of bool masks (1 when both are empty)."""
    if pred.shape != target.shape:
        raise FewflowError(f"mask shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    p, q = pred.bool().flatten(1), target.bool().flatten(1)
    inter, union = (p & q).sum(1).double(), (p | q).sum(1).double()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


# --------------------------------------------------------------------------- registration


@dataclass
class SymmFlowConfig:
    """SymmFlow's loss settings (the authors' code) and its network / codec (recipe fields)."""

    image_weight: float = field(default=0.5, metadata={"help": "w: weight of the data channels' MSE"})
    sigma_min: float = field(default=1e-4, metadata={"help": "end noise of the paths"})
    mask_dropout: float = field(default=0.1, metadata={"help": "rows trained without their mask"})
    encoding: str = field(default="onehot", metadata={"help": "class code: onehot (K maps) | scalar (1 map)"})
    beta: float = field(default=2.0, metadata={"help": "code amplitude: codes lie in [-beta/2, beta/2]"})
    segment: bool = field(default=True, metadata={"help": "a mask channel (images: the thresholded data)"})
    base: int = field(default=32, metadata={"help": "UNet width (images)"})
    mults: tuple[int, ...] = field(default=(1, 2), metadata={"help": "UNet channel multipliers"})
    hidden: int = field(default=256, metadata={"help": "MLP width (vectors)"})
    depth: int = field(default=4, metadata={"help": "MLP depth (vectors)"})


def make_symmflow_model(cfg: SymmFlowConfig, meta: dict[str, Any]) -> SymmFlowNet:
    """The run's :class:`SymmFlowNet` from the method config and the run's ``meta`` (shape, classes, value
    range): a U-Net for images (with a mask channel when ``cfg.segment``), an MLP for vectors."""
    k = meta.get("num_classes")
    if not meta.get("conditional") or not k:
        raise FewflowError("symmflow needs class labels (a conditional run)")
    shape = [int(v) for v in meta["shape"]]
    codec = SymmCodec(int(k), cfg.encoding, cfg.beta, segment=bool(cfg.segment and len(shape) == 3),
                      value_range=meta.get("value_range") or (-1.0, 1.0))
    return SymmFlowNet(shape, codec, base=cfg.base, mults=cfg.mults, hidden=cfg.hidden, depth=cfg.depth)


def _build(cfg: SymmFlowConfig, ctx: BuildContext) -> list[Stage]:
    check_linear_path(ctx.path, "symmflow")
    loss = SymmFlowLoss(source=ctx.source, image_weight=cfg.image_weight, sigma_min=cfg.sigma_min,
                        mask_dropout=cfg.mask_dropout, **ctx.conditioning())
    return [Stage("symmflow", loss)]


def _sampling(model: Any, cfg: SymmFlowConfig, *, nfe: int, **_: Any) -> SamplingPlan:
    from fewflow.solvers import stepper_for_nfe

    steps, name = stepper_for_nfe("euler", int(nfe))
    return SamplingPlan(SymmJointVelocity(model), SymmJointStepper(name, steps=steps))


register(MethodSpec(
    name="symmflow",
    label="SymmFlow",
    paper="Caetano et al., Symmetrical Flow Matching: Unified Image Generation, Segmentation, and "
    "Classification with Score-Based Generative Models (2506.10634)",
    summary="one network over data + label/mask channels flowing in opposite time directions: generates, "
    "classifies and segments",
    config=SymmFlowConfig,
    loss=SymmFlowLoss,
    build=_build,
    needs=Needs(model="custom", labels="required", coupling="fixed"),
    sampler=DefaultSampler("euler", nfe=25),
    sampling=_sampling,
    make_model=make_symmflow_model,
    recipe_fields=("encoding", "beta", "segment", "base", "mults", "hidden", "depth"),
))
