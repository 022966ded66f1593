"""Benchmark part: Action Flow Matching on the unicycle figure-8 with actuator gain switches ("Action Flow
Matching for Continual Robot Learning", Murillo-Gonzalez & Liu, RSS 2025, arXiv 2504.18471).

One Action FM field is trained offline on pairs generated from the nominal model alone
(:func:`fewflow.control.actionfm.action_pairs`) for a fixed list of gain changes (``TRAINED``: five
positive-gain changes whose intended commands stay inside the action box, plus a turn-sign flip). Each
gain change is then switched on at step ``switch`` of a two-lap figure-8 episode tracked by the nominal
CEM planner with three adaptations (:func:`fewflow.control.actionfm.run_episode`): none, online
fine-tuning of the model's gains and biases, and Action FM. Reported per gain change and adaptation: the
plan-consistency error (how far the motion is from the planned one) averaged over the 20 steps after the
switch, the steps until it stays below 0.03, the post-switch cross-track error, waypoints reached and
episode length. Extra rows (full mode): a gain change not in the training list and a weakened actuator
whose intended commands leave the action box (no action correction can restore it).

Claims, fixed before running: on the five positive trained changes Action FM's mean post-switch
plan-consistency error is lower than (1) no adaptation's and (2) online fine-tuning's; (3) its mean
post-switch cross-track error is lower than both baselines'.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fewflow._validate import FewflowError
from fewflow.bench.common import cached_row, format_table

__all__ = ["CLAIM_SET", "SIZES", "TRAINED", "part"]

TITLE = "Action Flow Matching: unicycle figure-8 with actuator gain switches (arXiv 2504.18471)"
VERSION = 3
# the positive-gain changes of the claims, and the trained sign flip
CLAIM_SET: list[tuple[float, float]] = [(2.0, 1.0), (1.0, 2.5), (1.6, 1.8), (2.5, 2.5), (1.3, 3.0)]
TRAINED: list[tuple[float, float]] = [*CLAIM_SET, (1.0, -1.0)]
EXTRA: dict[str, list[tuple[float, float]]] = {"trained sign flip": [(1.0, -1.0)], "unseen": [(1.8, 2.2)],
                                                "weakened": [(0.6, 0.6)]}
MODES = ("none", "finetune", "actionfm")

SIZES: dict[str, dict[str, Any]] = {
    "smoke": {"claim_gains": CLAIM_SET[:1], "extra": False, "seeds": (0,), "pairs": 3000, "steps": 120,
              "hidden": 32, "depth": 2, "laps": 1, "switch": 15, "max_steps": 80},
    "quick": {"claim_gains": CLAIM_SET, "extra": False, "seeds": (0,), "pairs": 10000, "steps": 800,
              "hidden": 64, "depth": 2, "laps": 2, "switch": 30, "max_steps": 300},
    "full": {"claim_gains": CLAIM_SET, "extra": True, "seeds": (0, 1, 2), "pairs": 20000, "steps": 3000,
             "hidden": 96, "depth": 2, "laps": 2, "switch": 30, "max_steps": 300},
}


def _say(verbose: bool, msg: str) -> None:
    if verbose:
        print(msg, flush=True)


def _gname(g: tuple[float, float]) -> str:
    return f"({g[0]:g}, {g[1]:g})"


def _flow(cache: Path, s: dict[str, Any], seed: int, verbose: bool) -> Any:
    """The Action FM field, trained once and cached as a state dict."""
    from fewflow.control.actionfm import CONTEXT_DIM, ActionFlow, action_pairs, train_action_flow
    from fewflow.models import MLP

    path = cache / "flow.pt"
    if path.exists():
        model = MLP(2, hidden=s["hidden"], depth=s["depth"], cond_dim=CONTEXT_DIM)
        model.load_state_dict(torch.load(path, weights_only=True))
        model.eval()
        return ActionFlow(model)
    t0 = time.perf_counter()
    data = action_pairs(s["pairs"], TRAINED, seed=seed)
    flow = train_action_flow(data, steps=s["steps"], hidden=s["hidden"], depth=s["depth"], lr=3e-3, seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(flow.model.state_dict(), tmp)
    tmp.replace(path)
    _say(verbose, f"  trained Action FM ({s['steps']} steps, {time.perf_counter() - t0:.0f} s)")
    return flow


def _env(g: tuple[float, float], s: dict[str, Any]) -> Any:
    from fewflow.control.envs import make_env

    return make_env("unicycle", laps=s["laps"], max_steps=s["max_steps"], switch_step=s["switch"],
                    switch_gains=g)


def _episode(g: tuple[float, float], group: str, mode: str, ep_seed: int, flow: Any, s: dict[str, Any]
             ) -> dict[str, Any]:
    from fewflow.control.actionfm import run_episode

    t0 = time.perf_counter()
    res = run_episode(_env(g, s), mode, flow=flow, seed=ep_seed)
    return {"gains": _gname(g), "group": group, "mode": mode, "seed": ep_seed, **res.metrics,
            "wall_s": round(time.perf_counter() - t0, 2)}


def _mean(rows: list[dict[str, Any]], key: str) -> float:
    return float(np.mean([r[key] for r in rows])) if rows else float("nan")


def _claims(rows: list[dict[str, Any]], s: dict[str, Any]) -> list[dict[str, Any]]:
    names = {_gname(g) for g in s["claim_gains"]}
    sel = {m: [r for r in rows if r["mode"] == m and r["gains"] in names] for m in MODES}
    pe = {m: _mean(sel[m], "plan_err_after") for m in MODES}
    ct = {m: _mean(sel[m], "cte_after") for m in MODES}
    # the recovery time itself: steps until the plan-consistency error falls below its tolerance, median
    # over the trained gain changes and seeds (an episode that never recovers counts its remaining steps)
    rs = {m: float(np.median([r["adapt_steps"] for r in sel[m]])) if sel[m] else float("nan") for m in MODES}
    ds = "unicycle"
    return [
        {"claim": "after trained gain changes Action FM restores the planned motion faster than no "
                  "adaptation (mean plan-consistency error over the 20 steps after the switch)",
         "dataset": ds, "met": bool(pe["actionfm"] < pe["none"]),
         "value": f"{pe['actionfm']:.3f} (Action FM) vs {pe['none']:.3f} (none)"},
        {"claim": "... and faster than online fine-tuning of the model's gains (same measure)",
         "dataset": ds, "met": bool(pe["actionfm"] < pe["finetune"]),
         "value": f"{pe['actionfm']:.3f} (Action FM) vs {pe['finetune']:.3f} (fine-tuning)"},
        {"claim": "after trained gain changes Action FM tracks the figure-8 better than both baselines "
                  "(mean post-switch cross-track error)",
         "dataset": ds, "met": bool(ct["actionfm"] < min(ct["none"], ct["finetune"])),
         "value": f"{ct['actionfm']:.3f} m (Action FM) vs {ct['none']:.3f} (none), "
                  f"{ct['finetune']:.3f} (fine-tuning)"},
        {"claim": "after trained gain changes Action FM recovers in fewer steps than online fine-tuning "
                  "(median steps until the plan-consistency error is below 0.03)",
         "dataset": ds, "met": bool(rs["actionfm"] < rs["finetune"]),
         "value": f"{rs['actionfm']:.1f} (Action FM) vs {rs['finetune']:.1f} (fine-tuning), "
                  f"{rs['none']:.1f} (none)"},
    ]


def _plot(flow: Any, s: dict[str, Any], path: Path) -> Path | None:
    """Tracks of the three adaptations around the switch to (2, 1), and their plan-consistency errors."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from fewflow.control.actionfm import run_episode

    g = s["claim_gains"][0]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    env = _env(g, s)
    axes[0].plot(env.dense[:, 0], env.dense[:, 1], color="0.8", lw=6, label="track")
    colors = {"none": "tab:red", "finetune": "tab:orange", "actionfm": "tab:blue"}
    for mode in MODES:
        res = run_episode(_env(g, s), mode, flow=flow, seed=0)
        st = res.states
        axes[0].plot(st[:, 0], st[:, 1], color=colors[mode], lw=1.2, label=mode)
        k = s["switch"]
        axes[0].plot(st[k, 0], st[k, 1], "k*", ms=10)
        axes[1].plot(np.arange(1, len(res.plan_error) + 1), res.plan_error, color=colors[mode], label=mode)
    axes[1].axvline(s["switch"], color="k", ls="--", lw=0.8)
    axes[0].set_title(f"gains switch to {_gname(g)} at the star")
    axes[0].set_aspect("equal")
    axes[0].legend(fontsize=8)
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("plan-consistency error")
    axes[1].set_yscale("log")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def part(mode: str, cache: Path, seed: int = 0, verbose: bool = True) -> dict[str, Any]:
    """Run the Action FM part in ``mode`` ("smoke", "quick" or "full"); see the module docstring."""
    if mode not in SIZES:
        raise FewflowError(f"mode must be one of {list(SIZES)}, got {mode!r}")
    torch.set_num_threads(1)
    s = SIZES[mode]
    root = Path(cache) / "ctl_actionfm" / f"{mode}-v{VERSION}-seed{seed}"
    flow = _flow(root, s, seed, verbose)
    groups: list[tuple[str, tuple[float, float]]] = [("trained", g) for g in s["claim_gains"]]
    if s["extra"]:
        groups += [(name, g) for name, gl in EXTRA.items() for g in gl]
    rows = []
    for group, g in groups:
        for m in MODES:
            for ep in s["seeds"]:
                key = f"{g[0]:g}_{g[1]:g}-{m}-{ep + seed}"
                rows.append(cached_row(root / "rows", key,
                                       lambda g=g, group=group, m=m, ep=ep:
                                       _episode(g, group, m, ep + seed, flow, s)))
            sel = [r for r in rows if r["gains"] == _gname(g) and r["mode"] == m]
            _say(verbose, f"  {_gname(g)} {m}: plan err {_mean(sel, 'plan_err_after'):.3f}, cte "
                          f"{_mean(sel, 'cte_after'):.3f}")
    claims = _claims(rows, s)
    table_rows = []
    for group, g in groups:
        for m in MODES:
            sel = [r for r in rows if r["gains"] == _gname(g) and r["mode"] == m]
            table_rows.append([_gname(g), group, m, _mean(sel, "plan_err_after"), _mean(sel, "adapt_steps"),
                               _mean(sel, "cte_after"), _mean(sel, "reached"), _mean(sel, "steps")])
    table = format_table(["gains after switch", "set", "adaptation", "plan error (20 steps)",
                          "steps to plan error < 0.03", "cross-track after (m)", "waypoints reached",
                          "episode steps"], table_rows)
    out: dict[str, Any] = {"rows": rows, "claims": claims}
    plot = _plot(flow, s, root / "actionfm.png") if mode != "smoke" else None
    n_wp = 60 * s["laps"]
    lines = [
        f"## {TITLE}",
        "",
        f"Unicycle (dt 0.2 s, v in [-1, 1], omega in [-pi/2, pi/2]) tracking {s['laps']} lap(s) of a "
        f"figure-8 ({n_wp} waypoints) with a nominal CEM planner (horizon 5, 128 samples, 3 iterations); "
        f"the actuator gains (g_v, g_w) switch at step {s['switch']}. Action FM: fewflow MLP "
        f"{s['hidden']}x{s['depth']} trained {s['steps']} steps on {s['pairs']} offline pairs of the gain "
        f"list {', '.join(_gname(g) for g in TRAINED)} (and nominal), 10 midpoint steps per action. "
        "Fine-tuning: gains and biases fitted online (10 Adam steps per control step on the last 10 "
        f"transitions). Means over {len(s['seeds'])} seed(s); mode {mode}.",
        "",
        table,
        "",
    ]
    if plot is not None:
        out["plots"] = [str(plot)]
        lines += [f"Plot: `{plot.name}` (tracks around the switch and the plan-consistency error).", ""]
    out["lines"] = lines
    return out
