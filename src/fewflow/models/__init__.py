"""Reference networks: time-embedded MLP, small U-Net, small DiT; ``build_model`` rebuilds from ``.config``.

Every model is ``forward(x, t, y=None, c=None)`` (velocity) or ``forward(x, s, t, y=None, c=None)`` with
``is_flow_map = True`` (average velocity on ``[s, t]``); none uses BatchNorm, and attention is written
out so ``torch.func.jvp`` works through every model. ``c`` is an optional condition tensor (``cond_dim``
values per row, or ``cond_channels`` image channels), with ``c_mask = False`` marking null rows.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from fewflow._validate import FewflowError, unknown_name
from fewflow.models.dit import DiT
from fewflow.models.embeddings import Conditioning, TimeEmbedding, TimeFeatures
from fewflow.models.mlp import MLP
from fewflow.models.unet import UNet, plain_attention

MODELS: dict[str, type[nn.Module]] = {"MLP": MLP, "UNet": UNet, "DiT": DiT}
# networks defined by method modules in this package, imported only when a config names them
LAZY_MODELS: dict[str, str] = {"BlockwiseVelocity": "fewflow.models.blockwise"}


def build_model(config: dict[str, Any]) -> nn.Module:
    """Rebuild a model from ``.config``: ``{"type": "MLP" | "UNet" | "DiT", **constructor kwargs}``."""
    if not isinstance(config, dict) or "type" not in config:
        raise FewflowError("model config must be a dict with a 'type' key (e.g. model.config)")
    kw = dict(config)
    kind = kw.pop("type")
    if kind in LAZY_MODELS:
        import importlib

        cls = getattr(importlib.import_module(LAZY_MODELS[kind]), kind)
    elif kind in MODELS:
        cls = MODELS[kind]
    else:
        raise unknown_name("model type", kind, [*MODELS, *LAZY_MODELS])
    try:
        return cls(**kw)
    except TypeError as exc:
        raise FewflowError(f"bad config for {kind}: {exc}") from exc


__all__ = [
    "MLP", "UNet", "DiT", "build_model", "MODELS", "Conditioning", "TimeEmbedding", "TimeFeatures",
    "plain_attention",
]
