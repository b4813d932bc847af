"""EfficientNet (Tan & Le, 2019), shrunk for 28x28 digits.

Keeps its ideas: MBConv blocks (1x1 expansion, depthwise conv, squeeze-and-excitation, linear
1x1 projection, identity shortcut when shapes match), Swish (SiLU) activations, and a network
whose width and depth come from compound scaling: a small base (B0-like, four stages) scaled by
`width = BETA**PHI` and `depth = ALPHA**PHI` with the paper's alpha=1.2, beta=1.1 (the third
coefficient, resolution gamma=1.15, is fixed here by the 28x28 input). PHI=1 gives this model
(each stage's repeats rounded up from 1.2 to 2, channels scaled by 1.1 and rounded to 8).
Activation: Swish by default; `activation=` also takes relu or leaky_relu.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from training.models.layers import make_activation
from training.models.norms import BN_MOMENTUM
from training.models.spec import ModelSpec

ALPHA, BETA = 1.2, 1.1  # depth and width coefficients from the paper's grid search
PHI = 1  # compound coefficient
# Base stages: (expand ratio, output channels, repeats, stride, kernel); 14 -> 7 after the stem
BASE_STAGES = ((1, 16, 1, 1, 3), (4, 24, 1, 2, 3), (4, 40, 1, 1, 5), (4, 64, 1, 1, 3))
BASE_STEM, BASE_HEAD = 16, 128


def round_channels(channels: float, divisor: int = 8) -> int:
    """Round to the nearest multiple of `divisor`, never down by more than 10% (as the paper)."""
    rounded = max(divisor, int(channels + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * channels else rounded


def scaled_stages(phi: int = PHI) -> list[tuple[int, int, int, int, int]]:
    """The base stages with channels scaled by BETA**phi and repeats by ALPHA**phi."""
    width, depth = BETA**phi, ALPHA**phi
    return [
        (expand, round_channels(channels * width), math.ceil(repeats * depth), stride, kernel)
        for expand, channels, repeats, stride, kernel in BASE_STAGES
    ]


class SqueezeExcitation(nn.Module):
    """Channel attention: global average pool, 1x1 reduce, act, 1x1 expand, sigmoid, rescale."""

    def __init__(self, channels: int, squeezed: int, activation: str) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, squeezed, 1)
        self.act = make_activation(activation)
        self.expand = nn.Conv2d(squeezed, channels, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.expand(self.act(self.reduce(self.pool(x)))))


class MBConv(nn.Module):
    """Inverted residual: [1x1 expand-BN-act], kxk depthwise-BN-act, SE, 1x1 project-BN (+x)."""

    def __init__(
        self, in_ch: int, out_ch: int, expand: int, stride: int, kernel: int, activation: str
    ) -> None:
        super().__init__()
        hidden = in_ch * expand
        self.expand: nn.Module = nn.Identity()
        if expand != 1:
            self.expand = nn.Sequential(
                nn.Conv2d(in_ch, hidden, 1, bias=False),
                nn.BatchNorm2d(hidden, momentum=BN_MOMENTUM),
                make_activation(activation),
            )
        self.depthwise = nn.Sequential(
            nn.Conv2d(hidden, hidden, kernel, stride, kernel // 2, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden, momentum=BN_MOMENTUM),
            make_activation(activation),
        )
        self.se = SqueezeExcitation(hidden, max(1, in_ch // 4), activation)
        self.project = nn.Sequential(
            nn.Conv2d(hidden, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch, momentum=BN_MOMENTUM)
        )
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.se(self.depthwise(self.expand(x))))
        return out + x if self.residual else out


class EfficientNet(nn.Module):
    """Stride-2 stem conv, compound-scaled MBConv stages (14 -> 7), 1x1 head conv, GAP, fc."""

    def __init__(self, num_classes: int = 10, activation: str = "swish", phi: int = PHI) -> None:
        super().__init__()
        width = BETA**phi
        stem = round_channels(BASE_STEM * width)
        self.stem = nn.Sequential(
            nn.Conv2d(1, stem, 3, stride=2, padding=1, bias=False),  # 28 -> 14, as B0's stem
            nn.BatchNorm2d(stem, momentum=BN_MOMENTUM),
            make_activation(activation),
        )
        blocks: list[nn.Module] = []
        in_ch = stem
        for expand, out_ch, repeats, stride, kernel in scaled_stages(phi):
            for index in range(repeats):
                blocks.append(
                    MBConv(in_ch, out_ch, expand, stride if index == 0 else 1, kernel, activation)
                )
                in_ch = out_ch
        self.blocks = nn.Sequential(*blocks)
        head = round_channels(BASE_HEAD * width)
        self.head_conv = nn.Conv2d(in_ch, head, 1, bias=False)
        self.head_bn = nn.BatchNorm2d(head, momentum=BN_MOMENTUM)
        self.head_act = make_activation(activation)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(head, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        x = self.head_act(self.head_bn(self.head_conv(x)))
        return self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))


SPEC = ModelSpec(
    name="efficientnet",
    build=EfficientNet,
    gradcam_layer="head_act",
    description="EfficientNet (2019): MBConv + squeeze-and-excitation + Swish, compound-scaled",
    epochs=3,
)
