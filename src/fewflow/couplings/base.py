"""The coupling protocol: how a batch of source samples ``x0`` is paired with a batch of data ``x1``.

A coupling returns a :class:`CouplingResult`. It only ever *reorders* ``x0`` (``x0_new = x0[perm]``),
never ``x1``, so labels and any other conditioning that travel with ``x1`` stay aligned. Independent
CFM ("Flow Matching for Generative Modeling", Lipman et al. 2023) uses the identity pairing; the
minibatch-OT variants ("Improving and generalizing flow-based generative models with minibatch optimal
transport", Tong et al. 2024) and W-CFM ("Weighted Conditional Flow Matching", Calvo-Ordonez et al.
2025) live in sibling modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from fewflow._validate import FewflowError, check_batch, check_finite, check_same_shape


@dataclass
class CouplingResult:
    """A coupled batch: ``x0[j]`` is paired with ``x1[j]``.

    Attributes:
        x0: the reordered source batch, ``x0_new = x0_in[perm]`` (same shape, device and dtype as the input).
        x1: the data batch, unchanged.
        perm: ``LongTensor (B,)`` with ``x0_new = x0_in[perm]``; ``None`` means the identity.
        weights: optional per-pair weights ``(B,)`` (W-CFM); ``None`` means uniform.
        y: the labels of ``x1`` passed through unchanged (``None`` if none were given).
        diagnostics: plain floats for logging, e.g. ``cost_independent`` / ``cost_coupled`` (mean squared
            distance of the pairs before / after coupling) or ``ess`` for weighted couplings.
    """

    x0: Tensor
    x1: Tensor
    perm: Tensor | None = None
    weights: Tensor | None = None
    y: Tensor | None = None
    diagnostics: dict[str, float] = field(default_factory=dict)


class Coupling:
    """Base class: ``coupling(x0, x1, *, y=None, generator=None) -> CouplingResult``.

    Subclasses implement :meth:`couple` on validated inputs. ``x0`` and ``x1`` must have the same shape
    ``(B, ...)``; images are flattened for the cost, never reshaped in the result.
    """

    def __call__(
        self,
        x0: Tensor,
        x1: Tensor,
        *,
        y: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> CouplingResult:
        check_finite("x0", x0)
        check_finite("x1", x1)
        check_batch("x0", x0)
        check_same_shape("x0", x0, "x1", x1)
        if not x0.is_floating_point() or not x1.is_floating_point():
            raise FewflowError(f"x0 and x1 must be floating-point tensors, got {x0.dtype} and {x1.dtype}")
        if y is not None:
            if not torch.is_tensor(y):
                raise FewflowError(f"y must be a torch.Tensor of labels, got {type(y).__name__}")
            if y.shape[0] != x1.shape[0]:
                raise FewflowError(f"y has {y.shape[0]} labels but the batch x1 has {x1.shape[0]} samples")
        return self.couple(x0, x1, y=y, generator=generator)

    def couple(
        self, x0: Tensor, x1: Tensor, *, y: Tensor | None, generator: torch.Generator | None
    ) -> CouplingResult:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class IndependentCoupling(Coupling):
    """The product coupling ``pi = p0 x p1``: pairs are kept as drawn (independent / I-CFM)."""

    def couple(
        self, x0: Tensor, x1: Tensor, *, y: Tensor | None, generator: torch.Generator | None
    ) -> CouplingResult:
        return CouplingResult(x0=x0, x1=x1, perm=None, weights=None, y=y)


def pairwise_cost(x0: Tensor, x1: Tensor, cost: str = "sqeuclidean") -> Tensor:
    """The cost matrix ``C[i, j] = c(x0_i, x1_j)`` in float64 on the CPU (inputs flattened to ``(B, D)``).

    ``cost="sqeuclidean"``: ``||x0_i - x1_j||^2``; ``cost="euclidean"``: ``||x0_i - x1_j||``.
    """
    if cost not in ("sqeuclidean", "euclidean"):
        raise FewflowError(f"unknown cost {cost!r}; choose one of: euclidean, sqeuclidean")
    for name, z in (("x0", x0), ("x1", x1)):
        check_finite(name, z)
        if z.dim() < 1 or z.shape[0] == 0 or z.numel() == 0:
            raise FewflowError(f"{name} must be a non-empty batch (B, ...), got shape {tuple(z.shape)}")
    if x0.shape[1:] != x1.shape[1:]:
        raise FewflowError(f"x0 samples have shape {tuple(x0.shape[1:])}, x1 samples {tuple(x1.shape[1:])}")
    a = x0.detach().reshape(x0.shape[0], -1).to(device="cpu", dtype=torch.float64)
    b = x1.detach().reshape(x1.shape[0], -1).to(device="cpu", dtype=torch.float64)
    d2 = (a.pow(2).sum(1)[:, None] + b.pow(2).sum(1)[None, :] - 2.0 * a @ b.T).clamp_min_(0.0)
    return d2 if cost == "sqeuclidean" else d2.sqrt()


def pair_cost(x0: Tensor, x1: Tensor) -> Tensor:
    """Per-pair squared distance ``||x0_i - x1_i||^2`` on the inputs' device, shape ``(B,)``."""
    return (x0 - x1).reshape(x0.shape[0], -1).pow(2).sum(1)


def randn_like(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Standard normal noise shaped like ``x`` on ``x``'s device and dtype.

    With a generator, the draw happens on the generator's device (so a CPU generator also serves a CUDA
    batch reproducibly) and is moved to ``x.device``.
    """
    if generator is None:
        return torch.randn(x.shape, device=x.device, dtype=x.dtype)
    z = torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype)
    return z.to(x.device)


def rand(n: int, like: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """``U[0, 1)`` draws of shape ``(n,)`` on ``like``'s device and dtype (see :func:`randn_like`)."""
    if generator is None:
        return torch.rand(n, device=like.device, dtype=like.dtype)
    return torch.rand(n, generator=generator, device=generator.device, dtype=like.dtype).to(like.device)
