"""effft: fine-tune EfficientNet on your own images."""

from .input import InputSpec
from .model import EfficientNet, create_model, list_models
from .model.weights.load import load_weights

__version__ = "0.1.0"
__all__ = ["EfficientNet", "InputSpec", "create_model", "list_models", "load_weights", "__version__"]
