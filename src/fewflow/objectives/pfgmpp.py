"""PFGM++: EDM denoiser training with the D-augmented (heavy-tailed) perturbation kernel.

"PFGM++: Unlocking the Potential of Physics-Inspired Generative Models" (Xu, Liu, Tian, Tong, Tegmark,
Jaakkola; arXiv 2302.04265). Data ``y`` in ``R^N`` is perturbed with the kernel of
:mod:`fewflow.paths.pfgmpp`, ``p(x | y) ~ (||x - y||^2 + r^2)^(-(N + D) / 2)`` with ``r = sigma sqrt(D)``,
and a denoiser ``D_theta(x, sigma)`` regresses the clean point, exactly as in EDM ("Elucidating the Design
Space of Diffusion-Based Generative Models", Karras et al., arXiv 2206.00364) but with that noise:

    ln sigma ~ N(P_mean, P_std^2),   x = y + n,  n ~ PFGM++ kernel(sigma, D),
    L = E[ lambda(sigma) || D_theta(x, sigma) - y ||^2 ],
    lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2,

with EDM's preconditioning ``D_theta(x, sigma) = c_skip x + c_out F(c_in x, c_noise)``,
``c_skip = sigma_data^2 / (sigma^2 + sigma_data^2)``,
``c_out = sigma sigma_data / sqrt(sigma^2 + sigma_data^2)``,
``c_in = 1 / sqrt(sigma^2 + sigma_data^2)``, ``c_noise = ln(sigma) / 4``; the backbone ``F`` is one of
fewflow's networks (MLP or UNet) with ``c_noise`` as its time input. ``D = inf`` is EDM itself.

Sampling (unchanged from EDM but for the prior): the probability-flow ODE ``dx / dsigma = (x - D(x, sigma)) /
sigma`` is integrated with Heun's method on the rho-grid from ``sigma_max`` to ``sigma_min``, followed by an
Euler step to ``sigma = 0``; the start is a draw of the PFGM++ prior (the kernel at ``sigma_max`` around 0)
instead of ``sigma_max N(0, I)``. Optional EDM churn (``S_churn``) and the paper's robustness test
(``alpha``: ``x += alpha sigma eps`` before every step, the official ``generate_alpha.py``) are supported.

Time. fewflow's time runs ``t = 0`` noise to ``t = 1`` data; EDM's ``sigma`` runs the other way. The one
map is :func:`fewflow.paths.pfgmpp.sigma_of_t` (Karras's rho-schedule, ``sigma(0) = sigma_max``,
``sigma(1) = sigma_min``), so a uniform fewflow time grid is EDM's sampling grid. The trained network is a
denoiser ``D(x, sigma)``, not a velocity: the sampler feeds it ``sigma`` directly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from fewflow._validate import FewflowError, check_batch, check_finite, unknown_name
from fewflow.methods.registry import (
    BuildContext,
    DefaultSampler,
    MethodSpec,
    Needs,
    SamplingPlan,
    Stage,
    register,
)
from fewflow.objectives.base import LossOutput
from fewflow.objectives.common import drop_labels
from fewflow.paths.pfgmpp import as_aug_dim, perturb, prior_from_gaussian, sigma_of_t, t_of_sigma
from fewflow.solvers.steppers import Stepper

__all__ = [
    "DenoiserInTime",
    "PFGMPPConfig",
    "PFGMPPDenoiser",
    "PFGMPPLoss",
    "PFGMPPSampler",
    "edm_preconditioning",
    "make_pfgmpp_model",
    "pfgmpp_sample",
    "sampler_steps",
]


def edm_preconditioning(sigma: Tensor, sigma_data: float = 0.5) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """EDM's ``(c_skip, c_out, c_in, c_noise)`` for noise levels ``sigma`` (Karras et al. 2022, Table 1)."""
    s2 = sigma**2 + sigma_data**2
    return sigma_data**2 / s2, sigma * sigma_data / s2.sqrt(), 1.0 / s2.sqrt(), sigma.log() / 4.0


