"""The autoencoder of latent flow matching: a reconstruction loss, plus a KL term for the VAE.

"Flow Matching in Latent Space" (Dao, Phung, Nguyen, Tran; arXiv 2307.08698) trains flow matching on the
latents of a frozen autoencoder ``(E, D)``; fewflow trains that autoencoder as the method ``autoencoder``
and any method on its latents with ``fewflow train --latent AE_RUN`` (see :func:`fewflow.runs.latent_data`).
For a batch of samples ``x`` with ``P`` entries each::

    plain AE:  L = E_x [ ||D(E(x)) - x||^2 / P ]
    VAE:       L = E_x [ ||D(z) - x||^2 / P + beta KL(q(z|x) || N(0, I)) / P ],
               z = mu(x) + sigma(x) eps,  KL = 1/2 sum_j (mu_j^2 + sigma_j^2 - 1 - log sigma_j^2),

the sum-reduced form of the KL-regularised autoencoder of "High-Resolution Image Synthesis with Latent
Diffusion Models" (Rombach et al., arXiv 2112.10752; its KL-f8 model, the one LFM uses, has ``beta =
1e-6``) divided by ``P``, with an L2 reconstruction and no perceptual or adversarial term. There is no time
variable here; the flow trained on the latents uses fewflow's convention (t = 0 noise, t = 1 data; LFM's
code puts data at t = 0).
"""

from __future__ import annotations

import math
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
from fewflow.models.autoencoder import build_autoencoder, gaussian_kl
from fewflow.objectives.base import LossOutput
from fewflow.objectives.common import unwrap
from fewflow.solvers.steppers import Stepper

__all__ = ["AutoencoderConfig", "AutoencoderLoss", "PriorDecode", "make_autoencoder"]


class AutoencoderLoss:
    """``loss(model, x, *, generator=None, **cond) -> LossOutput`` for a fewflow autoencoder (module
    docstring). ``beta`` weighs the KL term of a variational model (ignored for a plain one); labels and
    conditions are ignored. Diagnostics: ``loss``, ``mse``, ``kl`` (per sample, summed over the latent),
    ``latent_std``."""

    def __init__(self, beta: float = 1e-6) -> None:
        if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta >= 0):
            raise FewflowError(f"beta (KL weight) must be a finite number >= 0, got {beta!r}")
        self.beta = float(beta)

    def __call__(self, model: Any, x1: Tensor, *, generator: torch.Generator | None = None,
                 **cond: Any) -> LossOutput:
        check_finite("x", x1)
        check_batch("x", x1)
        out = model(x1, sample=True, generator=generator)
        p = x1[0].numel()
        mse = (out.recon - x1).pow(2).flatten(1).mean(1)
        loss_per = mse
        diag: dict[str, float] = {}
        if out.logvar is not None:
            kl = gaussian_kl(out.mean, out.logvar)
            loss_per = mse + self.beta * kl / p
            diag["kl"] = float(kl.detach().mean())
        loss = loss_per.mean()
        diag.update({"loss": float(loss.detach()), "mse": float(mse.detach().mean()),
                     "latent_std": float(out.mean.detach().std())})
        return LossOutput(loss, diag)

    def __repr__(self) -> str:
        return f"AutoencoderLoss(beta={self.beta:g})"


@dataclass
class AutoencoderConfig:
    """The loss's ``beta`` and the network's settings (recipe fields; ``null``: chosen by the data shape,
    see :func:`fewflow.models.autoencoder.build_autoencoder`)."""

    beta: float = field(default=1e-6, metadata={"help": "KL weight of the VAE (LDM KL-f8: 1e-6)"})
    variational: bool = field(default=False, metadata={"help": "a KL-regularised VAE instead of a plain AE"})
    width: int = field(default=32, metadata={"help": "conv channels of the first stage (MLP: 4x hidden)"})
    latent_channels: int | None = field(default=None, metadata={"help": "null: 4 if S>=16 else 1"})
    latent_dim: int | None = field(default=None, metadata={"help": "latent size for vector data (null: D)"})
    downsample: int | None = field(default=None, metadata={"help": "null: 2 if S>=16 else 1"})


def make_autoencoder(cfg: AutoencoderConfig, meta: dict[str, Any]) -> nn.Module:
    """The run's autoencoder for data of shape ``meta["shape"]``."""
    if meta.get("latent"):
        raise FewflowError("an autoencoder trains on the data itself: drop --latent")
    return build_autoencoder(meta["shape"], width=cfg.width, latent_channels=cfg.latent_channels,
                             latent_dim=cfg.latent_dim, downsample=cfg.downsample,
                             variational=cfg.variational)


def _build(cfg: AutoencoderConfig, ctx: BuildContext) -> list[Stage]:
    return [Stage("autoencoder", AutoencoderLoss(beta=cfg.beta))]


class PriorDecode(Stepper):
    """The sampler of an autoencoder run: one step that decodes ``z ~ N(0, I)`` (the VAE's prior; a plain
    autoencoder has no prior, so its draws only show what the decoder does -- generate with a latent run).
    ``f`` is the decoder; the step ignores ``x``."""

    nfe_per_step = 1
    stochastic = True
    steps = 1

    def __init__(self, latent_shape: tuple[int, ...]) -> None:
        self.latent_shape = tuple(latent_shape)

    def step(self, f: Any, x: Tensor, t: Tensor, t_next: Tensor,
             generator: torch.Generator | None = None) -> Tensor:
        gdev = generator.device if generator is not None else x.device
        z = torch.randn((x.shape[0], *self.latent_shape), generator=generator, device=gdev, dtype=x.dtype)
        return f(z.to(x.device), t)


class _Decoder(nn.Module):
    def __init__(self, ae: nn.Module) -> None:
        super().__init__()
        self.ae = ae

    def forward(self, z: Tensor, t: Any = None, **_: Any) -> Tensor:
        return self.ae.decode(z)


def _sampling(model: Any, cfg: AutoencoderConfig, **_: Any) -> SamplingPlan:
    ae = unwrap(model)
    return SamplingPlan(_Decoder(ae), PriorDecode(ae.latent_shape))


register(MethodSpec(
    name="autoencoder",
    label="Autoencoder (LFM)",
    paper="Dao et al., Flow Matching in Latent Space (2307.08698); Rombach et al., High-Resolution Image "
    "Synthesis with Latent Diffusion Models (2112.10752)",
    summary="the autoencoder / KL-VAE whose latents `fewflow train --latent RUN` trains any method on",
    config=AutoencoderConfig,
    loss=AutoencoderLoss,
    build=_build,
    needs=Needs(model="custom", coupling="fixed", ddp_mode="allreduce"),
    sampler=DefaultSampler("euler", nfe=1),
    sampling=_sampling,
    make_model=make_autoencoder,
    recipe_fields=("variational", "width", "latent_channels", "latent_dim", "downsample"),
    docs="latent",
))
