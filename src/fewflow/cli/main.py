"""``fewflow`` command line: train, sample, evaluate, fetch data, and run the demo.

Every command prints ``--help`` with examples. Errors in the user's input (bad options, an unknown
data set, a missing or corrupt checkpoint, a config for another model) print ONE line
``error: ...`` on stderr and exit with code 2; ``fewflow --debug ...`` shows the traceback instead.
A training run that stops early (a non-finite loss or gradient) prints one ``error: ...`` line and
exits with code 3; an internal error (a bug) exits with code 1.

Longer than fewflow's ~400-line guide on purpose: one click group: every command's options and help text.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from fewflow._validate import FewflowError

EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 1
EXIT_TRAINING_STOPPED = 3


class TrainingStopped(FewflowError):
    """``fewflow train`` ended before its last step (e.g. a non-finite loss): exit code 3."""


def _check_completed(result: Any) -> None:
    """Raise :class:`TrainingStopped` unless a training result ran to its end."""
    reason = str(getattr(result, "stopped_reason", "completed"))
    if reason not in ("completed", "already complete"):
        raise TrainingStopped(f"training stopped at step {result.step}: {reason}")


# --------------------------------------------------------------------------- error handling


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    if not text and isinstance(e, KeyError) and e.args:
        text = repr(e.args[0])
    return text.splitlines()[0] if text else type(e).__name__


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "the input is wrong" rather than "fewflow has a bug"."""
    errs: list[type[BaseException]] = [
        FewflowError,
        FileNotFoundError,
        NotADirectoryError,
        IsADirectoryError,
        PermissionError,
    ]
    try:
        from safetensors import SafetensorError

        errs.append(SafetensorError)
    except ImportError:  # pragma: no cover
        pass
    try:
        import yaml

        errs.append(yaml.YAMLError)
    except ImportError:  # pragma: no cover
        pass
    errs.append(json.JSONDecodeError)
    return tuple(errs)


