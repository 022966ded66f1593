"""Benchmark part: flow policies from few demonstrations — FM with 10 Euler steps, the 1-NFE MeanFlow
policy (MP1, arXiv 2507.10543) and MeanFlow with DM1's dispersive losses (arXiv 2510.07865).

For each environment (``nav2d``: a point robot crossing a wall through one of three corridors, a
multimodal expert; ``pusht``: Push-T with state observations) and each number of expert demonstrations,
one run per policy is trained by :func:`fewflow.control.policy.train_policy` (the same
:class:`fewflow.models.policy.ActionChunkNet`, steps, batch, cosine learning-rate schedule and seed for
all, so that every policy gets the same budget; in full mode 3000 steps, enough for both flow matching
and MeanFlow to stop improving on nav2d's largest demo set; observation history 2,
action chunks of 8, the first 4 executed) and rolled out closed-loop by
:func:`fewflow.control.rollout.rollout` from evaluation start states disjoint from the demonstrations':

* ``fm10``: flow matching (``cfm``), 10 Euler steps;
* ``mf1``: ``mp1`` with ``dispersive = "none"`` and MP1's MeanFlow settings (:data:`MP1_SETTINGS`:
  logit-normal time pairs, ``s = t`` on half of each batch, adaptive weight ``p = 0.5``), one flow-map jump;
* ``mf1_<kind>``: ``mp1`` with the dispersive loss ``kind`` (weight 0.5, tau 1), in the low-demo regime
  (the smallest demo count) only;
* ``noise`` (a reference, no training): the chunk is the source draw ``x0 ~ N(0, I)`` itself, clipped
  and unnormalised like a policy's output. nav2d's expert always moves up and the robot slides along
  walls, so this reaches the goal in about half of the episodes: learned policies are compared with it.

Measured: success rate, latency of one policy call (one chunk, in ms, on one CPU thread), and on nav2d
the mode coverage (the fraction of the three corridors that the successful episodes used) and the
collision rate. The claims, fixed before running: (1) MeanFlow-1 reaches FM-10's success within 5 points
at >= 5x lower latency (largest demo count, per environment); (2) each dispersive loss improves
MeanFlow-1's success at the smallest demo count (reported met or not); (3) on nav2d MeanFlow-1 uses all
three corridors at the largest demo count (one-step sampling keeps the expert's modes). Rows are cached
as JSON under ``cache``; trained runs have a ``DONE`` marker, so a rerun is instant and a killed run
resumes.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from fewflow._validate import FewflowError
from fewflow.bench.common import cached_row, format_table, train_once

__all__ = ["MP1_SETTINGS", "SIZES", "part"]

TITLE = "Flow policies from few demonstrations: FM-10 vs MeanFlow-1 (MP1) and dispersive losses (DM1)"
VERSION = 2  # 2: 3000 steps with a cosine schedule, MP1's MeanFlow settings, 200 nav2d episodes
DISPERSIVE_KINDS = ("infonce_l2", "infonce_cosine", "hinge", "covariance")
OBS_HORIZON, ACT_HORIZON, EXEC_HORIZON = 2, 8, 4

# MP1's MeanFlow settings (arXiv 2507.10543, its mp1.yaml): (s, t) from two sorted logit-normal(-0.4, 1)
# draws in its time (mean +0.4 in fewflow time), s = t on half of each batch (flow_ratio 0.5), adaptive
# weight power p = 1 - gamma = 0.5; given explicitly so the benchmark does not use mp1's small-scale recipe
MP1_SETTINGS: dict[str, Any] = {"time_pairs": "logit_normal", "time_mean": 0.4, "time_std": 1.0, "ratio": 0.5,
                                "adaptive_p": 0.5, "adaptive_c": 1e-3}

# per mode: environments, demo counts, dispersive kinds (smallest demo count), training and evaluation sizes;
# every policy of a mode trains the same steps with the same cosine learning-rate schedule (MP1 trains with
# a cosine schedule after a linear warm-up)
SIZES: dict[str, dict[str, Any]] = {
    "smoke": {"envs": {"nav2d": {"demos": (4,), "disp": ("infonce_l2",), "episodes": 2, "max_steps": 40}},
              "steps": 20, "hidden": 32, "depth": 2, "batch": 64, "warmup": 0},
    "quick": {"envs": {"nav2d": {"demos": (10, 50), "disp": ("infonce_l2",), "episodes": 20,
                                 "max_steps": None},
                       "pusht": {"demos": (10,), "disp": (), "episodes": 4, "max_steps": 200}},
              "steps": 300, "hidden": 128, "depth": 3, "batch": 128, "warmup": 30},
    "full": {"envs": {"nav2d": {"demos": (10, 50, 200), "disp": DISPERSIVE_KINDS, "episodes": 200,
                                "max_steps": None},
                      # Push-T needs more data, width and steps before FM-10 succeeds at all (1 in 20 at
                      # 200 demos, 256 x 3, 8000 steps; none at 50 or 200 demos with 128 x 3, 3000 steps):
                      # only the largest demo count fits the time budget
                      "pusht": {"demos": (200,), "disp": (), "episodes": 40, "max_steps": 300,
                                "train": {"hidden": 256, "steps": 8000}}},
             "steps": 3000, "hidden": 128, "depth": 3, "batch": 128, "warmup": 200},
}


def _say(verbose: bool, msg: str) -> None:
    if verbose:
        print(msg, flush=True)


def _sizes(s: dict[str, Any], env: dict[str, Any]) -> dict[str, Any]:
    """The mode's training sizes with the environment's overrides (``env["train"]``, e.g. a wider net)."""
    return {**s, **env.get("train", {})}


def _policies(n_demos: int, env: dict[str, Any]) -> list[tuple[str, str, dict[str, Any], int]]:
    """``(key, method, settings, nfe)`` of every policy trained at ``n_demos``."""
    out: list[tuple[str, str, dict[str, Any], int]] = [
        ("fm10", "cfm", {}, 10), ("mf1", "mp1", {**MP1_SETTINGS, "dispersive": "none"}, 1)]
    if n_demos == min(env["demos"]):
        out += [(f"mf1_{k}", "mp1", {**MP1_SETTINGS, "dispersive": k}, 1) for k in env["disp"]]
        out.append(("noise", "none", {}, 0))  # reference: an untrained sampler's chunks
    return out


class _NoisePolicy:
    """Reference policy: the chunk is the source draw itself, ``x0 ~ N(0, I)`` clipped to ``[-1, 1]`` and
    unnormalised with the demonstrations' statistics (what any policy outputs before training)."""

    def __init__(self, info: dict[str, Any], seed: int) -> None:
        self.info, self.rng = info, np.random.default_rng(seed)

    def __call__(self, obs_hist: np.ndarray) -> np.ndarray:
        from fewflow.control.demos import unnormalize

        a = np.clip(self.rng.standard_normal((self.info["act_horizon"], self.info["act_dim"])), -1.0, 1.0)
        return unnormalize(a, self.info["stats"]["act_min"], self.info["stats"]["act_max"])


