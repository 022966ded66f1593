"""TARFlow: exact-likelihood training of a transformer autoregressive normalizing flow.

"Normalizing Flows are Capable Generative Models" (Zhai et al., arXiv 2412.06329), with pieces of
"STARFlow: Scaling Latent Normalizing Flows for High-resolution Image Synthesis" (Gu et al., arXiv
2506.06276: Jacobi inversion) and STARFlow-V (causal video flow, a learnable flow-score-matching denoiser).
The network is :class:`fewflow.models.tarflow.TARFlow`; this module holds the loss, the likelihood
helpers, the samplers and the registration of the method ``tarflow``.

**Time convention.** A normalizing flow has no time variable; its *sampling* direction is noise -> data:
``z ~ N(0, I)`` (fewflow's t = 0 end) is pushed through ``f^{-1}`` to data (t = 1). The papers write the
flow in the data -> noise direction ``z = f(x)``; so do we for the density.

**Loss (per dimension, nats).** With ``D`` data dimensions, Gaussian noise augmentation ``sigma`` and
(for quantised data) uniform dequantisation ``u ~ U(-Delta/2, Delta/2)^D`` with bin width ``Delta``:

    x~ = x + u + sigma eps,   z, logdet = f(x~),
    L = E[ 0.5 ||z||^2 / D + 0.5 log(2 pi) - logdet / D ] = E[-log p(x~)] / D.

``bits/dim = (L - log Delta) / log 2`` for quantised data (uniform dequantisation makes
``E_u[log p(x + u)] + D log Delta`` a lower bound on the discrete log-likelihood, Theis et al. 2016), and
``L / log 2`` for continuous data (``Delta = 0``: no uniform noise, no offset). With ``sigma > 0`` the flow
models the noise-smoothed density ``p_sigma``, and its bits/dim are those of the smoothed data, as in the
paper (which trains and reports with its noise level). The paper's noise levels are 0.05 (ImageNet 64) and
0.1 (its MNIST example) on data in ``[-1, 1]``; fewflow's data sets share that range, and our default is the
MNIST value, 0.1.

**Sampling.** ``z ~ N(0, T^2 I)`` (temperature ``T``), ``x = f^{-1}(z)`` by Jacobi iterations or token by
token, then TARFlow's score-based denoising step (Tweedie's formula, with the flow's own exact score by
autograd)

    x^ = x + sigma^2 grad_x log p_sigma(x),

or the learned STARFlow-V denoiser ``x^ = x - sigma D(x)``, trained by flow-score matching
``|| D(x~) - sg(sigma grad_x(-log p(x~))) ||^2`` beside the NLL (``learn_denoiser``; the target is the
flow's input gradient, so the two losses share one backward pass of the flow; unlike STARFlow-V it shares
the run's optimiser).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

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
from fewflow.models.tarflow import InverseStats, TARFlow
from fewflow.objectives.base import LossOutput
from fewflow.objectives.common import drop_labels
from fewflow.solvers.steppers import Stepper

__all__ = [
    "SampleResult",
    "TARFlowConfig",
    "TARFlowLoss",
    "bayes_classify",
    "bits_per_dim",
    "detect_bin_width",
    "jacobi_sample",
    "log_likelihood",
    "make_tarflow",
    "sample",
    "sequential_sample",
]

_LN2 = math.log(2.0)


def _flow(model: Any) -> TARFlow:
    m = getattr(model, "module", model)  # DDP
    m = getattr(m, "flow", m)  # the sampling wrapper
    if not isinstance(m, TARFlow):
        raise FewflowError(f"tarflow needs a TARFlow network, got {type(m).__name__}")
    return m


def detect_bin_width(x: Tensor, max_levels: int = 256) -> float:
    """The spacing of the quantisation levels of ``x`` (digits in ``[-1, 1]``: 2/16; 8-bit images: 2/255),
    or 0.0 when the values do not lie on an evenly spaced grid of at most ``max_levels`` levels."""
    u = torch.unique(x.detach().double().flatten())
    if u.numel() < 2 or u.numel() > max_levels:
        return 0.0
    d = float((u[1:] - u[:-1]).min())
    k = (u - u[0]) / d
    if d <= 0 or float((k - k.round()).abs().max()) > 1e-3 or float(k[-1]) + 1 > max_levels:
        return 0.0
    return d


def _check_sigma(name: str, v: float) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise FewflowError(f"{name} must be a finite number >= 0, got {v!r}")
    return float(v)


class TARFlowLoss:
    """Negative log-likelihood per dimension of the noise-augmented, dequantised data (module docstring):
    ``loss(model, x1, *, generator=None, y=None) -> LossOutput``.

    Args:
        noise_sigma: Gaussian noise augmentation ``sigma`` (paper: 0.05 ImageNet 64, 0.1 MNIST).
        bin_width: the data's quantisation step ``Delta`` (uniform dequantisation and the bits/dim offset);
            0: continuous data. (The method's config uses -1 for "detect from the training data".)
        learn_denoiser: also train the flow's learned denoiser by flow-score matching (the network must
            have one: ``denoiser_layers > 0``).
        denoiser_weight: weight of the flow-score-matching term.
        label_dropout, num_classes: classifier-free-guidance label dropout (null class ``num_classes``).

    Diagnostics: ``nll`` (nats/dim), ``bpd``, ``logdet`` (per dim), ``fsm`` (the denoiser's loss).
    """

    def __init__(self, noise_sigma: float = 0.1, bin_width: float = 0.0, learn_denoiser: bool = False,
                 denoiser_weight: float = 1.0, label_dropout: float = 0.0,
                 num_classes: int | None = None) -> None:
        self.noise_sigma = _check_sigma("noise_sigma", noise_sigma)
        self.bin_width = _check_sigma("bin_width", bin_width)
        self.denoiser_weight = _check_sigma("denoiser_weight", denoiser_weight)
        if not (0.0 <= label_dropout <= 1.0):
            raise FewflowError(f"label_dropout must lie in [0, 1], got {label_dropout}")
        self.learn_denoiser = bool(learn_denoiser)
        if self.learn_denoiser and self.noise_sigma == 0:
            raise FewflowError("learn_denoiser needs noise_sigma > 0 (the denoiser removes that noise)")
        self.label_dropout, self.num_classes = float(label_dropout), num_classes

    def augment(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``x + u + sigma eps`` (a new tensor; ``x`` is not modified)."""
        gdev = generator.device if generator is not None else x.device
        out = x
        if self.bin_width > 0:
            u = torch.rand(x.shape, generator=generator, device=gdev, dtype=x.dtype).to(x.device) - 0.5
            out = out + self.bin_width * u
        if self.noise_sigma > 0:
            e = torch.randn(x.shape, generator=generator, device=gdev, dtype=x.dtype).to(x.device)
            out = out + self.noise_sigma * e
        return out

    def __call__(self, model: Any, x1: Tensor, *, generator: torch.Generator | None = None,
                 **cond: Any) -> LossOutput:
        check_finite("x1", x1)
        check_batch("x1", x1, min_dim=2)
        if cond.get("c") is not None:
            raise FewflowError("tarflow is conditioned on class labels only; data with a condition c is "
                               "not supported")
        flow = _flow(model)
        y = cond.get("y")
        if y is not None and self.label_dropout > 0:
            y = drop_labels({"y": y}, self.label_dropout, self.num_classes, x1, generator)[0]["y"]
        xt = self.augment(x1, generator)
        if self.learn_denoiser:
            xt = xt.detach().requires_grad_(True)
        z, logdet = model(xt, y)
        d = z[0].numel()
        nll_rows = 0.5 * z.flatten(1).pow(2).sum(1) / d + 0.5 * math.log(2 * math.pi) - logdet / d
        nll = nll_rows.mean()
        loss = nll
        diag = {"nll": float(nll.detach()), "logdet": float(logdet.detach().mean()) / d}
        if self.learn_denoiser:
            if flow.denoiser is None:
                raise FewflowError("learn_denoiser needs a flow with a denoiser (denoiser_layers > 0)")
            (g,) = torch.autograd.grad(nll_rows.sum() * d, xt, retain_graph=True)  # grad of -log p
            target = (self.noise_sigma * g).detach()
            pred = flow.denoiser_output(xt.detach(), y)
            fsm = (pred - target).pow(2).flatten(1).sum(1).mean() / d
            loss = loss + self.denoiser_weight * fsm
            diag["fsm"] = float(fsm.detach())
        off = -math.log(self.bin_width) if self.bin_width > 0 else 0.0
        diag["bpd"] = (diag["nll"] + off) / _LN2
        diag["loss"] = float(loss.detach())
        return LossOutput(loss, diag)


# --------------------------------------------------------------------------- likelihood helpers


def log_likelihood(model: Any, x: Tensor, y: Tensor | None = None) -> Tensor:
    """``log p(x)`` in nats per sample ``(B,)`` (exact: Gaussian prior plus the flow's log-determinant)."""
    check_finite("x", x)
    return _flow(model).log_prob(x, y)


def bits_per_dim(model: Any, x: Tensor, y: Tensor | None = None, *, bin_width: float = 0.0) -> Tensor:
    """``-(log p(x) + D log Delta) / (D log 2)`` per sample ``(B,)``; ``bin_width = Delta = 0``: continuous
    bits/dim ``-log p(x) / (D log 2)``. Evaluate on dequantised inputs (``TARFlowLoss.augment``) for the
    bound on the discrete likelihood."""
    _check_sigma("bin_width", bin_width)
    d = x[0].numel()
    lp = log_likelihood(model, x, y)
    off = d * math.log(bin_width) if bin_width > 0 else 0.0
    return -(lp + off) / (d * _LN2)


def bayes_classify(model: Any, x: Tensor, batch: int = 512) -> Tensor:
    """Bayes' rule with a uniform class prior: ``argmax_y log p(x | y)`` of a class-conditional flow."""
    flow = _flow(model)
    k = flow.num_classes
    if k is None:
        raise FewflowError("Bayes classification needs a class-conditional flow")
    out = []
    with torch.no_grad():
        for xb in x.split(batch):
            lp = torch.stack([flow.log_prob(xb, torch.full((xb.shape[0],), c, device=xb.device))
                              for c in range(k)], 1)
            out.append(lp.argmax(1))
    return torch.cat(out)


# --------------------------------------------------------------------------- sampling


@dataclass
class SampleResult:
    """Samples ``x``, the latent ``z`` they came from, and the inversion's cost (:class:`InverseStats`:
    network evaluations per block, total, wall time); ``x_raw`` is ``x`` before denoising."""

    x: Tensor
    z: Tensor
    stats: InverseStats
    x_raw: Tensor


def _check_temperature(temperature: float) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
            math.isfinite(temperature) and temperature > 0):
        raise FewflowError(f"temperature must be a finite number > 0, got {temperature!r}")
    return float(temperature)