class FewflowGroup(click.Group):
    """A click group whose ``main`` turns every error into one ``error: ...`` line and an exit code."""

    def main(
        self,
        args: Any = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        debug = (
            "--debug" in argv[: _first_command_index(argv, self)] or os.environ.get("FEWFLOW_DEBUG") == "1"
        )
        try:
            return super().main(
                args=argv,
                prog_name=prog_name or "fewflow",
                complete_var=complete_var,
                standalone_mode=False,
                **extra,
            )
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("error: aborted", err=True)
            sys.exit(1)
        except click.ClickException as e:  # UsageError, BadParameter, NoSuchOption ...
            if debug:
                raise
            click.echo(f"error: {e.format_message()}", err=True)
            sys.exit(EXIT_USER_ERROR)
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            sys.exit(130)
        except TrainingStopped as e:
            if debug:
                raise
            click.echo(f"error: {_first_line(e)}", err=True)
            sys.exit(EXIT_TRAINING_STOPPED)
        except _user_errors() as e:
            if debug:
                raise
            click.echo(f"error: {_first_line(e)}", err=True)
            sys.exit(EXIT_USER_ERROR)
        except Exception as e:  # a bug: say so in one line, the traceback is one flag away
            if debug:
                raise
            click.echo(
                f"error: internal error ({type(e).__name__}: {_first_line(e)}); "
                "rerun with `fewflow --debug ...` for the traceback",
                err=True,
            )
            sys.exit(EXIT_INTERNAL_ERROR)


def _first_command_index(argv: list[str], group: click.Group) -> int:
    for i, a in enumerate(argv):
        if a in group.commands:
            return i
    return len(argv)


# --------------------------------------------------------------------------- helpers


def _parse_value(text: str) -> Any:
    """Parse a ``--set`` value as YAML (numbers, true/false, null, lists), falling back to the string."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _parse_sets(items: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--set")
        k, v = item.split("=", 1)
        out[k.strip()] = _parse_value(v.strip())
    return out


def _parse_int_list(text: str, what: str) -> list[int]:
    try:
        vals = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise click.BadParameter(
            f"expected comma-separated integers, got {text!r}", param_hint=what
        ) from None
    if not vals or any(v < 1 for v in vals):
        raise click.BadParameter(f"expected positive integers, got {text!r}", param_hint=what)
    return vals


def _threads(n: int | None) -> None:
    import torch

    if n:
        torch.set_num_threads(int(n))


def _device(name: str) -> str:
    """``auto``: CUDA when available, else CPU."""
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _say(msg: str) -> None:
    click.echo(msg, err=True)


# --------------------------------------------------------------------------- the group


@click.group(
    cls=FewflowGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100}
)
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.version_option(package_name="fewflow", prog_name="fewflow")
def cli(debug: bool) -> None:
    """fewflow: flow-matching generative models -- train, sample fast, measure.

    \b
    Examples:
      fewflow demo --out demo_out                 # 2-3 minute tour on CPU
      fewflow train --data checkerboard --steps 3000 --out runs/cb
      fewflow sample runs/cb --nfe 8 --solver heun --n 2000 --out s.png
      fewflow eval runs/cb --nfe 1,2,4,8,100 --json
      fewflow fetch mnist

    Time runs from t = 0 (noise) to t = 1 (data). Run `fewflow COMMAND --help` for details.
    """


# --------------------------------------------------------------------------- train


@cli.command("train")
@click.option(
    "--data",
    "data",
    default=None,
    help="Data: a built-in set (8gaussians, moons, checkerboard, spirals, rings, gmm, digits, mnist), "
    "a folder of images (class subfolders = labels), an .npy / .npz / .csv file, or module:function. "
    "[default: checkerboard, or the config's]",
)
@click.option(
    "--image-size", "image_size", type=int, default=None,
    help="Centre-crop and resize the images of a --data folder to S x S.",
)
@click.option("--method", default=None, help="Training method (see `fewflow methods`).  [default: cfm]")
@click.option(
    "--teacher", default=None, type=click.Path(file_okay=False),
    help="Run folder of a trained velocity model, for methods that distil or refine one.",
)
@click.option(
    "--latent", default=None, type=click.Path(file_okay=False),
    help="Run folder of a trained autoencoder (--method autoencoder): train on its latents "
    "(latent flow matching); sampling decodes.",
)
@click.option("--out", "out", type=click.Path(file_okay=False), required=True, help="Run folder to write.")
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
    default=None,
    help="A JSON or YAML run config (as written to RUN/config.json); flags override it.",
)
@click.option("--resume", is_flag=True, help="Continue the run in --out from its latest checkpoint.")
@click.option("--steps", type=int, default=None, help="Optimiser steps in total.")
@click.option("--batch-size", type=int, default=None, help="Batch size.")
@click.option("--lr", type=float, default=None, help="Learning rate.")
@click.option("--coupling", default=None, help="independent | ot | sinkhorn | wcfm | sb | class_ot.")
@click.option("--path", "path_schedule", default=None, help="Path schedule: linear|cosine|vp|polynomial.")
@click.option("--time-sampler", default=None, help="uniform | logit_normal | shifted.")
@click.option("--source", default=None, help="gaussian | norm_aligned.")
@click.option(
    "--model", "model_kind", default=None,
    help="Network: mlp | unet | dit, or your own nn.Module class as module:Class "
    "(constructor arguments: --set model.KEY=VALUE).",
)
@click.option("--conditional/--unconditional", default=None, help="Class-conditional training (labels y).")
@click.option(
    "--label-dropout", type=float, default=None, help="Drop labels with this probability (for CFG)."
)
@click.option("--n", "n_data", type=int, default=None, help="Number of training samples to load/draw.")
@click.option("--seed", type=int, default=None, help="Seed for data order, init and the objective.")
@click.option("--device", default=None, help="auto | cpu | cuda | cuda:1 ...")
@click.option(
    "--set",
    "sets",
    multiple=True,
    metavar="KEY=VALUE",
    help="Set any config entry by dotted key, e.g. --set model.hidden=128 --set train.ema_decay=0.99.",
)
@click.option("--threads", type=int, default=None, help="torch.set_num_threads (default: leave as is).")
@click.option("--no-progress", is_flag=True, help="No tqdm bar.")
@click.option(
    "--logger", "logger", type=click.Choice(["tensorboard", "wandb", "both", "none"]), default=None,
    help="Scalars besides log.csv: TensorBoard (default), Weights & Biases (offline unless "
    "WANDB_MODE=online; pip install 'fewflow[wandb]'), both, or none.",
)
@click.option("--force", is_flag=True, help="Start afresh even if --out already holds a run.")
def train_cmd(
    data,
    image_size,
    method,
    teacher,
    latent,
    out,
    config_file,
    resume,
    steps,
    batch_size,
    lr,
    coupling,
    path_schedule,
    time_sampler,
    source,
    model_kind,
    conditional,
    label_dropout,
    n_data,
    seed,
    device,
    sets,
    threads,
    no_progress,
    logger,
    force,
) -> None:
    """Train a model and write a run folder: config.json, checkpoints, log.csv, samples.png.

    \b
    Examples:
      fewflow train --data checkerboard --steps 3000 --out runs/cb
      fewflow train --data moons --coupling ot --path linear --out runs/moons-ot
      fewflow train --data moons --method meanflow --set method.ratio=0.5 --out runs/mf
      fewflow train --data moons --method reflow --teacher runs/moons-ot --out runs/rf
      fewflow train --data digits --conditional --label-dropout 0.1 --out runs/digits
      fewflow train --data mnist --method autoencoder --steps 2000 --out runs/ae
      fewflow train --data mnist --latent runs/ae --method cfm --out runs/lfm
      fewflow train --config my_run.yaml --out runs/x --set train.lr=3e-4
      fewflow train --data photos/ --image-size 32 --model unet --out runs/photos
      fewflow train --data points.csv --model mynets:Net --set model.width=64 --out runs/mine
      fewflow train --out runs/cb --resume --steps 6000     # continue to 6000 steps

    Precedence: data-set defaults < --config file < flags. With --resume the run's own
    config.json is used and only --steps / --device / --no-progress may change.

    Exit status: 0 when training ran to its last step; 2 for bad input; 3 when training
    stopped early on a non-finite loss or gradient (diverged): OUT/latest still names the
    last good checkpoint, and the weights, gradients and offending values of the failed
    step are in OUT/diverged-<step>/ for inspection.
    """
    from fewflow.config import RunConfig, read_config
    from fewflow.runs import read_run_folder, train_run

    _threads(threads)
    if data is not None and not data.strip():
        raise click.BadParameter("is empty: name a data set", param_hint="--data")
    out_dir = Path(out)
    flags: dict[str, Any] = {
        "method.name": method,
        "teacher": teacher,
        "latent": latent,
        "objective.coupling": coupling,
        "objective.path": path_schedule,
        "objective.time_sampler": time_sampler,
        "objective.source": source,
        "objective.conditional": conditional,
        "objective.label_dropout": label_dropout,
        "model.type": model_kind,
        "data.n": n_data,
        "data.kwargs.image_size": image_size,
        "seed": seed,
        "train.steps": steps,
        "train.batch_size": batch_size,
        "train.lr": lr,
        "train.logger": logger,
        "train.device": device,
    }
    flags = {k: v for k, v in flags.items() if v is not None}
    flags.update(_parse_sets(sets))
    if no_progress:
        flags["train.progress"] = False
    if seed is not None:
        flags["train.seed"] = seed

    if resume:
        cfg = read_run_folder(out_dir)
        allowed = {"train.steps", "train.device", "train.progress"}
        changed = sorted(set(flags) - allowed)
        if changed or data or config_file:
            extra = changed + (["--data"] if data else []) + (["--config"] if config_file else [])
            raise FewflowError(
                f"--resume continues {out_dir} with its own config; cannot change {', '.join(extra)}"
            )
        cfg = cfg.replace(flags)
    else:
        if (out_dir / "config.json").exists() and not force:
            raise FewflowError(
                f"{out_dir} already holds a run; use --resume to continue it or --force to overwrite"
            )
        if config_file:
            raw = read_config(config_file)
            raw = raw.get("run_config", raw)  # accept a run folder's config.json as well
            if data:  # another data source: forget what the config had recorded about its own
                raw["data"] = {k: v for k, v in (raw.get("data") or {}).items()
                               if k not in ("kind", "path", "sha256")}
                raw["data"]["name"] = data
            if not (raw.get("data") or {}).get("name"):
                raise FewflowError(f"{config_file} has no data section (data.name): add one or pass --data")
            raw["data"].pop("sha256", None)  # a new run records the file as it is now
            base = _base_config(raw["data"]["name"])
            merged = base.to_dict()
            _deep_update(merged, raw)
            cfg = RunConfig.from_dict(merged)
        else:
            cfg = _base_config(data or "checkerboard")
        kind = flags.pop("model.type", None)
        if kind is not None and _model_kind(kind) != _model_kind(cfg.model.get("type", "MLP")):
            cfg = cfg.replace({"model": {"type": kind}})  # another network: drop the default's settings
        cfg = cfg.replace(flags)
        if image_size is not None and cfg.data.kind is None and cfg.data.name in _builtin_data():
            raise click.BadParameter(f"applies to a folder of images, not to {cfg.data.name!r}",
                                     param_hint="--image-size")
        if force and out_dir.exists():
            import shutil

            shutil.rmtree(out_dir)
    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 talks
    what = cfg.data.name
    if _user_inputs(cfg):  # bad user data or network (or a changed file): one error before training
        from fewflow.runs import check_inputs

        what = check_inputs(cfg).description or what
    elif cfg.latent and not resume:  # a wrong autoencoder run: one error before training starts
        from fewflow.runs import check_latent

        check_latent(cfg)
    if cfg.train.get("logger") in ("wandb", "both"):  # a missing package fails before training starts
        from fewflow.train.loggers import require_wandb

        require_wandb()
    if main_rank:
        _say(f"training {cfg.method_name} on {what} -> {out_dir}")
    result = train_run(cfg, out_dir, resume=resume)
    _check_completed(result)
    if main_rank:
        _say(f"done: step {result.step}, last loss {result.last_loss:.4g} ({result.stopped_reason})")
        click.echo(str(out_dir))


def _builtin_data() -> tuple[str, ...]:
    from fewflow.data import DATASETS

    return tuple(DATASETS)


def _base_config(name: str) -> Any:
    """The defaults for ``--data NAME``: the built-in set's, or those for data from the user."""
    from fewflow.config import default_config
    from fewflow.runs import user_data_config

    return default_config(name) if name in _builtin_data() else user_data_config(name)


def _user_inputs(cfg: Any) -> bool:
    """Whether the run trains on data from the user or with the user's network."""
    from fewflow.data import is_import_path

    return cfg.data.kind is not None or cfg.data.name not in _builtin_data() or is_import_path(
        cfg.model.get("type"))


def _model_kind(name: Any) -> str:
    """A built-in network's canonical type (``unet`` -> ``UNet``) or a user's ``module:Class`` as is."""
    from fewflow.config import model_type
    from fewflow.data import parse_import_path

    if ":" in str(name):
        return ":".join(parse_import_path(name, "a model class (--model)"))
    return model_type(name)


def _deep_update(base: dict, new: dict) -> None:
    """Merge ``new`` into ``base``; a ``model`` section of another ``type`` replaces the default one."""
    for k, v in new.items():
        if (
            k == "model"
            and isinstance(v, dict)
            and "type" in v
            and isinstance(base.get(k), dict)
            and _model_kind(v["type"]) != _model_kind(base[k].get("type", "MLP"))
        ):
            base[k] = dict(v)
        elif isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_update(base[k], v)
        else:
            base[k] = v


# --------------------------------------------------------------------------- sample


@cli.command("sample")
@click.argument("run_dir", type=click.Path())
@click.option(
    "--nfe", type=int, default=None, help="Model evaluations (Euler: steps; Heun/midpoint: 2 per step)."
)
@click.option(
    "--solver", default=None,
    help="euler | midpoint | heun | rk4 | flowturbo | flow_map.  [default: the run's method's]",
)
@click.option("--n", "n", type=int, default=1000, show_default=True, help="Number of samples.")
@click.option(
    "--out",
    "out",
    type=click.Path(dir_okay=False),
    required=True,
    help="Output file: .npy, .pt, .png (scatter for 2-D, image grid otherwise) or .fasta (sequence runs).",
)
@click.option("--grid", "grid", default=None, help="Time grid: uniform | shift | edm | logsnr | boss (BOSS).")
@click.option("--shift", type=float, default=None, help="Shift factor for --grid shift (default 3).")
@click.option(
    "--raag", "raag_alpha", type=float, default=None,
    help="Ratio-aware adaptive guidance with this alpha; --cfg is then w_max.",
)
@click.option(
    "--cfg", "cfg_scale", type=float, default=None, help="Classifier-free guidance scale (1 = off)."
)
@click.option("--label", type=int, default=None, help="Class label for a conditional run (default: random).")
@click.option(
    "--cond", "cond_file", type=click.Path(dir_okay=False), default=None,
    help="Condition tensor c (.npy): N rows (or one row for all) of the run's cond_shape.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the source noise.")
@click.option(
    "--which",
    type=click.Choice(["ema", "model"]),
    default="ema",
    show_default=True,
    help="EMA or raw weights.",
)
@click.option("--device", default="auto", show_default=True, help="auto (CUDA if available) | cpu | cuda.")
@click.option("--threads", type=int, default=None, help="torch.set_num_threads.")
@click.option("--set", "sets", multiple=True, metavar="method.FIELD=VALUE",
              help="A field of the run's method config read at sampling time (repeatable), e.g. "
                   "--set method.jacobi_threshold=1e-6; the run folder is not changed.")
def sample_cmd(
    run_dir, nfe, solver, n, out, grid, shift, raag_alpha, cfg_scale, label, cond_file, seed, which, device,
    threads, sets,
) -> None:
    """Draw samples from a trained run.

    \b
    Examples:
      fewflow sample runs/cb --nfe 8 --solver heun --n 2000 --out s.npy
      fewflow sample runs/cb --nfe 4 --grid shift --shift 3 --out s.png
      fewflow sample runs/digits --nfe 16 --cfg 2.0 --label 3 --out threes.png
      fewflow sample runs/digits --nfe 4 --cfg 3.0 --raag 10 --out raag.png
      fewflow sample runs/cond --cond c.npy --n 500 --cfg 2.0 --out s.npy   # c: (500, *cond_shape)
      fewflow sample runs/cb --nfe 4 --grid boss --out boss.png     # cached in the user cache
      fewflow sample runs/cb --nfe 6 --solver flowturbo --out turbo.png
      fewflow sample runs/dna --n 100 --out seqs.fasta             # a run on sequence data
      fewflow sample runs/tf --set method.FIELD=VALUE --out s.png   # a sampling-time method setting
    """
    import torch

    from fewflow.runs import load_run
    from fewflow.sampling import generate

    _threads(threads)
    device = _device(device)
    out_path = Path(out)
    suffix = out_path.suffix.lower()
    if suffix not in (".npy", ".pt", ".png", ".fasta", ".fa"):
        raise click.BadParameter(f"output must end in .npy, .pt, .png or .fasta, got {out!r}",
                                 param_hint="--out")
    if n < 1:
        raise click.BadParameter(f"must be positive, got {n}", param_hint="--n")
    cond = None
    if cond_file is not None:
        import numpy as np

        try:
            cond = torch.from_numpy(np.load(cond_file, allow_pickle=False))
        except (OSError, ValueError, TypeError) as exc:
            raise FewflowError(f"cannot read the condition --cond {cond_file}: {exc}") from None
    model, cfg = load_run(run_dir, which=which, device=device)
    overrides = _parse_sets(sets)
    bad = [k for k in overrides if not k.startswith("method.") or k == "method.name"]
    if bad:
        raise FewflowError(f"fewflow sample --set takes method.FIELD=VALUE (not the method's name), "
                           f"got {bad[0]!r}")
    if overrides:
        cfg = cfg.replace(overrides)
    if suffix in (".fasta", ".fa") and cfg.meta.get("kind") != "sequence":
        raise click.BadParameter("FASTA output needs a run trained on sequence data", param_hint="--out")
    gkw = dict(cfg.sampler.grid_kwargs)
    if shift is not None:
        gkw["shift"] = shift
    gen = torch.Generator(device=device).manual_seed(seed)
    res = generate(
        model,
        cfg,
        n,
        nfe=nfe,
        stepper=solver,
        grid=grid,
        grid_kwargs=gkw,
        cfg_scale=cfg_scale,
        label=label,
        cond=cond,
        generator=gen,
        raag_alpha=raag_alpha,
    )
    x = res.x.detach().cpu()
    if suffix == ".npy":
        import numpy as np

        from fewflow._io import atomic_path

        with atomic_path(out_path) as tmp, open(tmp, "wb") as fh:
            np.save(fh, x.numpy())
    elif suffix == ".pt":
        import io

        from fewflow._io import atomic_write_bytes

        buf = io.BytesIO()
        torch.save(x, buf)
        atomic_write_bytes(out_path, buf.getvalue())
    elif suffix in (".fasta", ".fa"):
        from fewflow.data.sequences import alphabet_for, decode, write_fasta

        seqs = decode(x, alphabet_for(cfg.meta.get("alphabet"), int(cfg.meta["shape"][-1])))
        write_fasta(out_path, seqs, names=[f"sample_{i}" for i in range(len(seqs))])
    else:
        from fewflow.plotting import plot_samples

        vr = cfg.meta.get("value_range")
        plot_samples(
            x,
            out_path,
            value_range=tuple(vr) if vr and len(cfg.meta.get("shape", [])) == 3 else None,
            title=f"{cfg.data.name}: NFE {res.nfe}",
        )
    _say(f"{n} samples, NFE {res.nfe} -> {out_path}")
    click.echo(str(out_path))


# --------------------------------------------------------------------------- eval


@cli.command("eval")
@click.argument("run_dir", type=click.Path())
@click.option("--nfe", "nfe", default="1,2,4,8,100", show_default=True, help="Comma-separated NFE budgets.")
@click.option(
    "--solver", default=None, help="Comma-separated steppers, e.g. euler,heun.  [default: the run's]"
)
@click.option("--grid", "grid", default=None, help="Time grid: uniform | shift | edm | logsnr | boss.")
@click.option(
    "--n", "n", type=int, default=None, help="Samples per evaluation (default: 2-D 10000, images 2000)."
)
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Seed of the source noise and projections."
)
@click.option("--which", type=click.Choice(["ema", "model"]), default="ema", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print ONE JSON object (else a table).")
@click.option("--out", "out", type=click.Path(dir_okay=False), default=None, help="Also write the JSON here.")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA if available) | cpu | cuda.")
@click.option("--threads", type=int, default=None, help="torch.set_num_threads.")
@click.option("--diagnostics", "diagnostics", is_flag=True,
              help="Also measure whether the learned field is a gradient field (Jacobian asymmetry, loop "
              "circulation) and the curvature of its paths.")
