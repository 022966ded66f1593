"""Benchmark part: MLE fine-tuning of reconstructions (Li, Ding, Li, Li; arXiv 2510.02081).

Two conditional tasks, both fewflow user data (``module:function``, so ``fewflow train --data
fewflow.bench.ll_mle_finetune:circle_task`` trains on them too):

* ``circle``: a 2-D target nearly determined by its condition, ``c = theta / pi`` and
  ``x = 2 (cos theta, sin theta) + 0.05 eps`` (the paper's forecasting-like regime);
* ``policy``: a policy-like regression, actions ``a in R^2`` a *bimodal* function of an observation
  ``o in [-1, 1]^4``: ``a = mu(o) +- w(o) + 0.05 eps`` with
  ``mu(o) = (sin(pi o_1) + o_2 / 2, cos(pi o_3) o_4)``, ``w(o) = (0.8, 0.6 + 0.3 o_1)`` and the sign a
  fair coin (robot action chunks' regime).

For each task: a CFM teacher, then ``mle_finetune`` (straightforward) and ``mle_finetune_residual``
started from it. The circle task pairs ``x0`` with noise (its target is near-deterministic); the bimodal
policy task pairs each target with the teacher's inverse ODE of it (``pairing="inverse"``), because a
random ``x0`` would pull the decoder towards the mean of the two modes. Measured at 1 / 2 / 4 NFE (Euler,
uniform grid): the *reconstruction error* ``E ||Phi^N(x0; c) - x1||^2`` on held-out pairs (noise ``x0``
for circle; the teacher's 32-step Heun inverse of ``x1`` for policy, the same ``x0`` for every model),
the *sliced-W2* between generated ``(c, x)`` pairs (fresh noise, the held-out conditions) and held-out
``(c, x1)`` pairs (beside the floor: a second draw of ``x | c`` for the same conditions), and the
field's *stiffness*: the mean spectral norm of ``d v / d x`` at ``x_t = t x1 + (1 - t) z`` (``z`` noise),
``t in {0.1, 0.5, 0.9}`` (:func:`fewflow.metrics.stiffness.lipschitz_estimate`). The fine-tuning pairs
of the policy task use 6 Heun steps of the inverse ODE per batch (cost).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fewflow._io import atomic_write_json
from fewflow.bench.common import format_table, train_once

__all__ = ["circle_task", "make_task", "part", "policy_task", "sample_given"]

MODULE = "fewflow.bench.ll_mle_finetune"
TASKS = ("circle", "policy")
NFES = (1, 2, 4)
SIZES: dict[str, dict[str, Any]] = {
    "smoke": {"hidden": 32, "depth": 2, "teacher_steps": 120, "ft_steps": 12, "n_eval": 256,
              "batch": 128},
    "quick": {"hidden": 128, "depth": 3, "teacher_steps": 1200, "ft_steps": 200, "n_eval": 2000,
              "batch": 256},
    "full": {"hidden": 256, "depth": 4, "teacher_steps": 3000, "ft_steps": 800, "n_eval": 3000,
             "batch": 512},
}
N_TRAIN = 20_000


def sample_given(name: str, c: Tensor, generator: torch.Generator) -> Tensor:
    """Draw ``x | c`` of one task (module docstring) for the conditions ``c``."""
    n = c.shape[0]
    if name == "circle":
        theta = c[:, 0] * math.pi
        noise = 0.05 * torch.randn(n, 2, generator=generator)
        return 2.0 * torch.stack([theta.cos(), theta.sin()], 1) + noise
    if name == "policy":
        o = c
        mu = torch.stack([torch.sin(math.pi * o[:, 0]) + 0.5 * o[:, 1],
                          torch.cos(math.pi * o[:, 2]) * o[:, 3]], 1)
        w = torch.stack([torch.full_like(o[:, 0], 0.8), 0.6 + 0.3 * o[:, 0]], 1)
        sign = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)[:, None]
        return mu + sign * w + 0.05 * torch.randn(n, 2, generator=generator)
    raise ValueError(f"unknown task {name!r}")


def make_task(name: str, n: int, seed: int) -> tuple[Tensor, Tensor]:
    """``(x, c)`` of one task (module docstring), ``n`` rows from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    if name == "circle":
        c = (2 * torch.rand(n, generator=g) - 1)[:, None]
    elif name == "policy":
        c = 2 * torch.rand(n, 4, generator=g) - 1
    else:
        raise ValueError(f"unknown task {name!r}")
    return sample_given(name, c, g), c


def circle_task() -> dict[str, Tensor]:
    """The circle task's training set (``--data fewflow.bench.ll_mle_finetune:circle_task``)."""
    x, c = make_task("circle", N_TRAIN, 0)
    return {"x": x, "c": c}


