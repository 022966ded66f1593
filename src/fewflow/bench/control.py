"""``fewflow bench control``: robot policies and planning with flows.

One part per paper (see :mod:`fewflow.bench.parts`), each a module ``fewflow.bench.ctl_<name>``:

* ``policies``: FM (10 steps), MeanFlow at 1 step (MP1) and MP1 with each of DM1's dispersive losses on
  Push-T and a 2-D navigation world at 10 / 50 / 200 demonstrations: success, mode coverage, latency;
* ``actionfm``: Action Flow Matching on a unicycle after actuator-gain switches, against no adaptation and
  online model fine-tuning: waypoints reached and recovery steps;
* ``goalflow``: GoalFlow (goal vocabulary, scoring, goal-conditioned 1-step trajectory flow) against plain
  conditional FM in the navigation world: off-road / collision rate, min-ADE / FDE.

Writes ``control.{json,md,png}`` with the ``{claim, dataset, met, value}`` claims of every part.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fewflow.bench.parts import parts_main, run_parts

__all__ = ["PARTS", "main", "run"]

PARTS = ("policies", "actionfm", "goalflow")
STEM = "control"
TITLE = "Robot policies and planning with flows"


def run(mode: str = "quick", parts: Sequence[str] = PARTS, *, cache_dir: Path | None = None,
        out_dir: Path | None = None, seed: int = 0, verbose: bool = True) -> dict[str, Any]:
    """Run the selected parts; write the tables when ``out_dir`` is set (cached parts are read back)."""
    return run_parts(STEM, "ctl", PARTS, TITLE, mode, parts, cache_dir=cache_dir, out_dir=out_dir, seed=seed,
                     verbose=verbose)


def main(argv: Sequence[str] | None = None) -> int:
    """``fewflow bench control [--quick|--full|--smoke] [--parts policies,actionfm,goalflow]``."""
    return parts_main(STEM, "ctl", PARTS, TITLE, __doc__.split("\n\n")[0], argv)
