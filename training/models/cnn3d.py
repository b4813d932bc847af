"""A 3D CNN over Moving MNIST clips (`training.clips`): convolutions across time and space.

Input [N, 1, T=8, 32, 32]; three Conv3d-BatchNorm-activation blocks with 3x3x3 kernels. The
first pool is spatial only (1x2x2) so the early layers see motion at full frame rate, the second
halves time too; the last block's output (32 channels, 4 x 8 x 8) is the spatio-temporal
Grad-CAM target, then global average pool and fc. Activation: ReLU by default; `activation=`
also takes leaky_relu or swish.
"""

from __future__ import annotations

import torch
from torch import nn

from training.clips import FRAMES, SIZE
from training.models.layers import make_activation
from training.models.norms import BN_MOMENTUM
from training.models.spec import ModelSpec


class Cnn3d(nn.Module):
    """conv3d 1->8, pool (1,2,2), conv3d 8->16, pool (2,2,2), conv3d 16->32, GAP, fc."""

    def __init__(self, num_classes: int = 10, activation: str = "relu") -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(1, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm3d(8, momentum=BN_MOMENTUM)
        self.act1 = make_activation(activation)
        self.pool1 = nn.MaxPool3d((1, 2, 2))  # 8x32x32 -> 8x16x16
        self.conv2 = nn.Conv3d(8, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm3d(16, momentum=BN_MOMENTUM)
        self.act2 = make_activation(activation)
        self.pool2 = nn.MaxPool3d(2)  # -> 4x8x8
        self.conv3 = nn.Conv3d(16, 32, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm3d(32, momentum=BN_MOMENTUM)
        self.act3 = make_activation(activation)
        self.avgpool = nn.AdaptiveAvgPool3d(1)
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.act1(self.bn1(self.conv1(x))))
        x = self.pool2(self.act2(self.bn2(self.conv2(x))))
        x = self.act3(self.bn3(self.conv3(x)))
        return self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))


SPEC = ModelSpec(
    name="cnn3d",
    build=Cnn3d,
    gradcam_layer="act3",
    description="3D CNN: Conv3d over 8-frame 32x32 clips of a moving MNIST digit",
    input_shape=(1, FRAMES, SIZE, SIZE),
    dataset="moving_mnist",
    epochs=6,
)
