"""MP1: a MeanFlow action-chunk policy with 1-NFE sampling, and the dispersive regularisers of MP1 / DM1.

From "MP1: MeanFlow Tames Policy Learning in 1-step for Robotic Manipulation" (Sheng, Wang, Li, Liu, 2025;
arXiv 2507.10543) and "DM1: MeanFlow with Dispersive Regularization for 1-Step Robotic Manipulation" (Zou
et al., 2025; arXiv 2510.07865); the regularisers come from "Diffuse and Disperse: Image Generation with
Representation Regularization" (Wang & He, 2025; arXiv 2506.09027). Written in **fewflow time** (t = 0
noise, t = 1 action chunk; both papers put noise at t = 1 and their ``u`` is ``-u`` here).

**The policy.** ``x1`` is a normalised action chunk (``act_horizon * act_dim`` numbers in ``[-1, 1]``),
``c`` the flattened observation history. The network is a flow map ``u(x, s, t, c=obs)``
(:class:`fewflow.models.policy.ActionChunkNet`, or any fewflow flow-map network built with ``cond_dim``).
Training is MeanFlow (:class:`fewflow.objectives.meanflow.MeanFlowLoss`: the same JVP target and adaptive
weighting, reused, not re-derived)::

    x_s   = s x1 + (1 - s) x0,    v = x1 - x0,
    u_tgt = sg( v + (t - s) (v . d_x u + d_s u) ),
    L_MF  = mean_i  ||u(x_s, s, t | c) - u_tgt||^2 / sg((||.||^2 + c_ad)^p),

with MP1's settings: ``(s, t)`` two sorted logit-normal draws (the paper's logit-normal(-0.4, 1) over noise
time is mean +0.4 here), ``s = t`` on half of each batch (``flow_ratio = 0.5``), ``p = 1 - gamma = 0.5``,
``c_ad = 1e-3``, per-sample mean over action numbers. Sampling is one network evaluation::

    a = x0 + u(x0, 0, 1 | c),   x0 ~ N(0, I)

(MP1's ``a = eps - u(eps, 0, 1)`` in its time), or ``k`` flow-map jumps on a uniform grid (DM1's k-step).

**Dispersive regularisation.** On the intermediate representation ``z`` of the network (its hidden
states after every block but the last, :func:`representations`; MP1 takes its U-Net's down-block outputs
the same way), one of, for a batch ``z_1..z_B`` (flattened per row)::

    infonce_l2      log (1/B^2) sum_ij exp(-D_ij / tau),   D_ij = ||z_i - z_j||^2 [/ max_kl D_kl]
    infonce_cosine  log (1/B^2) sum_ij exp(-D_ij / tau),   D_ij = 1 - cos(z_i, z_j)
    hinge           mean_{i != j} max(0, eps - D_ij)^2,     D_ij = ||z_i - z_j||^2
    covariance      sum_{m != n} Cov_mn^2,                  Cov of the rows z_i / ||z_i|| (1/(B-1))

summed over the hooked layers and added with weight ``lambda``: ``L = L_MF + lambda L_disp``. These are the
forms of "Diffuse and Disperse" (the InfoNCE pairs include ``i = j``, a constant ``log``-shift), computed
with a stable ``logsumexp``. ``dispersive_normalize`` divides the squared distances by their maximum as
MP1's code does (scale-free; on by default, as this method is MP1). Defaults: weight 0.5 (MP1 and DM1),
``tau = 1`` (MP1; DM1 uses 0.5), hinge margin ``eps = 1`` (DM1). The DM1 code's variants differ (unsquared
distances, a clamp that saturates once distances exceed ``10 tau``); fewflow implements the paper forms.
The features are taken from a second forward at the same ``(x_s, s, t, c)`` as the MeanFlow prediction
(the same values MP1 reads from its forward; a separate pass because the MeanFlow prediction comes out of
``torch.func.jvp``). A batch of one row has no pairs: its dispersive term is 0.

**Left out.** MP1's code also mixes ``v~ = w v + (1 - w) u(x_s, s, s | obs)`` (``w = 2``) into the target,
calling the *conditional* model for the second term; at the optimum ``u(x_s, s, s | obs) = E[v | x_s,
obs]``, so the expected target is unchanged and only its noise grows. It is not implemented (the
guidance of :class:`MeanFlowLoss` needs class labels and a dropped null branch, which policies do not
train).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from fewflow._validate import FewflowError, check_finite, expand_like, unknown_name
from fewflow.methods.registry import BuildContext, DefaultSampler, MethodSpec, Needs, Stage, register
from fewflow.objectives.base import LossOutput
from fewflow.objectives.common import unwrap
from fewflow.objectives.meanflow import MeanFlowLoss, TimePairSampler, time_pairs

__all__ = [
    "DISPERSIVE",
    "MP1Config",
    "MP1Loss",
    "dispersive_covariance",
    "dispersive_hinge",
    "dispersive_infonce_cosine",
    "dispersive_infonce_l2",
    "dispersive_loss",
    "representations",
]

#: The dispersive regularisers by name ("none" turns the term off).
DISPERSIVE = ("none", "infonce_l2", "infonce_cosine", "hinge", "covariance")


def _rows(z: Tensor, who: str) -> Tensor:
    if not torch.is_tensor(z) or z.dim() < 1:
        raise FewflowError(f"{who} needs a batch of representations (B, ...), got {type(z).__name__}")
    if z.shape[0] == 0:
        raise FewflowError(f"{who} got an empty batch")
    return z.reshape(z.shape[0], -1)


def _sq_dists(z: Tensor) -> Tensor:
    """``D_ij = ||z_i - z_j||^2`` without the square-root's infinite gradient at ``i = j``."""
    sq = z.pow(2).sum(1)
    return (sq[:, None] + sq[None, :] - 2.0 * z @ z.T).clamp_min(0.0)


