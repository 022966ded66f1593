"""Samplers benchmark: schedules x steppers, BOSS, FlowTurbo, source pruning and CFG vs RAAG on the few-step
benchmark's teachers (shared cache).

    python benchmarks/samplers.py --quick
    python benchmarks/samplers.py --full --workers 2   # benchmarks/results/samplers.*

Thin wrapper over :mod:`fewflow.bench.samplers` (see its docstring and docs/benchmarks.md).
"""

from __future__ import annotations

import sys

from fewflow.bench.samplers import main

if __name__ == "__main__":
    sys.exit(main())
