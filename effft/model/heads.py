"""What sits on the pooled features: the classifier of a fine-tuned EfficientNet."""

from __future__ import annotations

import math

from torch import nn


def classifier(num_features: int, num_classes: int) -> nn.Module:
    """A freshly initialised linear classifier (nn.Identity for 0 classes: features only)."""
    head: nn.Module = nn.Linear(num_features, num_classes) if num_classes > 0 else nn.Identity()
    init_classifier(head)
    return head


def init_classifier(head: nn.Module) -> None:
    """Small weights from the fan-in, as torch's Linear default, and a zero bias.

    A new head on pretrained features then starts near chance with a small loss, instead of
    large logits whose first gradients would wreck the pretrained features. (The TF reference
    scales by the fan-out, 1/sqrt(classes), which is large for the few classes of a fine-tune.)
    """
    if isinstance(head, nn.Linear):
        bound = 1.0 / math.sqrt(head.weight.shape[1])
        nn.init.uniform_(head.weight, -bound, bound)
        nn.init.zeros_(head.bias)