def eval_cmd(run_dir, nfe, solver, grid, n, seed, which, as_json, out, device, threads, diagnostics) -> None:
    """Measure sample quality against held-out data at several NFE budgets.

    2-D data: sliced-W2, MMD, energy distance; digits / MNIST: Frechet distance in the data set's
    classifier features and that classifier's accuracy on class-conditional samples.
    Always: straightness of the sampling paths, wall time, actual NFE, and the two-sample
    floor (the same metric between two independent data draws of the same size).
    Samples with NaN / inf (a diverged model) and unknown --solver names are errors (exit 2).
    --diagnostics adds whether the learned field is a gradient field: its Jacobian asymmetry
    ||J - J^T|| / ||J|| and normalised loop circulation at several t (0 for a gradient field).

    \b
    Examples:
      fewflow eval runs/cb --nfe 1,2,4,8,100 --json
      fewflow eval runs/cb --nfe 2,4,8 --solver euler,heun --out metrics.json
      fewflow eval runs/cb --nfe 8 --diagnostics
    """
    from fewflow.evaluate import evaluate_run, format_table
    from fewflow.runs import load_run

    _threads(threads)
    device = _device(device)
    nfes = _parse_int_list(nfe, "--nfe")
    solvers = [s.strip() for s in (solver or "").split(",") if s.strip()] or None  # unknown: an error
    model, cfg = load_run(run_dir, which=which, device=device)
    report = evaluate_run(
        model, cfg, nfes=nfes, steppers=solvers, grid=grid, n=n, seed=seed, progress=not as_json,
        diagnostics=diagnostics,
    )
    report["run"] = str(run_dir)
    text = json.dumps(report, indent=None if as_json else 2, sort_keys=False)
    if out:
        from fewflow._io import atomic_write_json

        atomic_write_json(Path(out), report, indent=2)
    if as_json:
        click.echo(text)
    else:
        click.echo(format_table(report))


