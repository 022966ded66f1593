"""Guidance: wrappers that turn conditional models into a (guided) velocity or flow-map model.

``CFG``: classifier-free guidance (Ho & Salimans 2022) in one batched forward, optionally on an interval
(Kynkaanniemi et al. 2024); ``RAAG``: ratio-aware adaptive guidance (Zhu et al. 2025).
"""

from fewflow.guidance.cfg import CFG
from fewflow.guidance.raag import RAAG, plot_ratio_history, raag_ratio, raag_scale

__all__ = ["CFG", "RAAG", "plot_ratio_history", "raag_ratio", "raag_scale"]