class PFGMPPDenoiser(nn.Module):
    """The preconditioned denoiser ``D(x, sigma, **cond) = c_skip x + c_out F(c_in x, c_noise, **cond)``.

    ``backbone`` is any fewflow network ``F(x, t, y=None, c=None, ...)`` (MLP, UNet); it receives
    ``c_noise = ln(sigma) / 4`` as its time input. ``sigma`` is a ``(B,)`` tensor or a number.
    """

    is_flow_map = False

    def __init__(self, backbone: nn.Module, sigma_data: float = 0.5) -> None:
        super().__init__()
        if not sigma_data > 0:
            raise FewflowError(f"sigma_data must be > 0, got {sigma_data}")
        self.backbone = backbone
        self.sigma_data = float(sigma_data)

    @property
    def num_classes(self) -> int | None:
        """The backbone's classes (``None``: unconditional; the trainer then passes no labels)."""
        return getattr(self.backbone, "num_classes", None)

    def forward(self, x: Tensor, sigma: Tensor | float, **cond: Any) -> Tensor:
        sigma = torch.as_tensor(sigma, device=x.device, dtype=x.dtype).reshape(-1).expand(x.shape[0])
        c_skip, c_out, c_in, c_noise = edm_preconditioning(sigma, self.sigma_data)
        view = (-1, *([1] * (x.dim() - 1)))
        f = self.backbone(x * c_in.view(view), c_noise, **cond)
        return c_skip.view(view) * x + c_out.view(view) * f


