"""Stiffness of a velocity field: the spectral norm of its Jacobian in ``x``, by power iteration.

For a velocity model ``v(x, t, **cond)`` the local Lipschitz constant at ``(x, t)`` is the largest singular
value of the Jacobian ``J = d v / d x`` (the data dimensions flattened),

    L(x, t) = ||J(x, t)||_2 = sqrt(lambda_max(J^T J)).

Power iteration on ``J^T J`` needs one Jacobian-vector product (forward mode) and one vector-Jacobian
product (reverse mode) per iteration and never forms ``J``: ``u <- J^T J u / ||J^T J u||``, and the
estimate ``||J u||`` increases to ``sigma_max`` from below (exact after one iteration when ``J`` is a
multiple of an orthogonal matrix, and geometrically fast with the gap ``sigma_2 / sigma_1`` otherwise).

"Fine-Tuning Flow Matching via Maximum Likelihood Estimation of Reconstructions" (Li, Ding, Li, Li;
arXiv 2510.02081) bounds the N-step Euler error of a learned field by the training error amplified by
``exp(L)``: a stiff field (large ``L``) makes few-step sampling fragile. ``lipschitz_estimate`` measures
``L`` along a batch of states; rows are treated independently (the model must not mix rows of a batch,
as batch normalisation would).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fewflow._validate import FewflowError, check_batch, check_finite

__all__ = ["lipschitz_estimate"]


def _row_norm(z: Tensor) -> Tensor:
    return z.reshape(z.shape[0], -1).norm(dim=1)


def _scale_rows(z: Tensor, s: Tensor) -> Tensor:
    return z * s.reshape(-1, *([1] * (z.dim() - 1)))


def lipschitz_estimate(
    model: Any,
    x: Tensor,
    t: Tensor | float,
    *,
    iters: int = 20,
    generator: torch.Generator | None = None,
    **cond: Any,
) -> Tensor:
    """Per-row spectral norm of ``d model(x, t, **cond) / d x``, shape ``(B,)`` (module docstring).

    Args:
        model: a velocity model ``v(x, t, **cond)`` returning a tensor shaped like ``x``.
        x: states ``(B, ...)``; not modified.
        t: times ``(B,)`` or one number for every row (fewflow time: 0 source, 1 data).
        iters: power iterations on ``J^T J`` (>= 1).
        generator: for the random start vector.
        cond: conditioning passed to every model call (``y``, ``c``, ...).

    Returns the estimate ``||J u_k||`` after ``iters`` iterations, a lower bound of the true spectral norm
    that converges to it; the model's parameters receive no gradient."""
    check_batch("x", x)
    check_finite("x", x)
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise FewflowError(f"iters must be a positive integer, got {iters!r}")
    b = x.shape[0]
    if not torch.is_tensor(t):
        t = torch.full((b,), float(t), device=x.device, dtype=x.dtype)
    t = t.to(device=x.device, dtype=x.dtype)
    if t.dim() == 0:
        t = t.expand(b)
    if t.shape != (b,):
        raise FewflowError(f"t must be one number or have shape ({b},), got {tuple(t.shape)}")
    x = x.detach()

    def f(z: Tensor) -> Tensor:
        out = model(z, t, **cond)
        if not torch.is_tensor(out) or out.shape != z.shape:
            raise FewflowError("lipschitz_estimate needs a velocity model whose output is shaped like x")
        return out

    gdev = generator.device if generator is not None else x.device
    u = torch.randn(x.shape, generator=generator, device=gdev, dtype=x.dtype).to(x.device)
    u = _scale_rows(u, 1.0 / _row_norm(u).clamp_min(1e-30))
    est = torch.zeros(b, device=x.device, dtype=x.dtype)
    with torch.enable_grad():
        z = x.clone().requires_grad_(True)
        out = f(z)  # one graph, reused by every product below
        w = torch.zeros_like(out, requires_grad=True)
        # J u by the double-vjp trick (any autograd model): w -> J^T w is linear in w, so the gradient of
        # <J^T w, u> in w is J u
        (jt_w,) = torch.autograd.grad(out, z, w, create_graph=True)
        for k in range(iters + 1):
            (ju,) = torch.autograd.grad(jt_w, w, u, retain_graph=True)
            est = torch.maximum(est, _row_norm(ju).detach())
            if k == iters:
                break
            (jtju,) = torch.autograd.grad(out, z, ju, retain_graph=True)
            n = _row_norm(jtju)
            if bool((n == 0).all()):
                break
            keep = (n > 0).reshape(-1, *([1] * (x.dim() - 1)))
            u = torch.where(keep, _scale_rows(jtju, 1.0 / n.clamp_min(1e-30)), u).detach()
    return est
