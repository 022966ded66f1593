"""Training-time distributions for flow matching, in fewflow time (t = 0 source/noise, t = 1 data).

Every sampler has ``.sample(n, *, device=None, dtype=None, generator=None) -> Tensor (n,)`` with values in
[0, 1]. With a generator the draw happens on the generator's device and is moved to ``device``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fewflow._validate import FewflowError, unknown_name
from fewflow.solvers.grids import shift_time


def _draw(
    kind: str,
    n: int,
    device: torch.device | str | None,
    dtype: torch.dtype | None,
    generator: torch.Generator | None,
) -> Tensor:
    if not isinstance(n, int) or n < 0:
        raise FewflowError(f"number of times n must be a non-negative integer, got {n!r}")
    dtype = dtype if dtype is not None else torch.get_default_dtype()
    fn = torch.rand if kind == "uniform" else torch.randn
    if generator is None:
        return fn(n, device=device, dtype=dtype)
    out = fn(n, generator=generator, device=generator.device, dtype=dtype)
    return out.to(device) if device is not None else out


class TimeSampler:
    """Base class: ``sample(n, *, device=None, dtype=None, generator=None) -> Tensor (n,)`` in [0, 1]."""

    def sample(
        self,
        n: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        raise NotImplementedError


class UniformTime(TimeSampler):
    """``t ~ U[lo, hi]`` (the default of "Flow Matching for Generative Modeling", Lipman et al. 2023)."""

    def __init__(self, lo: float = 0.0, hi: float = 1.0) -> None:
        if not (0.0 <= lo < hi <= 1.0):
            raise FewflowError(f"UniformTime needs 0 <= lo < hi <= 1, got lo={lo}, hi={hi}")
        self.lo, self.hi = float(lo), float(hi)

    def sample(self, n, *, device=None, dtype=None, generator=None) -> Tensor:  # noqa: D102
        return self.lo + (self.hi - self.lo) * _draw("uniform", n, device, dtype, generator)

    def __repr__(self) -> str:
        return f"UniformTime(lo={self.lo:g}, hi={self.hi:g})"


class LogitNormalTime(TimeSampler):
    """Logit-normal times ``t = sigmoid(mean + std * z)``, ``z ~ N(0, 1)``, **in fewflow time**.

    From "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis" (Esser et al., SD3),
    which found logit-normal(0, 1) the best of its samplers. Papers that put noise at t = 1 (SD3, MeanFlow)
    state ``logit-normal(m, s)`` for their noise-level time ``1 - t``; since ``1 - sigmoid(a) = sigmoid(-a)``
    that is ``LogitNormalTime(mean=-m, std=s)`` here, or :meth:`from_noise_time` ``(m, s)``.
    """

    def __init__(self, mean: float = 0.0, std: float = 1.0) -> None:
        if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
            raise FewflowError(f"LogitNormalTime needs finite mean and std > 0, got mean={mean}, std={std}")
        self.mean, self.std = float(mean), float(std)

    @classmethod
    def from_noise_time(cls, mean: float, std: float) -> LogitNormalTime:
        """The sampler for a paper's logit-normal(mean, std) over noise-level time (t = 1 noise)."""
        return cls(mean=-mean, std=std)

    def sample(self, n, *, device=None, dtype=None, generator=None) -> Tensor:  # noqa: D102
        return torch.sigmoid(self.mean + self.std * _draw("normal", n, device, dtype, generator))

    def __repr__(self) -> str:
        return f"LogitNormalTime(mean={self.mean:g}, std={self.std:g})"


class ShiftedTime(TimeSampler):
    """A base sampler followed by the SD3 timestep shift :func:`shift_time` (``shift = 1``: unchanged)."""

    def __init__(self, base: TimeSampler, shift: float) -> None:
        if not hasattr(base, "sample"):
            raise FewflowError(f"ShiftedTime needs a base time sampler, got {type(base).__name__}")
        if not (math.isfinite(shift) and shift > 0):
            raise FewflowError(f"shift must be a positive finite number, got {shift}")
        self.base, self.shift = base, float(shift)

    def sample(self, n, *, device=None, dtype=None, generator=None) -> Tensor:  # noqa: D102
        t = self.base.sample(n, device=device, dtype=dtype, generator=generator)
        return shift_time(t, self.shift)

    def __repr__(self) -> str:
        return f"ShiftedTime({self.base!r}, shift={self.shift:g})"


def _shifted(shift: float, **kw: float) -> ShiftedTime:
    return ShiftedTime(UniformTime(**kw), shift)


#: training time samplers by name (``objective.time_sampler`` of a run config)
TIME_SAMPLERS: dict[str, type | object] = {
    "uniform": UniformTime,
    "logit_normal": LogitNormalTime,
    "shifted": _shifted,
}


def get_time_sampler(name: str, **kw: float) -> TimeSampler:
    """A training time sampler by name: ``uniform`` (``lo``, ``hi``), ``logit_normal`` (``mean``, ``std``),
    ``shifted`` (``shift``: SD3's shift of uniform times)."""
    if name not in TIME_SAMPLERS:
        raise unknown_name("time sampler", str(name), TIME_SAMPLERS)
    try:
        return TIME_SAMPLERS[name](**kw)  # type: ignore[operator]
    except TypeError as e:
        raise FewflowError(f"bad arguments for time sampler {name!r}: {e}") from None
