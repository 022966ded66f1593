"""BOSS phase 2: straighten a trained velocity model on its Bellman-optimal steps (+ a LoRA adapter).

Paper: *Bellman Optimal Step-size Straightening of Flow-Matching Models* (Nguyen, Nguyen, Nguyen;
ICLR 2024, arXiv 2312.16414; code ``nguyenngocbaocmt02/BOSS``, ``losses.get_redress_loss_fn``).

Reference trajectories of the frozen model are stored once at the nodes of the chosen schedule
``t_{i_0} < ... < t_{i_K}`` (:func:`fewflow.solvers.boss.boss_segments`). Fine-tuning makes one Euler
step along each segment reproduce it: with ``x_a = x_ref(t_a)``, ``x_b = x_ref(t_b)``,

    L(theta) = E || v_theta(x_a, t_a) - (x_b - x_a) / (t_b - t_a) ||^2

(squared L2 summed over features, averaged over the batch; time runs from the source at t = 0 to data at
t = 1). Sampling afterwards is plain Euler on the same schedule. The BOSS code offers a rank-4 LoRA
variant: :class:`LoRALinear` / :func:`apply_lora` wrap ``nn.Linear`` layers with a zero-initialised
low-rank update so that fine-tuning starts exactly at the pretrained model (*LoRA: Low-Rank Adaptation of
Large Language Models*, Hu et al. 2021).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from fewflow._validate import FewflowError, check_finite, expand_like
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
from fewflow.solvers.boss import BossSegments

__all__ = [
    "BossRefineLoss",
    "BossSegments",
    "LoRALinear",
    "apply_lora",
    "boss_refine_loss",
    "lora_parameters",
    "merge_lora",
]


def boss_refine_loss(model: Any, seg: BossSegments, **cond: Any) -> LossOutput:
    """``mean_m || v(x_start, t_start) - (x_end - x_start) / (t_end - t_start) ||^2`` over the rows of
    ``seg``. Conditioning: the per-row ``seg.cond`` (aligned with the segments) wins over ``cond``, whose
    other keys are passed through (a trainer's data-batch labels must not replace the segments' own)."""
    xa, xb = seg.x_start, seg.x_end
    ta = seg.t_start.to(xa.dtype)
    dt = expand_like((seg.t_end - seg.t_start).to(xa.dtype), xa)
    target = (xb - xa) / dt
    v = model(xa, ta, **{**cond, **seg.cond})
    if v.shape != xa.shape:
        raise FewflowError(f"model returned shape {tuple(v.shape)} for input of shape {tuple(xa.shape)}")
    per = (v - target).pow(2).flatten(1).sum(1)
    loss = per.mean()
    # endpoint error of the Euler jump, the quantity BOSS straightens
    jump_err = (per.detach() * dt.flatten().pow(2)).mean()
    diag = {"boss_loss": float(loss.detach()), "jump_error": float(jump_err)}
    return LossOutput(loss=loss, diagnostics=diag)


class BossRefineLoss:
    """BOSS refinement objective over stored reference segments.

    ``loss(model, x1, generator=None, **cond)`` fits the trainer protocol: the stored segments are the
    training data, so ``x1`` is only used for its batch size (or pass ``batch_size=``); each call draws
    that many segment rows uniformly (with ``generator``) and returns :func:`boss_refine_loss` on them.
    Defaults of the BOSS code: L2 loss, Adam lr 2e-4, EMA; rank-4 LoRA optional (:func:`apply_lora`).
    """

    def __init__(self, segments: BossSegments, batch_size: int | None = None) -> None:
        if not isinstance(segments, BossSegments):
            raise FewflowError(f"segments must be a BossSegments, got {type(segments).__name__}")
        if len(segments) == 0:
            raise FewflowError("segments is empty")
        check_finite("segments.x_start", segments.x_start)
        check_finite("segments.x_end", segments.x_end)
        if batch_size is not None and int(batch_size) < 1:
            raise FewflowError(f"batch_size must be >= 1, got {batch_size}")
        self.segments = segments
        self.batch_size = batch_size

    def __call__(
        self, model: Any, x1: Tensor | None = None, *, generator: torch.Generator | None = None, **cond: Any
    ) -> LossOutput:
        if self.batch_size is not None:
            b = int(self.batch_size)
        elif x1 is not None:
            b = int(x1.shape[0])
        else:
            raise FewflowError("BossRefineLoss needs x1 (for its batch size) or batch_size= at construction")
        n = len(self.segments)
        gen_device = generator.device if generator is not None else "cpu"
        idx = torch.randint(n, (b,), generator=generator, device=gen_device).to(self.segments.x_start.device)
        return boss_refine_loss(model, self.segments.select(idx), **cond)


class LoRALinear(nn.Module):
    """``y = base(x) + (alpha / r) * x A^T B^T`` with the wrapped ``nn.Linear`` frozen.

    ``A`` (r x in) is Kaiming-uniform initialised, ``B`` (out x r) is zero, so the wrapped layer starts
    exactly equal to ``base``. :meth:`merged` folds the update into a plain ``nn.Linear``.
    """

    def __init__(self, base: nn.Linear, rank: int = 4, alpha: float | None = None) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise FewflowError(f"LoRALinear wraps nn.Linear, got {type(base).__name__}")
        if int(rank) < 1:
            raise FewflowError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.rank = int(rank)
        self.scaling = float(alpha if alpha is not None else rank) / self.rank
        w = base.weight
        self.lora_a = nn.Parameter(torch.empty(self.rank, base.in_features, device=w.device, dtype=w.dtype))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, self.rank, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.scaling * (x @ self.lora_a.t()) @ self.lora_b.t()

    def delta_weight(self) -> Tensor:
        return self.scaling * self.lora_b @ self.lora_a

    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` with weight ``W + (alpha / r) B A`` (same device/dtype)."""
        w = self.base.weight
        out = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None,
                        device=w.device, dtype=w.dtype)
        with torch.no_grad():
            out.weight.copy_(w + self.delta_weight())
            if self.base.bias is not None:
                out.bias.copy_(self.base.bias)
        return out


