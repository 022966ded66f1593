"""Couplings: how source samples x0 are paired with data x1 in a batch (they reorder x0, never x1).

Independent (CFM), exact minibatch OT (OT-CFM), Sinkhorn and Schroedinger-bridge entropic OT (Tong et al.,
"Improving and generalizing flow-based generative models with minibatch optimal transport"), Gibbs-kernel
weights (W-CFM, "Weighted Conditional Flow Matching"), class-conditional OT, and a background-thread
prefetcher that takes the OT solve off the training critical path.
"""

from fewflow.couplings.base import Coupling, CouplingResult, IndependentCoupling, pairwise_cost
from fewflow.couplings.ot import (
    ClassConditionalOT,
    ExactOTCoupling,
    SchrodingerBridgeCoupling,
    SinkhornCoupling,
    brownian_bridge_noise,
    entropic_plan,
)
from fewflow.couplings.prefetch import PrefetchCoupler
from fewflow.couplings.weighted import WeightedCoupling, effective_sample_size, gibbs_weights

__all__ = [
    "ClassConditionalOT",
    "Coupling",
    "CouplingResult",
    "ExactOTCoupling",
    "IndependentCoupling",
    "PrefetchCoupler",
    "SchrodingerBridgeCoupling",
    "SinkhornCoupling",
    "WeightedCoupling",
    "brownian_bridge_noise",
    "effective_sample_size",
    "entropic_plan",
    "gibbs_weights",
    "pairwise_cost",
]
