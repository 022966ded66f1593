"""Training methods: the one registry (:mod:`fewflow.methods.registry`).

Each method file in ``fewflow/objectives/`` registers its :class:`MethodSpec` next to its loss;
``fewflow methods`` prints the table.
"""

from fewflow.methods.registry import (
    BuildContext,
    DefaultSampler,
    MethodSpec,
    Needs,
    SamplingPlan,
    Stage,
    get_method,
    list_methods,
    methods_table,
    register,
    register_variant,
)

__all__ = [
    "BuildContext",
    "DefaultSampler",
    "MethodSpec",
    "Needs",
    "SamplingPlan",
    "Stage",
    "get_method",
    "list_methods",
    "methods_table",
    "register",
    "register_variant",
]