def _demos(cache: Path, env_name: str, n: int, seed: int) -> Any:
    """The first ``n`` of the cached expert episodes of ``env_name`` (collected once, the largest count)."""
    from fewflow.control.demos import collect_demos, load_demos, save_demos

    path = cache / "demos" / f"{env_name}-seed{seed}.npz"
    if path.exists():
        d = load_demos(path)
        if d.n_episodes >= n:
            return d.select(np.arange(n))
    d = collect_demos(env_name, n, seed=seed)
    save_demos(d, path)
    return d


def _row(env_name: str, n_demos: int, key: str, method: str, settings: dict[str, Any], nfe: int,
         s: dict[str, Any], e: dict[str, Any], demos: Any, cache: Path, seed: int, verbose: bool
         ) -> dict[str, Any]:
    from fewflow.control.envs import make_env
    from fewflow.control.policy import policy_from_run, policy_run_config, read_policy_info, write_policy_data
    from fewflow.control.rollout import rollout

    root = cache / "runs" / f"{env_name}-{n_demos}-{key}"
    data = write_policy_data(demos, root, OBS_HORIZON, ACT_HORIZON, successful_only=True)
    n_pairs = int(np.load(data, allow_pickle=False)["x"].shape[0])
    batch = min(int(s["batch"]), n_pairs)
    pol: Any
    if method == "none":
        secs, pol = 0.0, _NoisePolicy(read_policy_info(root), seed)
    else:
        def make_config() -> Any:
            cfg = policy_run_config(data, method, settings=settings, hidden=s["hidden"], depth=s["depth"],
                                    steps=s["steps"], batch_size=batch, seed=seed)
            cfg.train = {**cfg.train, "lr_schedule": "cosine", "warmup": int(s["warmup"])}
            return cfg

        secs = train_once(
            root, make_config,
            steps=s["steps"], batch_size=batch, seed=seed, lr=1e-3, say=lambda m: _say(verbose, m),
            label=f"{env_name} {n_demos} demos {key}")
        pol = policy_from_run(root, nfe=nfe, seed=seed)
    t0 = time.perf_counter()
    res = rollout(env_name, pol, episodes=e["episodes"], obs_horizon=OBS_HORIZON, exec_horizon=EXEC_HORIZON,
                  seed=seed, progress=False, max_steps=e["max_steps"])
    row: dict[str, Any] = {
        "env": env_name, "demos": n_demos, "policy": key, "method": method, "nfe": nfe,
        "dispersive": settings.get("dispersive", "none"), "pairs": n_pairs, "steps": s["steps"],
        "episodes": e["episodes"], "success": float(res.success_rate), "mean_reward": float(res.mean_reward),
        "latency_ms": float(res.latency_ms["mean"]), "latency_p95_ms": float(res.latency_ms["p95"]),
        "train_s": round(float(secs), 1), "eval_s": round(time.perf_counter() - t0, 1),
    }
    if env_name == "nav2d":
        env = make_env("nav2d")
        used = [env.corridor_of(tr) for tr, ok in zip(res.trajectories, res.successes, strict=True) if ok]
        counts = np.bincount(np.asarray([u for u in used if u >= 0], dtype=np.int64),
                             minlength=env.n_corridors)
        row["corridors"] = [int(v) for v in counts]
        row["mode_coverage"] = float((counts > 0).mean())
        row["collision_episodes"] = float(np.mean([i["collisions"] > 0 for i in res.infos]))
        row["trajectories"] = [np.round(tr, 3).tolist() for tr in res.trajectories[:12]]
    return row