def sample(model: Any, n: int | None = None, *, y: Tensor | None = None, z: Tensor | None = None,
           temperature: float = 1.0, method: str = "jacobi", threshold: float = 1e-3,
           chunk: int | None = None, denoise: str = "autograd", sigma: float = 0.1, guidance: float = 0.0,
           generator: torch.Generator | None = None) -> SampleResult:
    """Draw ``z ~ N(0, temperature^2 I)`` (or use the given ``z``, multiplied by ``temperature``), invert the
    flow (``method`` "jacobi" or "sequential") and denoise (``denoise`` "autograd": ``x + sigma^2 score``,
    "learned": ``x - sigma D(x)``, "none"). ``guidance`` is TARFlow's per-token classifier-free guidance
    (:meth:`fewflow.models.tarflow.TARFlow.inverse`)."""
    flow = _flow(model)
    temperature = _check_temperature(temperature)
    _check_sigma("sigma", sigma)
    if denoise not in ("autograd", "learned", "none"):
        raise FewflowError(f"denoise must be 'autograd', 'learned' or 'none', got {denoise!r}")
    p = next(flow.parameters())
    if z is None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise FewflowError(f"number of samples must be a positive integer, got {n!r}")
        gdev = generator.device if generator is not None else p.device
        z = torch.randn((n, *flow.shape), generator=generator, device=gdev, dtype=p.dtype).to(p.device)
    else:
        check_finite("z", z)
    x, stats = flow.inverse(z * temperature, y, method=method, threshold=threshold, chunk=chunk,
                            guidance=guidance)
    raw = x
    if denoise == "autograd":
        x = flow.denoise(x, sigma, y)
    elif denoise == "learned":
        x = flow.denoise_learned(x, sigma, y)
    return SampleResult(x.detach(), z, stats, raw)


