r"""Source distributions: what ``x0`` (the ``t = 0`` end of a flow) is.

- :class:`GaussianSource`: ``N(0, scale^2 I)``.
- :class:`NormAlignedGaussian`: a Gaussian whose mean norm matches the data's (Lee, Kim & Lee, "Is There a
  Better Source Distribution than Gaussian? Exploring Source Distributions for Image Flow Matching", TMLR
  2025), with an ``accept(x0)`` hook for their directional pruning.
- :class:`DataSource`: another data set as the source (domain transfer), drawn without replacement per epoch.

Every source follows the :class:`Source` protocol: ``sample(n, *, device=None, dtype=None, generator=None)``
returns ``(n, *shape)``, ``sample_like(x1, generator=None)`` matches a data batch's size, device and dtype.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from fewflow._validate import FewflowError, check_finite

__all__ = ["SOURCES", "Source", "GaussianSource", "NormAlignedGaussian", "DataSource", "gaussian_mean_norm"]


@runtime_checkable
class Source(Protocol):
    """What a flow starts from: ``sample``, ``sample_like`` and (when it has a density) ``log_prob``."""

    def sample(self, n: int, *, device: Any = None, dtype: torch.dtype | None = None,
               generator: torch.Generator | None = None) -> Tensor: ...

    def sample_like(self, x1: Tensor, generator: torch.Generator | None = None) -> Tensor: ...

    def log_prob(self, x: Tensor) -> Tensor: ...


def _randn(shape: Sequence[int], *, device: Any = None, dtype: torch.dtype | None = None,
           generator: torch.Generator | None = None) -> Tensor:
    """Standard normal noise on ``device``; a generator living on another device draws there, then moves."""
    dtype = dtype if dtype is not None else torch.get_default_dtype()
    if generator is None:
        return torch.randn(tuple(shape), device=device, dtype=dtype)
    out = torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=dtype)
    return out.to(device) if device is not None else out


def _check_n(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise FewflowError(f"number of samples n must be a non-negative int, got {n!r}")
    return n


def _as_shape(shape: int | Sequence[int]) -> tuple[int, ...]:
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if len(shape) == 0 or not all(isinstance(s, int) and s > 0 for s in shape):
        raise FewflowError(f"source shape must be a positive int or a tuple of positive ints, got {shape!r}")
    return shape


def gaussian_mean_norm(d: int) -> float:
    r"""``E ||x||`` for ``x ~ N(0, I_d)``: ``sqrt(2) Gamma((d + 1)/2) / Gamma(d/2)`` (the chi mean), exact.

    (It is ``sqrt(d - 1/2)`` to O(1/d), not ``sqrt(d)``.)
    """
    if d < 1:
        raise FewflowError(f"dimension must be >= 1, got {d}")
    return math.sqrt(2.0) * math.exp(math.lgamma((d + 1) / 2) - math.lgamma(d / 2))


class GaussianSource:
    r"""Isotropic Gaussian source ``N(0, scale^2 I)`` over samples of shape ``shape``.

    ``log_prob(x) = -||x||^2 / (2 scale^2) - (d/2) log(2 pi scale^2)``, ``d = prod(shape)``.
    """

    def __init__(self, shape: int | Sequence[int], scale: float = 1.0) -> None:
        self.shape = _as_shape(shape)
        self.scale = self._check_scale(scale)

    @staticmethod
    def _check_scale(scale: float) -> float:
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise FewflowError(f"source scale must be a finite number > 0, got {scale!r}")
        return float(scale)

    @property
    def dim(self) -> int:
        """Number of entries per sample, ``prod(shape)``."""
        return math.prod(self.shape)

    def sample(self, n: int, *, device: Any = None, dtype: torch.dtype | None = None,
               generator: torch.Generator | None = None) -> Tensor:
        """Draw ``n`` samples, shape ``(n, *shape)``."""
        n = _check_n(n)
        return self.scale * _randn((n, *self.shape), device=device, dtype=dtype, generator=generator)

    def sample_like(self, x1: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Draw one source sample per row of the data batch ``x1`` (same device and dtype)."""
        self._check_shape("x1", x1)
        return self.sample(x1.shape[0], device=x1.device, dtype=x1.dtype, generator=generator)

    def log_prob(self, x: Tensor) -> Tensor:
        """Log density of each row, shape ``(B,)``."""
        self._check_shape("x", x)
        check_finite("x", x)
        sq = x.reshape(x.shape[0], -1).pow(2).sum(dim=1)
        return -0.5 * sq / self.scale**2 - 0.5 * self.dim * math.log(2 * math.pi * self.scale**2)

    def _check_shape(self, name: str, x: Tensor) -> None:
        if not torch.is_tensor(x):
            raise FewflowError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if tuple(x.shape[1:]) != self.shape:
            raise FewflowError(
                f"{name} has sample shape {tuple(x.shape[1:])} but the source has shape {self.shape}"
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape}, scale={self.scale:.6g})"


