from .efficientnet import EfficientNet, Variant, StageSpec, create_model, list_models
from .tags import Preprocessing

__all__ = ["EfficientNet", "Variant", "StageSpec", "Preprocessing", "create_model", "list_models"]
