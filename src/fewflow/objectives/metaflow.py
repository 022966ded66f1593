"""Meta Flow Matching (MFM): a flow conditioned on an embedding of its source population.

"Meta Flow Matching: Integrating Vector Fields on the Wasserstein Manifold" (Atanackovic, Zhang, Amos,
Blanchette, Lee, Bengio, Tong, Neklyudov; ICLR 2025, arXiv 2408.14608). Populations ``i`` come as paired
clouds ``(X0_i, X1_i)`` (:class:`fewflow.data.populations.Populations`); the evolution of a population
depends on the whole population (cell-cell interactions, a patient's composition), so a vector field
``v(x, t)`` of one point cannot represent it. MFM learns ``v_omega(x, t | phi_theta(X0_i))``, with
``phi_theta`` a permutation-invariant encoder of the *source* population
(:class:`fewflow.models.set_encoder.SetEncoder`: a GCN on its kNN graph, mean-pooled and L2-normalised),
by flow matching on each population's pairs, in fewflow's time (t = 0 source population, t = 1 its
response; the paper uses the same direction):

    L(omega, theta) = E_i E_{t ~ U[0, 1]} E_{(x0, x1) ~ pi_i}
                      || v_omega(x_t, t | phi_theta(X0_i)) - (x1 - x0) ||^2,   x_t = (1 - t) x0 + t x1,

(any affine path ``x_t = alpha_t x1 + sigma_t x0`` with its velocity works the same). Encoder and field are
trained jointly end-to-end by one optimiser (the authors' code alternates two Adam optimisers between the
field, on detached embeddings, and the encoder; joint training is the objective above). At inference an
unseen population is embedded once and every point is integrated from t = 0 to 1 with that embedding.

The paper's baselines are the same loss with another condition (``condition``):

* ``"none"``: flow matching ``v(x_t, t)`` from source to target points, blind to the population;
* ``"id"``: the conditional-generator FM (CGFM), conditioned on a one-hot population id; it cannot embed
  an unseen population. fewflow trains it with the id dropped on a share ``id_dropout`` of the rows (the
  model's learned null condition, an average field) and gives unseen populations that null condition
  (inferred: the paper does not say what CGFM receives for an unseen population).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from fewflow._validate import FewflowError, check_finite
from fewflow.methods.registry import (
    BuildContext,
    MethodSpec,
    Needs,
    SamplingPlan,
    Stage,
    register,
    register_variant,
)
from fewflow.models.mlp import MLP
from fewflow.models.set_encoder import SetEncoder
from fewflow.objectives.base import LossOutput
from fewflow.objectives.common import sample_source

__all__ = ["CONDITIONS", "MetaFlowConfig", "MetaFlowLoss", "PopulationFlow", "predict_population"]

CONDITIONS = ("population", "none", "id")


class PopulationFlow(nn.Module):
    """A velocity field ``v(x, t, c=None)`` and the population condition it is read with.

    ``condition="population"``: ``c = encoder(X0)`` (a :class:`SetEncoder`, ``embed_dim`` values);
    ``"id"``: ``c = one_hot(pid, num_populations)``; ``"none"``: no condition. The field is
    :class:`fewflow.models.MLP` with ``cond_dim`` = the condition's size (FiLM-conditioned residual blocks;
    rows with ``c_mask = False`` or ``c=None`` use its learned null condition).
    """

    is_flow_map: bool = False
    num_classes: int | None = None  # no class labels: the trainer passes none

    def __init__(self, dim: int, condition: str = "population", *, hidden: int = 256, depth: int = 4,
                 embed_dim: int = 64, encoder: str = "gcn", gnn_hidden: int = 64, gnn_layers: int = 3,
                 k: int = 50, num_populations: int = 1) -> None:
        super().__init__()
        if condition not in CONDITIONS:
            raise FewflowError(f"condition must be one of {list(CONDITIONS)}, got {condition!r}")
        if condition == "id" and (not isinstance(num_populations, int) or num_populations < 1):
            raise FewflowError(f"num_populations must be a positive int, got {num_populations!r}")
        self.dim, self.condition, self.num_populations = int(dim), condition, int(num_populations)
        self.encoder = (SetEncoder(dim, embed_dim, gnn_hidden, gnn_layers, k, encoder)
                        if condition == "population" else None)
        cond_dim = {"population": embed_dim, "id": num_populations, "none": None}[condition]
        self.field = MLP(dim, hidden, depth, cond_dim=cond_dim)

    def forward(self, x: Tensor, t: Tensor | float, c: Tensor | None = None, c_mask: Tensor | None = None
                ) -> Tensor:
        if self.condition == "none":
            return self.field(x, t)
        return self.field(x, t, c=c, c_mask=c_mask)

    def population_condition(self, sets: Tensor | None = None, pid: Tensor | None = None) -> Tensor | None:
        """The condition of each population: ``(P, embed_dim)`` embeddings of ``sets`` ``(P, n, d)``, the
        one-hot ``(P, num_populations)`` of ``pid`` ``(P,)`` (an id ``< 0`` or ``None``: the null
        condition, ``None``), or ``None`` for ``condition="none"``."""
        if self.condition == "population":
            if sets is None:
                raise FewflowError("an MFM model needs the source population(s) to embed (sets=)")
            return self.encoder(sets)
        if self.condition == "id":
            if pid is None:
                return None
            pid = torch.as_tensor(pid, device=self.field.inp.weight.device).long().reshape(-1)
            if bool((pid >= self.num_populations).any()):
                raise FewflowError(f"population id {int(pid.max())} is out of range for "
                                   f"{self.num_populations} training populations")
            if bool((pid < 0).any()):
                return None
            return nn.functional.one_hot(pid, self.num_populations).to(self.field.inp.weight.dtype)
        return None


class MetaFlowLoss:
    """``loss(model, x1, *, x0, sets, index, pid, generator=None) -> LossOutput`` (module docstring).

    The batch (:meth:`fewflow.data.populations.Populations.batches`): paired rows ``x0``, ``x1``
    ``(B, d)``, the source clouds ``sets`` ``(P, s, d)`` of the batch's ``P`` populations, ``index``
    ``(B,)`` the population of each row, ``pid`` ``(P,)`` their ids. Without ``sets`` (a plain data set,
    ``fewflow train --data moons``) the batch is one population whose source is the run's source (``x0``
    drawn like CFM's), embedded from the batch's own ``x0``.

    Args:
        path: an affine path (``path.sample(x0, x1, t)``); ``None``: the linear path ``x_t = (1-t) x0 + t
            x1``, velocity ``x1 - x0`` (the paper's).
        source: draws ``x0`` when the batch has none (``None``: N(0, I)).
        condition: ``"population"`` (MFM), ``"none"`` (FM) or ``"id"`` (CGFM).
        id_dropout: CGFM only: probability of training a row on the null condition.
        label_dropout, num_classes: the run's class conditioning; MFM trains unconditionally, so these must
            be 0 / ``None``.
    """

    def __init__(self, path: Any = None, source: Any = None, condition: str = "population",
                 id_dropout: float = 0.1, label_dropout: float = 0.0, num_classes: int | None = None) -> None:
        if condition not in CONDITIONS:
            raise FewflowError(f"condition must be one of {list(CONDITIONS)}, got {condition!r}")
        if not 0.0 <= id_dropout < 1.0:
            raise FewflowError(f"id_dropout must lie in [0, 1), got {id_dropout}")
        if num_classes is not None or label_dropout:
            raise FewflowError("Meta Flow Matching conditions on populations, not classes; train it "
                               "unconditionally (--unconditional)")
        self.path, self.source, self.condition, self.id_dropout = path, source, condition, float(id_dropout)

    def __call__(self, model: PopulationFlow, x1: Tensor, *, generator: torch.Generator | None = None,
                 x0: Tensor | None = None, sets: Tensor | None = None, index: Tensor | None = None,
                 pid: Tensor | None = None, **cond: Any) -> LossOutput:
        if cond:
            raise FewflowError(
                f"Meta Flow Matching takes no condition besides populations, got {sorted(cond)}")
        if x1.dim() != 2 or x1.shape[0] == 0:
            raise FewflowError(f"x1 must be a non-empty (B, d) batch of points, got {tuple(x1.shape)}")
        check_finite("x1", x1)
        if getattr(model, "condition", self.condition) != self.condition:
            raise FewflowError(
                f"the loss conditions on {self.condition!r} but the model on {model.condition!r}")
        if x0 is None:
            x0 = sample_source(self.source, x1, generator)
        elif x0.shape != x1.shape:
            raise FewflowError(f"x0 {tuple(x0.shape)} and x1 {tuple(x1.shape)} must be paired rows")
        check_finite("x0", x0)
        b = x1.shape[0]
        if sets is None:
            sets, index = x0[None], torch.zeros(b, dtype=torch.long, device=x1.device)
            pid = torch.zeros(1, dtype=torch.long, device=x1.device) if pid is None else pid
        if index is None or index.shape != (b,):
            raise FewflowError(f"index must give the population of each of the {b} rows")
        if sets.dim() != 3 or sets.shape[-1] != x1.shape[1]:
            raise FewflowError(f"sets must be (P, n, {x1.shape[1]}) source clouds, got {tuple(sets.shape)}")
        if int(index.min()) < 0 or int(index.max()) >= sets.shape[0]:
            raise FewflowError(f"index must lie in [0, {sets.shape[0]}) (one entry per set)")
        t = torch.rand(b, device=x1.device, dtype=x1.dtype, generator=generator)
        if self.path is None:
            tt = t[:, None]
            xt, target = (1 - tt) * x0 + tt * x1, x1 - x0
        else:
            ps = self.path.sample(x0, x1, t)
            xt, target = ps.x_t, ps.velocity
        kw: dict[str, Any] = {}
        if self.condition != "none":
            pc = model.population_condition(sets=sets, pid=pid)
            if pc is not None:
                kw["c"] = pc[index]
                if self.condition == "id" and self.id_dropout > 0:
                    keep = torch.rand(b, device=x1.device, generator=generator) >= self.id_dropout
                    kw["c_mask"] = keep
        pred = model(xt, t, **kw)
        per = (pred - target.detach()).pow(2).mean(1)
        loss = per.mean()
        return LossOutput(loss, {"loss": float(loss.detach()), "t_mean": float(t.mean())})


def predict_population(model: PopulationFlow, x0: Tensor, *, population: Tensor | None = None,
                       pid: int | None = None, steps: int = 50, stepper: str = "heun") -> Tensor:
    """Integrate every point of a source population ``x0`` ``(n, d)`` from t = 0 to 1: the predicted
    response ``(n, d)``.

    MFM embeds ``population`` (default: ``x0`` itself) once; CGFM uses the one-hot of ``pid`` (``None``:
    the null condition, as for an unseen population); FM uses no condition. ``steps`` steps of
    ``stepper`` (:func:`fewflow.solvers.solve`).
    """
    from fewflow.solvers import solve

    if x0.dim() != 2 or x0.shape[0] < 1:
        raise FewflowError(f"x0 must be a (n, d) source population, got {tuple(x0.shape)}")
    check_finite("x0", x0)
    w = next(model.parameters())
    x0 = x0.to(device=w.device, dtype=w.dtype)
    with torch.no_grad():
        if model.condition == "population":
            pop = x0 if population is None else population.to(device=w.device, dtype=w.dtype)
            c = model.population_condition(sets=pop[None])
        elif model.condition == "id" and pid is not None:
            c = model.population_condition(pid=torch.tensor([int(pid)]))
        else:
            c = None
        cond = None if c is None else {"c": c.expand(x0.shape[0], -1)}
        return solve(model, x0, steps=int(steps), stepper=stepper, cond=cond).x


class _EmbedAtStart(nn.Module):
    """Sampling a run trained on a plain data set: the first call's ``x`` (the source draws at t = 0) is the
    population; its condition is computed once and reused at every later call."""

    is_flow_map = False

    def __init__(self, model: PopulationFlow) -> None:
        super().__init__()
        self.model = model
        self._c: Tensor | None = None

    def forward(self, x: Tensor, t: Tensor | float, **cond: Any) -> Tensor:
        if cond:
            return self.model(x, t, **cond)
        if self._c is None and self.model.condition != "none":
            pc = self.model.population_condition(sets=x[None], pid=torch.zeros(1, dtype=torch.long))
            self._c = None if pc is None else pc
        if self._c is None:
            return self.model(x, t)
        return self.model(x, t, c=self._c.expand(x.shape[0], -1))


# --------------------------------------------------------------------------- registration


@dataclass
class MetaFlowConfig:
    """MFM's settings: the loss's (``condition``, ``id_dropout``) and the network's (recipe fields).

    Defaults from the authors' letters configuration: GCN 3 layers x 64, k = 50; the field is fewflow's
    residual MLP (the paper's: 4 x 512 with Fourier features of x; smaller here for 2-D populations)."""

    condition: str = field(default="population", metadata={
        "help": "population (MFM), none (FM baseline) or id (conditional-generator FM baseline)"})
    id_dropout: float = field(default=0.1, metadata={"help": "CGFM: share of rows trained on the null id"})
    hidden: int = field(default=256, metadata={"help": "width of the velocity MLP"})
    depth: int = field(default=4, metadata={"help": "residual blocks of the velocity MLP"})
    embed_dim: int = field(default=64, metadata={"help": "size of the population embedding"})
    encoder: str = field(default="gcn", metadata={"help": "population encoder: gcn (paper) or deepsets"})
    gnn_hidden: int = field(default=64, metadata={"help": "hidden width of the encoder"})
    gnn_layers: int = field(default=3, metadata={"help": "encoder layers"})
    k: int = field(default=50, metadata={"help": "neighbours of the kNN graph"})
    num_populations: int = field(default=1, metadata={"help": "CGFM: number of training populations"})


_RECIPE = ("hidden", "depth", "embed_dim", "encoder", "gnn_hidden", "gnn_layers", "k", "num_populations")


def make_population_flow(cfg: MetaFlowConfig, meta: dict[str, Any]) -> PopulationFlow:
    """The network of a run (``meta["shape"]``: one point's shape)."""
    shape = meta.get("shape")
    if shape is None or len(shape) != 1:
        raise FewflowError(f"Meta Flow Matching needs points (d,), got data of shape {shape}")
    return PopulationFlow(int(math.prod(shape)), cfg.condition, hidden=cfg.hidden, depth=cfg.depth,
                          embed_dim=cfg.embed_dim, encoder=cfg.encoder, gnn_hidden=cfg.gnn_hidden,
                          gnn_layers=cfg.gnn_layers, k=cfg.k, num_populations=cfg.num_populations)


def _build(cfg: MetaFlowConfig, ctx: BuildContext) -> list[Stage]:
    loss = MetaFlowLoss(ctx.path, source=ctx.source, condition=cfg.condition, id_dropout=cfg.id_dropout,
                        **ctx.conditioning())
    return [Stage("mfm", loss)]


def _sampling(model: Any, cfg: MetaFlowConfig, **_: Any) -> SamplingPlan:
    return SamplingPlan(_EmbedAtStart(model))


_SPEC = register(MethodSpec(
    name="mfm",
    label="Meta FM",
    paper="Atanackovic et al., Meta Flow Matching: Integrating Vector Fields on the Wasserstein Manifold "
    "(2408.14608)",
    summary="flow matching conditioned on a GCN embedding of the source population (populations data)",
    config=MetaFlowConfig,
    loss=MetaFlowLoss,
    build=_build,
    needs=Needs(model="custom", labels="none"),
    sampling=_sampling,
    make_model=make_population_flow,
    recipe_fields=_RECIPE,
    docs="metaflow",
))
register_variant("mfm_fm", _SPEC, label="FM (populations)", ablation=True, condition="none",
                 summary="the MFM baseline: flow matching blind to the population")
register_variant("mfm_cgfm", _SPEC, label="CGFM", ablation=True, condition="id",
                 summary="the MFM baseline: flow matching conditioned on a population id")
