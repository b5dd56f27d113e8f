"""The losses of embedding runs, all from pytorch-metric-learning (MIT licence).

- ArcFace (Deng et al., CVPR 2019): an additive angular margin on the cosine of the true class.
- CosFace (Wang et al., CVPR 2018): an additive cosine margin.
Both keep one learnt direction per training person (the loss's own parameters, which train
with the head) and compare it with the embedding by cosine, times `scale`.

The validation loss of an embedding run cannot be the margin loss: the people of val are not
those whose directions the loss learnt. It is the supervised contrastive loss (Khosla et al.,
NeurIPS 2020) of all val embeddings at once: how much closer each photo is to the other photos of
its person than to everyone else's, a smooth figure that needs no class directions.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import EffftError

SCALE = 64.0  # both papers' scale
MARGINS = {"arcface": 28.6, "cosface": 0.35}  # ArcFace: 0.5 rad in degrees (as the library takes it); CosFace: cosine
VAL_TEMPERATURE = 0.1  # SupCon's temperature in its paper


def _library() -> object:
    try:
        from pytorch_metric_learning import losses
    except ImportError:
        raise EffftError("task: embedding needs pytorch-metric-learning: pip install 'effft[face]'") from None
    return losses


def margin_loss(kind: str, *, people: int, dim: int, margin: float | None, scale: float | None) -> nn.Module:
    """The margin loss `kind` (arcface, cosface) over `people` training identities, or the plain
    cross-entropy of a classifier (softmax)."""
    if kind == "softmax":
        return nn.CrossEntropyLoss()
    losses = _library()
    cls = {"arcface": losses.ArcFaceLoss, "cosface": losses.CosFaceLoss}[kind]  # type: ignore[attr-defined]
    return cls(num_classes=people, embedding_size=dim, margin=MARGINS[kind] if margin is None else margin,
               scale=SCALE if scale is None else scale)


def separation_loss(embeddings: torch.Tensor, labels: torch.Tensor) -> float:
    """The supervised contrastive loss of `embeddings` (N, D) with their people `labels` (N,)."""
    losses = _library()
    with torch.no_grad():
        return float(losses.SupConLoss(temperature=VAL_TEMPERATURE)(embeddings.float(), labels))  # type: ignore[attr-defined]