# --------------------------------------------------------------------------- methods


@cli.command("methods")
@click.option("--json", "as_json", is_flag=True, help="Print the registry as a JSON list.")
@click.option("--all", "show_all", is_flag=True, help="Also list the ablations.")
def methods_cmd(as_json: bool, show_all: bool) -> None:
    """List the registered training methods: name, paper, needs, default sampler.

    \b
    Examples:
      fewflow methods
      fewflow methods --json          # every method with its config fields and defaults
    """
    from fewflow.methods import list_methods, methods_table

    specs = [s for s in list_methods() if show_all or as_json or not s.ablation]
    if as_json:
        click.echo(json.dumps([s.describe() for s in specs], indent=1, default=str))
    else:
        click.echo(methods_table(specs))


# --------------------------------------------------------------------------- fetch


@cli.command("fetch")
@click.argument("name", type=click.Choice(["mnist", "dna", "proteins", "pbmc68k", "meshes", "meshes-large"]))
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Where to keep the data (default: $FEWFLOW_CACHE or ~/.cache/fewflow).",
)
@click.option("--force", is_flag=True, help="Download again even if a verified copy is cached.")
def fetch_cmd(name, cache_dir, force) -> None:
    """Download a data set once (checksum-verified) into the cache.

    \b
    Examples:
      fewflow fetch mnist
      fewflow fetch mnist --cache-dir /data/fewflow
      fewflow fetch dna        # a bacterial genome (pyrodigal 3.7.1 wheel), 128-bp windows
      fewflow fetch proteins   # 2,100 proteins (pyhmmer 0.12.3 wheel), 64-aa crops
      fewflow fetch pbmc68k    # 700 PBMCs (scanpy 1.11.5 wheel), populations for Meta Flow Matching
      fewflow fetch meshes     # airplane, ant, nut, sphere (pyvista 0.49.1 wheel, MIT)
      fewflow fetch meshes-large   # + bunny, cow, bone (pymeshlab wheel, GPL, 60 MB)
    """
    if name.startswith("meshes"):
        from fewflow.points import fetch_meshes

        for mesh, path in fetch_meshes(cache_dir=cache_dir, include_large=name == "meshes-large",
                                       force=force).items():
            click.echo(f"{mesh}: {path}")
        return
    from fewflow.data import fetch_dna, fetch_mnist, fetch_proteins
    from fewflow.data.populations import fetch_pbmc68k

    fetch = {"mnist": fetch_mnist, "dna": fetch_dna, "proteins": fetch_proteins,
             "pbmc68k": fetch_pbmc68k}[name]
    path = fetch(cache_dir=cache_dir, force=force)
    click.echo(str(path))


