"""SCOOP: self-supervised correspondence and run-time optimisation for scene flow ("SCOOP: Self-Supervised
Correspondence and Optimization-Based Scene Flow", Lang, Aiger, Cole, Avidan, Rubinstein; CVPR 2023,
arXiv 2211.14020).

Scene flow (see :mod:`fewflow.points.sceneflow`) maps every source point ``p_i`` to its displacement
``f_i``; there is no time variable. SCOOP has two parts.

**1. Correspondence model** (:class:`ScoopNet`). A point network (three PointNet++-like set convolutions
on a kNN graph, :class:`SetConv`: ``h_i' = max_{j in N(i)} MLP([h_j, p_j - p_i])`` with instance
normalisation, widths ``n, 2n, 4n``) embeds both clouds. The transport cost is ``C_ij = 1 - S_ij`` with the
cosine similarity ``S_ij = <h_i, g_j> / (|h_i| |g_j|)``, restricted to pairs closer than ``support_radius``.
The plan is the unrolled unbalanced Sinkhorn iteration of entropic OT with KL-relaxed marginals
(Chizat et al., arXiv 1607.05816; used by FLOT, arXiv 2007.11142)::

    K = exp(-C / eps),  a = 1/N,  repeat L times:
        b = (1/M / (K^T a))^(gamma / (gamma + eps)),   a = (1/N / (K b))^(gamma / (gamma + eps))
    T = diag(a) K diag(b)

with learned ``eps = exp(e) + 0.03`` and ``gamma = exp(g)`` (``e = g = 0`` at initialisation). Each source
point is then reconstructed from its ``k`` largest transport weights, ``q_hat_i = sum_{j in top_k(T_i)}
w_ij q_j`` (``w`` = ``T_ij`` normalised over the top k), the initial flow is ``f0_i = q_hat_i - p_i``, and
the confidence ``c_i = max(0, sum_j w_ij S_ij)`` (or ``(. + 1) / 2`` with ``linear_corr_conf``).

**Self-supervised training** (:func:`scoop_loss`, :func:`train_scoop`; no ground-truth flow)::

    L = mean_i c_i d(q_hat_i, Q)^2 + lambda_b mean_j d(q_j, Q_hat)^2 + lambda_c (1 - mean_i c_i)
        + lambda_s mean_i mean_{j in N_k(i)} |f0_i - f0_j|_1

(``d(x, Y)`` the distance to the nearest point of ``Y``; ``c_i = 1`` without ``use_corr_conf``).

**Run-time refinement** (:func:`refine_flow`). With the network frozen, a residual ``Delta`` is optimised
per scene by Adam from zero::

    min_Delta  w_t [mean_i c_i d(p_i + f_i, Q)^2 + lambda_b mean_j d(q_j, P + F)^2]
               + w_s mean_i mean_{j in N_k(i)} |f_i - f_j|_1,     f = f0 + Delta

**Defaults** are the authors' code (itailang/SCOOP, ``train_scoop.py`` / ``evaluate_scoop.py`` and the
KITTI-v recipe): ``n = 32``, 32-NN graph, 1 Sinkhorn iteration, top-64 reconstruction, confidence loss
0.1, smoothness 10 (training) / 1 (refinement) over 32 neighbours, forward Chamfer only, Adam lr 1e-3,
batch 4, 400 epochs (lr x 0.1 after 85 % of them), refinement 150 steps at lr 0.2. The distances are
squared (as in the authors' Chamfer).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import Tensor, nn

from fewflow._validate import FewflowError, check_finite, unknown_key
from fewflow.points.sceneflow import SceneFlowPairs, _check_cloud, end_point_error, nearest_index

__all__ = [
    "FlowEstimate",
    "RefineResult",
    "ScoopConfig",
    "ScoopNet",
    "ScoopOutput",
    "SetConv",
    "estimate_flow",
    "load_scoop",
    "refine_flow",
    "save_scoop",
    "scoop_loss",
    "sinkhorn_plan",
    "smoothness_loss",
    "train_scoop",
    "weighted_chamfer",
]


@dataclass
class ScoopConfig:
    """SCOOP's settings with the authors' defaults (module docstring)."""

    channels: int = field(default=32, metadata={"help": "n: set-convolution widths n, 2n, 4n"})
    graph_k: int = field(default=32, metadata={"help": "kNN graph size of the feature network (incl. self)"})
    sinkhorn_iters: int = field(default=1, metadata={"help": "unrolled Sinkhorn iterations"})
    epsilon_offset: float = field(default=0.03, metadata={"help": "eps = exp(learned) + offset"})
    support_radius: float = field(default=10.0, metadata={"help": "no transport beyond this"})
    cross_recon_k: int = field(default=64, metadata={"help": "top-k targets reconstructing a source point"})
    linear_corr_conf: bool = field(default=False, metadata={"help": "confidence (S+1)/2 instead of max(S,0)"})
    use_corr_conf: bool = field(default=True, metadata={"help": "weight the Chamfer term by the confidence"})
    corr_conf_loss_weight: float = field(default=0.1, metadata={"help": "lambda_c of 1 - mean confidence"})
    smooth_flow_loss_weight: float = field(default=10.0, metadata={"help": "lambda_s (training)"})
    smooth_k: int = field(default=32, metadata={"help": "neighbours of the smoothness terms"})
    backward_dist_weight: float = field(default=0.0, metadata={"help": "lambda_b (training)"})
    lr: float = field(default=1e-3, metadata={"help": "Adam learning rate (training)"})
    batch_size: int = field(default=4, metadata={"help": "pairs per training step"})
    epochs: int = field(default=400, metadata={"help": "passes over the training pairs"})
    lr_decay_at: float = field(default=0.85, metadata={"help": "fraction of training after which lr x 0.1"})
    refine_steps: int = field(default=150, metadata={"help": "run-time refinement Adam steps"})
    refine_lr: float = field(default=0.2, metadata={"help": "run-time refinement learning rate"})
    refine_target_weight: float = field(default=1.0, metadata={"help": "w_t (refinement)"})
    refine_smooth_weight: float = field(default=1.0, metadata={"help": "w_s (refinement)"})
    refine_backward_dist_weight: float = field(default=0.0, metadata={"help": "lambda_b (refinement)"})

    def __post_init__(self) -> None:
        for f in fields(self):  # accept integers for float fields (e.g. parsed from a command line)
            v = getattr(self, f.name)
            if f.type == "float" and isinstance(v, int) and not isinstance(v, bool):
                setattr(self, f.name, float(v))
            if f.type == "float" and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise FewflowError(f"ScoopConfig.{f.name} must be a number, got {v!r}")
            if f.type == "bool" and not isinstance(v, bool):
                raise FewflowError(f"ScoopConfig.{f.name} must be true or false, got {v!r}")
        ints = ("channels", "graph_k", "cross_recon_k", "smooth_k", "batch_size")
        for name in ints:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise FewflowError(f"ScoopConfig.{name} must be an integer >= 1, got {v!r}")
        for name in ("sinkhorn_iters", "epochs", "refine_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise FewflowError(f"ScoopConfig.{name} must be an integer >= 0, got {v!r}")
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, float) and not (math.isfinite(v) and v >= 0):
                raise FewflowError(f"ScoopConfig.{f.name} must be a finite number >= 0, got {v!r}")
        if self.epsilon_offset <= 0:
            raise FewflowError(f"ScoopConfig.epsilon_offset must be > 0, got {self.epsilon_offset!r}")

    @classmethod
    def from_dict(cls, d: dict) -> ScoopConfig:
        """Build from a plain dict; unknown keys raise naming the closest valid one."""
        valid = [f.name for f in fields(cls)]
        for k in d:
            if k not in valid:
                raise unknown_key(k, "scoop", valid)
        return cls(**d)


# ------------------------------------------------------------------------------------------ network


def _graph(x: Tensor, k: int) -> Tensor:
    """``(B, N, k')`` neighbour indices, the point itself first, then its ``k' - 1`` nearest others."""
    from fewflow.points.knn import knn_graph

    b, n, _ = x.shape
    self_idx = torch.arange(n, device=x.device).view(1, n, 1).expand(b, n, 1)
    kk = min(k, n) - 1
    if kk < 1:
        return self_idx
    with torch.no_grad():
        return torch.cat([self_idx, knn_graph(x.detach(), kk)], dim=-1)


def _gather(x: Tensor, idx: Tensor) -> Tensor:
    """``x (B, N, C)`` at ``idx (B, N', k)`` -> ``(B, N', k, C)``."""
    b, n2, k = idx.shape
    flat = idx.reshape(b, n2 * k, 1).expand(-1, -1, x.shape[-1])
    return torch.gather(x, 1, flat).view(b, n2, k, x.shape[-1])


class SetConv(nn.Module):
    """``h_i' = max_{j in N(i)} MLP([h_j, p_j - p_i])``: three 1x1 convolutions, each followed by instance
    normalisation (over points and neighbours, per cloud) and LeakyReLU(0.1), then a max over neighbours."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(3):
            layers += [nn.Conv2d(c_in + 3 if i == 0 else c_out, c_out, 1, bias=False),
                       nn.InstanceNorm2d(c_out, affine=True), nn.LeakyReLU(0.1)]
        self.mlp = nn.Sequential(*layers)

    def forward(self, h: Tensor, pos: Tensor, nbr: Tensor) -> Tensor:
        """``h (B, N, C_in)``, ``pos (B, N, 3)``, ``nbr (B, N, k)`` -> ``(B, N, C_out)``."""
        rel = _gather(pos, nbr) - pos.unsqueeze(2)
        z = torch.cat([_gather(h, nbr), rel], dim=-1).permute(0, 3, 1, 2)  # (B, C+3, N, k)
        return self.mlp(z).amax(dim=-1).transpose(1, 2)


@dataclass
class ScoopOutput:
    """What :class:`ScoopNet` returns: the initial ``flow (B, N, 3)``, the confidence ``conf (B, N)``,
    the reconstructed target ``recon (B, N, 3)`` and the source neighbour graph ``nbr (B, N, k)`` (point
    itself first)."""

    flow: Tensor
    conf: Tensor
    recon: Tensor
    nbr: Tensor


def sinkhorn_plan(
    feat1: Tensor,
    feat2: Tensor,
    pos1: Tensor,
    pos2: Tensor,
    epsilon: Tensor | float,
    gamma: Tensor | float,
    iters: int,
    support_radius: float = 10.0,
) -> tuple[Tensor, Tensor]:
    """SCOOP's unrolled unbalanced Sinkhorn (module docstring): ``(T, S)``, both ``(B, N, M)``.

    ``feat1 (B, N, C)``, ``feat2 (B, M, C)``; ``pos1``, ``pos2`` the points (for the support mask);
    differentiable in the features, ``epsilon`` and ``gamma``. ``iters = 0`` returns the kernel ``K``. The
    scaling updates add 1e-8 to their denominators, as the authors' code does.
    """
    if feat1.dim() != 3 or feat2.dim() != 3 or feat1.shape[::2] != feat2.shape[::2]:
        raise FewflowError(f"features must be (B, N, C) and (B, M, C), got {tuple(feat1.shape)} and "
                           f"{tuple(feat2.shape)}")
    f1 = feat1 / (feat1.pow(2).sum(-1, keepdim=True) + 1e-8).sqrt()
    f2 = feat2 / (feat2.pow(2).sum(-1, keepdim=True) + 1e-8).sqrt()
    sim = f1 @ f2.transpose(1, 2)
    with torch.no_grad():
        support = (torch.cdist(pos1, pos2.to(pos1.dtype)).pow(2) < support_radius**2).to(sim.dtype)
    kernel = torch.exp(-(1.0 - sim) / epsilon) * support
    if iters == 0:
        return kernel, sim
    power = gamma / (gamma + epsilon)
    n, m = kernel.shape[1], kernel.shape[2]
    a = torch.full((kernel.shape[0], n, 1), 1.0 / n, dtype=sim.dtype, device=sim.device)
    b = torch.full((kernel.shape[0], m, 1), 1.0 / m, dtype=sim.dtype, device=sim.device)
    for _ in range(iters):
        b = torch.pow((1.0 / m) / (kernel.transpose(1, 2) @ a + 1e-8), power)
        a = torch.pow((1.0 / n) / (kernel @ b + 1e-8), power)
    return a * kernel * b.transpose(1, 2), sim


class ScoopNet(nn.Module):
    """SCOOP's correspondence model (module docstring); ``forward(source, target) -> ScoopOutput``.

    ``source (B, N, 3)``, ``target (B, M, 3)``. ``config`` is the :class:`ScoopConfig` it was built from.
    """

    def __init__(self, config: ScoopConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else ScoopConfig()
        n = self.config.channels
        self.convs = nn.ModuleList([SetConv(3, n), SetConv(n, 2 * n), SetConv(2 * n, 4 * n)])
        self.epsilon = nn.Parameter(torch.zeros(1))
        self.gamma = nn.Parameter(torch.zeros(1))

    def features(self, pos: Tensor, nbr: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Per-point features ``(B, N, 4n)`` and the neighbour graph used."""
        if nbr is None:
            nbr = _graph(pos, self.config.graph_k)
        h = pos
        for conv in self.convs:
            h = conv(h, pos, nbr)
        return h, nbr

    def forward(self, source: Tensor, target: Tensor) -> ScoopOutput:
        _check_cloud("source", source)
        _check_cloud("target", target)
        if source.shape[0] != target.shape[0]:
            raise FewflowError(f"source and target hold different numbers of clouds: {source.shape[0]} vs "
                               f"{target.shape[0]}")
        cfg = self.config
        k_graph = max(cfg.graph_k, cfg.smooth_k + 1)
        nbr = _graph(source, k_graph)
        h1, _ = self.features(source, nbr[..., : cfg.graph_k])
        h2, _ = self.features(target)
        eps = torch.exp(self.epsilon) + cfg.epsilon_offset
        plan, sim = sinkhorn_plan(h1, h2, source, target, eps, torch.exp(self.gamma), cfg.sinkhorn_iters,
                                  cfg.support_radius)
        k = min(cfg.cross_recon_k, target.shape[1])
        w, idx = plan.topk(k, dim=-1)
        w = w / (w.sum(-1, keepdim=True) + 1e-8)
        recon = (_gather(target, idx) * w.unsqueeze(-1)).sum(2)
        s = (torch.gather(sim, 2, idx) * w).sum(-1)
        conf = (s + 1.0) / 2.0 if cfg.linear_corr_conf else s.clamp_min(0.0)
        return ScoopOutput(recon - source, conf, recon, nbr)


# ------------------------------------------------------------------------------------------ losses


def weighted_chamfer(
    a: Tensor, b: Tensor, weight: Tensor | None = None, backward_weight: float = 0.0
) -> Tensor:
    """``mean_i w_i d(a_i, B)^2 + backward_weight * mean_j d(b_j, A)^2`` for ``a (B, N, 3)``,
    ``b (B, M, 3)``, ``weight (B, N)`` (averaged over the batch); differentiable in ``a`` (and ``b``)."""
    idx = nearest_index(a, b)
    d1 = (a - torch.gather(b.to(a.dtype), 1, idx.unsqueeze(-1).expand(-1, -1, a.shape[-1]))).pow(2).sum(-1)
    if weight is not None:
        d1 = d1 * weight
    loss = d1.mean()
    if backward_weight > 0:
        idx2 = nearest_index(b, a)
        near = torch.gather(a.to(b.dtype), 1, idx2.unsqueeze(-1).expand(-1, -1, b.shape[-1]))
        d2 = (b - near).pow(2).sum(-1)
        loss = loss + backward_weight * d2.mean()
    return loss


def smoothness_loss(flow: Tensor, nbr: Tensor) -> Tensor:
    """``mean_i mean_{j in nbr(i)} |f_i - f_j|_1`` for ``flow (B, N, 3)`` and ``nbr (B, N, k)`` (the
    neighbours of each point, itself excluded): zero for any constant (rigidly translating) flow."""
    return (flow.unsqueeze(2) - _gather(flow, nbr)).abs().sum(-1).mean()


def scoop_loss(out: ScoopOutput, target: Tensor, cfg: ScoopConfig) -> tuple[Tensor, dict[str, float]]:
    """SCOOP's self-supervised training loss (module docstring) and its terms as floats."""
    weight = out.conf if cfg.use_corr_conf else None
    rec = weighted_chamfer(out.recon, target, weight, cfg.backward_dist_weight)
    loss = rec
    terms = {"recon": float(rec.detach())}
    if cfg.use_corr_conf and cfg.corr_conf_loss_weight > 0:
        c = 1.0 - out.conf.mean()
        loss = loss + cfg.corr_conf_loss_weight * c
        terms["conf"] = float(c.detach())
    if cfg.smooth_flow_loss_weight > 0:
        sm = smoothness_loss(out.flow, out.nbr[..., 1 : cfg.smooth_k + 1])
        loss = loss + cfg.smooth_flow_loss_weight * sm
        terms["smooth"] = float(sm.detach())
    terms["loss"] = float(loss.detach())
    return loss, terms


# ------------------------------------------------------------------------------------------ training


def _as_clouds(pairs: SceneFlowPairs | tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    if isinstance(pairs, SceneFlowPairs):
        return pairs.source, pairs.target
    if isinstance(pairs, (tuple, list)) and len(pairs) == 2:
        s, t = pairs
        _check_cloud("source", s)
        _check_cloud("target", t)
        if s.shape[0] != t.shape[0]:
            raise FewflowError(f"source and target hold different numbers of clouds: {s.shape[0]} vs "
                               f"{t.shape[0]}")
        return s, t
    raise FewflowError(f"pairs must be SceneFlowPairs or a (source, target) tuple, got "
                       f"{type(pairs).__name__}")


def train_scoop(
    cfg: ScoopConfig,
    pairs: SceneFlowPairs | tuple[Tensor, Tensor],
    *,
    seed: int = 0,
    device: torch.device | str | None = None,
    model: ScoopNet | None = None,
    log: Callable[[int, dict[str, float]], None] | None = None,
    max_seconds: float | None = None,
) -> ScoopNet:
    """Train :class:`ScoopNet` self-supervised on ``pairs`` (only source and target are used, never the
    flow) for ``cfg.epochs`` shuffled passes in batches of ``cfg.batch_size`` with Adam at ``cfg.lr``
    (x 0.1 after ``cfg.lr_decay_at`` of the steps). ``log(step, terms)`` is called every step;
    ``max_seconds`` stops early. Returns the model in eval mode (on ``device``, default the data's)."""
    src, tgt = _as_clouds(pairs)
    dev = torch.device(device) if device is not None else src.device
    src, tgt = src.to(dev, torch.float32), tgt.to(dev, torch.float32)
    if model is None:
        with torch.random.fork_rng(devices=[]):  # seeded initialisation, global RNG state untouched
            torch.manual_seed(seed)
            model = ScoopNet(cfg)
    net = model.to(dev)
    net.config = cfg
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    n = src.shape[0]
    per_epoch = math.ceil(n / cfg.batch_size)
    total = cfg.epochs * per_epoch
    decay = int(cfg.lr_decay_at * total)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    step = 0
    for _ in range(cfg.epochs):
        order = torch.randperm(n, generator=g)
        for s in range(0, n, cfg.batch_size):
            if step == decay and decay > 0:
                for group in opt.param_groups:
                    group["lr"] = cfg.lr * 0.1
            sel = order[s : s + cfg.batch_size].to(dev)
            out = net(src[sel], tgt[sel])
            loss, terms = scoop_loss(out, tgt[sel], cfg)
            if not torch.isfinite(loss):
                raise FewflowError(f"SCOOP training loss became non-finite at step {step}: {terms}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if log is not None:
                log(step, terms)
            step += 1
            if max_seconds is not None and time.perf_counter() - t0 > max_seconds:
                return net.eval()
    return net.eval()


# ------------------------------------------------------------------------------------------ refinement


@dataclass
class RefineResult:
    """``flow (B, N, 3)`` after refinement, the objective per step (``loss``) and, when the true flow was
    given, the mean EPE per step (``epe``, ``steps + 1`` values: before each step and at the end)."""

    flow: Tensor
    loss: list[float]
    epe: list[float] | None = None


def refine_flow(
    source: Tensor,
    target: Tensor,
    flow: Tensor,
    conf: Tensor | None = None,
    *,
    steps: int = 150,
    lr: float = 0.2,
    target_weight: float = 1.0,
    smooth_weight: float = 1.0,
    smooth_k: int = 32,
    backward_weight: float = 0.0,
    gt_flow: Tensor | None = None,
) -> RefineResult:
    """SCOOP's run-time refinement (module docstring): Adam on a residual ``Delta`` (from 0) of
    ``w_t Chamfer_c(P + F0 + Delta, Q) + w_s smooth_k(F0 + Delta)``. ``source (B, N, 3)`` (or ``(N, 3)``),
    ``flow`` its initial flow (e.g. SCOOP's, or zero / nearest-neighbour for the training-free variant),
    ``conf (B, N)`` the point weights (default 1). Inputs are not modified; ``gt_flow`` only records EPE."""
    unbatched = source.dim() == 2
    def add(x: Tensor | None) -> Tensor | None:
        return x[None] if (x is not None and torch.is_tensor(x) and x.dim() == 2) else x

    s, t, f0, gt = add(source), add(target), add(flow), add(gt_flow)
    c = conf[None] if (conf is not None and conf.dim() == 1) else conf
    _check_cloud("source", s)
    _check_cloud("target", t)
    _check_cloud("flow", f0)
    if f0.shape != s.shape:
        raise FewflowError(f"flow must match source's shape {tuple(s.shape)}, got {tuple(f0.shape)}")
    if t.shape[0] != s.shape[0]:
        raise FewflowError(f"source and target hold different numbers of clouds: {s.shape[0]} vs "
                           f"{t.shape[0]}")
    if c is not None:
        check_finite("conf", c)
        if c.shape != s.shape[:2]:
            raise FewflowError(f"conf must have shape {tuple(s.shape[:2])}, got {tuple(c.shape)}")
        c = c.detach()
    if gt is not None and gt.shape != s.shape:
        raise FewflowError(f"gt_flow must match source's shape {tuple(s.shape)}, got {tuple(gt.shape)}")
    if not isinstance(steps, int) or steps < 0:
        raise FewflowError(f"steps must be an integer >= 0, got {steps!r}")
    if not (math.isfinite(lr) and lr > 0):
        raise FewflowError(f"lr must be a finite number > 0, got {lr!r}")
    s, t, f0 = s.detach(), t.detach().to(s.dtype), f0.detach()
    nbr = None
    if smooth_weight > 0 and s.shape[1] > 1:
        from fewflow.points.knn import knn_graph

        nbr = knn_graph(s, min(smooth_k, s.shape[1] - 1))
    delta = torch.zeros_like(f0, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=lr)
    losses: list[float] = []
    epes: list[float] | None = [] if gt is not None else None
    with torch.enable_grad():
        for _ in range(steps):
            f = f0 + delta
            loss = target_weight * weighted_chamfer(s + f, t, c, backward_weight)
            if nbr is not None:
                loss = loss + smooth_weight * smoothness_loss(f, nbr)
            if epes is not None:
                epes.append(float(end_point_error(f.detach(), gt).mean()))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    out = (f0 + delta).detach()
    if epes is not None:
        epes.append(float(end_point_error(out, gt).mean()))
    return RefineResult(out[0] if unbatched else out, losses, epes)


# ------------------------------------------------------------------------------------------ inference


@dataclass
class FlowEstimate:
    """:func:`estimate_flow`'s result: the final ``flow``, SCOOP's correspondence flow ``flow0`` and its
    confidence ``conf`` (all detached), and the refinement's per-step objective."""

    flow: Tensor
    flow0: Tensor
    conf: Tensor
    refine_loss: list[float] = field(default_factory=list)


def estimate_flow(
    model: ScoopNet,
    source: Tensor,
    target: Tensor,
    *,
    refine: bool = True,
    cfg: ScoopConfig | None = None,
    chunk: int = 8,
) -> FlowEstimate:
    """Scene flow of ``source (B, N, 3)`` (or ``(N, 3)``) to ``target``: the correspondence model's flow
    and confidence, then (``refine=True``) the run-time refinement with ``cfg``'s ``refine_*`` settings
    (default the model's config). Runs on the model's device in ``chunk`` clouds at a time."""
    unbatched = source.dim() == 2
    s = source[None] if unbatched else source
    t = target[None] if target.dim() == 2 else target
    _check_cloud("source", s)
    _check_cloud("target", t)
    cfg = cfg if cfg is not None else model.config
    dev = next(model.parameters()).device
    was = model.training
    model.eval()
    flows, confs = [], []
    with torch.no_grad():
        for i in range(0, s.shape[0], chunk):
            out = model(s[i : i + chunk].to(dev, torch.float32), t[i : i + chunk].to(dev, torch.float32))
            flows.append(out.flow)
            confs.append(out.conf)
    model.train(was)
    f0, conf = torch.cat(flows), torch.cat(confs)
    flow, losses = f0, []
    if refine and cfg.refine_steps > 0:
        res = refine_flow(s.to(dev, torch.float32), t.to(dev, torch.float32), f0, conf,
                          steps=cfg.refine_steps, lr=cfg.refine_lr, target_weight=cfg.refine_target_weight,
                          smooth_weight=cfg.refine_smooth_weight, smooth_k=cfg.smooth_k,
                          backward_weight=cfg.refine_backward_dist_weight)
        flow, losses = res.flow, res.loss

    def back(x: Tensor) -> Tensor:
        return x.to(source.device, source.dtype)

    if unbatched:
        return FlowEstimate(back(flow[0]), back(f0[0]), conf[0].to(source.device), losses)
    return FlowEstimate(back(flow), back(f0), conf.to(source.device), losses)


# ------------------------------------------------------------------------------------------ files


def save_scoop(model: ScoopNet, folder: str | Path) -> Path:
    """Write ``folder/model.safetensors`` and ``folder/config.json`` (atomically); returns ``folder``."""
    from fewflow._io import atomic_save_safetensors, atomic_write_json

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(folder / "model.safetensors", model.state_dict())
    atomic_write_json(folder / "config.json", {"kind": "scoop", "config": asdict(model.config)})
    return folder


def load_scoop(folder: str | Path, device: torch.device | str | None = None) -> ScoopNet:
    """Load a model written by :func:`save_scoop` (in eval mode, on ``device``, default CPU)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg_path, w_path = folder / "config.json", folder / "model.safetensors"
    if not cfg_path.exists() or not w_path.exists():
        raise FewflowError(f"{folder} is not a saved SCOOP model (needs config.json and model.safetensors)")
    meta = json.loads(cfg_path.read_text())
    if meta.get("kind") != "scoop":
        raise FewflowError(f"{cfg_path} does not describe a SCOOP model (kind={meta.get('kind')!r})")
    net = ScoopNet(ScoopConfig.from_dict(meta["config"]))
    net.load_state_dict(load_file(str(w_path)))
    return net.to(device if device is not None else "cpu").eval()