def policy_task() -> dict[str, Tensor]:
    """The policy task's training set (``--data fewflow.bench.ll_mle_finetune:policy_task``)."""
    x, c = make_task("policy", N_TRAIN, 0)
    return {"x": x, "c": c}


def _say(verbose: bool, msg: str) -> None:
    if verbose:
        print(msg, flush=True)


def _trained(root: Path, task: str, method: str, size: dict[str, Any], seed: int, *, steps: int,
             teacher: Path | None = None, method_kwargs: dict[str, Any] | None = None,
             verbose: bool = True) -> Path:
    """Train (or resume, or reuse) the run ``root`` through ``fewflow.runs.train_run``."""
    from fewflow.runs import user_data_config

    def make() -> Any:
        rc = user_data_config(f"{MODULE}:{task}_task", method)
        rc.method = {"name": method, **(method_kwargs or {})}
        rc.data.kwargs = {"normalize": False}
        rc.model = {"type": "MLP", "hidden": size["hidden"], "depth": size["depth"]}
        rc.teacher = str(teacher) if teacher is not None else None
        return rc

    train_once(root, make, steps=steps, batch_size=size["batch"], seed=seed,
               say=(lambda m: _say(verbose, m)), label=f"{task}/{root.name}")
    return root


def _field(run: Path) -> tuple[Any, Any]:
    """``(velocity field as sampled, RunConfig)``: a residual run's field is its teacher plus residual."""
    from fewflow.runs import load_run
    from fewflow.sampling import sampling_plan

    model, rc = load_run(run)
    return sampling_plan(model, rc, 4).model, rc


def _evaluate(task: str, run: Path, size: dict[str, Any], seed: int, teacher_field: Any) -> list[dict]:
    from fewflow.metrics import sliced_wasserstein
    from fewflow.metrics.stiffness import lipschitz_estimate
    from fewflow.runs import load_run
    from fewflow.sampling import generate
    from fewflow.solvers import solve

    field, rc = _field(run)
    model, _ = load_run(run)
    n = size["n_eval"]
    x1, c = make_task(task, n, 1000 + seed)
    x1b = sample_given(task, c, torch.Generator().manual_seed(2000 + seed))  # a second draw of x | c
    g = torch.Generator().manual_seed(3000 + seed)
    if task == "policy":  # the teacher's encoding of each target, shared by every model
        with torch.no_grad():
            x0 = solve(teacher_field, x1, steps=32, stepper="heun", t0=1.0, t1=0.0, cond={"c": c}).x
    else:
        x0 = torch.randn(n, 2, generator=g)
    z = torch.randn(n, 2, generator=g)
    proj = torch.Generator().manual_seed(7)
    floor = sliced_wasserstein(torch.cat([c, x1b], 1), torch.cat([c, x1], 1), generator=proj)
    rows = []
    for nfe in NFES:
        kw = {"nfe": nfe, "stepper": "euler", "grid": "uniform", "cond": c, "check_finite": False}
        rec = generate(model, rc, n, x0=x0, **kw).x
        smp = generate(model, rc, n, x0=z, **kw).x
        recon = float((rec - x1).pow(2).sum(1).mean())
        swd = sliced_wasserstein(torch.cat([c, smp], 1), torch.cat([c, x1], 1),
                                 generator=torch.Generator().manual_seed(7))
        rows.append({"task": task, "method": rc.method_name, "nfe": nfe, "recon": recon, "swd": swd,
                     "swd_floor": floor})
    m = min(n, 256)
    stiff = []
    for t in (0.1, 0.5, 0.9):
        xt = t * x1[:m] + (1 - t) * z[:m]
        stiff.append(float(lipschitz_estimate(field, xt, t, iters=10, c=c[:m]).mean()))
    res_lip = None
    if rc.method_name == "mle_finetune_residual":
        t = torch.rand(m, generator=g)
        res_lip = float(lipschitz_estimate(model, 3 * torch.randn(m, 2, generator=g), t, iters=20,
                                           c=c[:m]).max())
        bound = float(model.lipschitz_bound)
    for r in rows:
        r["stiffness"] = sum(stiff) / len(stiff)
        if res_lip is not None:
            r["residual_lip"], r["residual_lip_bound"] = res_lip, bound
    return rows


