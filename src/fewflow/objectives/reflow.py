"""Reflow (k-Rectified Flow).

Paper: *Flow Straight and Fast: Learning to Generate and Transfer Data with Rectified Flow* (Liu, Gong,
Liu; ICLR 2023, arXiv 2209.03003).

Given a trained velocity model ``v_k`` (the teacher, "k-RF"), draw source samples ``x0`` and solve its ODE
from t = 0 to t = 1 to get ``x1 = ODE_{v_k}(x0)``: the pairs ``(x0, x1)`` are a deterministic coupling
whose straight interpolations ``x_t = t x1 + (1 - t) x0`` no longer cross. Flow matching on these fixed
pairs,

    L(theta) = E_{(x0, x1), t} || v_theta(x_t, t) - (x1 - x0) ||^2,

gives "(k+1)-RF", whose paths are straighter (Theorem 3.6 of the paper: the transport cost does not
increase), so few Euler steps suffice. ``rounds = 2`` repeats the procedure on pairs of the first round's
model ("3-RF" from a 1-RF teacher). The student starts from the teacher's weights, as in the paper.
Pairs come from ``pair_steps`` Heun steps of the teacher (the paper used RK45); they are streamed from
sha256-checked shards (:func:`fewflow.couplings.generate_reflow_pairs`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fewflow.methods.registry import (
    BuildContext,
    DefaultSampler,
    MethodSpec,
    Needs,
    Stage,
    register,
    register_variant,
)
from fewflow.objectives.cfm import CFMLoss

__all__ = ["ReflowConfig"]


@dataclass
class ReflowConfig:
    """Reflow's recipe: rounds, pair count and the teacher ODE's resolution."""

    rounds: int = field(default=1, metadata={"help": "reflow rounds (1: 2-RF from the teacher, 2: 3-RF)"})
    n_pairs: int = field(default=50_000, metadata={"help": "teacher pairs per round"})
    pair_steps: int = field(default=50, metadata={"help": "Heun steps of the teacher ODE per pair"})


def _build(cfg: ReflowConfig, ctx: BuildContext) -> list[Stage]:
    from fewflow.couplings.reflow import reflow_batches

    if cfg.rounds not in (1, 2):
        from fewflow._validate import FewflowError

        raise FewflowError(f"reflow rounds must be 1 or 2, got {cfg.rounds}")
    teacher = ctx.need_teacher("reflow")
    assert ctx.pairs is not None
    loss = CFMLoss(ctx.path, time_sampler=ctx.time_sampler, **ctx.conditioning())
    share = 1.0 / cfg.rounds

    def round_data(k: int):
        def data(model, batch_size: int):
            src = teacher if k == 1 else model
            folder = ctx.pairs(src, tag="teacher" if k == 1 else f"round{k - 1}", n=cfg.n_pairs,
                               steps=cfg.pair_steps, seed=ctx.seed + k - 1)
            return reflow_batches(folder, batch_size, ctx.seed + k - 1)

        return data

    return [Stage(f"reflow-{k}", loss, round_data(k), share=share, pair_sets=1)
            for k in range(1, cfg.rounds + 1)]


SPEC = register(MethodSpec(
    name="reflow",
    label="Reflow (2-RF)",
    paper="Liu et al., Flow Straight and Fast: Learning to Generate and Transfer Data with Rectified Flow "
    "(2209.03003)",
    summary="retrain on the teacher's own (noise, sample) pairs: straighter paths, good 1-2 step Euler",
    config=ReflowConfig,
    loss=CFMLoss,
    build=_build,
    needs=Needs(teacher="required", init_from_teacher=True, pairs=True, coupling="fixed"),
    sampler=DefaultSampler("euler", nfe=2),
    recipe_fields=("rounds", "n_pairs", "pair_steps"),
    family="fewstep",
))
register_variant(
    "reflow2", SPEC, label="Reflow x2 (3-RF)", rounds=2,
    summary="two reflow rounds: pairs of the first round's model, retrain again",
)