# --------------------------------------------------------------------------- demo


@cli.command("demo")
@click.option(
    "--out",
    "out",
    type=click.Path(file_okay=False),
    default="demo_out",
    show_default=True,
    help="Folder for report.md, metrics.json, plots and the trained run.",
)
@click.option("--quick", is_flag=True, help="A much smaller run (about 30 s) for smoke tests.")
@click.option(
    "--digits/--no-digits",
    default=False,
    show_default=True,
    help="Also train a class-conditional model on 8x8 digits (adds about a minute).",
)
@click.option("--steps", type=int, default=None, hidden=True, help="Override the training steps (tests).")
@click.option(
    "--n-eval", type=int, default=None, hidden=True, help="Override samples per evaluation (tests)."
)
@click.option("--threads", type=int, default=1, show_default=True, help="torch.set_num_threads.")
def demo_cmd(out, quick, digits, steps, n_eval, threads) -> None:
    """Train a flow-matching model on a built-in data set and report quality vs NFE.

    Trains CFM on checkerboard, samples at NFE 1, 2, 4, 8, 100 with Euler and Heun, and writes
    OUT/report.md (metric vs NFE beside the two-sample floor), OUT/metrics.json and plots.
    Runs on CPU in about 2-3 minutes.

    \b
    Examples:
      fewflow demo
      fewflow demo --out /tmp/demo --quick
    """
    from fewflow.cli.demo import run_demo

    _threads(threads)
    report = run_demo(Path(out), quick=quick, digits=digits, steps=steps, n_eval=n_eval)
    click.echo(str(report))


