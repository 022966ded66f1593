"""A small convolutional autoencoder (optionally a KL-regularised VAE) for latent flow matching.

"Flow Matching in Latent Space" (Dao, Phung, Nguyen, Tran; arXiv 2307.08698) trains flow matching on the
latents ``z = s E(x)`` of a frozen pretrained autoencoder (``s`` a fixed scale factor) and decodes the
samples with ``D``. This module is fewflow's CPU-sized ``E`` / ``D`` for 8x8 and 28x28 images:

* images ``(B, C, S, S)`` are padded by edge replication to the next power of two (28 -> 32; 8 stays 8), so
  that ``downsample`` stride-2 stages give a latent of side ``P / 2^downsample`` (32 -> 8 for MNIST with
  two stages, 8 -> 4 for digits with one); the decoder crops its output back to ``S x S``;
* the latent is ``(latent_channels, h, w)``; with ``variational=True`` the encoder returns the mean ``mu``
  and log-variance ``log sigma^2`` of a diagonal Gaussian posterior ``q(z | x) = N(mu, diag sigma^2)``
  (as the KL-regularised autoencoder of "High-Resolution Image Synthesis with Latent Diffusion Models",
  Rombach et al., arXiv 2112.10752, whose KL-f8 model LFM uses) and the deterministic code is ``mu``.

Vectors ``(B, D)`` get :class:`MLPAutoencoder` (``D -> latent_dim``), the same interface.
GroupNorm / LayerNorm and SiLU throughout, no BatchNorm, so train and eval behave the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewflow._validate import FewflowError

__all__ = ["AutoencoderOutput", "ConvAutoencoder", "MLPAutoencoder", "build_autoencoder", "gaussian_kl",
           "padded_size"]


def padded_size(size: int) -> int:
    """The side the encoder works on: the smallest power of two ``>= size``."""
    p = 1
    while p < size:
        p *= 2
    return p


def gaussian_kl(mean: Tensor, logvar: Tensor) -> Tensor:
    """``KL(N(mu, diag sigma^2) || N(0, I))`` per sample, summed over the latent dimensions::

        KL = 1/2 sum_j ( mu_j^2 + sigma_j^2 - 1 - log sigma_j^2 ).
    """
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)


@dataclass
class AutoencoderOutput:
    """``recon`` (decoded, shaped like the input), the posterior ``mean`` and ``logvar`` (``None`` for a
    plain autoencoder), and the latent ``z`` that was decoded (a posterior draw or the mean)."""

    recon: Tensor
    mean: Tensor
    logvar: Tensor | None
    z: Tensor


def _groups(ch: int) -> int:
    for g in (8, 4, 2):
        if ch % g == 0:
            return g
    return 1


class _Res(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.n1, self.c1 = nn.GroupNorm(_groups(cin), cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.n2, self.c2 = nn.GroupNorm(_groups(cout), cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.c1(F.silu(self.n1(x)))
        return self.skip(x) + self.c2(F.silu(self.n2(h)))


class ConvAutoencoder(nn.Module):
    """Convolutional encoder ``E: (C, S, S) -> (latent_channels, h, w)`` and decoder ``D`` back.

    Args:
        in_channels: image channels ``C``.
        size: image side ``S`` (square images; 8 for digits, 28 for MNIST).
        channels: width of the first stage; stage ``i`` has ``channels * 2^min(i, 1)`` (two widths in all).
        latent_channels: channels of the latent.
        downsample: number of stride-2 stages (latent side ``padded_size(S) / 2^downsample``).
        variational: the encoder outputs a diagonal Gaussian posterior (a KL-regularised VAE).

    ``config`` holds the constructor arguments (``{"type": "ConvAutoencoder", ...}``).
    """

    is_flow_map = False

    def __init__(self, in_channels: int = 1, size: int = 28, channels: int = 32, latent_channels: int = 4,
                 downsample: int = 2, variational: bool = False) -> None:
        super().__init__()
        for name, v in (("in_channels", in_channels), ("size", size), ("channels", channels),
                        ("latent_channels", latent_channels)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise FewflowError(f"autoencoder {name} must be a positive integer, got {v!r}")
        if isinstance(downsample, bool) or not isinstance(downsample, int) or downsample < 0:
            raise FewflowError(f"autoencoder downsample must be an integer >= 0, got {downsample!r}")
        pad = padded_size(size)
        if pad % (2**downsample) or pad // (2**downsample) < 1:
            raise FewflowError(f"cannot downsample {size}x{size} images (padded to {pad}) {downsample} times")
        self.config: dict[str, Any] = {
            "type": "ConvAutoencoder", "in_channels": in_channels, "size": size, "channels": channels,
            "latent_channels": latent_channels, "downsample": downsample, "variational": bool(variational),
        }
        self.in_channels, self.size, self.pad = in_channels, size, pad
        self.latent_channels, self.variational = latent_channels, bool(variational)
        widths = [channels * 2 ** min(i, 1) for i in range(downsample + 1)]
        enc: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 3, padding=1)]
        for i in range(downsample):
            enc += [_Res(widths[i], widths[i]), nn.Conv2d(widths[i], widths[i + 1], 3, stride=2, padding=1)]
        enc += [_Res(widths[-1], widths[-1]), nn.GroupNorm(_groups(widths[-1]), widths[-1]), nn.SiLU(),
                nn.Conv2d(widths[-1], latent_channels * (2 if self.variational else 1), 3, padding=1)]
        self.encoder = nn.Sequential(*enc)
        dec: list[nn.Module] = [nn.Conv2d(latent_channels, widths[-1], 3, padding=1),
                                _Res(widths[-1], widths[-1])]
        for i in reversed(range(downsample)):
            dec += [nn.Upsample(scale_factor=2, mode="nearest"),
                    nn.Conv2d(widths[i + 1], widths[i], 3, padding=1), _Res(widths[i], widths[i])]
        dec += [nn.GroupNorm(_groups(widths[0]), widths[0]), nn.SiLU(), nn.Conv2d(widths[0], in_channels, 3,
                                                                                   padding=1)]
        self.decoder = nn.Sequential(*dec)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """``(latent_channels, h, w)``."""
        side = self.pad // (2 ** self.config["downsample"])
        return (self.latent_channels, side, side)

    def _check(self, x: Tensor) -> None:
        want = (self.in_channels, self.size, self.size)
        if not torch.is_tensor(x) or x.dim() != 4 or tuple(x.shape[1:]) != want:
            got = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            want_s = ", ".join(map(str, want))
            raise FewflowError(f"the autoencoder takes images of shape (B, {want_s}), got {got}")

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(mean, logvar)`` of the posterior (``logvar`` is ``None`` for a plain autoencoder)."""
        self._check(x)
        extra = self.pad - self.size
        if extra:
            lo = extra // 2
            x = F.pad(x, (lo, extra - lo, lo, extra - lo), mode="replicate")
        h = self.encoder(x)
        if not self.variational:
            return h, None
        mean, logvar = h.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode_mean(self, x: Tensor) -> Tensor:
        """The deterministic code: the encoder output, or the posterior mean of a VAE."""
        return self.encode(x)[0]

    def decode(self, z: Tensor) -> Tensor:
        """Images ``(B, C, S, S)`` from latents ``(B, *latent_shape)``."""
        if not torch.is_tensor(z) or z.dim() != 4 or tuple(z.shape[1:]) != self.latent_shape:
            got = tuple(z.shape) if torch.is_tensor(z) else type(z).__name__
            want_s = ", ".join(map(str, self.latent_shape))
            raise FewflowError(f"the decoder takes latents of shape (B, {want_s}), got {got}")
        out = self.decoder(z)
        extra = self.pad - self.size
        if extra:
            lo = extra // 2
            out = out[..., lo : lo + self.size, lo : lo + self.size]
        return out

    def forward(self, x: Tensor, *, sample: bool = False, generator: torch.Generator | None = None
                ) -> AutoencoderOutput:
        """Encode, (for a VAE with ``sample``) draw ``z = mu + sigma eps``, decode."""
        mean, logvar = self.encode(x)
        z = mean
        if sample and logvar is not None:
            gdev = generator.device if generator is not None else mean.device
            eps = torch.randn(mean.shape, generator=generator, device=gdev, dtype=mean.dtype).to(mean.device)
            z = mean + (0.5 * logvar).exp() * eps
        return AutoencoderOutput(self.decode(z), mean, logvar, z)


