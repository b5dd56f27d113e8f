"""Small layers the EfficientNet blocks are made of: convolutions with TensorFlow "SAME"
padding, BatchNorm fused with its activation, squeeze-and-excitation and drop path."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round a channel count to a multiple of `divisor`, never more than 10% below `value`.

    This is the rounding of the reference TensorFlow implementation (and timm's), so that scaled
    widths, and therefore weight shapes, match theirs exactly.
    """
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """(before, after) padding that makes the output ceil(size / stride) long, as TF's "SAME"
    does; an odd total puts the extra pixel after (bottom / right)."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class Conv2dSame(nn.Conv2d):
    """A strided convolution whose padding is computed from each input's size, as in TF."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom = same_padding(x.shape[-2], self.kernel_size[0], self.stride[0])
        left, right = same_padding(x.shape[-1], self.kernel_size[1], self.stride[1])
        if top or bottom or left or right:
            x = F.pad(x, (left, right, top, bottom))
        return self._conv_forward(x, self.weight, self.bias)


def conv2d(
    in_channels: int,
    out_channels: int,
    kernel: int,
    *,
    stride: int = 1,
    groups: int = 1,
    tf_same: bool = False,
) -> nn.Conv2d:
    """A bias-free convolution. With `tf_same`, strided convolutions pad like TF's "SAME";
    unstrided odd kernels need the same symmetric padding either way, so they stay static."""
    if tf_same and stride > 1:
        return Conv2dSame(in_channels, out_channels, kernel, stride, padding=0, groups=groups, bias=False)
    return nn.Conv2d(in_channels, out_channels, kernel, stride, padding=(kernel - 1) // 2, groups=groups, bias=False)


class BatchNormAct2d(nn.BatchNorm2d):
    """BatchNorm followed by an activation, one module so state-dict keys stay `bnN.weight` ..."""

    def __init__(self, channels: int, *, eps: float, act: type[nn.Module] | None) -> None:
        super().__init__(channels, eps=eps)
        self.act = act(inplace=True) if act is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(super().forward(x))


class SqueezeExcite(nn.Module):
    """Channel attention (Hu et al., 2018): pool, reduce, activate, expand, gate with a sigmoid."""

    def __init__(self, channels: int, reduced: int, *, act: type[nn.Module]) -> None:
        super().__init__()
        self.conv_reduce = nn.Conv2d(channels, reduced, 1, bias=True)
        self.act = act(inplace=True)
        self.conv_expand = nn.Conv2d(reduced, channels, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = x.mean((2, 3), keepdim=True)
        scale = self.conv_expand(self.act(self.conv_reduce(scale)))
        return x * scale.sigmoid()


class DropPath(nn.Module):
    """Stochastic depth (Huang et al., 2016): in training, drop a residual branch per sample with
    probability `p` and rescale the kept ones; the identity in eval mode."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p:.3f}"