def jacobi_sample(model: Any, n: int | None = None, *, threshold: float = 1e-3, chunk: int | None = None,
                  **kw: Any) -> SampleResult:
    """:func:`sample` with Jacobi inversion; ``result.stats`` holds the sweeps per block and the wall time."""
    return sample(model, n, method="jacobi", threshold=threshold, chunk=chunk, **kw)


def sequential_sample(model: Any, n: int | None = None, **kw: Any) -> SampleResult:
    """:func:`sample` with token-by-token inversion (``T - 1`` network evaluations per block)."""
    return sample(model, n, method="sequential", **kw)


class _SampleFn(torch.nn.Module):
    """``f(z, t, y=None) -> x``: the whole sampler as one "model call" for :func:`fewflow.solvers.solve`."""

    def __init__(self, flow: TARFlow, cfg: TARFlowConfig) -> None:
        super().__init__()
        self.flow, self.cfg = flow, cfg

    def forward(self, z: Tensor, t: Tensor, y: Tensor | None = None, **_: Any) -> Tensor:
        c, k = self.cfg, self.flow.num_classes
        half = z.shape[0] // 2
        if (y is not None and k is not None and z.shape[0] % 2 == 0 and half > 0
                and bool((y[half:] == k).all()) and bool((y[:half] != k).any())
                and torch.equal(z[:half], z[half:])):
            # the batched [conditional, null] call of a velocity-guidance wrapper: mixing two finished
            # samples is not TARFlow's guidance
            raise FewflowError("tarflow guides the per-token affine parameters (method.guidance), not with "
                               "--cfg / --raag")
        return sample(self.flow, z=z, y=y, temperature=c.temperature, method=c.inverse,
                      threshold=c.jacobi_threshold, chunk=c.jacobi_chunk or None, denoise=c.denoise,
                      sigma=c.noise_sigma, guidance=c.guidance).x


