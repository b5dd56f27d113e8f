"""The network for inference: every BatchNorm folded into the convolution before it.

In eval mode a BatchNorm is a fixed per-channel scale and shift, so it can be moved into the
preceding convolution's weight and bias (PyTorch's `torch.nn.utils.fusion.fuse_conv_bn_eval`);
the activation the BatchNorm carried stays where it was. What is left is a copy that runs fewer
ops and gives the same outputs to rounding. It is for inference only: it has no BatchNorm to
train and its state dict has other keys, so effft's training module refuses it.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .blocks import DepthwiseSeparable, MBConv
from .efficientnet import EfficientNet
from .layers import BatchNormAct2d

# (convolution, the BatchNorm after it) by module type, in forward order
PAIRS: dict[type, tuple[tuple[str, str], ...]] = {
    EfficientNet: (("conv_stem", "bn1"), ("conv_head", "bn2")),
    DepthwiseSeparable: (("conv_dw", "bn1"), ("conv_pw", "bn2")),
    MBConv: (("conv_pw", "bn1"), ("conv_dw", "bn2"), ("conv_pwl", "bn3")),
}


def is_fused(model: nn.Module) -> bool:
    return bool(getattr(model, "fused", False))


def fuse_for_inference(model: EfficientNet, *, channels_last: bool = True) -> EfficientNet:
    """A copy of `model` in eval mode with each BatchNorm folded into its convolution (and in
    channels_last memory format unless told otherwise); `model` itself is left as it was."""
    fused = copy.deepcopy(model).eval()
    for module in list(fused.modules()):
        for conv_name, bn_name in PAIRS.get(type(module), ()):
            conv, bn = getattr(module, conv_name), getattr(module, bn_name)
            if not isinstance(bn, BatchNormAct2d):
                continue
            setattr(module, conv_name, fuse_conv_bn_eval(conv, bn))
            setattr(module, bn_name, bn.act)  # the activation it carried, or Identity
    fused.fused = True
    for p in fused.parameters():
        p.requires_grad_(False)
    if channels_last:
        fused = fused.to(memory_format=torch.channels_last)
    return fused
