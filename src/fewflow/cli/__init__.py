"""The ``fewflow`` command line: ``train | sample | eval | fetch | demo`` (thin over the library).

Entry point: :func:`fewflow.cli.main.main` (console script ``fewflow``). Heavy imports happen
inside the commands so that ``fewflow --help`` starts fast.
"""

from __future__ import annotations

__all__ = ["main"]


def main(argv: list[str] | None = None) -> None:
    """Run the ``fewflow`` command line (see :mod:`fewflow.cli.main`)."""
    from fewflow.cli.main import main as _main

    _main(argv)