class MLPAutoencoder(nn.Module):
    """The vector counterpart of :class:`ConvAutoencoder`: ``E: R^D -> R^latent_dim`` and ``D`` back, two
    hidden layers of ``hidden`` units each way (LayerNorm + SiLU); ``variational`` as there."""

    is_flow_map = False

    def __init__(self, dim: int = 2, hidden: int = 128, latent_dim: int = 2,
                 variational: bool = False) -> None:
        super().__init__()
        for name, v in (("dim", dim), ("hidden", hidden), ("latent_dim", latent_dim)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise FewflowError(f"autoencoder {name} must be a positive integer, got {v!r}")
        self.config: dict[str, Any] = {"type": "MLPAutoencoder", "dim": dim, "hidden": hidden,
                                       "latent_dim": latent_dim, "variational": bool(variational)}
        self.dim, self.latent_dim, self.variational = dim, latent_dim, bool(variational)

        def mlp(i: int, o: int) -> nn.Sequential:
            return nn.Sequential(nn.Linear(i, hidden), nn.LayerNorm(hidden), nn.SiLU(),
                                 nn.Linear(hidden, hidden), nn.LayerNorm(hidden), nn.SiLU(),
                                 nn.Linear(hidden, o))

        self.encoder = mlp(dim, latent_dim * (2 if self.variational else 1))
        self.decoder = mlp(latent_dim, dim)

    @property
    def latent_shape(self) -> tuple[int]:
        return (self.latent_dim,)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        if not torch.is_tensor(x) or x.dim() != 2 or x.shape[1] != self.dim:
            got = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise FewflowError(f"the autoencoder takes vectors of shape (B, {self.dim}), got {got}")
        h = self.encoder(x)
        if not self.variational:
            return h, None
        mean, logvar = h.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode_mean(self, x: Tensor) -> Tensor:
        return self.encode(x)[0]

    def decode(self, z: Tensor) -> Tensor:
        if not torch.is_tensor(z) or z.dim() != 2 or z.shape[1] != self.latent_dim:
            got = tuple(z.shape) if torch.is_tensor(z) else type(z).__name__
            raise FewflowError(f"the decoder takes latents of shape (B, {self.latent_dim}), got {got}")
        return self.decoder(z)

    forward = ConvAutoencoder.forward


def build_autoencoder(shape: tuple[int, ...] | list[int], *, width: int = 32,
                      latent_channels: int | None = None, latent_dim: int | None = None,
                      downsample: int | None = None, variational: bool = False) -> nn.Module:
    """The autoencoder for samples of ``shape``: square images ``(C, S, S)`` get a :class:`ConvAutoencoder`
    (defaults: ``downsample`` 2 for ``S >= 16`` else 1; ``latent_channels`` 4 for ``S >= 16`` else 1: a
    4 x 8 x 8 latent for MNIST, 1 x 4 x 4 for 8x8 digits), vectors ``(D,)`` an :class:`MLPAutoencoder`
    (``hidden = 4 width``, ``latent_dim`` default ``D``)."""
    shape = tuple(int(v) for v in shape)
    if len(shape) == 3 and shape[1] == shape[2]:
        big = shape[1] >= 16
        lc = (4 if big else 1) if latent_channels is None else latent_channels
        return ConvAutoencoder(shape[0], shape[1], channels=width, latent_channels=lc,
                               downsample=downsample if downsample is not None else (2 if big else 1),
                               variational=variational)
    if len(shape) == 1:
        return MLPAutoencoder(shape[0], hidden=4 * width, latent_dim=latent_dim if latent_dim is not None
                              else shape[0], variational=variational)
    raise FewflowError(f"the autoencoder takes square images (C, S, S) or vectors (D,), got samples of shape "
                       f"{shape}")
