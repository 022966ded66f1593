"""GoalFlow on ``nav2d``: goal-point vocabulary, goal scoring, and a goal-conditioned trajectory flow.

"GoalFlow: Goal-Driven Flow Matching for Multimodal Trajectories Generation in End-to-End Autonomous
Driving" (Xing et al., CVPR 2025, arXiv 2503.05689), at toy scale on :class:`~fewflow.control.envs.nav2d.
Nav2D`. A plan is the robot's next ``horizon`` waypoints (every ``stride`` steps of a demonstration),
written relative to the current position ``p`` (so the first point is pinned to the start, as in the
paper). Three parts:

1. **Goal vocabulary** ``V = {g_i}``: k-means centres of the demonstrations' plan end points
   (:func:`goal_vocabulary`; the paper: 8192 centres of driving end points).
2. **Goal scoring** (:func:`goal_scores`): an imitation score ``S_im(p)`` (a network trained with the soft
   labels ``softmax_i(-||g_i - g_gt||^2 / tau)``, cross-entropy) and a drivable-area-compliance score
   (1 when ``g_i`` is drivable in the map: nav2d's ``drivable``, the exact label the paper's DAC head is
   trained on), combined as ``S = w_im log softmax(S_im) + theta log sigma_dac`` with ``w_im = 0.1`` and
   ``theta = 3`` (the authors' defaults) and ``sigma_dac`` the label clipped to ``[eps, 1 - eps]``. The top
   ``K`` goals (distinct vocabulary entries) are kept.
3. **Goal-conditioned trajectory FM**: ``x_t = t x1 + (1 - t) x0``, ``x0 ~ N(0, 0.1^2 I)`` (the authors'
   train scale), target ``x1 - x0``, L1 loss, condition ``c = (p, g - p)``; in fewflow's time (t = 0 noise,
   t = 1 data; the paper's convention is the same). Rows drop their condition with probability
   ``cond_dropout`` (the paper alternates full, goal-dropped and fully dropped conditions; one null
   embedding here). Sampling takes **one** Euler step from ``anchors`` noise draws per goal, and the
   trajectory whose end point is nearest its goal is selected.

The baseline is plain conditional FM on the same data, network and loss with ``c = p`` only. With one
Euler step from ``x0``, any flow-matching sampler returns ``E[x1 | c] + O(x0)``: for a multimodal ``c``
(two corridors) that is the average of the modes, which runs into the wall; given the goal the
conditional law is (nearly) unimodal and the mean stays in its corridor. Metrics
(:func:`offroad_rate`, :func:`min_ade_fde`): the fraction of sampled plans leaving the drivable area
(checked along the straight segments between waypoints), and min-ADE / min-FDE of ``K`` samples against
the demonstrated plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fewflow._validate import FewflowError

__all__ = [
    "GoalFlow",
    "GoalFlowConfig",
    "fit_goalflow",
    "goal_scores",
    "goal_vocabulary",
    "min_ade_fde",
    "offroad_rate",
    "plan_chunks",
]


def plan_chunks(demos: Any, horizon: int = 8, stride: int = 3, every: int = 1
                ) -> tuple[np.ndarray, np.ndarray]:
    """``(pos (M, 2), plans (M, horizon, 2))`` from 2-D position demonstrations (:class:`~fewflow.control.
    demos.Demos` of ``nav2d``): for every ``every``-th step ``k`` of every episode, the position ``p_k``
    and the absolute positions at steps ``k + stride, ..., k + horizon * stride`` (the episode's last
    position repeated past its end)."""
    if horizon < 1 or stride < 1 or every < 1:
        raise FewflowError("plan_chunks: horizon, stride and every must be positive integers")
    if getattr(demos, "obs_dim", None) != 2:
        raise FewflowError(f"plan_chunks needs 2-D position demonstrations (nav2d), got obs_dim "
                           f"{getattr(demos, 'obs_dim', None)}")
    pos, plans = [], []
    for obs, _ in demos.episodes():
        path = np.asarray(obs, dtype=np.float64)
        t = len(path)
        for k in range(0, t, every):
            idx = np.minimum(k + stride * np.arange(1, horizon + 1), t - 1)
            pos.append(path[k])
            plans.append(path[idx])
    return np.asarray(pos), np.asarray(plans)


def goal_vocabulary(end_points: np.ndarray, k: int = 64, seed: int = 0) -> np.ndarray:
    """``(k, 2)`` k-means centres of the plan end points ``(M, 2)`` (scikit-learn's ``KMeans``)."""
    from sklearn.cluster import KMeans

    e = np.asarray(end_points, dtype=np.float64)
    if e.ndim != 2 or e.shape[1] != 2 or len(e) == 0:
        raise FewflowError(f"goal_vocabulary needs end points (M, 2), got shape {e.shape}")
    if not np.all(np.isfinite(e)):
        raise FewflowError("goal_vocabulary: end points contain NaN or inf")
    if not isinstance(k, int) or not 1 <= k <= len(e):
        raise FewflowError(f"goal_vocabulary: k must be an int in 1..{len(e)}, got {k!r}")
    km = KMeans(n_clusters=k, n_init=3, random_state=seed).fit(e)
    return km.cluster_centers_.astype(np.float64)


def goal_scores(im_logits: Tensor, dac: Tensor, *, w_im: float = 0.1, theta: float = 3.0,
                eps: float = 1e-3) -> Tensor:
    """GoalFlow's goal score ``S = w_im log softmax(S_im) + theta log sigma_dac``.

    ``im_logits``: ``(..., K)`` imitation logits over the vocabulary; ``dac``: ``(K,)`` or ``(..., K)``
    drivable-area compliance in ``[0, 1]`` (a label or a probability, clipped to ``[eps, 1 - eps]``)."""
    if im_logits.shape[-1] != dac.shape[-1]:
        raise FewflowError(f"goal_scores: {im_logits.shape[-1]} imitation logits but {dac.shape[-1]} DAC "
                           "values")
    if not (torch.isfinite(im_logits).all() and torch.isfinite(dac).all()):
        raise FewflowError("goal_scores: inputs contain NaN or inf")
    p = dac.to(im_logits.dtype).clamp(eps, 1.0 - eps)
    return w_im * torch.log_softmax(im_logits, dim=-1) + theta * torch.log(p)


def _densify(start: np.ndarray, plans: np.ndarray, per_segment: int = 6) -> np.ndarray:
    """Points along the polyline ``start -> plan_1 -> ... -> plan_H``: ``(..., H * per_segment, 2)``."""
    full = np.concatenate([np.broadcast_to(start[..., None, :], plans[..., :1, :].shape), plans], axis=-2)
    a, b = full[..., :-1, :], full[..., 1:, :]
    s = np.linspace(0.0, 1.0, per_segment, endpoint=False)[1:] if per_segment > 1 else np.zeros(0)
    s = np.concatenate([s, [1.0]])
    pts = a[..., None, :] + s[:, None] * (b - a)[..., None, :]
    return pts.reshape(*plans.shape[:-2], -1, 2)


def offroad_rate(env: Any, start: np.ndarray, plans: np.ndarray) -> float:
    """Fraction of ``plans`` ``(..., H, 2)`` (absolute positions; ``start`` ``(..., 2)`` broadcast) that
    leave ``env.drivable`` somewhere along their segments."""
    plans = np.asarray(plans, dtype=np.float64)
    start = np.broadcast_to(np.asarray(start, dtype=np.float64), (*plans.shape[:-2], 2))
    pts = _densify(start, plans)
    bad = ~env.drivable(pts)
    return float(bad.any(axis=-1).mean())


def min_ade_fde(samples: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """``(min-ADE, min-FDE)`` of ``K`` sampled plans ``(K, H, 2)`` against the true plan ``(H, 2)``:
    the smallest mean (resp. final) waypoint distance over the samples."""
    s, g = np.asarray(samples, dtype=np.float64), np.asarray(truth, dtype=np.float64)
    if s.ndim != 3 or g.shape != s.shape[1:]:
        raise FewflowError(f"min_ade_fde needs samples (K, H, 2) and truth (H, 2), got {s.shape}, {g.shape}")
    d = np.linalg.norm(s - g[None], axis=-1)
    return float(d.mean(1).min()), float(d[:, -1].min())


# --------------------------------------------------------------------------------------------- models


@dataclass
class GoalFlowConfig:
    """Settings (defaults: the authors' where they apply, else chosen for the toy scale).

    vocab: goal vocabulary size (paper 8192; a 2-D map needs far fewer); tau: soft-label temperature of
    the imitation targets (squared distance units); w_im, theta: score weights (0.1, 3.0, the authors');
    noise: source std (0.1, the authors' train/test scale); cond_dropout: probability of the null
    condition; hidden, depth: MLP width/depth; steps, batch_size, lr: training; anchors: noise draws per
    goal at sampling (paper 128); scale: plans are divided by it before the flow sees them."""

    vocab: int = 48
    tau: float = 0.01
    w_im: float = 0.1
    theta: float = 3.0
    noise: float = 0.1
    cond_dropout: float = 0.1
    hidden: int = 128
    depth: int = 3
    steps: int = 2000
    batch_size: int = 256
    lr: float = 1e-3
    anchors: int = 16
    scale: float = 0.5


def _train_flow(model: nn.Module, x1: Tensor, c: Tensor, cfg: GoalFlowConfig, seed: int) -> None:
    """GoalFlow's FM loss through fewflow's trainer: ``CFMLoss`` with the L1 norm on ``x1 - x0``, source
    ``N(0, noise^2 I)`` and condition dropout (the null condition); Adam (AdamW without decay), cosine
    learning rate, no EMA."""
    from fewflow.objectives.cfm import CFMLoss
    from fewflow.paths import AffinePath
    from fewflow.sources import GaussianSource
    from fewflow.train import TrainConfig, Trainer

    loss = CFMLoss(AffinePath("linear"), source=GaussianSource((x1.shape[1],), scale=cfg.noise),
                   label_dropout=cfg.cond_dropout, norm="l1")
    tc = TrainConfig(steps=cfg.steps, batch_size=min(cfg.batch_size, x1.shape[0]), lr=cfg.lr,
                     lr_schedule="cosine", grad_clip=None, ema_decay=None, progress=False,
                     log_every=0, ckpt_every=0, seed=seed, device="cpu")
    Trainer(model, loss, {"x": x1, "c": c}, tc).fit()
    model.eval()


def _one_step(model: nn.Module, c: Tensor, n_out: int, noise: float, gen: torch.Generator,
              steps: int = 1) -> Tensor:
    """``steps`` Euler steps of ``model`` from ``N(0, noise^2)`` draws (one per row of ``c``)."""
    from fewflow.solvers import solve

    x0 = noise * torch.randn(c.shape[0], n_out, generator=gen).to(c)
    with torch.no_grad():
        return solve(model, x0, steps=steps, stepper="euler", cond={"c": c}).x


class GoalFlow:
    """A fitted GoalFlow planner and its plain conditional-FM baseline on one ``nav2d`` map.

    Attributes: ``vocab`` ``(V, 2)``, ``dac`` ``(V,)`` (drivable labels), ``scorer`` (``p -> V`` logits),
    ``flow`` (goal-conditioned velocity ``v(x, t, c=(p, g - p))``), ``plain`` (``v(x, t, c=p)``).
    """

    def __init__(self, env: Any, cfg: GoalFlowConfig, horizon: int, vocab: np.ndarray, dac: np.ndarray,
                 scorer: nn.Module, flow: nn.Module, plain: nn.Module) -> None:
        self.env, self.cfg, self.horizon = env, cfg, horizon
        self.vocab, self.dac = vocab, dac
        self.scorer, self.flow, self.plain = scorer, flow, plain

    def _check_pos(self, pos: Any) -> np.ndarray:
        p = np.asarray(pos, dtype=np.float64)
        if p.shape != (2,) or not np.all(np.isfinite(p)):
            raise FewflowError(f"GoalFlow needs one finite position (2,), got shape {p.shape}")
        return p

    def scores(self, pos: np.ndarray) -> np.ndarray:
        """Goal scores ``S`` ``(V,)`` of the vocabulary at position ``pos``."""
        p = self._check_pos(pos)
        with torch.no_grad():
            logits = self.scorer(torch.as_tensor(p, dtype=torch.float32)[None])[0]
        s = goal_scores(logits, torch.as_tensor(self.dac, dtype=torch.float32), w_im=self.cfg.w_im,
                        theta=self.cfg.theta)
        return s.double().numpy()

    def top_goals(self, pos: np.ndarray, k: int) -> np.ndarray:
        """The ``k`` best-scoring goals ``(k, 2)``."""
        order = np.argsort(-self.scores(pos))
        return self.vocab[order[: max(1, min(k, len(order)))]]

    def sample(self, pos: np.ndarray, k: int = 8, *, steps: int = 1, seed: int = 0,
               goals: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(plans (k, H, 2), goals (k, 2))``: for each of the top-``k`` goals (or the given ``goals``),
        ``anchors`` plans drawn with ``steps`` Euler steps, keeping the one whose end point is nearest the
        goal. Plans are absolute positions."""
        p = self._check_pos(pos)
        g = self.top_goals(p, k) if goals is None else np.asarray(goals, dtype=np.float64).reshape(-1, 2)
        a = self.cfg.anchors
        s = self.cfg.scale
        c = np.concatenate([np.repeat(p[None], len(g) * a, 0), np.repeat(g - p, a, 0) / s], axis=1)
        gen = torch.Generator().manual_seed(seed)
        x = _one_step(self.flow, torch.as_tensor(c, dtype=torch.float32), 2 * self.horizon, self.cfg.noise,
                      gen, steps)
        plans = x.double().numpy().reshape(len(g), a, self.horizon, 2) * s + p
        d = np.linalg.norm(plans[:, :, -1] - g[:, None], axis=-1)
        best = plans[np.arange(len(g)), d.argmin(1)]
        return best, g

    def sample_plain(self, pos: np.ndarray, k: int = 8, *, steps: int = 1, seed: int = 0) -> np.ndarray:
        """``k`` plans ``(k, H, 2)`` of the plain conditional FM baseline (``steps`` Euler steps)."""
        p = self._check_pos(pos)
        gen = torch.Generator().manual_seed(seed)
        c = torch.as_tensor(np.repeat(p[None], k, 0), dtype=torch.float32)
        x = _one_step(self.plain, c, 2 * self.horizon, self.cfg.noise, gen, steps)
        return x.double().numpy().reshape(k, self.horizon, 2) * self.cfg.scale + p


def fit_goalflow(env: Any, pos: np.ndarray, plans: np.ndarray, cfg: GoalFlowConfig | None = None,
                 seed: int = 0) -> GoalFlow:
    """Fit the vocabulary, the imitation scorer, the goal-conditioned flow and the plain baseline on
    ``(pos (M, 2), plans (M, H, 2))`` (:func:`plan_chunks`) for the map ``env`` (a ``Nav2D``)."""
    from fewflow.models import MLP

    cfg = cfg or GoalFlowConfig()
    pos = np.asarray(pos, dtype=np.float64)
    plans = np.asarray(plans, dtype=np.float64)
    if pos.ndim != 2 or pos.shape[1] != 2 or plans.ndim != 3 or plans.shape[2] != 2 or len(pos) != len(plans):
        raise FewflowError(f"fit_goalflow needs pos (M, 2) and plans (M, H, 2), got {pos.shape}, "
                           f"{plans.shape}")
    if len(pos) == 0:
        raise FewflowError("fit_goalflow: no plans")
    if not (np.all(np.isfinite(pos)) and np.all(np.isfinite(plans))):
        raise FewflowError("fit_goalflow: positions or plans contain NaN or inf")
    if not hasattr(env, "drivable"):
        raise FewflowError("fit_goalflow needs an environment with drivable(points) (nav2d)")
    horizon = plans.shape[1]
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    ends = plans[:, -1]
    vocab = goal_vocabulary(ends, min(cfg.vocab, len(ends)), seed)
    dac = env.drivable(vocab).astype(np.float64)

    # imitation scorer: p -> logits over the vocabulary, soft-label cross-entropy
    scorer = nn.Sequential(nn.Linear(2, cfg.hidden), nn.SiLU(), nn.Linear(cfg.hidden, cfg.hidden), nn.SiLU(),
                           nn.Linear(cfg.hidden, len(vocab)))
    P = torch.as_tensor(pos, dtype=torch.float32)
    d2 = ((torch.as_tensor(ends)[:, None] - torch.as_tensor(vocab)[None]) ** 2).sum(-1)
    soft = torch.softmax(-d2 / cfg.tau, dim=1).float()
    opt = torch.optim.Adam(scorer.parameters(), lr=cfg.lr)
    n = len(P)
    for _ in range(max(cfg.steps // 2, 1)):
        idx = torch.randint(0, n, (min(cfg.batch_size, n),), generator=gen)
        loss = -(soft[idx] * torch.log_softmax(scorer(P[idx]), 1)).sum(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    scorer.eval()

    x1 = torch.as_tensor((plans - pos[:, None]) / cfg.scale, dtype=torch.float32).reshape(n, -1)
    goal_rel = torch.as_tensor((ends - pos) / cfg.scale, dtype=torch.float32)
    flow = MLP(2 * horizon, hidden=cfg.hidden, depth=cfg.depth, cond_dim=4)
    _train_flow(flow, x1, torch.cat([P, goal_rel], 1), cfg, seed)
    plain = MLP(2 * horizon, hidden=cfg.hidden, depth=cfg.depth, cond_dim=2)
    _train_flow(plain, x1, P, cfg, seed + 1)
    return GoalFlow(env, cfg, horizon, vocab, dac, scorer, flow, plain)
