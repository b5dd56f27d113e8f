"""Other key layouts of EfficientNet weights, renamed to ours (timm's), and the stem adapted.

torchvision's and efficientnet_pytorch's checkpoints name the same tensors differently; both
are recognised by a key only they have and renamed key by key. Keys that match nothing are
kept as they are, so the loader's key check reports them.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping

import torch
from torch import nn

from ..efficientnet import EfficientNet

log = logging.getLogger(__name__)
StateDict = dict[str, torch.Tensor]

# torchvision trains efficientnet_b5..b7 with BatchNorm eps 1e-3 (b0..b4 with 1e-5); checked
# against torchvision.models.efficientnet.
_TORCHVISION_EPS_1E3 = {"efficientnet_b5", "efficientnet_b6", "efficientnet_b7"}
TF_EPS = 1e-3  # the TensorFlow reference's BatchNorm eps, kept by efficientnet_pytorch


def to_timm_layout(state: StateDict, model: EfficientNet) -> tuple[StateDict, float | None]:
    """The state in our layout, and the BatchNorm eps the weights were trained with where that
    can differ from the model's own."""
    if "features.0.0.weight" in state:
        log.info("converting torchvision weights to the model's layout")
        return from_torchvision(state), (1e-3 if model.name in _TORCHVISION_EPS_1E3 else None)
    if "_conv_stem.weight" in state:
        log.info("converting efficientnet_pytorch weights to the model's layout")
        if not model.variant.tf_port:
            log.info("these weights come from TensorFlow with 'SAME' padding: tf_%s matches them exactly", model.name)
        return from_efficientnet_pytorch(state, [len(stage) for stage in model.blocks]), TF_EPS
    return state, None


def set_bn_eps(model: nn.Module, eps: float) -> None:
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.eps = eps


# torchvision's parts of a block, by index: with an expansion (MBConv) or without (first stage).
_TV_MBCONV = {"0": ("conv_pw", "bn1"), "1": ("conv_dw", "bn2"), "2": "se", "3": ("conv_pwl", "bn3")}
_TV_DS = {"0": ("conv_dw", "bn1"), "1": "se", "2": ("conv_pw", "bn2")}
_TV_SE = {"fc1": "conv_reduce", "fc2": "conv_expand"}
_TV_BLOCK = re.compile(r"features\.(\d+)\.(\d+)\.block\.(\d+)\.(\w+)\.(.+)")
_TV_CONV_BN = re.compile(r"features\.(\d+)\.([01])\.(.+)")


def from_torchvision(state: Mapping[str, torch.Tensor]) -> StateDict:
    """torchvision's EfficientNet keys renamed to ours; unknown keys are kept as they are."""
    out = {}
    for key, value in state.items():
        out[_torchvision_key(key, state)] = value
    return out


def _torchvision_key(key: str, state: Mapping[str, torch.Tensor]) -> str:
    if m := _TV_BLOCK.fullmatch(key):
        stage, block, part, sub, rest = m.groups()
        expands = f"features.{stage}.{block}.block.3.0.weight" in state
        role = (_TV_MBCONV if expands else _TV_DS).get(part)
        prefix = f"blocks.{int(stage) - 1}.{block}"
        if role == "se" and sub in _TV_SE:
            return f"{prefix}.se.{_TV_SE[sub]}.{rest}"
        if isinstance(role, tuple) and sub in ("0", "1"):
            return f"{prefix}.{role[int(sub)]}.{rest}"
        return key
    if m := _TV_CONV_BN.fullmatch(key):
        index, sub, rest = m.groups()
        conv, bn = ("conv_stem", "bn1") if index == "0" else ("conv_head", "bn2")
        return f"{conv if sub == '0' else bn}.{rest}"
    if key.startswith("classifier.1."):
        return "classifier." + key[len("classifier.1."):]
    return key


_EP_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_EP_SE = {"_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand"}
_EP_MBCONV = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
              "_project_conv": "conv_pwl", "_bn2": "bn3", **_EP_SE}
_EP_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2", **_EP_SE}
_EP_BLOCK = re.compile(r"_blocks\.(\d+)\.(\w+)\.(\w+)")


def from_efficientnet_pytorch(state: Mapping[str, torch.Tensor], stage_lengths: list[int]) -> StateDict:
    """efficientnet_pytorch's keys renamed to ours. Its blocks are numbered straight through the
    stages; `stage_lengths` (the model's blocks per stage) places them. Unknown keys are kept."""
    places = [(s, b) for s, length in enumerate(stage_lengths) for b in range(length)]
    out = {}
    for key, value in state.items():
        out[_efficientnet_pytorch_key(key, state, places)] = value
    return out


def _efficientnet_pytorch_key(key: str, state: Mapping[str, torch.Tensor], places: list[tuple[int, int]]) -> str:
    if m := _EP_BLOCK.fullmatch(key):
        index, module, param = m.groups()
        expands = f"_blocks.{index}._expand_conv.weight" in state
        name = (_EP_MBCONV if expands else _EP_DS).get(module)
        if name is None or int(index) >= len(places):
            return key  # reported as unexpected
        stage, block = places[int(index)]
        return f"blocks.{stage}.{block}.{name}.{param}"
    module, _, param = key.partition(".")
    return f"{_EP_TOP[module]}.{param}" if module in _EP_TOP else key


def adapt_stem(state: StateDict, in_chans: int) -> StateDict:
    """A 3-channel stem for `in_chans` inputs. One channel sums the kernels, so a grey image gives
    what the same image in RGB gave; more channels repeat them, rescaled to keep the output scale."""
    weight = state.get("conv_stem.weight")
    if in_chans == 3 or weight is None or weight.ndim != 4 or weight.shape[1] != 3:
        return state
    if in_chans == 1:
        adapted = weight.sum(dim=1, keepdim=True)
    else:
        adapted = weight.repeat(1, math.ceil(in_chans / 3), 1, 1)[:, :in_chans] * (3 / in_chans)
    log.info("adapted the pretrained 3-channel stem to %d input channel(s)", in_chans)
    return {**state, "conv_stem.weight": adapted}


