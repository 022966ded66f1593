"""Benchmark part: GoalFlow against plain conditional flow matching on ``nav2d`` plans ("GoalFlow:
Goal-Driven Flow Matching for Multimodal Trajectories Generation in End-to-End Autonomous Driving", Xing
et al., CVPR 2025, arXiv 2503.05689).

Expert demonstrations of a two-corridor ``nav2d`` map (the expert picks a corridor at random, so plans
from one position are bimodal) are cut into 8-waypoint plans (every 3rd step, :func:`fewflow.control.
goalflow.plan_chunks`). :func:`fewflow.control.goalflow.fit_goalflow` fits the goal vocabulary (k-means of
plan end points), the imitation scorer, the goal-conditioned flow and the plain conditional-FM baseline
(same MLP, loss and source, condition = position only). On held-out demonstrations, from each test
position, ``K`` plans are drawn: GoalFlow's top-``K`` goals with one plan each (1 Euler step, nearest end
point to the goal of ``anchors`` draws), plain FM's ``K`` draws at 1 step, and plain FM at 8 steps as a
reference. Reported: off-road rate (plans leaving the drivable area along their segments), min-ADE and
min-FDE over the ``K`` plans against the demonstrated plan, and corridors covered from positions below
the wall.

Claims, fixed before running: at 1 step GoalFlow (1) has a lower off-road rate and (2) a lower min-ADE
and min-FDE than plain conditional FM.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fewflow._validate import FewflowError
from fewflow.bench.common import cached_row, format_table

__all__ = ["SIZES", "part"]

TITLE = "GoalFlow: goal-driven 1-step plans on nav2d (arXiv 2503.05689)"
VERSION = 2
ENV_KW = {"n_corridors": 2}
SIZES: dict[str, dict[str, Any]] = {
    "smoke": {"train_eps": 30, "test_eps": 6, "steps": 100, "hidden": 32, "depth": 2, "vocab": 16, "k": 4,
              "anchors": 8, "every": 8},
    "quick": {"train_eps": 150, "test_eps": 30, "steps": 600, "hidden": 64, "depth": 3, "vocab": 32, "k": 6,
              "anchors": 16, "every": 5},
    "full": {"train_eps": 300, "test_eps": 60, "steps": 2000, "hidden": 128, "depth": 3, "vocab": 48, "k": 6,
             "anchors": 16, "every": 3},
}
METHODS = (("goalflow", 1), ("plain", 1), ("plain", 8))


def _say(verbose: bool, msg: str) -> None:
    if verbose:
        print(msg, flush=True)


def _label(method: str, steps: int) -> str:
    name = "GoalFlow" if method == "goalflow" else "plain cond. FM"
    return f"{name} ({steps} step{'s' if steps > 1 else ''})"


def _evaluate(gf: Any, env: Any, pos: np.ndarray, plans: np.ndarray, s: dict[str, Any]
              ) -> list[dict[str, Any]]:
    from fewflow.control.goalflow import min_ade_fde, offroad_rate

    out = []
    below = pos[:, 1] < -env.wall_half
    for method, steps in METHODS:
        off, ade, fde, cov, top1 = [], [], [], [], []
        t0 = time.perf_counter()
        for i in range(len(pos)):
            if method == "goalflow":
                smp, _ = gf.sample(pos[i], s["k"], steps=steps, seed=i)
            else:
                smp = gf.sample_plain(pos[i], s["k"], steps=steps, seed=i)
            off.append(offroad_rate(env, pos[i], smp))
            top1.append(offroad_rate(env, pos[i], smp[:1]))
            a, f = min_ade_fde(smp, plans[i])
            ade.append(a)
            fde.append(f)
            if below[i]:
                cors = {env.corridor_of(np.concatenate([pos[i][None], p])) for p in smp}
                cov.append(len(cors - {-1}))
        out.append({"method": method, "steps": steps, "offroad": float(np.mean(off)),
                    "offroad_top1": float(np.mean(top1)), "min_ade": float(np.mean(ade)),
                    "min_fde": float(np.mean(fde)), "corridors": float(np.mean(cov)) if cov else float("nan"),
                    "n_positions": int(len(pos)), "wall_s": round(time.perf_counter() - t0, 2)})
    return out


def _plot(gf: Any, env: Any, pos: np.ndarray, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Circle, Rectangle
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 5))
    start = pos[int(np.argmin(pos[:, 1]))]
    for ax, method in zip(axes, ("goalflow", "plain")):
        for o in env.obstacles:
            ax.add_patch(Rectangle((o[0], o[1]), o[2] - o[0], o[3] - o[1], color="0.3"))
        ax.add_patch(Circle(tuple(env.goal), env.goal_radius, color="tab:green", alpha=0.3))
        ax.scatter(gf.vocab[:, 0], gf.vocab[:, 1], s=6, color="0.6", label="goal vocabulary")
        if method == "goalflow":
            smp, goals = gf.sample(start, 6, seed=0)
            ax.scatter(goals[:, 0], goals[:, 1], marker="*", s=90, color="tab:orange", label="selected goals")
            title = "GoalFlow, 1 step"
        else:
            smp = gf.sample_plain(start, 6, seed=0)
            title = "plain conditional FM, 1 step"
        for p in smp:
            full = np.concatenate([start[None], p])
            ax.plot(full[:, 0], full[:, 1], "-o", ms=2, color="tab:blue", lw=1)
        ax.plot(*start, "ks", ms=6)
        ax.set_xlim(-1, 1)
        ax.set_ylim(-1, 1)
        ax.set_aspect("equal")
        ax.set_title(title)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _run(root: Path, s: dict[str, Any], seed: int, verbose: bool, plot: bool) -> dict[str, Any]:
    from fewflow.control.demos import collect_demos
    from fewflow.control.envs import make_env
    from fewflow.control.goalflow import GoalFlowConfig, fit_goalflow, plan_chunks

    env = make_env("nav2d", **ENV_KW)
    train = collect_demos("nav2d", s["train_eps"], seed=seed, **ENV_KW)
    test = collect_demos("nav2d", s["test_eps"], seed=seed + 100_000, **ENV_KW)
    pos, plans = plan_chunks(train)
    tpos, tplans = plan_chunks(test, every=s["every"])
    cfg = GoalFlowConfig(vocab=s["vocab"], hidden=s["hidden"], depth=s["depth"], steps=s["steps"],
                         anchors=s["anchors"])
    t0 = time.perf_counter()
    gf = fit_goalflow(env, pos, plans, cfg, seed=seed)
    fit_s = time.perf_counter() - t0
    _say(verbose, f"  fitted GoalFlow + plain FM on {len(pos)} plans ({fit_s:.0f} s)")
    rows = _evaluate(gf, env, tpos, tplans, s)
    for r in rows:
        r.update({"dataset": "nav2d", "fit_s": round(fit_s, 1), "dac_fraction": float(gf.dac.mean())})
    png = _plot(gf, env, tpos, root / "goalflow.png") if plot else None
    return {"rows": rows, "plot": str(png) if png is not None else None}


def _claims(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by = {(r["method"], r["steps"]): r for r in rows}
    g, p = by[("goalflow", 1)], by[("plain", 1)]
    return [
        {"claim": "at 1 step GoalFlow's plans leave the drivable area less often than plain conditional FM's",
         "dataset": "nav2d", "met": bool(g["offroad"] < p["offroad"]),
         "value": f"off-road {g['offroad']:.3f} (GoalFlow) vs {p['offroad']:.3f} (plain FM)"},
        {"claim": "at 1 step GoalFlow's K plans cover the demonstrated plan better (lower min-ADE and "
                  "min-FDE)",
         "dataset": "nav2d", "met": bool(g["min_ade"] < p["min_ade"] and g["min_fde"] < p["min_fde"]),
         "value": f"min-ADE {g['min_ade']:.3f} vs {p['min_ade']:.3f}, min-FDE {g['min_fde']:.3f} vs "
                  f"{p['min_fde']:.3f} (GoalFlow vs plain FM)"},
    ]


def part(mode: str, cache: Path, seed: int = 0, verbose: bool = True) -> dict[str, Any]:
    """Run the GoalFlow part in ``mode`` ("smoke", "quick" or "full"); see the module docstring."""
    if mode not in SIZES:
        raise FewflowError(f"mode must be one of {list(SIZES)}, got {mode!r}")
    torch.set_num_threads(1)
    s = SIZES[mode]
    root = Path(cache) / "ctl_goalflow" / f"{mode}-v{VERSION}-seed{seed}"
    res = cached_row(root / "rows", "all", lambda: _run(root, s, seed, verbose, plot=mode != "smoke"))
    rows = res["rows"]
    claims = _claims(rows)
    table = format_table(
        ["sampler", "off-road rate (K plans)", "off-road rate (first plan)", f"min-ADE (K={s['k']})",
         f"min-FDE (K={s['k']})", "corridors covered"],
        [[_label(r["method"], r["steps"]), r["offroad"], r["offroad_top1"], r["min_ade"], r["min_fde"],
          r["corridors"]] for r in rows],
    )
    lines = [
        f"## {TITLE}",
        "",
        f"Two-corridor `nav2d`; {s['train_eps']} training and {s['test_eps']} held-out expert episodes cut "
        f"into 8-waypoint plans (every 3rd step). GoalFlow: {s['vocab']}-goal k-means vocabulary, imitation "
        "scorer + drivable-area compliance (S = 0.1 log softmax S_im + 3 log DAC), goal-conditioned flow "
        f"(MLP {s['hidden']}x{s['depth']}, {s['steps']} steps, L1, source N(0, 0.1^2)), {s['anchors']} draws "
        "per goal, nearest end point to the goal kept. Plain conditional FM: same network, loss and source, "
        f"conditioned on the position only. {rows[0]['n_positions']} test positions; mode {mode}.",
        "",
        table,
        "",
    ]
    out: dict[str, Any] = {"rows": rows, "claims": claims}
    if res.get("plot"):
        out["plots"] = [res["plot"]]
        name = Path(res["plot"]).name
        lines += [f"Plot: `{name}` (plans from the lowest test position, goals starred).", ""]
    out["lines"] = lines
    return out
