"""Benchmarks built on the library: ``fewstep`` (few-step methods at an equal training budget) and
``samplers`` (schedules, steppers, BOSS, FlowTurbo, source pruning and guidance on the same teachers).

Entry points for the CLI: ``fewflow.bench.fewstep.main(argv)`` / ``run(FewstepConfig(...))`` and
``fewflow.bench.samplers.main(argv)`` / ``run(SamplersConfig(...))``. Shared harness:
:mod:`fewflow.bench.common`.
"""

from __future__ import annotations

__all__ = ["common", "fewstep", "samplers"]