def apply_lora(model: nn.Module, rank: int = 4, alpha: float | None = None,
               names: list[str] | None = None) -> list[str]:
    """Replace ``nn.Linear`` submodules of ``model`` (all, or those whose qualified name is in ``names``)
    by :class:`LoRALinear` in place, freeze every other parameter, and return the replaced names.
    Afterwards only the LoRA factors train (:func:`lora_parameters`)."""
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if names is not None:
        unknown = set(names) - {n for n, _ in targets}
        if unknown:
            raise FewflowError(f"no nn.Linear named {sorted(unknown)} in the model")
        targets = [(n, m) for n, m in targets if n in set(names)]
    if not targets:
        raise FewflowError("apply_lora found no nn.Linear layer to wrap")
    if any(n == "" for n, _ in targets):
        raise FewflowError("apply_lora wraps Linear layers inside a model; use LoRALinear for a bare one")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, lin in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, LoRALinear(lin, rank=rank, alpha=alpha))
    return [n for n, _ in targets]


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable LoRA factors of every :class:`LoRALinear` in ``model``."""
    return [p for m in model.modules() if isinstance(m, LoRALinear) for p in (m.lora_a, m.lora_b)]


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every :class:`LoRALinear` back into a plain ``nn.Linear`` in place (for fast sampling and
    checkpointing with the original architecture); returns ``model``."""
    for name, mod in list(model.named_modules()):
        if isinstance(mod, LoRALinear):
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, mod.merged())
    return model


# --------------------------------------------------------------------------- registration


@dataclass
class BossRefineConfig:
    """BOSS phase 2: the grids to straighten the teacher on, the reference set, the BOSS code's lr."""

    grid_steps: tuple[int, ...] = field(default=(2, 4), metadata={"help": "step counts of the fitted grids"})
    n_ref: int = field(default=1000, metadata={"help": "reference trajectories"})
    fine_steps: int = field(default=100, metadata={"help": "Euler steps of a reference trajectory"})
    lr: float = field(default=2e-4, metadata={"help": "fine-tuning learning rate (BOSS code)"})


def _build_boss(cfg: BossRefineConfig, ctx: BuildContext) -> list[Stage]:
    from fewflow.solvers.boss import bellman_schedule, boss_cost_matrix, boss_reference, boss_segments

    teacher = ctx.need_teacher("boss_refine")
    if not cfg.grid_steps or any(int(k) < 1 for k in cfg.grid_steps):
        raise FewflowError(f"grid_steps must be positive step counts, got {cfg.grid_steps}")
    g = torch.Generator().manual_seed(ctx.seed + 77)
    x1 = ctx.data.x
    if ctx.source is not None:
        x0 = ctx.source.sample(cfg.n_ref, dtype=x1.dtype, generator=g)
    else:
        x0 = torch.randn(cfg.n_ref, *x1.shape[1:], generator=g, dtype=x1.dtype)
    cond = {} if ctx.num_classes is None else {"y": torch.arange(cfg.n_ref) % ctx.num_classes}
    with torch.no_grad():
        ref = boss_reference(teacher, x0, cfg.fine_steps, cond=cond)
        cost = boss_cost_matrix(teacher, reference=ref, cond=cond)
    scheds = {int(k): bellman_schedule(cost, int(k), times=ref.times) for k in cfg.grid_steps}
    ctx.record("grids", {str(k): [float(v) for v in s.grid] for k, s in scheds.items()})
    loss = BossRefineLoss(boss_segments(ref, *scheds.values()))

    def objective(model: Any, x1: Tensor, *, generator: Any = None, **_: Any) -> LossOutput:
        return loss(model, x1, generator=generator)  # labels come with the segments

    return [Stage("boss_refine", objective, lr=cfg.lr)]


def _sampling_boss(model: Any, cfg: BossRefineConfig, *, nfe: int, meta: dict, **_: Any) -> SamplingPlan:
    grid = (meta.get("grids") or {}).get(str(nfe))
    return SamplingPlan(model, "euler" if grid is not None else None, grid)


register(MethodSpec(
    name="boss_refine",
    label="BOSS refinement",
    paper="Nguyen et al., Bellman Optimal Step-size Straightening of Flow-Matching Models (2312.16414)",
    summary="fit Bellman-optimal K-step grids of a teacher, then fine-tune it to jump along them (Euler)",
    docs="boss",
    config=BossRefineConfig,
    loss=BossRefineLoss,
    build=_build_boss,
    needs=Needs(teacher="required", init_from_teacher=True, coupling="fixed"),
    sampler=DefaultSampler("euler", nfe=4),
    sampling=_sampling_boss,
    recipe_fields=("grid_steps", "n_ref", "fine_steps", "lr"),
    family="refiner",
))
