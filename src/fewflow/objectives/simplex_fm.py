"""Linear simplex flow matching: the straight path from a uniform Dirichlet draw to a vertex.

The baseline studied in Stark et al., "Dirichlet Flow Matching with Applications to DNA Sequence Design"
(arXiv 2402.05841), and compared against in GSFM (Tang et al., arXiv 2503.17361). In fewflow's time
(t = 0 source, t = 1 data), with one-hot data ``x1 = e_k`` per position and ``x0 ~ Dirichlet(1, ..., 1)``:

    x_t = (1 - t) x0 + t x1,        u_t(x | x1) = x1 - x0 = (x1 - x_t) / (1 - t).

As in GSFM the network is a denoiser trained with the per-token cross-entropy
``E [ (1/L) sum_l -log p_theta(x1_l | x_t, t) ]``, whose minimiser is ``p(e_k | x_t)``; the marginal
velocity is ``(p - x_t) / (1 - t)`` (:func:`fewflow.paths.simplex.linear_simplex_velocity`). Euler steps
of it are convex combinations of ``x`` and ``p`` and stay on the simplex; the last one lands on ``p``,
read out as ``one_hot(argmax p)`` (or a draw from ``p``). Stark et al. point out the weakness this baseline
illustrates: at time t the path's support excludes the faces far from the vertex, so for large ``K`` the
posterior becomes nearly certain early (their motivation for Dirichlet paths; not implemented here).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fewflow.methods.registry import (
    BuildContext,
    DefaultSampler,
    MethodSpec,
    Needs,
    SamplingPlan,
    Stage,
    register,
)
from fewflow.objectives.base import LossOutput
from fewflow.objectives.gsfm import (
    SimplexEuler,
    TokenProbabilities,
    _ce_output,
    _cond_like,
    check_one_hot,
    make_sequence_model,
    sample_simplex,
)
from fewflow.paths.simplex import dirichlet_source, linear_simplex_interpolant, uniform_like

__all__ = ["SimplexFMConfig", "SimplexFMLoss", "sample_simplex_fm"]


class SimplexFMLoss:
    """Linear-simplex FM's objective: ``loss(model, x1, *, generator=None, **cond) -> LossOutput``; the
    per-token cross-entropy of ``model(x_t, t) -> logits (B, L, K)`` at ``x_t = (1 - t) x0 + t x1``,
    ``x0 ~ Dirichlet(1)``, ``t ~ U[0, 1]``. Diagnostics: ``loss``, ``accuracy``, ``t_mean``."""

    def __init__(self, label_dropout: float = 0.0, num_classes: int | None = None) -> None:
        self.label_dropout, self.num_classes = float(label_dropout), num_classes

    def __call__(self, model: Any, x1: Tensor, *, generator: torch.Generator | None = None,
                 **cond: Any) -> LossOutput:
        check_one_hot("x1", x1)
        t = uniform_like(x1[:, 0, 0], generator)
        x_t = linear_simplex_interpolant(dirichlet_source(x1, generator), x1, t)
        cond = _cond_like(cond, x1, self.label_dropout, self.num_classes, generator)
        return _ce_output(model(x_t, t, **cond), x1, t)


@dataclass
class SimplexFMConfig:
    """The sampler's read-out and the denoiser's size (the loss itself has no settings)."""

    projection: str = field(default="clamp", metadata={"help": "sampler: clamp | euclidean"})
    final: str = field(default="argmax", metadata={"help": "sampler: argmax | sample of the last p"})
    width: int = field(default=64, metadata={"help": "denoiser width"})
    depth: int = field(default=2, metadata={"help": "denoiser transformer blocks"})
    heads: int = field(default=4, metadata={"help": "denoiser attention heads"})


def sample_simplex_fm(
    model: Any, n: int, L: int, K: int, steps: int = 100, *, cfg: SimplexFMConfig | None = None,
    guidance: Any = None, generator: torch.Generator | None = None, y: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Linear-simplex FM sampling; returns ``(x_simplex (n, L, K) one-hot, tokens (n, L))``."""
    cfg = cfg if cfg is not None else SimplexFMConfig()
    return sample_simplex(model, n, L, K, steps, kind="linear", projection=cfg.projection, final=cfg.final,
                          guidance=guidance, generator=generator, y=y)


def _build(cfg: SimplexFMConfig, ctx: BuildContext) -> list[Stage]:
    return [Stage("simplex_fm", SimplexFMLoss(**ctx.conditioning()))]


def _sampling(model: Any, cfg: SimplexFMConfig, *, nfe: int, **_: Any) -> SamplingPlan:
    st = SimplexEuler(int(nfe), kind="linear", projection=cfg.projection, final=cfg.final, from_gaussian=True)
    return SamplingPlan(TokenProbabilities(model), st)


register(MethodSpec(
    name="simplex_fm",
    label="Linear simplex FM",
    paper="Stark et al., Dirichlet Flow Matching with Applications to DNA Sequence Design (2402.05841)",
    summary="flow matching on the simplex along straight lines from a uniform Dirichlet draw (sequences)",
    config=SimplexFMConfig,
    loss=SimplexFMLoss,
    build=_build,
    needs=Needs(model="custom", coupling="fixed", data="sequence"),
    sampler=DefaultSampler("euler", nfe=100),
    sampling=_sampling,
    make_model=make_sequence_model,
    recipe_fields=("projection", "final", "width", "depth", "heads"),
    docs="gsfm",
))
