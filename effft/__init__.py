"""effft: fine-tune EfficientNet on your own images."""

from .model import EfficientNet, Preprocessing, create_model, list_models
from .model.weights import load_weights

__version__ = "0.1.0"
__all__ = ["EfficientNet", "Preprocessing", "create_model", "list_models", "load_weights", "__version__"]
