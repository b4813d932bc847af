"""The classic MNIST CNN: two 3x3 convolutions, max-pool, dropout, two fully connected layers."""

from __future__ import annotations

import torch
from torch import nn

from training.models.layers import make_activation
from training.models.spec import ModelSpec


class MnistCnn(nn.Module):
    """conv 1->32, conv 32->64, 2x2 max-pool, dropout 0.25, fc 9216->128, dropout 0.5, fc 128->10."""

    def __init__(self, num_classes: int = 10, activation: str = "relu") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.act1 = make_activation(activation)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.act2 = make_activation(activation)
        self.pool = nn.MaxPool2d(2)
        self.dropout1 = nn.Dropout(0.25)
        self.fc1 = nn.Linear(9216, 128)
        self.act3 = make_activation(activation)
        self.dropout2 = nn.Dropout(0.5)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act2(self.conv2(self.act1(self.conv1(x))))
        x = self.dropout1(self.pool(x))
        x = self.dropout2(self.act3(self.fc1(torch.flatten(x, 1))))
        return self.fc2(x)


SPEC = ModelSpec(
    name="mnist_cnn",
    build=MnistCnn,
    gradcam_layer="act2",
    description="the classic MNIST CNN (two 3x3 convs, max-pool, dropout, two fc layers)",
    epochs=8,
    recipe="modern",
)
