"""PSNR / SSIM per sample: closed forms, an independent float64 loop implementation, symmetry, errors."""

from __future__ import annotations

import math

import pytest
import torch

from fewflow._validate import FewflowError
from fewflow.metrics.image import gaussian_window, psnr, ssim

torch.set_num_threads(1)


def _naive_ssim(a: torch.Tensor, b: torch.Tensor, L: float = 2.0, size: int = 7, sigma: float = 1.5) -> float:
    """One image (C, H, W), python loops over every valid window, float64."""
    a, b = a.double(), b.double()
    c1, c2 = (0.01 * L) ** 2, (0.03 * L) ** 2
    half = (size - 1) / 2
    w = [[math.exp(-((i - half) ** 2 + (j - half) ** 2) / (2 * sigma**2)) for j in range(size)]
         for i in range(size)]
    tot = sum(sum(r) for r in w)
    w = [[v / tot for v in r] for r in w]
    vals = []
    C, H, W = a.shape
    for c in range(C):
        for i in range(H - size + 1):
            for j in range(W - size + 1):
                mx = my = exx = eyy = exy = 0.0
                for u in range(size):
                    for v in range(size):
                        p, q, k = float(a[c, i + u, j + v]), float(b[c, i + u, j + v]), w[u][v]
                        mx += k * p
                        my += k * q
                        exx += k * p * p
                        eyy += k * q * q
                        exy += k * p * q
                sx, sy, sxy = exx - mx * mx, eyy - my * my, exy - mx * my
                vals.append((2 * mx * my + c1) * (2 * sxy + c2) / ((mx**2 + my**2 + c1) * (sx + sy + c2)))
    return sum(vals) / len(vals)


def test_psnr_of_a_known_mse() -> None:
    x = torch.zeros(3, 1, 8, 8)
    ref = x.clone()
    ref[0] += 0.1  # MSE 0.01 -> 10 log10(4 / 0.01)
    ref[1, 0, 0, 0] = 2.0  # MSE 4 / 64
    got = psnr(x, ref)
    assert got[0].item() == pytest.approx(10 * math.log10(4 / 0.01), rel=1e-5)
    assert got[1].item() == pytest.approx(10 * math.log10(64.0), rel=1e-5)
    assert math.isinf(got[2].item()) and got[2] > 0
    assert psnr(x, ref, data_range=1.0)[0].item() == pytest.approx(20.0, rel=1e-5)


def test_ssim_identity_symmetry_and_range() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 2, 9, 10, generator=g) * 2 - 1
    y = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    assert torch.allclose(ssim(x, x), torch.ones(4), atol=1e-6)
    s = ssim(x, y)
    assert torch.allclose(s, ssim(y, x), atol=1e-6)
    assert s.shape == (4,) and (s < 0.99).all() and (s > -1).all()
    flat = torch.zeros_like(x)  # zero means: SSIM reduces to C1 (2 s_xy + C2) / (C1 (s_x^2 + s_y^2 + C2))
    assert (ssim(x - x.mean(), flat - x.mean()) < s).all()
    # more noise -> lower SSIM
    y2 = (x + 0.8 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    assert (ssim(x, y2) < s).all()


@pytest.mark.parametrize("shape", [(2, 1, 8, 8), (1, 3, 12, 9), (2, 1, 5, 6)])
def test_ssim_matches_a_naive_float64_loop(shape) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(shape, generator=g) * 2 - 1
    y = (0.7 * x + 0.4 * torch.randn(shape, generator=g)).clamp(-1, 1)
    got = ssim(x.double(), y.double())
    size = min(7, shape[2], shape[3])
    size -= 1 - size % 2
    for i in range(shape[0]):
        assert got[i].item() == pytest.approx(_naive_ssim(x[i], y[i], size=size), abs=1e-10)
    # float32 agrees to float32 precision; batched (B, H, W) input reads as one channel
    assert torch.allclose(ssim(x, y).double(), got, atol=1e-5)
    if shape[1] == 1:
        assert torch.allclose(ssim(x[:, 0], y[:, 0]), ssim(x, y))


def test_window_and_inputs_untouched() -> None:
    w = gaussian_window()
    assert w.shape == (7, 7) and w.sum().item() == pytest.approx(1.0) and torch.equal(w, w.T)
    assert w[3, 3] == w.max()
    x = torch.randn(2, 1, 8, 8)
    y = torch.randn(2, 1, 8, 8)
    xc, yc = x.clone(), y.clone()
    ssim(x, y)
    psnr(x, y)
    assert torch.equal(x, xc) and torch.equal(y, yc)


def test_shape_and_argument_errors() -> None:
    x = torch.zeros(2, 1, 8, 8)
    with pytest.raises(FewflowError, match="same shape"):
        ssim(x, torch.zeros(2, 1, 8, 7))
    with pytest.raises(FewflowError, match="same shape"):
        psnr(x, torch.zeros(3, 1, 8, 8))
    with pytest.raises(FewflowError, match=r"\(B, C, H, W\)"):
        ssim(torch.zeros(8, 8), torch.zeros(8, 8))
    with pytest.raises(FewflowError, match="data_range"):
        psnr(x, x, data_range=0.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_cuda_matches_cpu() -> None:
    x, y = torch.randn(3, 1, 8, 8), torch.randn(3, 1, 8, 8)
    assert torch.allclose(ssim(x.cuda(), y.cuda()).cpu(), ssim(x, y), atol=1e-5)
    assert torch.allclose(psnr(x.cuda(), y.cuda()).cpu(), psnr(x, y), atol=1e-4)