class DenoiserInTime(nn.Module):
    """A denoiser ``D(x, sigma)`` called in fewflow time: ``forward(x, t, **cond) = D(x, sigma(t), **cond)``
    with :func:`~fewflow.paths.pfgmpp.sigma_of_t` (so guidance wrappers, which check ``t`` in [0, 1], apply).
    Still a denoiser (it returns the clean-point estimate), not a velocity."""

    is_flow_map = False

    def __init__(self, denoiser: Any, sigma_min: float = 0.002, sigma_max: float = 80.0,
                 rho: float = 7.0) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.sigma_min, self.sigma_max, self.rho = float(sigma_min), float(sigma_max), float(rho)

    def forward(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        sigma = sigma_of_t(t.to(torch.float64), self.sigma_min, self.sigma_max, self.rho).to(x.dtype)
        return self.denoiser(x, sigma, **cond)


class PFGMPPLoss:
    """The PFGM++ objective ``loss(model, x1, *, generator=None, **cond) -> LossOutput`` (module docstring).

    ``model`` is a denoiser ``D(x, sigma, **cond)`` (:class:`PFGMPPDenoiser`). The per-sample loss is
    ``lambda(sigma)`` times the mean squared error over the data dimensions (EDM sums instead; a constant
    factor N), averaged over the batch.

    Args:
        D: augmented dimensions (``> 0``; ``math.inf`` or ``"inf"``: EDM's Gaussian noise).
        P_mean, P_std: log-normal training noise levels, ``ln sigma ~ N(P_mean, P_std^2)`` (EDM: -1.2, 1.2).
        sigma_data: the data's standard deviation in the preconditioning and weight (EDM: 0.5).
        label_dropout, num_classes: classifier-free guidance training (null class ``num_classes``).
    """

    def __init__(
        self,
        D: float | str = 128.0,
        P_mean: float = -1.2,
        P_std: float = 1.2,
        sigma_data: float = 0.5,
        label_dropout: float = 0.0,
        num_classes: int | None = None,
    ) -> None:
        self.D = as_aug_dim(D)
        if not (math.isfinite(P_mean) and P_std > 0 and math.isfinite(P_std)):
            raise FewflowError(f"need a finite P_mean and 0 < P_std < inf, got {P_mean}, {P_std}")
        if not (sigma_data > 0 and math.isfinite(sigma_data)):
            raise FewflowError(f"sigma_data must be a finite number > 0, got {sigma_data}")
        if not 0.0 <= label_dropout < 1.0:
            raise FewflowError(f"label_dropout must lie in [0, 1), got {label_dropout}")
        self.P_mean, self.P_std, self.sigma_data = float(P_mean), float(P_std), float(sigma_data)
        self.label_dropout, self.num_classes = float(label_dropout), num_classes

    def sample_sigma(self, n: int, like: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``n`` training noise levels ``exp(P_mean + P_std eps)`` on ``like``'s device and dtype."""
        gdev = generator.device if generator is not None else like.device
        eps = torch.randn(n, generator=generator, device=gdev, dtype=like.dtype).to(like.device)
        return (self.P_mean + self.P_std * eps).exp()

    def weight(self, sigma: Tensor) -> Tensor:
        """EDM's loss weight ``(sigma^2 + sigma_data^2) / (sigma sigma_data)^2``."""
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2

    def __call__(self, model: Any, x1: Tensor, *, generator: torch.Generator | None = None,
                 **cond: Any) -> LossOutput:
        check_finite("x1", x1)
        check_batch("x1", x1)
        b = x1.shape[0]
        sigma = self.sample_sigma(b, x1, generator)
        x, _ = perturb(x1, sigma, self.D, generator=generator)
        cond, _ = drop_labels(cond, self.label_dropout, self.num_classes, x1, generator)
        pred = model(x, sigma, **cond)
        if not torch.is_tensor(pred) or pred.shape != x1.shape:
            shape = tuple(pred.shape) if torch.is_tensor(pred) else type(pred).__name__
            raise FewflowError(f"denoiser output has shape {shape}, expected {tuple(x1.shape)}")
        mse = (pred - x1).pow(2).reshape(b, -1).mean(1)
        loss = (self.weight(sigma) * mse).mean()
        diag = {"loss": float(loss.detach()), "mse": float(mse.detach().mean()),
                "log_sigma_mean": float(sigma.log().mean())}
        return LossOutput(loss=loss, diagnostics=diag)

    def __repr__(self) -> str:
        return (f"PFGMPPLoss(D={self.D:g}, P_mean={self.P_mean:g}, P_std={self.P_std:g}, "
                f"sigma_data={self.sigma_data:g})")


# ------------------------------------------------------------------------------------------------ sampler


def sampler_steps(nfe: int) -> int:
    """Heun steps ``K`` for an NFE budget: ``K`` Heun steps between the ``K + 1`` grid nodes plus the final
    Euler step to ``sigma = 0`` cost ``2 K + 1`` evaluations (EDM's 18 nodes: ``K = 17``, 35 NFE); at
    least one step (3 NFE)."""
    if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
        raise FewflowError(f"nfe must be a positive integer, got {nfe!r}")
    return max(1, (nfe - 1) // 2)


class PFGMPPSampler(Stepper):
    """EDM's Heun sampler in ``sigma`` (Karras et al. 2022, Algorithm 2) as a fewflow stepper.

    The loop hands it fewflow times ``t`` (a uniform grid of ``steps + 1`` nodes on [0, 1]); it converts
    them with :func:`~fewflow.paths.pfgmpp.sigma_of_t`, works in ``sigma`` and calls ``f(x, t(sigma))``,
    ``f`` a :class:`DenoiserInTime` (which maps ``t`` back to ``sigma``). At ``t = 0``
    it first turns the standard Gaussian source draw into the PFGM++ prior
    (:func:`~fewflow.paths.pfgmpp.prior_from_gaussian`). Each step: ``x += alpha sigma eps`` (robustness
    test, ``alpha = 0`` off); churn ``sigma_hat = sigma (1 + gamma)``, ``gamma = min(S_churn / (steps + 1),
    sqrt 2 - 1)`` for ``S_min <= sigma <= S_max``, ``x_hat = x + sqrt(sigma_hat^2 - sigma^2) S_noise eps``;
    Heun from ``sigma_hat`` to the next node. The last step ends with EDM's Euler step to ``sigma = 0``,
    i.e. returns ``D(x, sigma_min)`` (after churn). ``2 steps + 1`` evaluations in all.
    """

    nfe_per_step = 2
    stochastic = True

    def __init__(self, steps: int, D: float | str = 128.0, sigma_min: float = 0.002, sigma_max: float = 80.0,
                 rho: float = 7.0, S_churn: float = 0.0, S_min: float = 0.0, S_max: float = math.inf,
                 S_noise: float = 1.0, alpha: float = 0.0) -> None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise FewflowError(f"steps must be a positive integer, got {steps!r}")
        if S_churn < 0 or alpha < 0 or S_noise < 0:
            raise FewflowError(f"S_churn, S_noise and alpha must be >= 0, got {S_churn}, {S_noise}, {alpha}")
        self.steps, self.D = steps, as_aug_dim(D)
        self.sigma_min, self.sigma_max, self.rho = float(sigma_min), float(sigma_max), float(rho)
        sigma_of_t(torch.zeros(1), self.sigma_min, self.sigma_max, self.rho)  # checks the range
        self.S_churn, self.S_min, self.S_max = float(S_churn), float(S_min), float(S_max)
        self.S_noise = float(S_noise)
        self.alpha = float(alpha)

    def sigma(self, t: Tensor) -> Tensor:
        """Noise levels of fewflow times ``t`` (float64)."""
        return sigma_of_t(t.to(torch.float64), self.sigma_min, self.sigma_max, self.rho)

    def _f(self, f: Any, x: Tensor, sigma: Tensor) -> Tensor:
        t = t_of_sigma(sigma.to(torch.float64), self.sigma_min, self.sigma_max, self.rho)
        return f(x, t.to(x.dtype))

    def grid(self) -> list[float]:
        """The fewflow time grid this sampler expects: ``steps + 1`` uniform nodes on [0, 1]."""
        return [i / self.steps for i in range(self.steps + 1)]

    @staticmethod
    def _randn(x: Tensor, generator: torch.Generator | None) -> Tensor:
        gdev = generator.device if generator is not None else x.device
        return torch.randn(x.shape, generator=generator, device=gdev, dtype=x.dtype).to(x.device)

    def _advance(self, f: Any, x: Tensor, t: Tensor, t_next: Tensor, generator: torch.Generator | None,
                 last: bool) -> Tensor:
        if bool((t == 0).all()):
            x = prior_from_gaussian(x, self.sigma_max, self.D, generator=generator)
        view = (-1, *([1] * (x.dim() - 1)))
        s_cur = self.sigma(t).to(x.dtype)
        s_next = self.sigma(t_next).to(x.dtype)
        if self.alpha > 0:
            x = x + self._randn(x, generator) * (self.alpha * s_cur).view(view)
        s_hat = s_cur
        if self.S_churn > 0:
            gamma = min(self.S_churn / (self.steps + 1), math.sqrt(2.0) - 1.0)
            inside = (s_cur >= self.S_min) & (s_cur <= self.S_max)
            s_hat = torch.where(inside, s_cur * (1.0 + gamma), s_cur)
            x = x + (s_hat**2 - s_cur**2).sqrt().view(view) * self.S_noise * self._randn(x, generator)
        d_cur = (x - self._f(f, x, s_hat)) / s_hat.view(view)
        x_next = x + (s_next - s_hat).view(view) * d_cur
        d_prime = (x_next - self._f(f, x_next, s_next)) / s_next.view(view)
        x_next = x + (s_next - s_hat).view(view) * (0.5 * d_cur + 0.5 * d_prime)
        if not last:
            return x_next
        # EDM's final node: (alpha, churn, then) Euler to sigma = 0, i.e. the denoised point
        s_last = s_next
        if self.alpha > 0:
            x_next = x_next + self._randn(x_next, generator) * (self.alpha * s_last).view(view)
        if self.S_churn > 0:
            gamma = min(self.S_churn / (self.steps + 1), math.sqrt(2.0) - 1.0)
            inside = (s_last >= self.S_min) & (s_last <= self.S_max)
            s_hat = torch.where(inside, s_last * (1.0 + gamma), s_last)
            kick = (s_hat**2 - s_last**2).sqrt().view(view) * self.S_noise
            x_next = x_next + kick * self._randn(x_next, generator)
            s_last = s_hat
        return self._f(f, x_next, s_last)

    def step(self, f, x, t, t_next, generator=None):
        return self._advance(f, x, t, t_next, generator, last=False)

    def step_last(self, f, x, t, t_next, generator=None):
        return self._advance(f, x, t, t_next, generator, last=True)

    def __repr__(self) -> str:
        return (f"PFGMPPSampler(steps={self.steps}, D={self.D:g}, "
                f"sigma=[{self.sigma_min:g}, {self.sigma_max:g}], rho={self.rho:g}, "
                f"S_churn={self.S_churn:g}, alpha={self.alpha:g})")


def pfgmpp_sample(
    model: Any,
    z: Tensor,
    *,
    nfe: int = 35,
    D: float | str = 128.0,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    S_churn: float = 0.0,
    alpha: float = 0.0,
    cond: dict[str, Any] | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Samples of a denoiser ``model(x, sigma, **cond)`` from standard Gaussian draws ``z`` (turned into the
    PFGM++ prior), with :class:`PFGMPPSampler` at an NFE budget (``2 K + 1`` evaluations, ``K`` Heun
    steps). ``z`` is not modified."""
    from fewflow.solvers import solve

    st = PFGMPPSampler(sampler_steps(nfe), D=D, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho,
                       S_churn=S_churn, alpha=alpha)
    with torch.no_grad():
        f = DenoiserInTime(model, sigma_min, sigma_max, rho)
        return solve(f, z, grid=st.grid(), stepper=st, cond=cond, generator=generator).x


# --------------------------------------------------------------------------- registration


@dataclass
class PFGMPPConfig:
    """Settings of :class:`PFGMPPLoss`, its sampler and its backbone (EDM's defaults; D from the paper)."""

    D: float | str = field(default=128.0, metadata={
        "help": "augmented dimensions (> 0; 'inf' = EDM); 128: the official default (CIFAR-10, FFHQ)"})
    P_mean: float = field(default=-1.2, metadata={"help": "mean of ln sigma at training (EDM)"})
    P_std: float = field(default=1.2, metadata={"help": "std of ln sigma at training (EDM)"})
    sigma_data: float = field(default=0.5, metadata={"help": "data std in the preconditioning (EDM)"})
    sigma_min: float = field(default=0.002, metadata={"help": "smallest sampling noise level (EDM)"})
    sigma_max: float = field(default=80.0, metadata={"help": "prior noise level (EDM)"})
    rho: float = field(default=7.0, metadata={"help": "rho of the sampling grid sigma(t) (EDM)"})
    S_churn: float = field(default=0.0, metadata={"help": "EDM churn of the sampler (0: deterministic ODE)"})
    alpha: float = field(default=0.0, metadata={"help": "noise injection x += alpha sigma eps per step"})
    backbone: str = field(default="auto", metadata={"help": "mlp | unet | auto (UNet for images >= 16 px)"})
    hidden: int = field(default=256, metadata={"help": "MLP width"})
    depth: int = field(default=4, metadata={"help": "MLP residual blocks"})
    base: int = field(default=32, metadata={"help": "UNet base channels"})

    def __post_init__(self) -> None:
        as_aug_dim(self.D)  # D <= 0 fails when the run is configured, not when training starts


def make_pfgmpp_model(cfg: PFGMPPConfig, meta: dict[str, Any]) -> PFGMPPDenoiser:
    """The run's denoiser: EDM preconditioning around a fewflow MLP or UNet (``cfg.backbone``)."""
    from fewflow.models import MLP, UNet

    shape = [int(v) for v in meta["shape"]]
    k = int(meta["num_classes"]) if meta.get("conditional") else None
    cond_shape = meta.get("cond_shape")
    cond_dim = int(math.prod(cond_shape)) if cond_shape is not None else None
    kind = cfg.backbone.lower()
    if kind not in ("auto", "mlp", "unet"):
        raise unknown_name("pfgmpp backbone", cfg.backbone, ("auto", "mlp", "unet"))
    image = len(shape) == 3 and shape[1] == shape[2]
    if kind == "auto":
        kind = "unet" if image and shape[1] >= 16 else "mlp"
    if kind == "unet":
        if not image:
            raise FewflowError(f"backbone 'unet' needs square images (C, H, W), got shape {tuple(shape)}")
        mults = (1, 2, 2) if shape[1] >= 16 else (1, 2)
        net: nn.Module = UNet(in_channels=shape[0], base=cfg.base, mults=mults, size=shape[1], num_classes=k,
                              cond_dim=cond_dim)
    else:
        net = MLP(int(math.prod(shape)), hidden=cfg.hidden, depth=cfg.depth, num_classes=k, cond_dim=cond_dim)
    return PFGMPPDenoiser(net, sigma_data=cfg.sigma_data)


def _build(cfg: PFGMPPConfig, ctx: BuildContext) -> list[Stage]:
    if ctx.source is not None:
        raise FewflowError("pfgmpp draws its own prior from a standard Gaussian: use the default source")
    loss = PFGMPPLoss(D=cfg.D, P_mean=cfg.P_mean, P_std=cfg.P_std, sigma_data=cfg.sigma_data,
                      **ctx.conditioning())
    return [Stage("pfgmpp", loss)]


def _sampling(model: Any, cfg: PFGMPPConfig, *, nfe: int, **_: Any) -> SamplingPlan:
    st = PFGMPPSampler(sampler_steps(int(nfe)), D=cfg.D, sigma_min=cfg.sigma_min, sigma_max=cfg.sigma_max,
                       rho=cfg.rho, S_churn=cfg.S_churn, alpha=cfg.alpha)
    f = DenoiserInTime(model, cfg.sigma_min, cfg.sigma_max, cfg.rho)
    return SamplingPlan(f, stepper=st, grid=st.grid())


register(MethodSpec(
    name="pfgmpp",
    label="PFGM++",
    paper="Xu et al., PFGM++: Unlocking the Potential of Physics-Inspired Generative Models (2302.04265)",
    summary="EDM denoiser trained with the D-augmented heavy-tailed kernel; Heun sampler from its prior",
    config=PFGMPPConfig,
    loss=PFGMPPLoss,
    build=_build,
    needs=Needs(model="custom", coupling="fixed"),
    sampler=DefaultSampler("heun", nfe=35),
    sampling=_sampling,
    make_model=make_pfgmpp_model,
    recipe_fields=(
        "sigma_min", "sigma_max", "rho", "S_churn", "alpha", "backbone", "hidden", "depth", "base",
    ),
    small_scale={"D": 128.0},
))
