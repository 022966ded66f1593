"""Flow policies from demonstrations: train a run on action chunks, load it as a chunk policy.

A flow policy (flow matching with ``fewflow train --method cfm``, or the 1-NFE MeanFlow policy ``mp1`` of
"MP1: MeanFlow Tames Policy Learning in 1-step for Robotic Manipulation", arXiv 2507.10543, with DM1's
dispersive losses, arXiv 2510.07865) is an ordinary fewflow run whose samples ``x`` are normalised action
chunks and whose condition ``c`` is the normalised observation history
(:func:`fewflow.control.demos.demos_dataset`). Two files beside the run make it a policy:

* ``policy_data.npz``: the chunked training pairs (``x`` = action chunks, ``c`` = observation
  histories, both in ``[-1, 1]``), which the run loads as user data with ``normalize=false``, so
  ``fewflow eval`` and resuming reload the same data;
* ``policy.json``: the environment, the horizons and the min-max statistics
  (``obs_min/obs_max/act_min/act_max``) the policy applies: :func:`fewflow.control.demos.normalize` on
  the observation history, :func:`~fewflow.control.demos.unnormalize` on the sampled chunk.

:func:`train_policy` writes both and trains; :func:`policy_from_run` returns a :class:`FlowPolicy`,
``policy(obs_hist (obs_horizon, obs_dim)) -> actions (act_horizon, act_dim)`` for
:func:`fewflow.control.rollout.rollout`, sampled with the method's default sampler (MP1: one flow-map
jump ``a = x0 + u(x0, 0, 1 | obs)``; flow matching: Euler steps) at the NFE asked for. Sampled chunks
are clipped to ``[-1, 1]`` (the demonstrations' range) before unnormalising, as DM1's sampler clips to
the action range.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fewflow._validate import FewflowError
from fewflow.control.demos import Demos, chunk_dataset, load_demos, normalize, unnormalize

__all__ = [
    "POLICY_DATA",
    "POLICY_FILE",
    "FlowPolicy",
    "demos_dataset",
    "policy_from_run",
    "policy_run_config",
    "read_policy_info",
    "train_policy",
    "write_policy_data",
]

POLICY_FILE = "policy.json"
POLICY_DATA = "policy_data.npz"
STAT_KEYS = ("obs_min", "obs_max", "act_min", "act_max")


def demos_dataset(demos: Demos, obs_horizon: int = 2, act_horizon: int = 8, successful_only: bool = False
                  ) -> Any:
    """The demonstrations as a fewflow :class:`~fewflow.data.Dataset` (``x`` = flattened normalised action
    chunks ``(M, act_horizon * act_dim)``, ``c`` = flattened normalised observation histories ``(M,
    obs_horizon * obs_dim)``, ``meta`` = statistics and horizons), as
    :func:`fewflow.control.demos.demos_dataset` builds it."""
    from fewflow.control.demos import demos_dataset as _dd

    return _dd(demos, obs_horizon, act_horizon, successful_only)


def _as_demos(demos: Demos | str | Path) -> Demos:
    if isinstance(demos, Demos):
        return demos
    if isinstance(demos, (str, Path)):
        return load_demos(demos)
    raise FewflowError(f"demos must be a Demos record or a .npz file, got {type(demos).__name__}")


def write_policy_data(
    demos: Demos | str | Path, out_dir: str | Path, obs_horizon: int = 2, act_horizon: int = 8,
    successful_only: bool = False,
) -> Path:
    """Write ``out_dir/policy_data.npz`` (``x`` action chunks, ``c`` observation histories, normalised) and
    ``out_dir/policy.json`` (env, horizons, dimensions, statistics); returns the ``.npz`` path. Rewriting
    identical data leaves the files (and so the recorded sha256) unchanged."""
    from fewflow._io import atomic_path, atomic_write_json

    d = _as_demos(demos)
    cond, actions, stats = chunk_dataset(d, obs_horizon, act_horizon, successful_only)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    info = {
        "env": d.env, "env_kwargs": dict(d.env_kwargs or {}), "obs_horizon": int(obs_horizon),
        "act_horizon": int(act_horizon), "obs_dim": d.obs_dim, "act_dim": d.act_dim,
        "episodes": d.n_episodes, "pairs": int(len(actions)),
        "stats": {k: [float(v) for v in stats[k]] for k in STAT_KEYS},
    }
    path = out / POLICY_DATA
    same = False
    if path.exists():
        with np.load(path, allow_pickle=False) as z:
            same = (set(z.files) == {"x", "c"} and np.array_equal(z["x"], actions)
                    and np.array_equal(z["c"], cond))
    if not same:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, x=actions, c=cond)
    atomic_write_json(out / POLICY_FILE, info)
    return path


def read_policy_info(run_dir: str | Path) -> dict[str, Any]:
    """The ``policy.json`` of a policy run (env, horizons, dimensions, statistics as arrays)."""
    path = Path(run_dir) / POLICY_FILE
    if not path.is_file():
        raise FewflowError(f"{run_dir} is not a policy run (no {POLICY_FILE}); train it with "
                           "fewflow.control.policy.train_policy")
    try:
        info = json.loads(path.read_text())
        stats = {k: np.asarray(info["stats"][k], dtype=np.float64) for k in STAT_KEYS}
        for key in ("obs_horizon", "act_horizon", "obs_dim", "act_dim", "env"):
            info[key]  # noqa: B018 - presence check
    except (KeyError, TypeError, ValueError) as e:
        raise FewflowError(f"{path} is not a valid policy description: {e}") from None
    if any(stats[k].shape != (int(info["obs_dim"]),) for k in ("obs_min", "obs_max")) or any(
            stats[k].shape != (int(info["act_dim"]),) for k in ("act_min", "act_max")):
        raise FewflowError(f"{path}: statistics do not match obs_dim / act_dim")
    info["stats"] = stats
    return info


def policy_run_config(
    data_path: str | Path, method: str = "mp1", *, settings: dict[str, Any] | None = None,
    hidden: int = 256, depth: int = 3, steps: int = 3000, batch_size: int = 256, lr: float = 1e-3,
    seed: int = 0,
) -> Any:
    """A :class:`fewflow.config.RunConfig` training ``method`` on ``data_path`` (a ``policy_data.npz``) with
    :class:`fewflow.models.policy.ActionChunkNet` (``hidden x depth``); ``settings`` are method fields
    (``{"dispersive": "infonce_l2"}``). MP1 runs use the method's small-scale settings (uniform time
    pairs, 75% of rows with ``s != t``, plain MSE) unless ``settings`` overrides them."""
    from fewflow.methods import get_method
    from fewflow.runs import user_data_config

    spec = get_method(method)
    cfg = user_data_config(str(data_path), method)
    cfg.data.kwargs = {**cfg.data.kwargs, "normalize": False}
    cfg.model = {"type": "fewflow.models.policy:ActionChunkNet", "hidden": int(hidden), "depth": int(depth)}
    cfg.method = spec.config_dict({**spec.small_scale_values(), **(settings or {})})
    cfg.seed = int(seed)
    cfg.train = {**cfg.train, "steps": int(steps), "batch_size": int(batch_size), "lr": float(lr),
                 "seed": int(seed)}
    cfg.validate()
    return cfg


def train_policy(
    demos: Demos | str | Path, out_dir: str | Path, method: str = "mp1", *, obs_horizon: int = 2,
    act_horizon: int = 8, settings: dict[str, Any] | None = None, hidden: int = 256, depth: int = 3,
    steps: int = 3000, batch_size: int = 256, lr: float = 1e-3, seed: int = 0, successful_only: bool = False,
    progress: bool = True, resume: bool = False,
) -> Path:
    """Chunk ``demos`` (:func:`write_policy_data`) into ``out_dir`` and train ``method`` there with
    :func:`fewflow.runs.train_run`; returns ``out_dir``, loadable by :func:`policy_from_run`."""
    from fewflow.runs import train_run

    out = Path(out_dir)
    data = write_policy_data(demos, out, obs_horizon, act_horizon, successful_only)
    n = int(np.load(data, allow_pickle=False)["x"].shape[0])
    cfg = policy_run_config(data, method, settings=settings, hidden=hidden, depth=depth, steps=steps,
                            batch_size=min(int(batch_size), n), lr=lr, seed=seed)
    cfg.train = {**cfg.train, "progress": bool(progress)}
    train_run(cfg, out, resume=resume, figures=False)
    return out


class FlowPolicy:
    """A trained flow policy: ``policy(obs_hist) -> actions`` (module docstring).

    ``obs_hist``: ``(obs_horizon, obs_dim)`` (or its flattening) in the environment's units; returns
    ``(act_horizon, act_dim)`` float64 actions. :meth:`sample` does a batch. ``latency_ms`` holds the wall
    time of every call (one chunk, normalisation included)."""

    def __init__(self, model: Any, cfg: Any, info: dict[str, Any], nfe: int | None = None, seed: int = 0
                 ) -> None:
        self.model, self.cfg, self.info = model, cfg, info
        self.obs_horizon, self.act_horizon = int(info["obs_horizon"]), int(info["act_horizon"])
        self.obs_dim, self.act_dim = int(info["obs_dim"]), int(info["act_dim"])
        self.stats = info["stats"]
        self.nfe = nfe
        p = next(iter(model.parameters()))
        self.device, self.dtype = p.device, p.dtype
        self.generator = torch.Generator(device=self.device).manual_seed(int(seed))
        self.latency_ms: list[float] = []
        self._plan: tuple[Any, ...] | None = None  # (model, stepper, grid, source, nfe), by the first call

    def _obs(self, obs_hist: Any) -> np.ndarray:
        try:
            o = np.asarray(obs_hist, dtype=np.float64)
        except (TypeError, ValueError):
            what = type(obs_hist).__name__
            raise FewflowError(f"observation history must be numeric, got {what}") from None
        want = self.obs_horizon * self.obs_dim
        if o.ndim >= 1 and o.shape[-1] == want and not (o.ndim >= 2 and o.shape[-2:] == (
                self.obs_horizon, self.obs_dim)):
            o = o.reshape(*o.shape[:-1], self.obs_horizon, self.obs_dim)
        if o.ndim < 2 or o.shape[-2:] != (self.obs_horizon, self.obs_dim):
            raise FewflowError(
                f"observation history must have shape ({self.obs_horizon}, {self.obs_dim}) (obs_horizon, "
                f"obs_dim) for this {self.info['env']} policy, got {tuple(o.shape)}")
        if not np.all(np.isfinite(o)):
            raise FewflowError("observation history contains non-finite values")
        return o

    def _setup(self) -> None:
        """Resolve the sampler once, as :func:`fewflow.sampling.generate` does (the method's plan, its
        stepper at ``nfe`` evaluations, the run's grid and source), so that a call costs the network
        evaluations and little else."""
        from fewflow.methods import get_method
        from fewflow.runs import build_source
        from fewflow.sampling import generate, sampling_plan
        from fewflow.solvers import stepper_for_nfe

        spec, smp = get_method(self.cfg.method_name), self.cfg.sampler
        nfe = self.nfe if self.nfe is not None else (smp.nfe if smp.nfe is not None else spec.sampler.nfe)
        nfe = int(nfe)
        plan = sampling_plan(self.model, self.cfg, nfe)
        if plan.stepper is not None and not isinstance(plan.stepper, str):
            stepper: Any = plan.stepper
        else:
            _, stepper = stepper_for_nfe(plan.stepper or smp.stepper or spec.sampler.stepper, nfe)
        probe = generate(self.model, self.cfg, 1, nfe=nfe, cond=torch.zeros(
            1, self.obs_horizon * self.obs_dim, dtype=self.dtype, device=self.device))
        self._plan = (plan.model, stepper, probe.times.detach().clone(), build_source(self.cfg), nfe)

    def sample(self, obs_hist: Any, x0: torch.Tensor | None = None) -> np.ndarray:
        """Chunks for a batch ``(B, obs_horizon, obs_dim)`` -> ``(B, act_horizon, act_dim)``; ``x0`` fixes
        the source draws ``(B, act_horizon * act_dim)`` (default: drawn from the policy's generator)."""
        from fewflow.sampling import draw_source
        from fewflow.solvers import solve

        o = self._obs(obs_hist)
        if o.ndim != 3:
            raise FewflowError(f"sample() takes a batch (B, {self.obs_horizon}, {self.obs_dim}), got "
                               f"{tuple(o.shape)}")
        if self._plan is None:
            self._setup()
        f, stepper, grid, source, _ = self._plan  # type: ignore[misc]
        b = o.shape[0]
        c = normalize(o, self.stats["obs_min"], self.stats["obs_max"]).reshape(b, -1)
        c_t = torch.as_tensor(c, dtype=self.dtype, device=self.device)
        if x0 is None:
            x0 = draw_source(self.cfg, b, device=self.device, dtype=self.dtype, generator=self.generator,
                             source=source)
        elif tuple(x0.shape) != (b, self.act_horizon * self.act_dim):
            raise FewflowError(f"x0 must have shape ({b}, {self.act_horizon * self.act_dim}), got "
                               f"{tuple(x0.shape)}")
        with torch.no_grad():
            x = solve(f, x0.to(self.device, self.dtype), grid=grid, stepper=stepper, cond={"c": c_t},
                      generator=self.generator).x
        if not bool(torch.isfinite(x).all()):
            raise FewflowError("the policy sampled non-finite actions (a diverged model?)")
        a = x.to("cpu", torch.float64).numpy().reshape(b, self.act_horizon, self.act_dim)
        return unnormalize(np.clip(a, -1.0, 1.0), self.stats["act_min"], self.stats["act_max"])

    def __call__(self, obs_hist: Any) -> np.ndarray:
        t0 = time.perf_counter()
        o = self._obs(obs_hist)
        if o.ndim != 2:
            raise FewflowError(f"policy(obs_hist) takes one history ({self.obs_horizon}, {self.obs_dim}); "
                               "use sample() for a batch")
        out = self.sample(o[None])[0]
        self.latency_ms.append((time.perf_counter() - t0) * 1e3)
        return out

    def __repr__(self) -> str:
        return (f"FlowPolicy({self.cfg.method_name}, env={self.info['env']}, nfe={self.nfe}, "
                f"obs {self.obs_horizon}x{self.obs_dim} -> actions {self.act_horizon}x{self.act_dim})")


def policy_from_run(run_dir: str | Path, nfe: int | None = None, *, seed: int = 0,
                    device: str | torch.device | None = None) -> FlowPolicy:
    """Load a policy run (its EMA weights and ``policy.json``) as a :class:`FlowPolicy` sampling with the
    method's default sampler at ``nfe`` evaluations (``None``: the method's default, 1 for ``mp1``)."""
    from fewflow.runs import load_run

    if nfe is not None and (isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1):
        raise FewflowError(f"nfe must be a positive integer, got {nfe!r}")
    info = read_policy_info(run_dir)
    model, cfg = load_run(run_dir, device=device)
    want_x = [int(info["act_horizon"]) * int(info["act_dim"])]
    want_c = [int(info["obs_horizon"]) * int(info["obs_dim"])]
    if list(cfg.meta.get("shape", [])) != want_x or list(cfg.meta.get("cond_shape") or []) != want_c:
        raise FewflowError(f"{run_dir}: the run's data shape {cfg.meta.get('shape')} / condition "
                           f"{cfg.meta.get('cond_shape')} do not match {POLICY_FILE} ({want_x} / {want_c})")
    return FlowPolicy(model, cfg, info, nfe=nfe, seed=seed)
