"""MobileNet v1 (Howard et al., 2017), shrunk for 28x28 digits.

Keeps its idea: after a plain 3x3 stem, every layer is a depthwise separable convolution: a
3x3 depthwise conv (one filter per channel, `groups=channels`) then a 1x1 pointwise conv that
mixes channels, each followed by BatchNorm and ReLU6, downsampling by stride-2 depthwise convs;
global average pool and one fc layer. Five separable layers (16 -> 128 channels) instead of
thirteen. Activation: ReLU6 by default (its bounded ReLU, kept for low-precision inference);
`activation=` also takes relu, leaky_relu or swish.
"""

from __future__ import annotations

import torch
from torch import nn

from training.models.layers import make_activation
from training.models.norms import BN_MOMENTUM
from training.models.spec import ModelSpec

# (output channels, stride) of each depthwise separable layer: 28 -> 28 -> 14 -> 14 -> 7 -> 7
LAYERS = ((32, 1), (64, 2), (64, 1), (128, 2), (128, 1))


def _activation(name: str) -> nn.Module:
    return nn.ReLU6() if name == "relu6" else make_activation(name)


class DepthwiseSeparable(nn.Module):
    """3x3 depthwise conv-BN-act, then 1x1 pointwise conv-BN-act."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, activation: str) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(
            in_ch, in_ch, 3, stride=stride, padding=1, groups=in_ch, bias=False
        )
        self.bn1 = nn.BatchNorm2d(in_ch, momentum=BN_MOMENTUM)
        self.act1 = _activation(activation)
        self.pointwise = nn.Conv2d(in_ch, out_ch, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch, momentum=BN_MOMENTUM)
        self.act2 = _activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.depthwise(x)))
        return self.act2(self.bn2(self.pointwise(x)))


class MobileNet(nn.Module):
    """3x3 stem conv (16 channels), five depthwise separable layers, global average pool, fc."""

    def __init__(self, num_classes: int = 10, activation: str = "relu6") -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16, momentum=BN_MOMENTUM),
            _activation(activation),
        )
        blocks = []
        in_ch = 16
        for out_ch, stride in LAYERS:
            blocks.append(DepthwiseSeparable(in_ch, out_ch, stride, activation))
            in_ch = out_ch
        self.features = nn.Sequential(*blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.stem(x))
        return self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))


SPEC = ModelSpec(
    name="mobilenet",
    build=MobileNet,
    gradcam_layer=f"features.{len(LAYERS) - 1}.act2",
    description="MobileNet (2017): depthwise separable convolutions with BatchNorm and ReLU6",
    epochs=4,
)
