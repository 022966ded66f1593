"""Degradation operators and noisy measurements for inverse problems.

Every operator here is linear, ``A: R^{C x H x W} -> R^m``, acts on batches ``(B, *shape)`` and never
modifies its input in place. Each implements

* :meth:`~fewflow.inverse.base.Operator.forward` ``A x``;
* :meth:`~fewflow.inverse.base.Operator.adjoint` ``A^T y``, exact: ``<A x, y> = <x, A^T y>``;
* :meth:`~fewflow.inverse.base.Operator.pinv` a right inverse ``A(pinv(y)) = y`` where one exists
  (:class:`GaussianBlur` has none: solvers fall back to the adjoint / gradient steps on ``||A x - y||^2``).

A :class:`Measurement` is ``y = A(x) + sigma * n`` with ``n ~ N(0, I)`` in measurement space, the
operator and ``sigma``; :func:`measure` draws one. :func:`make_operator` builds the standard tasks of
:data:`TASKS` for a given image shape ``(C, H, W)``.

Operators:

* :class:`Identity` (denoising), ``A = I``.
* :class:`Mask` (inpainting): keeps the entries where ``mask == 1``; ``A`` is a selection matrix, so the
  measurement is the vector ``(B, m)`` of observed entries (``m = mask.sum()``), ``A A^T = I`` and
  ``pinv = A^T`` (missing entries filled with zeros). ``A^T y`` is the degraded image for display.
* :class:`AvgPoolSR` (super-resolution): ``factor x factor`` average pooling. ``A A^T = I / factor^2``,
  so the Moore-Penrose pseudo-inverse ``A^T (A A^T)^{-1} = factor^2 A^T`` is nearest-neighbour upsampling.
* :class:`GaussianBlur` (deblurring): per-channel convolution with a normalised Gaussian kernel and zero
  padding ("same" output size); its adjoint is the transposed convolution with the same padding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fewflow._validate import FewflowError, check_finite, unknown_name
from fewflow.inverse.base import Operator

__all__ = [
    "TASKS",
    "AvgPoolSR",
    "GaussianBlur",
    "Identity",
    "Mask",
    "Measurement",
    "box_mask",
    "half_mask",
    "make_operator",
    "measure",
    "random_mask",
]

TASKS: tuple[str, ...] = ("inpaint", "sr2", "sr4", "deblur", "denoise")


def _shape_tuple(shape: Sequence[int] | torch.Size | None, name: str = "shape") -> tuple[int, ...] | None:
    if shape is None:
        return None
    try:
        out = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise FewflowError(f"{name} must be a sequence of positive integers, got {shape!r}") from None
    if not out or any(s < 1 for s in out):
        raise FewflowError(f"{name} must be a sequence of positive integers, got {shape!r}")
    return out


def _image_shape(shape: Sequence[int] | torch.Size, name: str = "shape") -> tuple[int, int, int]:
    s = _shape_tuple(shape, name)
    assert s is not None
    if len(s) != 3:
        raise FewflowError(f"{name} must be an image shape (C, H, W), got {s}")
    return s  # type: ignore[return-value]


def _check_input(op: Operator, x: Tensor, shape: tuple[int, ...] | None, image: bool = False) -> None:
    if not torch.is_tensor(x) or not x.is_floating_point():
        raise FewflowError(f"{op.name}: input must be a floating-point tensor")
    if image and x.dim() != 4:
        raise FewflowError(f"{op.name}: input must be an image batch (B, C, H, W), got {tuple(x.shape)}")
    if x.dim() < 2:
        raise FewflowError(f"{op.name}: input must be batched (B, ...), got shape {tuple(x.shape)}")
    if shape is not None and tuple(x.shape[1:]) != shape:
        raise FewflowError(
            f"{op.name}: input has per-sample shape {tuple(x.shape[1:])} but the operator expects {shape}"
        )


class Identity(Operator):
    """``A = I`` (denoising). ``shape`` (optional) is the per-sample shape inputs must have."""

    name = "identity"

    def __init__(self, shape: Sequence[int] | None = None) -> None:
        self.shape = _shape_tuple(shape)

    def forward(self, x: Tensor) -> Tensor:
        _check_input(self, x, self.shape)
        return x.clone()

    def adjoint(self, y: Tensor) -> Tensor:
        _check_input(self, y, self.shape)
        return y.clone()

    def pinv(self, y: Tensor) -> Tensor:
        return self.adjoint(y)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape) if self.shape else None}


class Mask(Operator):
    """Inpainting: observe the entries where ``mask`` is 1 (or ``True``), lose the others.

    Args:
        mask: per-sample 0/1 (or boolean) tensor, e.g. ``(C, H, W)``; with ``shape`` given, any tensor
            that broadcasts to ``shape`` (e.g. an ``(H, W)`` mask shared by every channel).
        shape: the per-sample shape of the images (defaults to ``mask.shape``).

    ``forward`` returns the observed entries as ``(B, m)`` in row-major order; ``adjoint`` puts them back
    in an image with zeros at the missing entries; ``pinv == adjoint`` because ``A A^T = I``.
    """

    name = "mask"

    def __init__(self, mask: Tensor, shape: Sequence[int] | None = None) -> None:
        if not torch.is_tensor(mask):
            raise FewflowError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
        check_finite("mask", mask.float())
        m = mask.detach()
        if m.dtype != torch.bool:
            if not bool(((m == 0) | (m == 1)).all()):
                raise FewflowError("mask must hold only 0 and 1 (1 = observed, 0 = missing)")
            m = m != 0
        full = _shape_tuple(shape) if shape is not None else tuple(m.shape)
        if not full:
            raise FewflowError("mask must have at least one dimension")
        try:
            m = torch.broadcast_to(m, full).clone()
        except RuntimeError:
            raise FewflowError(f"mask of shape {tuple(mask.shape)} does not broadcast to {full}") from None
        self.shape: tuple[int, ...] = full
        self.mask = m
        self.m = int(m.sum())
        if self.m == 0:
            raise FewflowError("mask observes nothing (every entry is 0)")

    def _mask_on(self, ref: Tensor) -> Tensor:
        return self.mask.to(device=ref.device)

    def forward(self, x: Tensor) -> Tensor:
        _check_input(self, x, self.shape)
        return x[:, self._mask_on(x)]

    def adjoint(self, y: Tensor) -> Tensor:
        if not torch.is_tensor(y) or not y.is_floating_point():
            raise FewflowError("mask: measurement must be a floating-point tensor")
        if y.dim() != 2 or y.shape[1] != self.m:
            raise FewflowError(
                f"mask: measurement must have shape (B, {self.m}) (observed entries), got {tuple(y.shape)}"
            )
        out = y.new_zeros((y.shape[0], *self.shape))
        out[:, self._mask_on(y)] = y
        return out

    def pinv(self, y: Tensor) -> Tensor:
        return self.adjoint(y)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "observed": self.m,
                "fraction": self.m / self.mask.numel()}


def box_mask(shape: Sequence[int], top: int, left: int, h: int, w: int) -> Mask:
    """A :class:`Mask` for images of ``shape = (C, H, W)`` that hides the box ``[top:top+h, left:left+w]``
    in every channel and observes the rest."""
    c, hh, ww = _image_shape(shape)
    top, left, h, w = int(top), int(left), int(h), int(w)
    if h < 1 or w < 1 or top < 0 or left < 0 or top + h > hh or left + w > ww:
        raise FewflowError(f"box (top={top}, left={left}, h={h}, w={w}) must lie inside the {hh}x{ww} image")
    m = torch.ones(c, hh, ww, dtype=torch.bool)
    m[:, top : top + h, left : left + w] = False
    return Mask(m)


def half_mask(shape: Sequence[int], side: str = "bottom") -> Mask:
    """A :class:`Mask` for ``shape = (C, H, W)`` that hides one half (``side`` in top/bottom/left/right)."""
    c, hh, ww = _image_shape(shape)
    sides = ("bottom", "top", "left", "right")
    if side not in sides:
        raise unknown_name("mask side", side, sides)
    m = torch.ones(c, hh, ww, dtype=torch.bool)
    if side == "bottom":
        m[:, hh - hh // 2 :, :] = False
    elif side == "top":
        m[:, : hh // 2, :] = False
    elif side == "left":
        m[:, :, : ww // 2] = False
    else:
        m[:, :, ww - ww // 2 :] = False
    return Mask(m)


def random_mask(shape: Sequence[int], keep: float, generator: torch.Generator | None = None) -> Mask:
    """A :class:`Mask` for ``shape = (C, H, W)`` observing each pixel (all channels together) with
    probability ``keep`` (at least one pixel is kept)."""
    c, hh, ww = _image_shape(shape)
    keep = float(keep)
    if not 0.0 < keep <= 1.0:
        raise FewflowError(f"keep must lie in (0, 1], got {keep}")
    dev = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand(hh, ww, generator=generator, device=dev).cpu()
    m = u < keep
    if not bool(m.any()):
        m.view(-1)[int(u.argmin())] = True
    return Mask(m, shape=(c, hh, ww))


class AvgPoolSR(Operator):
    """Super-resolution: ``factor x factor`` average pooling of ``(B, C, H, W)`` images.

    ``adjoint(y)`` = nearest upsampling ``/ factor^2``; ``pinv(y)`` = nearest upsampling (the
    Moore-Penrose pseudo-inverse, a right inverse: ``A(pinv(y)) = y``).
    """

    name = "avgpool_sr"

    def __init__(self, factor: int, shape: Sequence[int] | None = None) -> None:
        if int(factor) != factor or int(factor) < 1:
            raise FewflowError(f"factor must be a positive integer, got {factor!r}")
        self.factor = int(factor)
        self.shape = _image_shape(shape) if shape is not None else None
        if self.shape is not None:
            self._check_hw(self.shape[1], self.shape[2])

    def _check_hw(self, h: int, w: int) -> None:
        if h % self.factor or w % self.factor:
            raise FewflowError(f"avgpool_sr: image size {h}x{w} is not divisible by factor {self.factor}")

    def forward(self, x: Tensor) -> Tensor:
        _check_input(self, x, self.shape, image=True)
        self._check_hw(x.shape[2], x.shape[3])
        return F.avg_pool2d(x, self.factor)

    def _check_y(self, y: Tensor) -> None:
        if not torch.is_tensor(y) or not y.is_floating_point() or y.dim() != 4:
            raise FewflowError("avgpool_sr: measurement must be a floating-point (B, C, h, w) tensor")
        if self.shape is not None:
            c, h, w = self.shape
            want = (c, h // self.factor, w // self.factor)
            if tuple(y.shape[1:]) != want:
                raise FewflowError(f"avgpool_sr: measurement has shape {tuple(y.shape[1:])}, expected {want}")

    def adjoint(self, y: Tensor) -> Tensor:
        return self.pinv(y) / self.factor**2

    def pinv(self, y: Tensor) -> Tensor:
        self._check_y(y)
        f = self.factor
        return y.repeat_interleave(f, dim=2).repeat_interleave(f, dim=3)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "factor": self.factor, "shape": list(self.shape) if self.shape else None}


class GaussianBlur(Operator):
    """Deblurring: per-channel convolution with a normalised isotropic Gaussian kernel.

    Args:
        sigma: kernel standard deviation in pixels (> 0).
        size: odd kernel width (default ``2 * ceil(3 sigma) + 1``).
        shape: optional ``(C, H, W)`` the inputs must have.

    Zero padding of ``size // 2`` keeps the image size; the adjoint is the transposed convolution with the
    same padding, exact for that padding. There is no cheap right inverse (:meth:`pinv` raises); solvers
    use ``A^T`` and gradient steps on ``||A x - y||^2`` instead.
    """

    name = "gaussian_blur"

    def __init__(
        self, sigma: float = 1.0, size: int | None = None, shape: Sequence[int] | None = None
    ) -> None:
        sigma = float(sigma)
        if not math.isfinite(sigma) or sigma <= 0:
            raise FewflowError(f"blur sigma must be a positive number of pixels, got {sigma}")
        size = 2 * math.ceil(3 * sigma) + 1 if size is None else size
        if int(size) != size or int(size) < 1 or int(size) % 2 == 0:
            raise FewflowError(f"blur size must be a positive odd integer, got {size!r}")
        self.sigma, self.size = sigma, int(size)
        self.shape = _image_shape(shape) if shape is not None else None
        r = torch.arange(self.size, dtype=torch.float64) - self.size // 2
        g = torch.exp(-0.5 * (r / sigma) ** 2)
        k = g[:, None] * g[None, :]
        self.kernel = k / k.sum()

    def _weight(self, ref: Tensor) -> Tensor:
        c = ref.shape[1]
        k = self.kernel.to(device=ref.device, dtype=ref.dtype)
        return k.expand(c, 1, self.size, self.size)

    def forward(self, x: Tensor) -> Tensor:
        _check_input(self, x, self.shape, image=True)
        return F.conv2d(x, self._weight(x), padding=self.size // 2, groups=x.shape[1])

    def adjoint(self, y: Tensor) -> Tensor:
        _check_input(self, y, self.shape, image=True)
        return F.conv_transpose2d(y, self._weight(y), padding=self.size // 2, groups=y.shape[1])

    def pinv(self, y: Tensor) -> Tensor:
        raise FewflowError("gaussian_blur has no pseudo-inverse; use its adjoint or gradient steps instead")

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "sigma": self.sigma, "size": self.size,
                "shape": list(self.shape) if self.shape else None}


@dataclass
class Measurement:
    """A noisy measurement ``y = A(x) + sigma * n``, ``n ~ N(0, I)``.

    Attributes:
        y: the measurement batch, ``(B, ...)`` in the operator's output space.
        op: the degradation operator ``A``.
        sigma: the measurement noise standard deviation (>= 0).
    """

    y: Tensor
    op: Operator
    sigma: float

    def __post_init__(self) -> None:
        if not torch.is_tensor(self.y):
            raise FewflowError(f"measurement y must be a torch.Tensor, got {type(self.y).__name__}")
        check_finite("measurement y", self.y)
        if not isinstance(self.op, Operator):
            raise FewflowError(f"measurement op must be a fewflow Operator, got {type(self.op).__name__}")
        s = float(self.sigma)
        if not math.isfinite(s) or s < 0:
            raise FewflowError(f"measurement noise sigma must be >= 0, got {self.sigma}")
        self.sigma = s

    @property
    def m(self) -> int:
        """Number of measured values per sample."""
        return int(self.y[0].numel())

    def residual(self, x: Tensor) -> Tensor:
        """Per-sample ``||A(x) - y||``, shape ``(B,)``; at the truth its expectation is about
        ``sigma * sqrt(m)``."""
        r = self.op(x) - self.y
        return r.reshape(r.shape[0], -1).norm(dim=1)

    def describe(self) -> dict[str, Any]:
        """Plain-JSON description: operator, noise level, measurement shape."""
        return {"op": self.op.describe(), "sigma": self.sigma, "y_shape": list(self.y.shape), "m": self.m}


def measure(x: Tensor, op: Operator, sigma: float, generator: torch.Generator | None = None) -> Measurement:
    """Degrade a clean batch: ``y = A(x) + sigma * n`` with ``n ~ N(0, I)`` drawn from ``generator``
    (on ``x``'s device). ``x`` is not modified."""
    if not torch.is_tensor(x):
        raise FewflowError(f"x must be a torch.Tensor, got {type(x).__name__}")
    check_finite("x", x)
    s = float(sigma)
    if not math.isfinite(s) or s < 0:
        raise FewflowError(f"measurement noise sigma must be >= 0, got {sigma}")
    with torch.no_grad():
        ax = op(x.detach())
        noise = torch.randn(ax.shape, generator=generator, device=ax.device, dtype=ax.dtype)
        y = ax + s * noise
    return Measurement(y=y, op=op, sigma=s)


def make_operator(task: str, shape: Sequence[int], **kw: Any) -> Operator:
    """The operator of a standard task for images of ``shape = (C, H, W)``.

    * ``"inpaint"``: ``mask="box"`` (default; a centred box of half the height and width, override with
      ``top, left, h, w``), ``"half"`` (``side="bottom"``) or ``"random"`` (``keep=0.3``, ``generator``).
    * ``"sr2"`` / ``"sr4"``: :class:`AvgPoolSR` with factor 2 / 4 (8x8 -> 4x4 / 2x2, 28x28 -> 14x14 / 7x7).
    * ``"deblur"``: :class:`GaussianBlur` with ``sigma=1.0`` px and ``size`` = ``2 ceil(3 sigma) + 1``
      (capped at the largest odd number not above the image side).
    * ``"denoise"``: :class:`Identity`.
    """
    c, h, w = _image_shape(shape)
    kw = dict(kw)

    def done() -> None:
        if kw:
            raise FewflowError(f"unknown option(s) for task {task!r}: {', '.join(sorted(kw))}")

    if task == "inpaint":
        kind = kw.pop("mask", "box")
        if kind == "box":
            bh, bw = int(kw.pop("h", max(1, h // 2))), int(kw.pop("w", max(1, w // 2)))
            top, left = int(kw.pop("top", (h - bh) // 2)), int(kw.pop("left", (w - bw) // 2))
            done()
            return box_mask((c, h, w), top, left, bh, bw)
        if kind == "half":
            side = kw.pop("side", "bottom")
            done()
            return half_mask((c, h, w), side)
        if kind == "random":
            keep, gen = kw.pop("keep", 0.3), kw.pop("generator", None)
            done()
            return random_mask((c, h, w), keep, gen)
        raise unknown_name("inpainting mask", str(kind), ("box", "half", "random"))
    if task in ("sr2", "sr4"):
        done()
        return AvgPoolSR(2 if task == "sr2" else 4, shape=(c, h, w))
    if task == "deblur":
        sigma = float(kw.pop("sigma", 1.0))
        default = 2 * math.ceil(3 * sigma) + 1 if sigma > 0 else 1
        cap = min(h, w) if min(h, w) % 2 else min(h, w) - 1
        size = kw.pop("size", max(1, min(default, cap)))
        done()
        return GaussianBlur(sigma, size, shape=(c, h, w))
    if task == "denoise":
        done()
        return Identity((c, h, w))
    raise unknown_name("inverse task", str(task), TASKS)
