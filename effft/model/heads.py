"""What sits on the pooled features: the classifier of a fine-tuned EfficientNet, or the
embedding of a face (identity) model."""

from __future__ import annotations

import math

import torch
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


class EmbeddingHead(nn.Module):
    """Pooled features -> BatchNorm -> linear map to `dim` -> L2 normalisation.

    The BatchNorm before the projection is ArcFace's choice (Deng et al. 2019, the "E" output
    structure: BN-Dropout-FC-BN); the projection has no bias, as the loss compares directions.
    """

    def __init__(self, num_features: int, dim: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(num_features)
        self.fc = nn.Linear(num_features, dim, bias=False)
        bound = 1.0 / math.sqrt(num_features)
        nn.init.uniform_(self.fc.weight, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.fc(self.bn(x)), dim=1)


def pooled_embedding(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The network's pooled features, L2-normalised: the embedding of a model trained without one
    (ImageNet weights, a classifier's penultimate layer)."""
    features = model.forward_head(model.forward_features(x), pre_logits=True)  # type: ignore[operator]
    return nn.functional.normalize(features, dim=1)
