"""``fewflow export``: write a trained run as a pretrained folder (Hugging Face Hub layout).

The command is collected in :data:`COMMANDS` for the ``fewflow`` group.
"""

from __future__ import annotations

import click

__all__ = ["COMMANDS", "export_cmd"]


def _nfe_list(text: str) -> list[int]:
    try:
        vals = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}",
                                 param_hint="--eval") from None
    if not vals or any(v < 1 for v in vals):
        raise click.BadParameter(f"expected positive integers, got {text!r}", param_hint="--eval")
    return vals


@click.command("export")
@click.argument("run_dir", type=click.Path())
@click.argument("out_dir", type=click.Path())
@click.option("--which", type=click.Choice(["ema", "model"]), default="ema", show_default=True,
              help="The weights to export.")
@click.option("--eval", "eval_nfe", default=None, metavar="NFE_LIST",
              help="Evaluate the run at these comma-separated NFE budgets (as fewflow eval) and put the "
              "metrics table in the model card.")
@click.option("--eval-n", "eval_n", type=int, default=None,
              help="Samples per evaluation with --eval (default: 2-D 10000, images 2000).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the evaluation (--eval).")
@click.option("--threads", type=int, default=None, help="torch.set_num_threads.")
def export_cmd(run_dir, out_dir, which, eval_nfe, eval_n, seed, threads) -> None:
    """Export the weights of RUN_DIR as a pretrained folder OUT_DIR: model.safetensors (the chosen
    weights only), config.json (what rebuilds and samples the model) and README.md (a model card).

    The folder loads with fewflow.pretrained.from_pretrained and samples like the run itself; upload it
    with huggingface_hub if you like. Latent runs and runs that sample with a teacher are not exportable.

    \b
    Examples:
      fewflow export runs/mf export/mf
      fewflow export runs/digits export/digits --eval 1,2,4 --eval-n 1000
    """
    import torch

    from fewflow.pretrained import save_pretrained

    if threads:
        torch.set_num_threads(int(threads))
    metrics = None
    if eval_nfe is not None:
        from fewflow.evaluate import evaluate_run
        from fewflow.runs import load_run

        nfes = _nfe_list(eval_nfe)
        model, cfg = load_run(run_dir, which=which, device="cpu")
        metrics = evaluate_run(model, cfg, nfes=nfes, n=eval_n, seed=seed,
                               log=lambda m: click.echo(m, err=True))
    out = save_pretrained(run_dir, out_dir, which=which, metrics=metrics)
    click.echo(f"exported the {which} weights of {run_dir} -> {out}", err=True)
    click.echo(str(out))


COMMANDS = [export_cmd]