class _fit_method:
    """``Cls.fit(data, **kw)`` builds ``Cls(**kw)`` and fits it; ``obj.fit(data)`` re-fits ``obj``."""

    def __init__(self, fn):
        self.fn = fn
        self.__doc__ = fn.__doc__

    def __get__(self, obj, cls):
        if obj is None:
            @functools.wraps(self.fn)
            def build_and_fit(data, **kw):
                return self.fn(cls(**kw), data)

            return build_and_fit
        return functools.partial(self.fn, obj)


class NormAlignedGaussian(GaussianSource):
    r"""Norm-aligned Gaussian source (Lee, Kim & Lee, "Is There a Better Source Distribution than Gaussian?
    Exploring Source Distributions for Image Flow Matching", TMLR 2025, "norm alignment").

    ``x0 = scale * z``, ``z ~ N(0, I_d)``, with ``scale = mean_i ||x1_i|| / E||z||`` so that ``E||x0||``
    equals the data's mean norm. ``E||z|| = sqrt(2) Gamma((d+1)/2) / Gamma(d/2)`` is used exactly (the
    authors' code divides by an estimate of ``E||z||``, 55.4185 for CIFAR-10, which this formula gives as
    55.42). The same source is used for training and sampling.

    ``NormAlignedGaussian.fit(data)`` builds a fitted source; ``src.fit(data)`` re-fits in place. Directional
    pruning hook: :meth:`accept` returns a ``(B,)`` bool mask; :meth:`sample` rejection-samples until ``n``
    accepted draws (the base class accepts everything). The paper prunes at sampling time only.
    """

    def __init__(self, shape: int | Sequence[int] | None = None, scale: float = 1.0,
                 max_tries: int = 100) -> None:
        self.shape = _as_shape(shape) if shape is not None else None
        self.scale = self._check_scale(scale)
        self.max_tries = int(max_tries)
        self.data_mean_norm: float | None = None

    @_fit_method
    def fit(self, data: Tensor) -> NormAlignedGaussian:
        """Set ``shape`` (if unset) and ``scale = mean ||x1|| / E||N(0, I_d)||`` from data (N, ...).

        Called on the class, ``NormAlignedGaussian.fit(data, **kw)`` builds ``NormAlignedGaussian(**kw)``
        first; called on an instance it re-fits that instance. Returns the fitted source.
        """
        data = getattr(data, "x", data)  # accept a fewflow.data.Dataset
        if not torch.is_tensor(data) or data.dim() < 2 or data.shape[0] == 0:
            raise FewflowError("NormAlignedGaussian.fit needs a non-empty batched data tensor (N, ...)")
        check_finite("data", data)
        if self.shape is None:
            self.shape = tuple(data.shape[1:])
        self._check_shape("data", data)
        mean_norm = float(data.reshape(data.shape[0], -1).to(torch.float64).norm(dim=1).mean())
        if mean_norm <= 0:
            raise FewflowError("NormAlignedGaussian.fit: data has zero mean norm")
        self.data_mean_norm = mean_norm
        self.scale = mean_norm / gaussian_mean_norm(self.dim)
        return self

    def accept(self, x0: Tensor) -> Tensor:
        """Directional-pruning hook: a ``(B,)`` bool mask of the draws to keep (here: all)."""
        return torch.ones(x0.shape[0], dtype=torch.bool, device=x0.device)

    def sample(self, n: int, *, device: Any = None, dtype: torch.dtype | None = None,
               generator: torch.Generator | None = None) -> Tensor:
        """Draw ``n`` accepted samples (rejection sampling through :meth:`accept`)."""
        if self.shape is None:
            raise FewflowError("NormAlignedGaussian has no shape yet: call fit(data) or pass shape=")
        n = _check_n(n)
        out, have = [], 0
        for _ in range(self.max_tries):
            x = super().sample(max(n - have, 1), device=device, dtype=dtype, generator=generator)
            keep = self.accept(x)
            if keep.shape != (x.shape[0],) or keep.dtype != torch.bool:
                raise FewflowError(f"accept() must return a ({x.shape[0]},) bool mask, got "
                                   f"{tuple(keep.shape)} {keep.dtype}")
            out.append(x[keep])
            have += int(keep.sum())
            if have >= n:
                return torch.cat(out)[:n]
        raise FewflowError(f"NormAlignedGaussian.accept kept only {have} of {n} requested samples after "
                           f"{self.max_tries} rounds; the pruning is too strict")