class _OneShot(Stepper):
    """One "step" from noise to data: ``x1 = f(x0, 0)`` (the sampler above)."""

    steps = 1

    def step(self, f: Any, x: Tensor, t: Tensor, t_next: Tensor,
             generator: torch.Generator | None = None) -> Tensor:
        return f(x, t)


# --------------------------------------------------------------------------- registration


_INVERSES = ("jacobi", "sequential")
_DENOISERS = ("autograd", "learned", "none")


@dataclass
class TARFlowConfig:
    """TARFlow's settings: the loss's (noise, dequantisation, denoiser training), the network's (CPU-sized;
    paper ImageNet 64: patch 2, width 768, 8 blocks x 8 layers) and the sampler's."""

    noise_sigma: float = field(default=0.1, metadata={"help": "Gaussian noise augmentation (MNIST: 0.1)"})
    bin_width: float = field(default=-1.0, metadata={"help": "quantisation step of the data for uniform "
                                                              "dequantisation; -1: detect, 0: continuous"})
    learn_denoiser: bool = field(default=False, metadata={"help": "train a flow-score-matching denoiser"})
    denoiser_weight: float = 1.0
    patch: int = field(default=2, metadata={"help": "patch size (images); vectors: one coordinate per token"})
    width: int = 64
    layers: int = field(default=2, metadata={"help": "transformer layers per block"})
    blocks: int = field(default=4, metadata={"help": "affine autoregressive blocks (orders alternate)"})
    heads: int = 4
    denoiser_layers: int = field(default=2, metadata={"help": "layers of the learned denoiser"})
    temperature: float = field(default=1.0, metadata={"help": "sampling: z ~ N(0, temperature^2 I)"})
    inverse: str = field(default="jacobi", metadata={"help": "sampling: jacobi | sequential"})
    jacobi_threshold: float = field(default=1e-3, metadata={"help": "relative residual to stop Jacobi"})
    jacobi_chunk: int = field(default=0, metadata={"help": "tokens per Jacobi chunk; 0: all"})
    denoise: str = field(default="autograd", metadata={"help": "sampling: autograd | learned | none"})
    guidance: float = field(default=0.0, metadata={"help": "sampling: per-token CFG weight g (0: none)"})

    def __post_init__(self) -> None:
        _check_temperature(self.temperature)
        if self.inverse not in _INVERSES:
            raise FewflowError(f"inverse must be one of {list(_INVERSES)}, got {self.inverse!r}")
        if self.denoise not in _DENOISERS:
            raise FewflowError(f"denoise must be one of {list(_DENOISERS)}, got {self.denoise!r}")
        if self.denoise == "learned" and not self.learn_denoiser:
            raise FewflowError("denoise='learned' needs learn_denoiser=true")
        if self.bin_width != -1.0:
            _check_sigma("bin_width", self.bin_width)
        for name in ("patch", "width", "layers", "blocks", "heads"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise FewflowError(f"{name} must be an integer >= 1, got {v!r}")
        if self.jacobi_chunk < 0:
            raise FewflowError(f"jacobi_chunk must be >= 0, got {self.jacobi_chunk}")


def make_tarflow(cfg: TARFlowConfig, meta: dict[str, Any]) -> TARFlow:
    """The run's flow from its config and ``meta`` (``shape``; 4-D shapes are clips: video mode)."""
    shape = tuple(int(v) for v in meta["shape"])
    k = int(meta["num_classes"]) if meta.get("conditional") and meta.get("num_classes") else None
    return TARFlow(shape, patch=cfg.patch, width=cfg.width, layers=cfg.layers, blocks=cfg.blocks,
                   heads=cfg.heads, num_classes=k, video=len(shape) == 4,
                   denoiser_layers=cfg.denoiser_layers if cfg.learn_denoiser else 0)


def _build(cfg: TARFlowConfig, ctx: BuildContext) -> list[Stage]:
    bw = cfg.bin_width
    if bw == -1.0:
        bw = detect_bin_width(ctx.data.x) if ctx.data is not None else 0.0
    ctx.record("tarflow_bin_width", bw)
    loss = TARFlowLoss(noise_sigma=cfg.noise_sigma, bin_width=bw, learn_denoiser=cfg.learn_denoiser,
                       denoiser_weight=cfg.denoiser_weight, **ctx.conditioning())
    return [Stage("tarflow", loss)]


def _sampling(model: Any, cfg: TARFlowConfig, **_: Any) -> SamplingPlan:
    return SamplingPlan(_SampleFn(_flow(model), cfg), stepper=_OneShot(), grid=[0.0, 1.0])


register(MethodSpec(
    name="tarflow",
    label="TARFlow",
    paper="Zhai et al., Normalizing Flows are Capable Generative Models (2412.06329)",
    summary="transformer autoregressive normalizing flow: exact likelihood, Jacobi inversion, denoising",
    config=TARFlowConfig,
    loss=TARFlowLoss,
    build=_build,
    needs=Needs(model="custom", coupling="fixed", ddp_mode="allreduce"),
    sampler=DefaultSampler("euler", nfe=1),
    sampling=_sampling,
    make_model=make_tarflow,
    recipe_fields=("patch", "width", "layers", "blocks", "heads", "denoiser_layers", "temperature", "inverse",
                   "jacobi_threshold", "jacobi_chunk", "denoise", "guidance"),
))
