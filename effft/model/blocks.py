"""The two EfficientNet blocks. Attribute names are timm's state-dict keys, so timm checkpoints
load with strict=True. Note timm's naming: `conv_pw` is the pointwise projection in the
depthwise-separable block but the pointwise expansion in MBConv."""

from __future__ import annotations

import torch
from torch import nn

from .layers import BatchNormAct2d, DropPath, SqueezeExcite, conv2d, make_divisible


class DepthwiseSeparable(nn.Module):
    """Depthwise conv, SE, pointwise projection: the first stage, where expansion is 1."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        kernel: int,
        stride: int,
        se_ratio: float,
        act: type[nn.Module],
        bn_eps: float,
        tf_same: bool,
        drop_path: float,
    ) -> None:
        super().__init__()
        self.has_skip = stride == 1 and in_channels == out_channels
        self.conv_dw = conv2d(in_channels, in_channels, kernel, stride=stride, groups=in_channels, tf_same=tf_same)
        self.bn1 = BatchNormAct2d(in_channels, eps=bn_eps, act=act)
        # SE width comes from the block's input channels (EfficientNet paper, Sec. 4).
        self.se = SqueezeExcite(in_channels, round(in_channels * se_ratio), act=act) if se_ratio else nn.Identity()
        self.conv_pw = conv2d(in_channels, out_channels, 1)
        self.bn2 = BatchNormAct2d(out_channels, eps=bn_eps, act=None)
        self.drop_path = DropPath(drop_path) if self.has_skip else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.conv_dw(x)
        x = self.bn1(x)
        x = self.se(x)
        x = self.conv_pw(x)
        x = self.bn2(x)
        if self.has_skip:
            x = self.drop_path(x) + shortcut
        return x


class MBConv(nn.Module):
    """Inverted residual (MobileNetV2) with SE: expand, depthwise conv, SE, project."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        kernel: int,
        stride: int,
        expansion: int,
        se_ratio: float,
        act: type[nn.Module],
        bn_eps: float,
        tf_same: bool,
        drop_path: float,
    ) -> None:
        super().__init__()
        mid = make_divisible(in_channels * expansion)
        self.has_skip = stride == 1 and in_channels == out_channels
        self.conv_pw = conv2d(in_channels, mid, 1)
        self.bn1 = BatchNormAct2d(mid, eps=bn_eps, act=act)
        self.conv_dw = conv2d(mid, mid, kernel, stride=stride, groups=mid, tf_same=tf_same)
        self.bn2 = BatchNormAct2d(mid, eps=bn_eps, act=act)
        # SE width comes from the block's input channels, not the expanded ones.
        self.se = SqueezeExcite(mid, round(in_channels * se_ratio), act=act) if se_ratio else nn.Identity()
        self.conv_pwl = conv2d(mid, out_channels, 1)
        self.bn3 = BatchNormAct2d(out_channels, eps=bn_eps, act=None)
        self.drop_path = DropPath(drop_path) if self.has_skip else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.conv_pw(x)
        x = self.bn1(x)
        x = self.conv_dw(x)
        x = self.bn2(x)
        x = self.se(x)
        x = self.conv_pwl(x)
        x = self.bn3(x)
        if self.has_skip:
            x = self.drop_path(x) + shortcut
        return x
