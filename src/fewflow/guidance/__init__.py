"""Guidance: wrappers that turn conditional models into a (guided) velocity or flow-map model."""

from fewflow.guidance.cfg import CFG

__all__ = ["CFG"]
