"""Benchmarks built on the library, one module each with ``main(argv)`` (what ``fewflow bench NAME``
runs) and ``run(Config(...))``:

* ``fewstep``: few-step methods at an equal training budget;
* ``samplers``: schedules, steppers, BOSS, FlowTurbo, source pruning and guidance on the same teachers;
* ``discrete``: Gumbel-softmax FM vs linear-simplex FM, real DNA / proteins with STGFlow, transition
  matching vs FM Euler;
* ``inverse``: FLAIR, DPS and FlowOpt with a trained prior (restoration, inversion, editing).

Shared harness: :mod:`fewflow.bench.common`.
"""

from __future__ import annotations

__all__ = ["common", "discrete", "fewstep", "inverse", "samplers"]
