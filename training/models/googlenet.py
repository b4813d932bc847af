"""GoogLeNet (Szegedy et al., 2014), shrunk for 28x28 digits.

Keeps its idea: Inception modules that run 1x1, 1x1->3x3, 1x1->5x5 and 3x3 max-pool->1x1
branches in parallel and concatenate them, the 1x1 reductions keeping the wide kernels cheap,
and a global-average-pool head with dropout instead of big fc layers. Three modules (two at
14x14, one at 7x7) instead of nine; no auxiliary classifiers. Each convolution is followed by
BatchNorm (as in Inception v2 and torchvision's GoogLeNet) so it trains in a few epochs.
Activation: ReLU by default; `activation=` also takes leaky_relu or swish.
"""

from __future__ import annotations

import torch
from torch import nn

from training.models.layers import make_activation
from training.models.norms import BN_MOMENTUM
from training.models.spec import ModelSpec


class ConvUnit(nn.Sequential):
    """Conv (no bias) -> BatchNorm -> activation."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, activation: str) -> None:
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel, padding=kernel // 2, bias=False),
            nn.BatchNorm2d(out_ch, momentum=BN_MOMENTUM),
            make_activation(activation),
        )


class Inception(nn.Module):
    """Four parallel branches concatenated on channels: 1x1 | 1x1,3x3 | 1x1,5x5 | pool,1x1."""

    def __init__(
        self,
        in_ch: int,
        ch1x1: int,
        ch3x3red: int,
        ch3x3: int,
        ch5x5red: int,
        ch5x5: int,
        pool_proj: int,
        activation: str,
    ) -> None:
        super().__init__()
        self.branch1 = ConvUnit(in_ch, ch1x1, 1, activation)
        self.branch2 = nn.Sequential(
            ConvUnit(in_ch, ch3x3red, 1, activation), ConvUnit(ch3x3red, ch3x3, 3, activation)
        )
        self.branch3 = nn.Sequential(
            ConvUnit(in_ch, ch5x5red, 1, activation), ConvUnit(ch5x5red, ch5x5, 5, activation)
        )
        self.branch4 = nn.Sequential(
            nn.MaxPool2d(3, stride=1, padding=1), ConvUnit(in_ch, pool_proj, 1, activation)
        )
        self.out_channels = ch1x1 + ch3x3 + ch5x5 + pool_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)]
        return torch.cat(branches, dim=1)


class GoogLeNet(nn.Module):
    """Stem conv + pool (28 -> 14), Inception 3a/3b, pool (-> 7), Inception 4a, GAP, fc."""

    def __init__(self, num_classes: int = 10, activation: str = "relu") -> None:
        super().__init__()
        self.stem = ConvUnit(1, 32, 3, activation)
        self.pool1 = nn.MaxPool2d(2)
        self.inception3a = Inception(32, 16, 24, 32, 4, 8, 8, activation)  # -> 64
        self.inception3b = Inception(64, 32, 32, 48, 8, 16, 16, activation)  # -> 112
        self.pool2 = nn.MaxPool2d(3, stride=2, padding=1)  # 14 -> 7
        self.inception4a = Inception(112, 48, 48, 64, 12, 24, 32, activation)  # -> 168
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(self.inception4a.out_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.stem(x))
        x = self.pool2(self.inception3b(self.inception3a(x)))
        x = self.inception4a(x)
        return self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))


SPEC = ModelSpec(
    name="googlenet",
    build=GoogLeNet,
    # Every branch ends in its activation, so the module's concatenated output is post-activation.
    gradcam_layer="inception4a",
    description="GoogLeNet (2014): Inception modules with parallel 1x1/3x3/5x5/pool branches",
    epochs=3,
)
