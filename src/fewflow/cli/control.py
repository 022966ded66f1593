"""``fewflow demos``, ``fewflow policy train`` and ``fewflow rollout``: expert demonstrations, flow policies
trained on them, and closed-loop policy evaluation.

``demos`` runs an environment's scripted expert and writes the demonstrations as ``.npz``
(:func:`fewflow.control.demos.save_demos`). ``rollout`` loads a trained policy run
(:func:`fewflow.control.policy.policy_from_run`; ``RUN`` may also be the word ``expert`` for the
environment's own scripted expert) and runs it closed loop with receding-horizon action chunks
(:func:`fewflow.control.rollout.rollout`), writing ``metrics.json`` and, with ``--gif N``, a GIF of the
first N episodes. ``policy train`` trains an action-chunk policy (FM or MP1,
:func:`fewflow.control.policy.train_policy`). The commands are collected in :data:`COMMANDS`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from fewflow._validate import FewflowError, parse_value

__all__ = ["COMMANDS", "demos_cmd", "rollout_cmd"]


def _env_settings(sets: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in sets:
        if "=" not in item:
            raise FewflowError(f"--env-set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = parse_value(value)
    return out


@click.command("demos")
@click.argument("env_name", metavar="ENV")
@click.option("--n", "n_episodes", type=int, default=200, show_default=True, help="Number of episodes.")
@click.option("--out", "out", type=click.Path(dir_okay=False), required=True, help="The .npz file to write.")
@click.option("--seed", type=int, default=0, show_default=True, help="Episode e starts from reset(seed + e).")
@click.option("--env-set", "sets", multiple=True, metavar="KEY=VALUE",
              help="An environment setting, e.g. n_corridors=2 (repeatable).")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar.")
def demos_cmd(env_name: str, n_episodes: int, out: str, seed: int, sets: tuple[str, ...],
              progress: bool) -> None:
    """Collect scripted-expert demonstrations of ENV (nav2d, pusht, reach, unicycle) into an .npz file.

    \b
    Examples:
      fewflow demos nav2d --n 200 --out demos.npz
      fewflow demos pusht --n 100 --seed 1 --out pusht.npz
      fewflow demos nav2d --n 50 --env-set n_corridors=2 --out two.npz
    """
    from fewflow.control.demos import collect_demos, save_demos

    t0 = time.perf_counter()
    demos = collect_demos(env_name, n_episodes, seed=seed, progress=progress, **_env_settings(sets))
    path = save_demos(demos, out)
    click.echo(f"{demos.n_episodes} episodes, {len(demos.obs)} steps, expert success "
               f"{demos.success.mean():.2f} ({time.perf_counter() - t0:.1f} s) -> {path}")


@click.command("rollout")
@click.argument("run_dir", metavar="RUN")
@click.option("--env", "env_name", default=None,
              help="Environment (default: the policy run's; required when RUN is 'expert').")
@click.option("--episodes", type=int, default=50, show_default=True, help="Number of episodes.")
@click.option("--out", "out", type=click.Path(file_okay=False), required=True, help="Folder to write.")
@click.option("--gif", "gif", type=int, default=0, show_default=True,
              help="Record the first N episodes as OUT/rollout.gif.")
@click.option("--nfe", type=int, default=None, help="Network evaluations per chunk (default: the method's).")
@click.option("--exec-horizon", type=int, default=4, show_default=True,
              help="Actions executed from each chunk before replanning.")
@click.option("--obs-horizon", type=int, default=None,
              help="Observations the policy sees (default: the run's; 1 for the expert).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the evaluation episodes.")
@click.option("--env-set", "sets", multiple=True, metavar="KEY=VALUE", help="An environment setting.")
@click.option("--fps", type=int, default=10, show_default=True, help="Frames per second of the GIF.")
@click.option("--device", default="cpu", show_default=True, help="cpu | cuda | auto.")
@click.option("--threads", type=int, default=None, help="torch.set_num_threads.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar.")
def rollout_cmd(run_dir: str, env_name: str | None, episodes: int, out: str, gif: int, nfe: int | None,
                exec_horizon: int, obs_horizon: int | None, seed: int, sets: tuple[str, ...], fps: int,
                device: str, threads: int | None, progress: bool) -> None:
    """Run a trained policy (or the scripted 'expert') closed loop and write OUT/metrics.json.

    The metrics hold the success rate, per-episode rewards and steps, and the latency of one policy
    call (one action chunk: mean and 95th percentile, in ms); --gif N adds OUT/rollout.gif.

    \b
    Examples:
      fewflow rollout runs/nav2d_mp1 --episodes 50 --out eval
      fewflow rollout runs/pusht_fm --nfe 10 --gif 3 --out eval_fm
      fewflow rollout expert --env pusht --episodes 20 --exec-horizon 1 --out expert
    """
    from fewflow._io import atomic_write_json
    from fewflow.control.rollout import ExpertChunkPolicy, rollout, save_gif

    if gif < 0 or gif > episodes:
        raise FewflowError(f"--gif must lie in 0..{episodes} (the number of episodes), got {gif}")
    env_kwargs = _env_settings(sets)
    info: dict[str, Any] = {}
    if run_dir == "expert":
        if env_name is None:
            raise FewflowError("rollout expert needs --env")
        policy: Any = ExpertChunkPolicy(act_horizon=exec_horizon)
        oh = obs_horizon or 1
        source = "expert"
    else:
        import torch

        from fewflow.control.policy import policy_from_run, read_policy_info

        if threads:
            torch.set_num_threads(threads)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        info = read_policy_info(run_dir)
        policy = policy_from_run(run_dir, nfe=nfe, seed=seed, device=device)
        run_env = str(info["env"])
        if env_name is not None and env_name != run_env:
            raise FewflowError(f"{run_dir} is a policy for {run_env!r}, not {env_name!r}")
        env_name = run_env
        env_kwargs = {**dict(info.get("env_kwargs") or {}), **env_kwargs}
        run_oh = int(info["obs_horizon"])
        if obs_horizon is not None and obs_horizon != run_oh:
            raise FewflowError(f"{run_dir} was trained with obs_horizon {run_oh}, not {obs_horizon}")
        oh = run_oh
        if exec_horizon > int(info["act_horizon"]):
            raise FewflowError(f"--exec-horizon {exec_horizon} exceeds the policy's action chunk "
                               f"({info['act_horizon']})")
        source = str(run_dir)
    t0 = time.perf_counter()
    res = rollout(env_name, policy, episodes=episodes, obs_horizon=oh, exec_horizon=exec_horizon, seed=seed,
                  record_episodes=gif, env_kwargs=env_kwargs, progress=progress)
    wall = time.perf_counter() - t0
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = res.metrics()
    metrics.update(policy=source, env=env_name, env_kwargs=env_kwargs, nfe=nfe, obs_horizon=oh,
                   exec_horizon=exec_horizon, seed=seed, wall_s=wall)
    if gif:
        metrics["gif"] = str(save_gif(res.frames, out_dir / "rollout.gif", fps=fps).name)
    atomic_write_json(out_dir / "metrics.json", metrics)
    lat = res.latency_ms
    click.echo(f"{env_name}: success {res.success_rate:.2f} over {episodes} episodes, mean reward "
               f"{res.mean_reward:.3f}, latency {lat['mean']:.2f} ms per chunk (p95 {lat['p95']:.2f}) "
               f"-> {out_dir / 'metrics.json'}")


@click.group("policy")
def policy_group() -> None:
    """Flow policies from expert demonstrations (evaluate them with ``fewflow rollout``)."""


@policy_group.command("train")
@click.argument("demos", type=click.Path(dir_okay=False))
@click.option("--method", default="mp1", show_default=True,
              help="cfm (flow-matching policy, sampled with Euler steps) or mp1 (1-NFE MeanFlow policy).")
@click.option("--out", "out", type=click.Path(file_okay=False), required=True, help="Run folder to write.")
@click.option("--obs-horizon", type=int, default=2, show_default=True, help="Observations the policy sees.")
@click.option("--act-horizon", type=int, default=8, show_default=True, help="Actions per predicted chunk.")
@click.option("--steps", type=int, default=3000, show_default=True, help="Optimiser steps.")
@click.option("--batch-size", type=int, default=256, show_default=True, help="Batch size.")
@click.option("--lr", type=float, default=1e-3, show_default=True, help="Learning rate.")
@click.option("--hidden", type=int, default=256, show_default=True, help="ActionChunkNet width.")
@click.option("--depth", type=int, default=3, show_default=True, help="ActionChunkNet residual blocks.")
@click.option("--successful-only", is_flag=True, help="Train on the successful episodes only.")
@click.option("--set", "sets", multiple=True, metavar="method.FIELD=VALUE",
              help="A method setting, e.g. --set method.dispersive=infonce_l2.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for init and data order.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its latest checkpoint.")
@click.option("--threads", type=int, default=None, help="torch.set_num_threads (default: leave as is).")
@click.option("--no-progress", is_flag=True, help="No tqdm bar.")
def policy_train_cmd(demos: str, method: str, out: str, obs_horizon: int, act_horizon: int, steps: int,
                     batch_size: int, lr: float, hidden: int, depth: int, successful_only: bool,
                     sets: tuple[str, ...], seed: int, resume: bool, threads: int | None,
                     no_progress: bool) -> None:
    """Train a chunk policy on DEMOS (an .npz written by ``fewflow demos``).

    \b
    Examples:
      fewflow demos nav2d --n 100 --out demos.npz
      fewflow policy train demos.npz --method mp1 --out runs/pol
      fewflow policy train demos.npz --method mp1 --set method.dispersive=infonce_l2 --out runs/pol_d
      fewflow policy train demos.npz --method cfm --steps 2000 --out runs/pol_fm
      fewflow rollout runs/pol --episodes 50 --out eval --gif 2
    """
    from fewflow.cli.main import _parse_sets, _say, _threads
    from fewflow.control.policy import train_policy

    _threads(threads)
    settings = {}
    for key, value in _parse_sets(sets).items():
        if not key.startswith("method."):
            raise FewflowError(f"--set takes method.FIELD=VALUE here, got {key!r}")
        settings[key.removeprefix("method.")] = value
    train_policy(demos, out, method, obs_horizon=obs_horizon, act_horizon=act_horizon, settings=settings,
                 hidden=hidden, depth=depth, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                 successful_only=successful_only, progress=not no_progress, resume=resume)
    _say(f"policy run written to {out} (fewflow rollout {out} --out DIR)")


COMMANDS = [demos_cmd, rollout_cmd, policy_group]
