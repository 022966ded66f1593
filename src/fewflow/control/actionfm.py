"""Action Flow Matching: a flow from the planned action to the intended action under changed dynamics.

"Action Flow Matching for Continual Robot Learning" (Murillo-Gonzalez & Liu, RSS 2025, arXiv 2504.18471).
A planner plans with its nominal dynamics model; when the robot's true dynamics drift, the planned action
``a_plan`` no longer produces the planned state change. The *intended* action ``a_int`` is the one that
would produce it under the true dynamics. Action FM learns, offline, a conditional flow from ``a_plan`` to
``a_int`` -- the **source is the planned action, not noise** -- conditioned on a dynamics context ``c``
that reveals the current dynamics:

    x_t = (1 - t) a_plan + t a_int,        L = E || v_theta(x_t, t, c) - (a_int - a_plan) ||^2,

in fewflow's time (t = 0 the source, t = 1 the target; the paper uses the same direction). At run time
the planner's action is transported by integrating ``dx/dt = v_theta(x, t, c)`` from ``x_0 = a_plan``
(10 midpoint steps, the authors' setting) and the result is executed; the planner itself is unchanged.

For the unicycle (:mod:`fewflow.control.envs.unicycle`) the pairs come in closed form from the nominal
model: under actuators ``g a + b`` the intended action is ``a_int = (a_plan - b) / g`` (clipped to the
action box). The context of a transition ``(s, a, s')`` is ``c = (a, e / dt)`` with
``e = s' - f_nom(s, a)`` the model error in the body frame of ``s`` (:func:`context_features`); the
unicycle is invariant to rigid motions, so ``c`` depends on the command and the actuators only, and one
transition with non-zero speed and turn rate identifies both gains.

What differs from the paper (inferred where it is silent, simplified where it is not about the flow):

* The paper detects a new regime when the model error exceeds a threshold, executes the raw planned
  action once as a probe and registers ``(state, action, error)`` as the regime's context. Here every
  executed transition is its own probe: the context is the latest *informative* transition (``|v|`` and
  ``|omega|`` above ``informative``) of the executed command and its nominal-model error, so no action is
  spent probing. While that error is below a threshold (the nominal regime) the plan is executed as is,
  as in the paper before a regime is registered; the training pairs still hold 20 % nominal rows
  (``e = 0``, identity), so the field is defined there too.
* The planner is a small CEM MPC on the analytic nominal unicycle instead of an MPC on a learned ensemble.
* The network is fewflow's residual :class:`~fewflow.models.MLP` with the context as its condition ``c``
  (the authors: separate action and dynamics encoders, H = 64).

Baselines compared by :func:`run_episode`: ``"none"`` (plan with the nominal model, execute the plan) and
``"finetune"`` (online model adaptation: the planner's model gains and biases are fitted to the recent
transitions by a few gradient steps per control step, the continual-learning alternative the paper
compares against).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fewflow._validate import FewflowError
from fewflow.control.envs.unicycle import (
    ACTION_HIGH,
    ACTION_LOW,
    CEMPlanner,
    Unicycle,
    body_frame_error,
    intended_action,
    recovery_steps,
    tracking_metrics,
    unicycle_step,
)

__all__ = [
    "CONTEXT_DIM",
    "ActionFlow",
    "EpisodeResult",
    "GainFitter",
    "action_pairs",
    "context_features",
    "run_episode",
    "train_action_flow",
]

CONTEXT_DIM = 5
MODES = ("none", "finetune", "actionfm")


def context_features(action: np.ndarray, error: np.ndarray, dt: float) -> np.ndarray:
    """The dynamics context ``c = (a / a_max, e / dt)`` of executed commands ``(..., 2)`` and their
    body-frame model errors ``(..., 3)`` (:func:`~fewflow.control.envs.unicycle.body_frame_error`)."""
    a = np.asarray(action, dtype=np.float64) / ACTION_HIGH
    e = np.asarray(error, dtype=np.float64) / dt
    return np.concatenate([a, e], axis=-1)


def _check_gains_list(gains: Sequence[Sequence[float]]) -> np.ndarray:
    g = np.asarray(gains, dtype=np.float64)
    if g.ndim != 2 or g.shape[1] != 2 or len(g) == 0:
        raise FewflowError(f"gains must be a non-empty list of (g_v, g_w) pairs, got shape {g.shape}")
    if not np.all(np.isfinite(g)) or np.any(np.abs(g) < 1e-3):
        raise FewflowError("gains must be finite and non-zero")
    return g


def action_pairs(
    n: int, gains: Sequence[Sequence[float]], *, dt: float = 0.2, nominal_share: float = 0.2,
    informative: float = 0.2, seed: int = 0,
) -> dict[str, np.ndarray]:
    """Offline training data of Action FM, from the nominal model alone.

    Each row draws actuator gains (the nominal ``(1, 1)`` with probability ``nominal_share``, else one of
    ``gains``), a probe command ``a`` (uniform in the action box with ``|a| >= informative`` times the
    bounds in both components) whose nominal-model error under those gains gives the context ``c``, and a
    planned command ``a_plan`` (uniform in the box) with its intended command ``a_int = a_plan / g``
    (clipped). Returns float32 arrays ``plan``, ``intended`` (both ``(n, 2)``, scaled by the action bounds
    to ``[-1, 1]``), ``c`` ``(n, 5)`` and ``gains`` ``(n, 2)``."""
    if not isinstance(n, int) or n < 1:
        raise FewflowError(f"n must be a positive int, got {n!r}")
    if not 0.0 <= nominal_share <= 1.0:
        raise FewflowError(f"nominal_share must lie in [0, 1], got {nominal_share}")
    glist = _check_gains_list(gains)
    rng = np.random.default_rng(seed)
    g = glist[rng.integers(len(glist), size=n)]
    g[rng.random(n) < nominal_share] = 1.0
    mag = rng.uniform(informative, 1.0, size=(n, 2)) * rng.choice([-1.0, 1.0], size=(n, 2))
    probe = mag * ACTION_HIGH
    s0 = np.zeros((n, 3))
    s0[:, 2] = rng.uniform(-math.pi, math.pi, n)
    err = body_frame_error(s0, unicycle_step(s0, probe, dt, g), unicycle_step(s0, probe, dt))
    plan = rng.uniform(ACTION_LOW, ACTION_HIGH, size=(n, 2))
    inten = intended_action(plan, g)
    return {
        "plan": (plan / ACTION_HIGH).astype(np.float32),
        "intended": (inten / ACTION_HIGH).astype(np.float32),
        "c": context_features(probe, err, dt).astype(np.float32),
        "gains": g.astype(np.float32),
    }


class ActionFlow:
    """A trained Action FM field with its sampler: ``flow(a_plan, c) -> a_int``.

    ``model`` is a velocity model ``v(x, t, c=...)`` on actions scaled to ``[-1, 1]``; :meth:`__call__`
    takes and returns commands in the environment's units, ``(2,)`` or ``(B, 2)``, with contexts
    ``(5,)`` or ``(B, 5)``, integrating ``steps`` steps of ``stepper`` from ``t = 0`` (the plan) to
    ``t = 1`` (the intended command), then clipping into the action box."""

    def __init__(self, model: nn.Module, steps: int = 10, stepper: str = "midpoint") -> None:
        self.model, self.steps, self.stepper = model, int(steps), stepper

    @torch.no_grad()
    def __call__(self, plan: np.ndarray, c: np.ndarray) -> np.ndarray:
        from fewflow.solvers import solve

        plan = np.asarray(plan, dtype=np.float64)
        c = np.asarray(c, dtype=np.float64)
        single = plan.ndim == 1
        p2, c2 = np.atleast_2d(plan), np.atleast_2d(c)
        if p2.shape[1] != 2 or c2.shape != (p2.shape[0], CONTEXT_DIM):
            raise FewflowError(f"ActionFlow needs plans (B, 2) and contexts (B, {CONTEXT_DIM}), got "
                               f"{plan.shape} and {c.shape}")
        if not (np.all(np.isfinite(p2)) and np.all(np.isfinite(c2))):
            raise FewflowError("ActionFlow: plan and context must be finite")
        ref = next(self.model.parameters())
        x0 = torch.as_tensor(p2 / ACTION_HIGH, dtype=ref.dtype, device=ref.device)
        ct = torch.as_tensor(c2, dtype=ref.dtype, device=ref.device)
        out = solve(self.model, x0, steps=self.steps, stepper=self.stepper, cond={"c": ct}).x
        a = np.clip(out.cpu().double().numpy() * ACTION_HIGH, ACTION_LOW, ACTION_HIGH)
        return a[0] if single else a


def train_action_flow(
    data: dict[str, np.ndarray], *, steps: int = 2000, batch_size: int = 256, lr: float = 1e-3,
    hidden: int = 64, depth: int = 3, seed: int = 0, device: str | torch.device = "cpu",
) -> ActionFlow:
    """Train the Action FM field on :func:`action_pairs` data with fewflow's trainer and CFM loss on fixed
    pairs (``x0 = a_plan``, ``x1 = a_int``, condition ``c``; linear path, uniform t), Adam (AdamW without
    decay) and a cosine learning rate. Returns an :class:`ActionFlow` (10 midpoint steps)."""
    from fewflow.models import MLP
    from fewflow.objectives.cfm import CFMLoss
    from fewflow.paths import AffinePath
    from fewflow.train import TrainConfig, Trainer

    for k in ("plan", "intended", "c"):
        if k not in data:
            raise FewflowError(f"Action FM data needs the key {k!r} (see action_pairs)")
    x0 = torch.as_tensor(data["plan"], dtype=torch.float32, device=device)
    x1 = torch.as_tensor(data["intended"], dtype=torch.float32, device=device)
    c = torch.as_tensor(data["c"], dtype=torch.float32, device=device)
    if x0.shape != x1.shape or x0.dim() != 2 or x0.shape[1] != 2 or c.shape != (x0.shape[0], CONTEXT_DIM):
        raise FewflowError(f"Action FM data: plan/intended (N, 2) and c (N, {CONTEXT_DIM}) expected, got "
                           f"{tuple(x0.shape)}, {tuple(x1.shape)}, {tuple(c.shape)}")
    if x0.shape[0] == 0:
        raise FewflowError("Action FM data is empty")
    for name, t in (("plan", x0), ("intended", x1), ("c", c)):
        if not torch.isfinite(t).all():
            raise FewflowError(f"Action FM data {name!r} contains NaN or inf")
    torch.manual_seed(seed)
    model = MLP(2, hidden=hidden, depth=depth, cond_dim=CONTEXT_DIM).to(device)
    n, bs = x0.shape[0], min(batch_size, x0.shape[0])

    def pairs() -> Any:  # fixed (planned, intended) pairs with their context, drawn with replacement
        gen = torch.Generator(device=device).manual_seed(seed)
        while True:
            idx = torch.randint(0, n, (bs,), generator=gen, device=device)
            yield {"x1": x1[idx], "x0": x0[idx], "c": c[idx]}

    tc = TrainConfig(steps=steps, batch_size=bs, lr=lr, lr_schedule="cosine", grad_clip=None, ema_decay=None,
                     progress=False, log_every=0, ckpt_every=0, seed=seed, device=str(device))
    Trainer(model, CFMLoss(AffinePath("linear")), pairs(), tc).fit()
    model.eval()
    return ActionFlow(model)


# ------------------------------------------------------------------------------------- online fine-tuning


def _step_torch(state: Tensor, action: Tensor, dt: float, gains: Tensor, bias: Tensor) -> Tensor:
    eff = action * gains + bias
    u, w = eff[..., 0], eff[..., 1]
    th = state[..., 2]
    th1 = th + w * dt
    small = w.abs() < 1e-4
    w_safe = torch.where(small, torch.ones_like(w), w)
    r = u / w_safe
    dx = torch.where(small, u * dt * torch.cos(th + 0.5 * w * dt), r * (torch.sin(th1) - torch.sin(th)))
    dy = torch.where(small, u * dt * torch.sin(th + 0.5 * w * dt), -r * (torch.cos(th1) - torch.cos(th)))
    return torch.stack([state[..., 0] + dx, state[..., 1] + dy, th1], dim=-1)


class GainFitter:
    """Online model adaptation: actuator gains and biases of the planner's model fitted to the last
    ``window`` transitions by ``iters`` Adam steps (learning rate ``lr``) per control step, minimising the
    squared one-step prediction error (heading error wrapped)."""

    def __init__(self, dt: float, window: int = 10, iters: int = 10, lr: float = 0.05) -> None:
        self.dt, self.window, self.iters = dt, window, iters
        self.params = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64, requires_grad=True)
        self.opt = torch.optim.Adam([self.params], lr=lr)
        self.buf: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    @property
    def gains(self) -> np.ndarray:
        return self.params.detach()[:2].numpy().copy()

    @property
    def bias(self) -> np.ndarray:
        return self.params.detach()[2:].numpy().copy()

    def update(self, s: np.ndarray, a: np.ndarray, s_next: np.ndarray) -> None:
        self.buf = (self.buf + [(s, a, s_next)])[-self.window:]
        S = torch.as_tensor(np.stack([b[0] for b in self.buf]))
        A = torch.as_tensor(np.stack([b[1] for b in self.buf]))
        N = torch.as_tensor(np.stack([b[2] for b in self.buf]))
        for _ in range(self.iters):
            pred = _step_torch(S, A, self.dt, self.params[:2], self.params[2:])
            d = pred - N
            d = torch.cat([d[:, :2], torch.atan2(torch.sin(d[:, 2:]), torch.cos(d[:, 2:]))], dim=1)
            loss = (d / self.dt).pow(2).sum(1).mean()
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()


# --------------------------------------------------------------------------------------------- episodes


@dataclass
class EpisodeResult:
    """One tracking episode: :class:`~fewflow.control.envs.unicycle.TrackingMetrics` fields plus
    ``adapt_steps`` (steps after the switch until the plan-consistency error stays below ``plan_tol``),
    the per-step ``cross_track`` and ``plan_error`` lists and the ``states`` visited ``(T + 1, 3)``.

    The plan-consistency error of a step is ``|| s' - f_model(s, a_plan) ||`` (body frame, heading in
    radians): how far the robot's motion is from what the planner planned with its model (the nominal
    one, or the fitted one for ``"finetune"``); it is what each adaptation tries to drive to zero. Without
    adaptation it stays large, and ``adapt_steps`` is then every step left after the switch.
    ``plan_err_after`` is its mean over the ``window`` steps after the switch (how fast and how well the
    adaptation restores the planned motion)."""

    mode: str
    metrics: dict[str, Any]
    cross_track: list[float] = field(default_factory=list)
    plan_error: list[float] = field(default_factory=list)
    states: np.ndarray | None = None

    def row(self) -> dict[str, Any]:
        return {"mode": self.mode, **self.metrics}


def run_episode(
    env: Unicycle, mode: str, *, flow: ActionFlow | None = None, seed: int = 0, informative: float = 0.2,
    planner_kwargs: dict[str, Any] | None = None, fitter_kwargs: dict[str, Any] | None = None,
    plan_tol: float = 0.03, window: int = 20, regime_tol: float = 0.01,
) -> EpisodeResult:
    """Track the figure-8 in ``env`` with the nominal CEM planner and the adaptation ``mode``:

    * ``"none"``: execute the planned command;
    * ``"finetune"``: the planner's model uses gains/biases fitted online (:class:`GainFitter`);
    * ``"actionfm"``: execute ``flow(a_plan, c)`` with ``c`` the context of the latest informative
      transition (module docstring); while that transition's model error is below ``regime_tol`` (the
      nominal regime) or before any, execute the plan itself, as the paper does before it registers a
      new regime.
    """
    if mode not in MODES:
        raise FewflowError(f"mode must be one of {list(MODES)}, got {mode!r}")
    if mode == "actionfm" and flow is None:
        raise FewflowError("mode 'actionfm' needs a trained flow (train_action_flow)")
    if not isinstance(env, Unicycle):
        raise FewflowError(f"run_episode needs a Unicycle environment, got {type(env).__name__}")
    env.reset(seed=seed)
    planner = CEMPlanner(env, seed=seed, **(planner_kwargs or {}))
    fitter = GainFitter(env.dt, **(fitter_kwargs or {})) if mode == "finetune" else None
    ctx: np.ndarray | None = None
    states = [env.state.copy()]
    cte: list[float] = []
    perr: list[float] = []
    done = False
    while not done:
        s = env.state.copy()
        if fitter is not None:
            planner.gains, planner.bias = fitter.gains, fitter.bias
        a_plan = planner.plan(s, env.target)
        a_exec = flow(a_plan, ctx) if (mode == "actionfm" and ctx is not None) else a_plan
        a_exec = np.clip(a_exec, ACTION_LOW, ACTION_HIGH)
        _, _, done, info = env.step(a_exec)
        s1 = env.state.copy()
        states.append(s1)
        cte.append(float(info["cross_track"]))
        planned_next = unicycle_step(s, a_plan, env.dt, planner.gains, planner.bias)
        perr.append(float(np.linalg.norm(body_frame_error(s, s1, planned_next))))
        if fitter is not None:
            fitter.update(s, a_exec, s1)
        if mode == "actionfm" and np.all(np.abs(a_exec) >= informative * ACTION_HIGH):
            err = body_frame_error(s, s1, unicycle_step(s, a_exec, env.dt))
            ctx = context_features(a_exec, err, env.dt) if np.linalg.norm(err) > regime_tol else None
    m = asdict(tracking_metrics(env, cte))
    ks = env.switch_step or 0
    m["adapt_steps"] = recovery_steps(perr, ks, plan_tol)
    m["plan_err_after"] = float(np.mean(perr[ks:ks + window])) if len(perr) > ks else 0.0
    return EpisodeResult(mode, m, cte, perr, np.stack(states))
