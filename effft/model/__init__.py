"""The network (efficientnet.py, from blocks.py and layers.py), its heads, the family by name
(registry.py) and its weights (weights/)."""

from .efficientnet import EfficientNet, StageSpec, Variant
from .registry import create_model, list_models

__all__ = ["EfficientNet", "Variant", "StageSpec", "create_model", "list_models"]