def _task_rows(task: str, mode: str, cache: Path, seed: int, verbose: bool) -> list[dict]:
    path = cache / "rows" / f"{task}.json"
    if path.exists():
        return json.loads(path.read_text())
    size = SIZES[mode]
    base = cache / "runs" / task
    t0 = time.perf_counter()
    teacher = _trained(base / "teacher", task, "cfm", size, seed, steps=size["teacher_steps"],
                       verbose=verbose)
    # the bimodal task pairs by the teacher's inverse ODE (6 Heun steps per batch keep the cost down)
    pairing = {"pairing": "inverse", "inverse_steps": 6} if task == "policy" else {}
    runs = {
        "cfm": teacher,
        "mle_finetune": _trained(base / "straightforward", task, "mle_finetune", size, seed,
                                 steps=size["ft_steps"], teacher=teacher, method_kwargs=pairing,
                                 verbose=verbose),
        "mle_finetune_residual": _trained(base / "residual", task, "mle_finetune_residual", size, seed,
                                          steps=size["ft_steps"], teacher=teacher, method_kwargs=pairing,
                                          verbose=verbose),
    }
    teacher_field, _ = _field(teacher)
    rows = []
    for run in runs.values():
        rows += _evaluate(task, run, size, seed, teacher_field)
    for r in rows:
        r["seconds"] = round(time.perf_counter() - t0, 1)
    atomic_write_json(path, rows)
    return rows


def _lower(rows: list[dict], task: str, method: str, key: str) -> tuple[bool, str]:
    base = {r["nfe"]: r[key] for r in rows if r["task"] == task and r["method"] == "cfm"}
    new = {r["nfe"]: r[key] for r in rows if r["task"] == task and r["method"] == method}
    met = all(new[k] < base[k] for k in NFES)
    return met, ", ".join(f"{k} NFE {base[k]:.3g} -> {new[k]:.3g}" for k in NFES)


LABELS = {"cfm": "pretrained (CFM)", "mle_finetune": "MLE fine-tuned",
          "mle_finetune_residual": "MLE residual"}


def part(mode: str, cache: Path, seed: int = 0, verbose: bool = True) -> dict:
    """Run (or reuse) this part; ``mode`` is ``smoke``, ``quick`` or ``full`` (module docstring)."""
    if mode not in SIZES:
        raise ValueError(f"mode must be one of {sorted(SIZES)}, got {mode!r}")
    torch.set_num_threads(1)
    cache = Path(cache) / "mle_finetune" / mode / f"seed{seed}"
    rows: list[dict] = []
    for task in TASKS:
        _say(verbose, f"[mle_finetune] {task} ({mode})")
        rows += _task_rows(task, mode, cache, seed, verbose)
    claims = []
    for task in TASKS:
        for method, what in (("mle_finetune", "straightforward"), ("mle_finetune_residual", "residual")):
            met, val = _lower(rows, task, method, "recon")
            claims.append({"claim": f"MLE fine-tuning ({what}) lowers the reconstruction error at 1, 2 "
                           "and 4 NFE against the pretrained model", "dataset": task, "met": met,
                           "value": val})
        met, val = _lower(rows, task, "mle_finetune", "swd")
        claims.append({"claim": "MLE fine-tuning (straightforward) lowers the sliced-W2 of (c, x) at 1, 2 "
                       "and 4 NFE (better few-step samples)", "dataset": task, "met": met, "value": val})
        res = [r for r in rows if r["task"] == task and "residual_lip" in r][0]
        claims.append({"claim": "the residual is contractive: its measured Lipschitz constant stays below "
                       "alpha_max (1 + lip)", "dataset": task,
                       "met": bool(res["residual_lip"] < res["residual_lip_bound"]),
                       "value": f"{res['residual_lip']:.3g} < {res['residual_lip_bound']:.3g}"})
    table = []
    for r in rows:
        table.append([r["task"], LABELS.get(r["method"], r["method"]), r["nfe"], r["recon"], r["swd"],
                      r["swd_floor"], r["stiffness"]])
    lines = [
        "## MLE fine-tuning of reconstructions (Li et al., 2510.02081)",
        "",
        f"Mode {mode}, seed {seed}. Conditional 2-D circle (x nearly determined by c) and a bimodal "
        "policy-like regression (actions from a 4-D observation). Recon: E||Phi^N(x0; c) - x1||^2 "
        "(Euler, N = NFE); sliced-W2 of (c, x) against held-out pairs; stiffness: mean ||dv/dx||_2 on "
        "the path.",
        "",
        format_table(["task", "model", "NFE", "recon", "sliced-W2", "SW2 floor", "stiffness"], table),
        "",
    ]
    lines += [f"- {c['dataset']}: {c['claim']}: {'met' if c['met'] else 'not met'} ({c['value']})"
              for c in claims]
    return {"rows": rows, "claims": claims, "lines": lines}
