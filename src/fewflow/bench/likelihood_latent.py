"""``fewflow bench likelihood_latent``: latent flows, exact likelihoods, fine-tuning and field diagnostics.

One part per paper, each a module ``fewflow.bench.ll_<name>`` with ``part(mode, cache, seed, verbose) ->
{"rows", "claims", "lines"}`` that trains through the method registry, caches its runs and rows (a rerun
resumes where a killed one stopped) and states its paper's effect at this scale as claims:

* ``lfm``: latent flow matching on MNIST against pixel-space FM at equal training wall time;
* ``tarflow``: an autoregressive normalizing flow (TARFlow / STARFlow): bits/dim, denoising, Jacobi vs
  sequential sampling, Bayes classification from conditional likelihoods;
* ``pfgmpp``: PFGM++ for D in {16, 64, 256, 2048, inf}: quality at low NFE and under injected noise;
* ``mle_finetune``: fine-tuning by MLE of reconstructions, before vs after, straightforward and residual;
* ``symmflow``: one network that generates, classifies and segments;
* ``diagnostics``: is the learned field a gradient field (analytic, unconstrained, grad-phi)?

Writes ``likelihood_latent.{json,md,png}`` with the ``{claim, dataset, met, value}`` claims of every part.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fewflow.bench.parts import parts_main, run_parts

__all__ = ["PARTS", "main", "run"]

PARTS = ("lfm", "tarflow", "pfgmpp", "mle_finetune", "symmflow", "diagnostics")
STEM = "likelihood_latent"
TITLE = "Latent flows, likelihoods, fine-tuning and field diagnostics"


def run(mode: str = "quick", parts: Sequence[str] = PARTS, *, cache_dir: Path | None = None,
        out_dir: Path | None = None, seed: int = 0, verbose: bool = True) -> dict[str, Any]:
    """Run the selected parts; write the tables when ``out_dir`` is set. Returns ``{"claims", "parts",
    "paths"}``. Each part caches its runs and rows, so a rerun after a failure resumes."""
    return run_parts(STEM, "ll", PARTS, TITLE, mode, parts, cache_dir=cache_dir, out_dir=out_dir, seed=seed,
                     verbose=verbose)


def main(argv: Sequence[str] | None = None) -> int:
    """``fewflow bench likelihood_latent [--quick|--full|--smoke] [--parts lfm,tarflow,...]``."""
    return parts_main(STEM, "ll", PARTS, TITLE, __doc__.split("\n\n")[0], argv)
