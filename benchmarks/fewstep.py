"""Few-step benchmark: every few-step method vs one CFM teacher at an equal budget of network evaluations.

    python benchmarks/fewstep.py --quick          # CI: a few minutes on 2 cores
    python benchmarks/fewstep.py --full --workers 2   # the committed tables (benchmarks/results/fewstep.*)
    python benchmarks/fewstep.py --only meanflow,reflow --datasets moons

Thin wrapper over :mod:`fewflow.bench.fewstep` (see its docstring and docs/benchmarks.md).
"""

from __future__ import annotations

import sys

from fewflow.bench.fewstep import main

if __name__ == "__main__":
    sys.exit(main())