def _log_mean_exp(a: Tensor) -> Tensor:
    return torch.logsumexp(a.flatten(), 0) - math.log(a.numel())


def dispersive_infonce_l2(z: Tensor, tau: float = 1.0, normalize: bool = True) -> Tensor:
    """``log (1/B^2) sum_ij exp(-||z_i - z_j||^2 / tau)`` (divided by the largest squared distance first when
    ``normalize``, as MP1's code). ``z``: ``(B, ...)``, flattened per row. Minimising it spreads the rows."""
    if tau <= 0:
        raise FewflowError(f"dispersive temperature tau must be > 0, got {tau}")
    z = _rows(z, "infonce_l2")
    if z.shape[0] < 2:
        return z.sum() * 0.0
    d = _sq_dists(z)
    if normalize:
        d = d / d.max().clamp_min(1e-12)
    return _log_mean_exp(-d / tau)


def dispersive_infonce_cosine(z: Tensor, tau: float = 1.0) -> Tensor:
    """``log (1/B^2) sum_ij exp(-(1 - cos(z_i, z_j)) / tau)``: the InfoNCE form with the cosine
    dissimilarity (invariant to each row's scale)."""
    if tau <= 0:
        raise FewflowError(f"dispersive temperature tau must be > 0, got {tau}")
    z = _rows(z, "infonce_cosine")
    if z.shape[0] < 2:
        return z.sum() * 0.0
    zn = nn.functional.normalize(z, dim=1, eps=1e-12)
    return _log_mean_exp(-(1.0 - zn @ zn.T) / tau)


def dispersive_hinge(z: Tensor, margin: float = 1.0) -> Tensor:
    """``mean_{i != j} max(0, margin - ||z_i - z_j||^2)^2``: pushes pairs closer than the margin apart."""
    if margin <= 0:
        raise FewflowError(f"hinge margin must be > 0, got {margin}")
    z = _rows(z, "hinge")
    b = z.shape[0]
    if b < 2:
        return z.sum() * 0.0
    d = _sq_dists(z)
    off = ~torch.eye(b, dtype=torch.bool, device=z.device)
    return torch.relu(margin - d[off]).pow(2).mean()


def dispersive_covariance(z: Tensor) -> Tensor:
    """``sum_{m != n} Cov_mn^2`` of the unit-normalised rows ``z_i / ||z_i||`` (unbiased covariance over
    the batch): decorrelates the representation's features."""
    z = _rows(z, "covariance")
    b = z.shape[0]
    if b < 2:
        return z.sum() * 0.0
    zn = nn.functional.normalize(z, dim=1, eps=1e-12)
    zc = zn - zn.mean(0, keepdim=True)
    cov = zc.T @ zc / (b - 1)
    return cov.pow(2).sum() - torch.diagonal(cov).pow(2).sum()


def dispersive_loss(
    z: Tensor, kind: str, *, tau: float = 1.0, margin: float = 1.0, normalize: bool = True
) -> Tensor:
    """The dispersive regulariser ``kind`` (one of :data:`DISPERSIVE`) of the representations ``z``."""
    if kind == "infonce_l2":
        return dispersive_infonce_l2(z, tau, normalize)
    if kind == "infonce_cosine":
        return dispersive_infonce_cosine(z, tau)
    if kind == "hinge":
        return dispersive_hinge(z, margin)
    if kind == "covariance":
        return dispersive_covariance(z)
    if kind == "none":
        return _rows(z, "dispersive").sum() * 0.0
    raise unknown_name("dispersive loss", kind, DISPERSIVE)


