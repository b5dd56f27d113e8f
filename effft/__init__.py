"""effft: fine-tune EfficientNet on your own images."""

import os

# albumentations asks PyPI at every import whether a newer release exists (up to 2 s on a machine
# without internet) and warns when one does: a network call in every command, and not effft's news
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from .input import InputSpec
from .model import EfficientNet, create_model, list_models
from .model.weights.load import load_weights

__version__ = "0.1.0"
__all__ = ["EfficientNet", "InputSpec", "create_model", "list_models", "load_weights", "__version__"]
