"""EfficientNet (Tan & Le, 2019) built from the B0 stage table by compound scaling.

Every variant is the B0 table scaled by one coefficient: width (channels), depth (repeats per
stage) and resolution grow together, as a `Variant` says (the table of variants is in
`registry`). Module names equal timm's state-dict keys, so timm checkpoints load as they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from torch import nn

from ..input import InputSpec
from .blocks import DepthwiseSeparable, MBConv
from .heads import EmbeddingHead, classifier, init_classifier
from .layers import BatchNormAct2d, conv2d, make_divisible


@dataclass(frozen=True)
class StageSpec:
    """One row of the B0 table: a stage of `repeats` identical blocks."""

    block: Literal["ds", "mbconv"]
    repeats: int
    kernel: int
    stride: int  # of the first block; the others have stride 1
    expansion: int
    out_channels: int
    se_ratio: float  # of the block's input channels; 0 means no SE


# EfficientNet-B0, Table 1 of the paper.
B0_STAGES: tuple[StageSpec, ...] = (
    StageSpec("ds", repeats=1, kernel=3, stride=1, expansion=1, out_channels=16, se_ratio=0.25),
    StageSpec("mbconv", repeats=2, kernel=3, stride=2, expansion=6, out_channels=24, se_ratio=0.25),
    StageSpec("mbconv", repeats=2, kernel=5, stride=2, expansion=6, out_channels=40, se_ratio=0.25),
    StageSpec("mbconv", repeats=3, kernel=3, stride=2, expansion=6, out_channels=80, se_ratio=0.25),
    StageSpec("mbconv", repeats=3, kernel=5, stride=1, expansion=6, out_channels=112, se_ratio=0.25),
    StageSpec("mbconv", repeats=4, kernel=5, stride=2, expansion=6, out_channels=192, se_ratio=0.25),
    StageSpec("mbconv", repeats=1, kernel=3, stride=1, expansion=6, out_channels=320, se_ratio=0.25),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280


@dataclass(frozen=True)
class Variant:
    """A compound-scaled member of the family."""

    width: float
    depth: float
    resolution: int
    dropout: float
    drop_path: float = 0.2  # stochastic depth at the last block (survival 0.8 in the paper)
    lite: bool = False  # EfficientNet-Lite: no SE, ReLU6, stem/head and first/last stage unscaled
    tf_port: bool = False  # weights ported from TensorFlow: "SAME" padding, BatchNorm eps 1e-3

    @property
    def bn_eps(self) -> float:
        return 1e-3 if self.tf_port else 1e-5


class EfficientNet(nn.Module):
    """An EfficientNet. Build one with `create_model`."""

    def __init__(
        self,
        variant: Variant,
        *,
        stages: Sequence[StageSpec] = B0_STAGES,
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_rate: float | None = None,
        drop_path_rate: float | None = None,
        embedding_dim: int | None = None,
        name: str = "efficientnet",
    ) -> None:
        super().__init__()
        self.name = name
        self.variant = variant
        self.in_chans = in_chans
        self.drop_rate = variant.dropout if drop_rate is None else drop_rate
        drop_path_rate = variant.drop_path if drop_path_rate is None else drop_path_rate
        act = nn.ReLU6 if variant.lite else nn.SiLU
        eps, tf_same = variant.bn_eps, variant.tf_port

        def width(channels: int) -> int:
            return make_divisible(channels * variant.width)

        def repeats(i: int, stage: StageSpec) -> int:
            if variant.lite and i in (0, len(stages) - 1):
                return stage.repeats
            return math.ceil(stage.repeats * variant.depth)

        stem = STEM_CHANNELS if variant.lite else width(STEM_CHANNELS)
        self.conv_stem = conv2d(in_chans, stem, 3, stride=2, tf_same=tf_same)
        self.bn1 = BatchNormAct2d(stem, eps=eps, act=act)

        counts = [repeats(i, s) for i, s in enumerate(stages)]
        total, index = sum(counts), 0
        channels, body = stem, []
        for stage, count in zip(stages, counts):
            out = width(stage.out_channels)
            blocks = []
            for j in range(count):
                common = dict(
                    kernel=stage.kernel,
                    stride=stage.stride if j == 0 else 1,
                    se_ratio=0.0 if variant.lite else stage.se_ratio,
                    act=act,
                    bn_eps=eps,
                    tf_same=tf_same,
                    drop_path=drop_path_rate * index / total,  # rises linearly with depth
                )
                if stage.block == "ds":
                    blocks.append(DepthwiseSeparable(channels, out, **common))
                else:
                    blocks.append(MBConv(channels, out, expansion=stage.expansion, **common))
                channels, index = out, index + 1
            body.append(nn.Sequential(*blocks))
        self.blocks = nn.Sequential(*body)

        self.num_features = HEAD_CHANNELS if variant.lite else width(HEAD_CHANNELS)
        self.conv_head = conv2d(channels, self.num_features, 1)
        self.bn2 = BatchNormAct2d(self.num_features, eps=eps, act=act)
        self.num_classes = num_classes
        self.embedding_dim = embedding_dim
        self.classifier: nn.Module = nn.Identity()
        self.reset_classifier(num_classes)
        # what the weights were trained with; load_weights sets it from their pretrained config
        self.preprocessing = InputSpec(size=variant.resolution)
        self.weights_source: str | None = None
        self._init_weights()

    def _init_weights(self) -> None:
        # As the reference: fan-out normal for convolutions; the classifier as below.
        if self.conv_stem.weight.is_meta:  # counting parameters only
            return
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        init_classifier(self.classifier)

    def reset_classifier(self, num_classes: int) -> None:
        """A new, freshly initialised classifier for `num_classes` (0: features only), or the
        embedding head where the model has one (`embedding_dim`)."""
        self.num_classes = num_classes
        self.classifier = classifier(self.num_features, num_classes) if self.embedding_dim is None \
            else EmbeddingHead(self.num_features, self.embedding_dim)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_stem(x)
        x = self.bn1(x)
        x = self.blocks(x)
        x = self.conv_head(x)
        return self.bn2(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean((2, 3))
        if self.drop_rate > 0.0 and self.training:
            x = nn.functional.dropout(x, p=self.drop_rate, training=True)
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def stages(self) -> list[nn.Module]:
        """The model in depth order, stem and head included, for freezing and per-stage rates."""
        return [nn.ModuleList([self.conv_stem, self.bn1]), *self.blocks,
                nn.ModuleList([self.conv_head, self.bn2]), self.classifier]
