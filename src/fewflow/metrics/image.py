"""Full-reference image metrics, per sample: PSNR and SSIM.

Both take batches ``(B, C, H, W)`` (or ``(B, H, W)``, read as one channel) on any device and return a
``(B,)`` tensor in the inputs' dtype (promoted to at least float32). ``data_range`` is the
width of the value range: fewflow's images live in ``[-1, 1]``, hence the default ``2.0``.

* **PSNR** ``= 10 log10(L^2 / MSE)`` with ``MSE`` the mean squared error over one sample's pixels and
  ``L = data_range``; ``+inf`` for identical images.
* **SSIM** (Wang, Bovik, Sheikh, Simoncelli, "Image Quality Assessment: From Error Visibility to Structural
  Similarity", IEEE TIP 2004): with Gaussian-weighted local means ``mu_x, mu_y``, variances
  ``s_x^2, s_y^2`` and covariance ``s_xy``,

      SSIM(x, y) = mean over windows and channels of
                   (2 mu_x mu_y + C1)(2 s_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(s_x^2 + s_y^2 + C2)),

  ``C1 = (0.01 L)^2``, ``C2 = (0.03 L)^2`` (the paper's constants). The paper's window is 11x11 with
  ``sigma = 1.5``; fewflow's images are small (8x8 digits, 28x28 MNIST), so the window here is a **7x7**
  Gaussian with ``sigma = 1.5`` (as in scikit-image's Gaussian-weighted SSIM), shrunk to the largest odd
  size that fits in smaller images; only windows lying wholly inside the image are used (no padding).
  The local (co)variances are the weighted population moments ``E_w[x y] - E_w[x] E_w[y]``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from fewflow._validate import FewflowError

__all__ = ["gaussian_window", "psnr", "ssim"]

K1, K2 = 0.01, 0.03
WINDOW, SIGMA = 7, 1.5


def _prepare(x: Tensor, ref: Tensor, data_range: float) -> tuple[Tensor, Tensor]:
    if not torch.is_tensor(x) or not torch.is_tensor(ref):
        raise FewflowError("image metrics take tensors")
    if x.shape != ref.shape:
        raise FewflowError(f"images and references must have the same shape, got {tuple(x.shape)} and "
                           f"{tuple(ref.shape)}")
    if x.dim() == 3:
        x, ref = x.unsqueeze(1), ref.unsqueeze(1)
    if x.dim() != 4:
        raise FewflowError(f"images must have shape (B, C, H, W) or (B, H, W), got {tuple(x.shape)}")
    if x.device != ref.device:
        raise FewflowError(f"images are on {x.device} and references on {ref.device}")
    if not (isinstance(data_range, (int, float)) and math.isfinite(data_range) and data_range > 0):
        raise FewflowError(f"data_range must be a positive number, got {data_range!r}")
    dtype = torch.promote_types(torch.promote_types(x.dtype, ref.dtype), torch.float32)
    return x.to(dtype), ref.to(dtype)


def psnr(x: Tensor, ref: Tensor, data_range: float = 2.0) -> Tensor:
    """Peak signal-to-noise ratio in dB per sample, ``(B,)``: ``10 log10(data_range^2 / MSE)``."""
    x, ref = _prepare(x, ref, data_range)
    mse = (x - ref).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(torch.as_tensor(data_range**2, dtype=x.dtype, device=x.device) / mse)


def gaussian_window(size: int = WINDOW, sigma: float = SIGMA, *, dtype: torch.dtype = torch.float32,
                    device: torch.device | str | None = None) -> Tensor:
    """The normalised 2-D Gaussian window ``(size, size)`` (outer product of 1-D Gaussians, sum 1)."""
    r = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(x: Tensor, ref: Tensor, data_range: float = 2.0) -> Tensor:
    """Structural similarity per sample, ``(B,)`` (module docstring: 7x7 Gaussian window, sigma 1.5,
    ``C1 = (0.01 L)^2``, ``C2 = (0.03 L)^2``, mean over valid windows and channels). Symmetric in its
    arguments; ``ssim(x, x) = 1``."""
    x, ref = _prepare(x, ref, data_range)
    _, c, h, w = x.shape
    size = min(WINDOW, h, w)
    size -= 1 - size % 2  # odd
    win = gaussian_window(size, SIGMA, dtype=x.dtype, device=x.device)
    kernel = win.expand(c, 1, size, size)

    def blur(a: Tensor) -> Tensor:
        return F.conv2d(a, kernel, groups=c)

    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    mx, my = blur(x), blur(ref)
    sxx = blur(x * x) - mx * mx
    syy = blur(ref * ref) - my * my
    sxy = blur(x * ref) - mx * my
    num = (2 * mx * my + c1) * (2 * sxy + c2)
    den = (mx * mx + my * my + c1) * (sxx + syy + c2)
    return (num / den).flatten(1).mean(1)
