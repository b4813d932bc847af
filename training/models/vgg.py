"""VGG (Simonyan & Zisserman, 2014), shrunk for 28x28 digits.

Keeps its idea: depth from stacks of 3x3 convolutions (two per stage, so each pair sees a 5x5
field with fewer weights), 2x2 max-pool between stages with channels doubling, and a
fully-connected classifier with dropout. Three stages of 16/32/64 channels instead of five of
64..512, and no BatchNorm, as in the original. Activation: ReLU by default; `activation=` also
takes leaky_relu or swish.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from training.models.layers import make_activation
from training.models.spec import ModelSpec

STAGES = (16, 32, 64)  # channels per stage; two 3x3 convs each, then a 2x2 max-pool
CONVS_PER_STAGE = 2


class Vgg(nn.Module):
    """Three stages of two 3x3 convs + max-pool (28 -> 14 -> 7 -> 3), fc 576->256->10."""

    def __init__(self, num_classes: int = 10, activation: str = "relu") -> None:
        super().__init__()
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        in_channels = 1
        for stage, channels in enumerate(STAGES, start=1):
            for index in range(1, CONVS_PER_STAGE + 1):
                layers[f"conv{stage}_{index}"] = nn.Conv2d(in_channels, channels, 3, padding=1)
                layers[f"act{stage}_{index}"] = make_activation(activation)
                in_channels = channels
            layers[f"pool{stage}"] = nn.MaxPool2d(2)
        self.features = nn.Sequential(layers)
        self.classifier = nn.Sequential(
            nn.Dropout(0.5),
            nn.Linear(STAGES[-1] * 3 * 3, 256),
            make_activation(activation),
            nn.Dropout(0.5),
            nn.Linear(256, num_classes),
        )
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


SPEC = ModelSpec(
    name="vgg",
    build=Vgg,
    gradcam_layer=f"features.act{len(STAGES)}_{CONVS_PER_STAGE}",
    description="VGG (2014): three stages of two 3x3 convs with max-pool, dropout fc layers",
    epochs=3,
)