def representations(model: Any, x: Tensor, *times: Tensor, **cond: Any) -> list[Tensor]:
    """The intermediate representations the dispersive losses act on, from one forward of ``model``.

    A network with ``forward_features(x, *times, **cond) -> (out, [features])`` (e.g.
    :class:`fewflow.models.policy.ActionChunkNet`) gives its own; a network with a ``blocks``
    ``ModuleList`` (fewflow's :class:`~fewflow.models.mlp.MLP`) gives the outputs of every block but the
    last (the one block when there is one), read with forward hooks. Anything else raises."""
    inner = unwrap(model)
    if callable(getattr(inner, "forward_features", None)):
        _, feats = inner.forward_features(x, *times, **cond)
        return list(feats)
    blocks = getattr(inner, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise FewflowError(
            f"the dispersive loss needs the network's intermediate representation: "
            f"{type(inner).__name__} has neither forward_features(...) nor a 'blocks' ModuleList (use "
            "fewflow.models.policy:ActionChunkNet or the MLP)")
    chosen = list(blocks)[:-1] if len(blocks) > 1 else list(blocks)
    feats: list[Tensor] = []

    def grab(_m: nn.Module, _inp: Any, out: Any) -> None:
        feats.append(out[0] if isinstance(out, tuple) else out)

    handles = [b.register_forward_hook(grab) for b in chosen]
    try:
        inner(x, *times, **cond)
    finally:
        for h in handles:
            h.remove()
    return feats


class MP1Loss(MeanFlowLoss):
    """MP1 / DM1 objective ``objective(model, x1, *, generator=None, c=obs) -> LossOutput``.

    MeanFlow (every setting of :class:`MeanFlowLoss` except training-time guidance) plus
    ``dispersive_weight * L_disp`` on :func:`representations`; see the module docstring.

    Args:
        path, source: as :class:`MeanFlowLoss` (linear path; standard normal noise by default).
        time_sampler: ``(s, t)`` pairs; default logit-normal(0.4, 1) in fewflow time (MP1's (-0.4, 1)).
        ratio: fraction of rows with ``s != t`` (MP1: ``flow_ratio = 0.5`` of rows have ``s = t``).
        adaptive_p, adaptive_c: adaptive weight ``1 / sg(L + c)^p`` (MP1: ``p = 1 - gamma = 0.5``, 1e-3).
        dispersive: one of :data:`DISPERSIVE` (``"none"``: plain MeanFlow policy).
        dispersive_weight: ``lambda`` (0.5 in MP1 and DM1).
        dispersive_tau: InfoNCE temperature (1.0 in MP1, 0.5 in DM1).
        dispersive_margin: hinge margin (1.0, DM1).
        dispersive_normalize: divide squared distances by their maximum in ``infonce_l2`` (MP1's code).
        label_dropout, num_classes, tangents, jvp_mode: as :class:`MeanFlowLoss`.
        reduction: per-sample reduction over action numbers (``"mean"`` as MP1's code).
    """

    def __init__(
        self,
        path: Any = None,
        source: Any = None,
        time_sampler: TimePairSampler | None = None,
        ratio: float = 0.5,
        adaptive_p: float = 0.5,
        adaptive_c: float = 1e-3,
        dispersive: str = "none",
        dispersive_weight: float = 0.5,
        dispersive_tau: float = 1.0,
        dispersive_margin: float = 1.0,
        dispersive_normalize: bool = True,
        label_dropout: float = 0.0,
        num_classes: int | None = None,
        tangents: str = "correct",
        jvp_mode: str = "auto",
        reduction: str = "mean",
    ) -> None:
        super().__init__(
            path=path, source=source, time_sampler=time_sampler, ratio=ratio, adaptive_p=adaptive_p,
            adaptive_c=adaptive_c, label_dropout=label_dropout, num_classes=num_classes, tangents=tangents,
            jvp_mode=jvp_mode, reduction=reduction,
        )
        if dispersive not in DISPERSIVE:
            raise unknown_name("dispersive loss", dispersive, DISPERSIVE)
        for name, v in (("dispersive_weight", dispersive_weight), ("dispersive_tau", dispersive_tau),
                        ("dispersive_margin", dispersive_margin)):
            if not math.isfinite(v) or v < 0 or (name != "dispersive_weight" and v == 0):
                raise FewflowError(f"{name} must be a finite number > 0 (weight >= 0), got {v}")
        self.dispersive, self.dispersive_weight = dispersive, float(dispersive_weight)
        self.dispersive_tau, self.dispersive_margin = float(dispersive_tau), float(dispersive_margin)
        self.dispersive_normalize = bool(dispersive_normalize)

    def dispersive_term(self, model: Any, x: Tensor, s: Tensor, t: Tensor, **cond: Any) -> Tensor:
        """``sum over hooked layers of L_disp(z)`` at ``(x, s, t, cond)`` (0 when ``dispersive="none"``)."""
        if self.dispersive == "none":
            return x.new_zeros(())
        feats = representations(model, x, s, t, **cond)
        terms = [dispersive_loss(f, self.dispersive, tau=self.dispersive_tau, margin=self.dispersive_margin,
                                 normalize=self.dispersive_normalize) for f in feats]
        return torch.stack(terms).sum()

    def loss_at(
        self, model: Any, x0: Tensor, x1: Tensor, s: Tensor, t: Tensor, *, dropped: Tensor | None = None,
        **cond: Any,
    ) -> LossOutput:
        """MeanFlow's loss at ``(x0, x1, s, t)`` plus the weighted dispersive term at the same points."""
        out = super().loss_at(model, x0, x1, s, t, dropped=dropped, **cond)
        if self.dispersive == "none" or self.dispersive_weight == 0.0:
            return out
        work = out.loss.dtype
        se = expand_like(s.to(work), x1)
        x_s = se * x1.to(work) + (1.0 - se) * x0.to(work)
        disp = self.dispersive_term(model, x_s, s.to(work), t.to(work), **cond)
        check_finite("dispersive loss", disp.detach())
        diag = {**out.diagnostics, "mf_loss": float(out.loss.detach()), "dispersive": float(disp.detach())}
        return LossOutput(out.loss + self.dispersive_weight * disp, diag)

    def __repr__(self) -> str:
        return (f"MP1Loss(ratio={self.ratio:g}, p={self.adaptive_p:g}, dispersive={self.dispersive!r}, "
                f"weight={self.dispersive_weight:g}, tau={self.dispersive_tau:g})")


# --------------------------------------------------------------------------- registration


@dataclass
class MP1Config:
    """Settings of :class:`MP1Loss` (MP1's defaults) and its ``(s, t)`` sampler."""

    ratio: float = field(default=0.5, metadata={"help": "fraction of rows with s != t (MP1: 0.5)"})
    adaptive_p: float = field(default=0.5, metadata={"help": "adaptive loss power p = 1 - gamma (0: MSE)"})
    adaptive_c: float = 1e-3
    dispersive: str = field(default="none", metadata={
        "help": "none | infonce_l2 | infonce_cosine | hinge | covariance"})
    dispersive_weight: float = field(default=0.5, metadata={"help": "weight of the dispersive term"})
    dispersive_tau: float = field(default=1.0, metadata={"help": "InfoNCE temperature (MP1 1.0, DM1 0.5)"})
    dispersive_margin: float = field(default=1.0, metadata={"help": "hinge margin on squared distances"})
    dispersive_normalize: bool = field(default=True, metadata={"help": "infonce_l2: D / max D (MP1 code)"})
    tangents: str = "correct"
    jvp_mode: str = "auto"
    reduction: str = field(default="mean", metadata={"help": "per-sample mean (MP1) or sum over actions"})
    time_pairs: str = field(default="logit_normal", metadata={"help": "logit_normal | uniform (s, t) draws"})
    time_mean: float = field(default=0.4, metadata={"help": "logit-normal mean, fewflow time (paper -0.4)"})
    time_std: float = 1.0


def _build_mp1(cfg: MP1Config, ctx: BuildContext) -> list[Stage]:
    loss = MP1Loss(
        path=ctx.path, source=ctx.source,
        time_sampler=time_pairs(cfg.time_pairs, cfg.time_mean, cfg.time_std),
        ratio=cfg.ratio, adaptive_p=cfg.adaptive_p, adaptive_c=cfg.adaptive_c, dispersive=cfg.dispersive,
        dispersive_weight=cfg.dispersive_weight, dispersive_tau=cfg.dispersive_tau,
        dispersive_margin=cfg.dispersive_margin, dispersive_normalize=cfg.dispersive_normalize,
        tangents=cfg.tangents, jvp_mode=cfg.jvp_mode, reduction=cfg.reduction, **ctx.conditioning(),
    )
    return [Stage("mp1", loss)]


MP1 = register(MethodSpec(
    name="mp1",
    label="MP1 (MeanFlow policy)",
    paper="Sheng et al., MP1: MeanFlow Tames Policy Learning in 1-step for Robotic Manipulation "
          "(2507.10543); Zou et al., DM1 (2510.07865)",
    summary="MeanFlow on observation-conditioned action chunks, 1-NFE sampling, optional dispersive loss",
    config=MP1Config,
    loss=MP1Loss,
    build=_build_mp1,
    needs=Needs(model="flow_map", ddp_mode="allreduce"),
    sampler=DefaultSampler("flow_map", nfe=1),
    recipe_fields=("time_pairs", "time_mean", "time_std"),
    small_scale={"time_pairs": "uniform", "ratio": 0.75, "adaptive_p": 1.0},
    docs="mp1",
))
