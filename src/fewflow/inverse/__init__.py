"""Inverse problems and editing with a trained flow as the prior.

Degradation operators and measurements (:mod:`fewflow.inverse.operators`), and solvers registered in
:mod:`fewflow.inverse.base` (each in its own module of this package, found by :func:`get_inverse`).
"""

from fewflow.inverse.base import (
    InverseResult,
    InverseSpec,
    Operator,
    get_inverse,
    list_inverse,
    register_inverse,
)

__all__ = ["InverseResult", "InverseSpec", "Operator", "get_inverse", "list_inverse", "register_inverse"]
