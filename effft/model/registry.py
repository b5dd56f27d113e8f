"""The family by name: the compound-scaling table, `create_model`, and the published weights.

Names are timm's. Weight tags (`<model name>.<tag>`, as on the Hugging Face hub under `timm/`)
and what each set of weights was trained with (size, mean, std, crop, interpolation) come from
timm's pretrained configs, so they stay what timm publishes; timm is used for this metadata
only, never for the network.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import replace

import torch

from ..errors import UnknownModelError, WeightsError
from .efficientnet import EfficientNet, Variant
from .weights.hub import HUB_PREFIXES

_SCALING = {  # name: (width, depth, resolution, dropout)
    "efficientnet_b0": (1.0, 1.0, 224, 0.2),
    "efficientnet_b1": (1.0, 1.1, 240, 0.2),
    "efficientnet_b2": (1.1, 1.2, 260, 0.3),
    "efficientnet_b3": (1.2, 1.4, 300, 0.3),
    "efficientnet_b4": (1.4, 1.8, 380, 0.4),
    "efficientnet_b5": (1.6, 2.2, 456, 0.4),
    "efficientnet_b6": (1.8, 2.6, 528, 0.5),
    "efficientnet_b7": (2.0, 3.1, 600, 0.5),
    "efficientnet_lite0": (1.0, 1.0, 224, 0.2),
    "efficientnet_lite1": (1.0, 1.1, 240, 0.2),
    "efficientnet_lite2": (1.1, 1.2, 260, 0.3),
    "efficientnet_lite3": (1.2, 1.4, 280, 0.3),
    "efficientnet_lite4": (1.4, 1.8, 300, 0.3),
}
_BASE = {n: Variant(width=w, depth=d, resolution=r, dropout=p, lite="lite" in n) for n, (w, d, r, p) in _SCALING.items()}
VARIANTS: dict[str, Variant] = {}
for _family in ("efficientnet_b", "efficientnet_lite"):
    _members = {n: v for n, v in _BASE.items() if n.startswith(_family)}
    VARIANTS.update(_members)
    VARIANTS.update({"tf_" + n: replace(v, tf_port=True) for n, v in _members.items()})



def list_models() -> list[str]:
    """Every model name `create_model` knows."""
    return list(VARIANTS)


def get_variant(name: str) -> Variant:
    try:
        return VARIANTS[name]
    except KeyError:
        close = difflib.get_close_matches(name, VARIANTS, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise UnknownModelError(
            f"unknown model '{name}': {hint}the models are {', '.join(VARIANTS)} (run `effft models`)"
        ) from None


def split_name(name: str) -> tuple[str, str | None]:
    """timm's `arch.tag` spelling -> (arch, tag); a name without a tag gives (name, None)."""
    for prefix in HUB_PREFIXES:
        if name.startswith(prefix):
            owner, _, repo = name[len(prefix):].partition("/")
            if owner != "timm" or not repo:
                raise UnknownModelError(f"'{name}': a hub id as the model name must be one of timm's "
                                        "(hf_hub:timm/<model>.<tag>); give other hub weights as model.pretrained")
            name = repo
    arch, _, tag = name.partition(".")
    return arch, tag or None


# --- published weights (timm's pretrained configs) --------------------------------------------


def known_tags(name: str) -> list[str]:
    """The weight tags of `name` that can be downloaded, the default first."""
    from .weights.hub import pretrained_cfgs

    return list(pretrained_cfgs(name))


def default_weights(name: str) -> str:
    """The hub id of the default weights of `name` (`timm/<name>.<tag>`)."""
    tags = known_tags(name)
    if not tags:
        raise WeightsError(f"no published weights are known for '{name}': give a weight file or hub id as "
                           "model.pretrained, or pretrained: false")
    return f"timm/{name}.{tags[0]}"


# --- building ---------------------------------------------------------------------------------


def create_model(
    name: str,
    *,
    pretrained: str | os.PathLike[str] | bool | None = None,
    num_classes: int = 1000,
    in_chans: int = 3,
    drop_rate: float | None = None,
    drop_path_rate: float | None = None,
    embedding_dim: int | None = None,
) -> EfficientNet:
    """Build the EfficientNet called `name` (timm's names, `name.tag` too), optionally with weights.

    `pretrained` is a hub id (`timm/efficientnet_b0.ra_in1k`, `efficientnet_b0.ra_in1k`,
    `hf_hub:...`), a folder (`local-dir:...`), a local weight file or effft checkpoint, or True
    for the default weights of `name` (its tag, where given). With another `num_classes` than
    the weights have, the classifier is re-initialised; with `in_chans` other than 3 the
    pretrained stem is adapted. The weights' preprocessing is then `model.preprocessing`.
    With `embedding_dim` the head is an `EmbeddingHead` of that length instead of a classifier.
    """
    arch, tag = split_name(name)
    model = EfficientNet(get_variant(arch), num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate,
                         drop_path_rate=drop_path_rate, embedding_dim=embedding_dim, name=arch)
    if pretrained is True:
        pretrained = f"timm/{arch}.{tag}" if tag else default_weights(arch)
    if pretrained:
        from .weights.load import load_weights

        load_weights(model, pretrained)
    return model


def parameter_count(name: str) -> int:
    """Parameters of the 1000-class model `name`, counted without allocating its weights."""
    with torch.device("meta"):
        model = EfficientNet(get_variant(name), name=name)
    return sum(p.numel() for p in model.parameters())