class DataSource:
    """Another data set as the source (domain transfer, e.g. an image-to-image flow).

    Rows are drawn *without replacement* through a fresh random permutation each epoch, so no row repeats
    within an epoch; a request that crosses an epoch boundary takes the rest of the epoch, then starts the
    next one. ``generator`` (constructor) drives the permutations unless a call passes its own. No density:
    :meth:`log_prob` raises.
    """

    def __init__(self, data: Tensor, generator: torch.Generator | None = None) -> None:
        data = getattr(data, "x", data)  # accept a fewflow.data.Dataset
        if not torch.is_tensor(data) or data.dim() < 2 or data.shape[0] == 0:
            raise FewflowError("DataSource needs a non-empty batched data tensor (N, ...)")
        check_finite("data", data)
        self.data = data
        self.shape = tuple(data.shape[1:])
        self.generator = generator
        self.epoch = 0
        self._perm: Tensor | None = None
        self._cursor = 0

    def __len__(self) -> int:
        return self.data.shape[0]

    def reset(self) -> None:
        """Forget the current epoch: the next draw starts a new permutation."""
        self._perm, self._cursor, self.epoch = None, 0, 0

    def _new_perm(self, generator: torch.Generator | None) -> None:
        g = generator if generator is not None else self.generator
        dev = g.device if g is not None else torch.device("cpu")
        self._perm = torch.randperm(len(self), generator=g, device=dev).to(self.data.device)
        self._cursor = 0
        self.epoch += 1

    def sample_indices(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """The next ``n`` row indices of the epoch-wise permutations."""
        n = _check_n(n)
        parts, need = [], n
        while need > 0:
            if self._perm is None or self._cursor >= len(self):
                self._new_perm(generator)
            take = min(need, len(self) - self._cursor)
            parts.append(self._perm[self._cursor:self._cursor + take])
            self._cursor += take
            need -= take
        if not parts:
            return torch.empty(0, dtype=torch.long, device=self.data.device)
        return torch.cat(parts)

    def sample(self, n: int, *, device: Any = None, dtype: torch.dtype | None = None,
               generator: torch.Generator | None = None) -> Tensor:
        """``n`` rows of the data set, without replacement within an epoch."""
        x = self.data[self.sample_indices(n, generator)]
        return x.to(device=device if device is not None else x.device, dtype=dtype or x.dtype)

    def sample_like(self, x1: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """One source row per row of ``x1`` (on ``x1``'s device and dtype)."""
        if not torch.is_tensor(x1) or tuple(x1.shape[1:]) != self.shape:
            got = tuple(x1.shape[1:]) if torch.is_tensor(x1) else type(x1).__name__
            raise FewflowError(f"x1 has sample shape {got} but the DataSource has shape {self.shape}")
        return self.sample(x1.shape[0], device=x1.device, dtype=x1.dtype, generator=generator)

    def log_prob(self, x: Tensor) -> Tensor:
        """Not available: a data set has no tractable density."""
        raise FewflowError("DataSource has no density: log_prob is not available for a data-set source")

    def __repr__(self) -> str:
        return f"DataSource(n={len(self)}, shape={self.shape})"


#: sources by name (``objective.source`` of a run config); ``norm_aligned`` is fitted to the data
SOURCES = ("gaussian", "norm_aligned")