def _claims(rows: list[dict[str, Any]], s: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for env_name, e in s["envs"].items():
        by = {(r["demos"], r["policy"]): r for r in rows if r["env"] == env_name}
        top, low = max(e["demos"]), min(e["demos"])
        fm, mf = by.get((top, "fm10")), by.get((top, "mf1"))
        if fm is not None and mf is not None:
            ratio = fm["latency_ms"] / max(mf["latency_ms"], 1e-9)
            out.append({
                "claim": f"MeanFlow-1 (MP1) reaches FM-10's success within 5 points at >= 5x lower latency "
                         f"({top} demos)",
                "dataset": env_name,
                "met": bool(mf["success"] >= fm["success"] - 0.05 and ratio >= 5.0),
                "value": f"success {mf['success']:.2f} vs {fm['success']:.2f}; latency "
                         f"{mf['latency_ms']:.2f} vs {fm['latency_ms']:.2f} ms ({ratio:.1f}x)",
            })
        base = by.get((low, "mf1"))
        for kind in e["disp"]:
            r = by.get((low, f"mf1_{kind}"))
            if base is None or r is None:
                continue
            out.append({
                "claim": f"the {kind} dispersive loss improves MeanFlow-1's success at {low} demos "
                         "(DM1/MP1's low-data effect)",
                "dataset": env_name, "met": bool(r["success"] > base["success"]),
                "value": f"success {r['success']:.2f} with vs {base['success']:.2f} without",
            })
        if env_name == "nav2d" and mf is not None:
            out.append({
                "claim": f"MeanFlow-1 uses all three corridors of nav2d at {top} demos (1-NFE sampling keeps "
                         "the expert's modes)",
                "dataset": env_name, "met": bool(mf["mode_coverage"] >= 1.0),
                "value": f"corridor counts {mf['corridors']} (FM-10: {fm['corridors'] if fm else 'n/a'})",
            })
    return out


def _plot(rows: list[dict[str, Any]], s: dict[str, Any], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is a core dependency
        return None
    from fewflow.control.envs import make_env

    envs = list(s["envs"])
    nav = [r for r in rows if r["env"] == "nav2d"]
    top = max((r["demos"] for r in nav), default=None)
    traj_rows = [r for r in nav if r["demos"] == top] + [
        r for r in nav if r["demos"] == min(r2["demos"] for r2 in nav) and r["dispersive"] != "none"]
    ncols = max(len(envs), len(traj_rows), 1)
    fig, axes = plt.subplots(2, ncols, figsize=(3.2 * ncols, 6.4), squeeze=False)
    for j, env_name in enumerate(envs):
        ax = axes[0][j]
        pols = sorted({r["policy"] for r in rows if r["env"] == env_name})
        for p in pols:
            pts = sorted((r["demos"], r["success"]) for r in rows
                         if r["env"] == env_name and r["policy"] == p)
            ax.plot([a for a, _ in pts], [b for _, b in pts], "o-" if len(pts) > 1 else "o", label=p)
        ax.set_xscale("log")
        ax.set_xlabel("demonstrations")
        ax.set_ylabel("success rate")
        ax.set_ylim(-0.05, 1.05)
        ax.set_title(env_name)
        ax.legend(fontsize=7)
    for j in range(len(envs), ncols):
        axes[0][j].axis("off")
    env = make_env("nav2d") if nav else None
    for j in range(ncols):
        ax = axes[1][j]
        if j >= len(traj_rows) or env is None:
            ax.axis("off")
            continue
        r = traj_rows[j]
        for xmin, ymin, xmax, ymax in env.obstacles:
            ax.add_patch(plt.Rectangle((xmin, ymin), xmax - xmin, ymax - ymin, color="0.6"))
        ax.add_patch(plt.Circle(tuple(env.goal), env.goal_radius, color="tab:green", alpha=0.3))
        for tr in r["trajectories"]:
            t = np.asarray(tr)
            ax.plot(t[:, 0], t[:, 1], lw=0.8)
        ax.set_xlim(-1, 1)
        ax.set_ylim(-1, 1)
        ax.set_aspect("equal")
        ax.set_title(f"{r['policy']} ({r['demos']} demos): {r['success']:.2f}", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def part(mode: str, cache: Path, seed: int = 0, verbose: bool = True) -> dict[str, Any]:
    """Run the flow-policy part in ``mode`` ("smoke", "quick" or "full"); see the module docstring."""
    if mode not in SIZES:
        raise FewflowError(f"mode must be one of {list(SIZES)}, got {mode!r}")
    import torch

    torch.set_num_threads(1)
    s = SIZES[mode]
    root = Path(cache) / "ctl_policies" / f"{mode}-v{VERSION}-seed{seed}"
    rows: list[dict[str, Any]] = []
    for env_name, e in s["envs"].items():
        for n in e["demos"]:
            for key, method, settings, nfe in _policies(n, e):
                t0 = time.perf_counter()

                def compute(env_name: str = env_name, n: int = n, key: str = key, method: str = method,
                            settings: dict[str, Any] = settings, nfe: int = nfe, e: dict[str, Any] = e
                            ) -> dict[str, Any]:
                    demos = _demos(root, env_name, max(e["demos"]), seed).select(np.arange(n))
                    return _row(env_name, n, key, method, settings, nfe, _sizes(s, e), e, demos, root, seed,
                                verbose)

                row = cached_row(root / "rows", f"{env_name}-{n}-{key}", compute)
                rows.append(row)
                _say(verbose, f"  {env_name} {n} demos {key}: success {row['success']:.2f}, "
                              f"{row['latency_ms']:.2f} ms/chunk ({time.perf_counter() - t0:.0f} s)")
    claims = _claims(rows, s)
    table = format_table(
        ["env", "demos", "policy", "NFE", "success", "mean reward", "latency ms", "mode coverage",
         "collisions"],
        [[r["env"], r["demos"], r["policy"], r["nfe"], r["success"], r["mean_reward"], r["latency_ms"],
          r.get("mode_coverage", "-"), r.get("collision_episodes", "-")] for r in rows])
    envs_desc = ", ".join(f"{k} ({e['episodes']} episodes)" for k, e in s["envs"].items())
    overrides = "".join(
        f" On {k}: `ActionChunkNet` {z['hidden']}x{z['depth']}, {z['steps']} steps for every policy."
        for k, e in s["envs"].items() if e.get("train") for z in [_sizes(s, e)])
    lines = [
        f"## {TITLE}",
        "",
        f"Policies trained on the first N expert episodes (`ActionChunkNet` {s['hidden']}x{s['depth']}, "
        f"the same {s['steps']} steps for every policy, batch {s['batch']}, lr 1e-3 with {s['warmup']} "
        f"warm-up steps and cosine decay, EMA; observation history {OBS_HORIZON}, chunks of {ACT_HORIZON} "
        f"actions, {EXEC_HORIZON} executed; mode {mode}) and rolled out on {envs_desc} from "
        "start states unseen in the demonstrations. `fm10`: flow matching, 10 Euler steps; `mf1`: MP1 "
        "(MeanFlow with MP1's settings: logit-normal time pairs, s = t on half of each batch, adaptive "
        "weight p = 0.5), one step; `mf1_<kind>`: MP1 with that dispersive loss (weight 0.5, tau 1), at the "
        "smallest demo count; `noise` (reference, untrained): the clipped source draw itself as the chunk. "
        "Latency: one policy call (one chunk) on one CPU thread. Mean reward: nav2d's "
        "progress toward the goal (+1 on success), Push-T's coverage of the goal region (clipped at 0.95, "
        "summed over steps). Mode coverage: fraction of nav2d's three corridors used by successful "
        "episodes." + overrides,
        "",
        table,
        "",
    ]
    out: dict[str, Any] = {"rows": rows, "claims": claims, "lines": lines}
    try:
        png = _plot(rows, s, Path(cache) / "ctl_policies.png")
    except Exception as exc:  # noqa: BLE001 - a figure never fails the benchmark
        _say(verbose, f"  (no plot: {exc})")
        png = None
    if png is not None:
        out["plots"] = [str(png)]
    if any(not math.isfinite(r["success"]) for r in rows):
        raise FewflowError("a policy produced a non-finite success rate")
    return out
