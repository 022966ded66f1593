"""Straight-through guidance (STGFlow) for flows on the simplex.

Tang, Zhang, Tong, Chatterjee, "Gumbel-Softmax Flow Matching with Straight-Through Guidance for
Controllable Biological Sequence Generation" (arXiv 2503.17361). A scorer ``f`` trained on *clean*
one-hot sequences steers a simplex flow (GSFM) without a noise-aware classifier: at each step, ``M``
discrete sequences are drawn from the current point ``x_t`` (per position, token ``k`` with probability
``x_t[l, k]``), scored with a straight-through estimator (the forward pass sees the one-hot draw ``h``,
the backward pass treats ``h`` as ``x_t``: ``h_st = h + x_t - stopgrad(x_t)``), and the averaged gradient
is added to the velocity:

    g(x_t) = (1 / M) sum_m grad_h f(h_m),      h_m ~ Cat(x_t),
    v_guided(x_t, t) = u_theta(x_t, t) + gamma (g - mean_K g).

The subtraction of the mean over the ``K`` states projects ``g`` onto the simplex's tangent space (its
entries then sum to zero per position), so the guided Euler step keeps the sum at one; the sampler's
projection handles negative coordinates.

What is the paper's and what is inferred: the paper's abstract and figures describe the straight-through
estimator with categorical draws from the current simplex point and a classifier trained on clean
sequences; the exact update (a plain sum ``u + gamma g`` with the tangent projection, no temperature
factor, the average over ``M`` draws) is inferred here, because no official code was available.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewflow._validate import FewflowError, check_finite

__all__ = ["STGuided", "SequenceRegressor", "stg_velocity", "train_sequence_classifier"]


def _draw_tokens(x: Tensor, m: int, generator: torch.Generator | None) -> Tensor:
    """``m`` categorical draws per position from the rows of ``x`` (``(B, L, K)``): ``(m, B, L)``."""
    k = x.shape[-1]
    probs = x.detach().clamp_min(0).reshape(-1, k)
    gdev = generator.device if generator is not None else x.device
    idx = torch.multinomial(probs.to(gdev, torch.float64), m, replacement=True, generator=generator)
    return idx.to(x.device).T.reshape(m, *x.shape[:-1])


def _scores(classifier: Callable[[Tensor], Tensor], h: Tensor, target: int | None) -> Tensor:
    out = classifier(h)
    if target is not None:
        if out.dim() != 2:
            raise FewflowError(f"a classifier with target= must return (B, C) logits, got {tuple(out.shape)}")
        return torch.log_softmax(out, dim=-1)[:, target]
    if out.dim() == 2 and out.shape[1] == 1:
        out = out[:, 0]
    if out.dim() != 1:
        raise FewflowError(f"the scorer must return one score per sequence (B,), got {tuple(out.shape)}; "
                           "pass target=CLASS for a classifier's (B, C) logits")
    return out


def stg_velocity(
    classifier: Callable[[Tensor], Tensor], x: Tensor, M: int = 8, gamma: float = 1.0,
    generator: torch.Generator | None = None, *, target: int | None = None,
) -> Tensor:
    """The straight-through guidance velocity ``gamma (g - mean_K g)`` at ``x`` (module docstring).

    Args:
        classifier: ``f(h) -> (B,)`` scores of one-hot sequences ``h`` ``(B, L, K)`` (higher = wanted), or
            ``(B, C)`` logits with ``target`` (the score is then ``log softmax(f(h))[target]``).
        x: points of the simplex ``(B, L, K)`` (not modified).
        M: categorical draws per sequence. gamma: guidance strength.
        generator: randomness of the draws.

    Returns:
        ``(B, L, K)``, summing to zero over ``K``; computed with autograd enabled even under
        ``torch.no_grad``; ``x`` is detached first, so no graph reaches the caller.
    """
    if isinstance(M, bool) or not isinstance(M, int) or M < 1:
        raise FewflowError(f"M (draws per sequence) must be a positive integer, got {M!r}")
    if not (isinstance(gamma, (int, float)) and math.isfinite(gamma)):
        raise FewflowError(f"gamma must be a finite number, got {gamma!r}")
    if not torch.is_tensor(x) or x.dim() != 3 or x.shape[-1] < 2:
        raise FewflowError(f"x must be simplex points (B, L, K), got "
                           f"{tuple(x.shape) if torch.is_tensor(x) else type(x).__name__}")
    check_finite("x", x)
    if gamma == 0:
        return torch.zeros_like(x)
    b, k = x.shape[0], x.shape[-1]
    idx = _draw_tokens(x, M, generator)
    with torch.enable_grad():
        xs = x.detach().requires_grad_(True)
        hard = F.one_hot(idx, k).to(x.dtype)                      # (M, B, L, K)
        st = hard + xs[None] - xs.detach()[None]                  # straight-through: d st / d x = I
        score = _scores(classifier, st.reshape(M * b, *x.shape[1:]), target)
        if score.shape != (M * b,):
            raise FewflowError(f"the scorer returned shape {tuple(score.shape)}, expected ({M * b},)")
        (grad,) = torch.autograd.grad(score.reshape(M, b).mean(0).sum(), xs)
    return float(gamma) * (grad - grad.mean(-1, keepdim=True))


class STGuided:
    """Straight-through guidance as the ``guidance(x, t) -> velocity`` of a simplex sampler
    (:class:`fewflow.objectives.gsfm.SimplexEuler`, :func:`fewflow.objectives.gsfm.sample_gsfm`).

    ``STGuided(classifier, gamma, M=8, target=None, generator=None)``; see :func:`stg_velocity`.
    """

    def __init__(self, classifier: Callable[[Tensor], Tensor], gamma: float, M: int = 8, *,
                 target: int | None = None, generator: torch.Generator | None = None) -> None:
        self.classifier, self.gamma, self.M = classifier, float(gamma), M
        self.target, self.generator = target, generator

    def __call__(self, x: Tensor, t: Tensor | None = None) -> Tensor:
        return stg_velocity(self.classifier, x, self.M, self.gamma, self.generator, target=self.target)


class SequenceRegressor(nn.Module):
    """A small MLP on flattened one-hot sequences: ``(B, L, K) -> (B,)`` (regression) or ``(B, C)``."""

    def __init__(self, length: int, states: int, hidden: int = 64, out: int = 1) -> None:
        super().__init__()
        self.out_dim = out
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(length * states, hidden), nn.SiLU(),
                                 nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, out))

    def forward(self, x: Tensor) -> Tensor:
        y = self.net(x)
        return y[:, 0] if self.out_dim == 1 else y


def train_sequence_classifier(
    x_onehot: Tensor, target: Tensor, *, hidden: int = 64, steps: int = 300, lr: float = 3e-3,
    batch_size: int = 256, generator: torch.Generator | None = None,
) -> SequenceRegressor:
    """Train a scorer on CLEAN one-hot sequences ``x_onehot`` ``(N, L, K)``.

    A float ``target`` ``(N,)`` trains a regressor (mean squared error) returning ``(B,)``; an integer one
    trains a classifier (cross-entropy over ``max(target) + 1`` classes) returning ``(B, C)`` logits (use
    ``target=CLASS`` in :func:`stg_velocity`). AdamW, ``steps`` minibatch steps; returns the module in eval
    mode on ``x_onehot``'s device and dtype. Inputs are not modified.
    """
    if not torch.is_tensor(x_onehot) or x_onehot.dim() != 3 or not x_onehot.is_floating_point():
        raise FewflowError("x_onehot must be a floating-point one-hot tensor (N, L, K)")
    check_finite("x_onehot", x_onehot)
    if not torch.is_tensor(target) or target.shape != (x_onehot.shape[0],):
        raise FewflowError(f"target must be a tensor of shape ({x_onehot.shape[0]},), got "
                           f"{tuple(target.shape) if torch.is_tensor(target) else type(target).__name__}")
    classify = not target.is_floating_point()
    n_out = int(target.max()) + 1 if classify else 1
    if classify and int(target.min()) < 0:
        raise FewflowError("class targets must be >= 0")
    if not classify:
        check_finite("target", target)
    net = SequenceRegressor(x_onehot.shape[1], x_onehot.shape[2], hidden, n_out).to(x_onehot.device,
                                                                                     x_onehot.dtype)
    opt = torch.optim.AdamW(net.parameters(), lr=lr)
    n = x_onehot.shape[0]
    gdev = generator.device if generator is not None else torch.device("cpu")
    tgt = target.to(x_onehot.device)
    if not classify:
        tgt = tgt.to(x_onehot.dtype)
    for _ in range(int(steps)):
        i = torch.randint(0, n, (min(batch_size, n),), generator=generator, device=gdev).to(x_onehot.device)
        out: Any = net(x_onehot[i])
        loss = F.cross_entropy(out, tgt[i]) if classify else F.mse_loss(out, tgt[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()