# --------------------------------------------------------------------------- bench

# every benchmark but ``overhead`` is a module ``fewflow.bench.NAME`` with ``main(argv) -> int``
BENCHES = ("fewstep", "samplers", "discrete", "inverse", "likelihood_latent", "geometry", "control")


@cli.command(
    "bench",
    context_settings={
        "ignore_unknown_options": True,
        "allow_extra_args": True,
        "help_option_names": ["--help"],
    },
)
@click.argument("which", type=click.Choice(["overhead", *BENCHES]))
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench_cmd(which: str, args: tuple[str, ...]) -> None:
    """Run a benchmark and write its tables: with --full into benchmarks/results (the committed tables),
    otherwise into the user cache folder (or --out).

    WHICH is ``fewstep`` (every few-step method vs the teacher at NFE 1-8), ``samplers`` (schedules,
    steppers, FlowTurbo, BOSS, pruning, CFG vs RAAG), ``discrete`` (sequences on the simplex, transition
    matching), ``inverse`` (FLAIR, DPS, FlowOpt with a trained prior), ``likelihood_latent`` (latent FM,
    TARFlow, PFGM++, MLE fine-tuning, SymmFlow, field diagnostics), ``geometry`` (PUFM++, Meta Flow
    Matching, SCOOP, ReynoldsFlow, FlowVid), ``control`` (MP1/DM1 policies, Action FM, GoalFlow) or
    ``overhead`` (the loop and loss against bare PyTorch, prefetched OT-CFM; ``--sampling --device cuda``:
    few-step sampling throughput). Further options go to the benchmark; ``fewflow bench fewstep -h``
    lists them.

    \b
    Examples:
      fewflow bench fewstep --quick
      fewflow bench fewstep --full --datasets mnist     # after fewflow fetch mnist
      fewflow bench samplers --quick --datasets moons
      fewflow bench geometry --quick --parts mfm,reynolds
      fewflow bench overhead
      fewflow bench overhead --sampling --device cuda
    """
    if which == "overhead":
        import runpy

        script = Path(__file__).resolve().parents[3] / "benchmarks" / "overhead.py"
        if not script.is_file():
            raise FewflowError(f"benchmarks/overhead.py not found next to the package ({script})")
        sys.argv = [str(script), *args]
        runpy.run_path(str(script), run_name="__main__")
        return
    import importlib

    bench_main = importlib.import_module(f"fewflow.bench.{which}").main
    code = bench_main(list(args))
    if code:
        raise SystemExit(code)


# --------------------------------------------------------------------------- restore / edit

from fewflow.cli.restore import COMMANDS as _INVERSE_COMMANDS  # noqa: E402

for _c in _INVERSE_COMMANDS:
    cli.add_command(_c)

from fewflow.cli.export import COMMANDS as _EXPORT_COMMANDS  # noqa: E402

for _c in _EXPORT_COMMANDS:
    cli.add_command(_c)

from fewflow.cli.control import COMMANDS as _CONTROL_COMMANDS  # noqa: E402

for _c in _CONTROL_COMMANDS:
    cli.add_command(_c)

from fewflow.cli.motion import COMMANDS as _MOTION_COMMANDS  # noqa: E402

for _c in _MOTION_COMMANDS:
    cli.add_command(_c)

from fewflow.cli.points import COMMANDS as _POINTS_COMMANDS  # noqa: E402

for _c in _POINTS_COMMANDS:
    cli.add_command(_c)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point (``fewflow = fewflow.cli.main:main``)."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    cli.main(args=argv, prog_name="fewflow")


if __name__ == "__main__":  # pragma: no cover
    main()
