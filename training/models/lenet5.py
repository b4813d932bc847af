"""LeNet-5 (LeCun et al., 1998): conv-pool-conv-pool-fc with tanh and average pooling.

Sized as in the paper for 32x32 inputs: the first 5x5 convolution pads 28x28 digits by 2, so
C1 sees the same 28x28 field, S2/S4 are 2x2 average pools, C3 is a full (not the paper's sparse)
connection table, and F6/F7 are plain linear layers instead of Euclidean RBF units.
Activation: tanh by default (the paper's squashing function, without its 1.7159 scale);
`activation=` also takes relu, leaky_relu or swish.
"""

from __future__ import annotations

import torch
from torch import nn

from training.models.layers import make_activation
from training.models.spec import ModelSpec


def _activation(name: str) -> nn.Module:
    return nn.Tanh() if name == "tanh" else make_activation(name)


class LeNet5(nn.Module):
    """C1 5x5 conv 1->6, S2 avg-pool, C3 5x5 conv 6->16, S4 avg-pool, fc 400->120->84->10."""

    def __init__(self, num_classes: int = 10, activation: str = "tanh") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5, padding=2)  # 28x28 -> 28x28
        self.act1 = _activation(activation)
        self.pool1 = nn.AvgPool2d(2)  # -> 14x14
        self.conv2 = nn.Conv2d(6, 16, 5)  # -> 10x10
        self.act2 = _activation(activation)
        self.pool2 = nn.AvgPool2d(2)  # -> 5x5
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.act3 = _activation(activation)
        self.fc2 = nn.Linear(120, 84)
        self.act4 = _activation(activation)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.act1(self.conv1(x)))
        x = self.pool2(self.act2(self.conv2(x)))
        x = self.act3(self.fc1(torch.flatten(x, 1)))
        x = self.act4(self.fc2(x))
        return self.fc3(x)


SPEC = ModelSpec(
    name="lenet5",
    build=LeNet5,
    gradcam_layer="act2",
    description="LeNet-5 (1998): 5x5 conv, avg-pool, 5x5 conv, avg-pool, three fc layers, tanh",
    epochs=6,
    recipe="modern",
)
