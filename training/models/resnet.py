"""ResNet (He et al., 2015), shrunk for 28x28 digits.

Keeps its idea: basic residual blocks (two 3x3 conv + BatchNorm, identity shortcut, a 1x1
strided projection where the shape changes, the activation after the addition), stages that
halve the resolution and double the channels, and a global-average-pool head. Three stages of
one block (16/32/64 channels at 28/14/7), like the CIFAR ResNets. Activation: ReLU by default;
`activation=` also takes leaky_relu or swish.
"""

from __future__ import annotations

import torch
from torch import nn

from training.models.layers import make_activation
from training.models.norms import BN_MOMENTUM
from training.models.spec import ModelSpec

STAGES = (16, 32, 64)
BLOCKS_PER_STAGE = 1


class BasicBlock(nn.Module):
    """x -> conv-BN-act-conv-BN, plus shortcut(x), then act."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, activation: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch, momentum=BN_MOMENTUM)
        self.act1 = make_activation(activation)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch, momentum=BN_MOMENTUM)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_ch, momentum=BN_MOMENTUM),
            )
        self.act2 = make_activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        return self.act2(out + self.shortcut(x))


class ResNet(nn.Module):
    """Stem conv-BN-act, three residual stages (28 -> 14 -> 7), global average pool, fc."""

    def __init__(self, num_classes: int = 10, activation: str = "relu") -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, STAGES[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(STAGES[0], momentum=BN_MOMENTUM),
            make_activation(activation),
        )
        in_ch = STAGES[0]
        stages: list[nn.Module] = []
        for index, channels in enumerate(STAGES):
            blocks = []
            for block in range(BLOCKS_PER_STAGE):
                stride = 2 if index > 0 and block == 0 else 1
                blocks.append(BasicBlock(in_ch, channels, stride, activation))
                in_ch = channels
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


SPEC = ModelSpec(
    name="resnet",
    build=ResNet,
    gradcam_layer=f"layer3.{BLOCKS_PER_STAGE - 1}.act2",
    description="ResNet (2015): residual blocks with BatchNorm, three stages, global avg-pool",
    epochs=3,
)
