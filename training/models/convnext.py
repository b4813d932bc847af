"""ConvNeXt (Liu et al., 2022), shrunk for 28x28 digits.

Keeps its ideas: a "patchify" stem (non-overlapping strided conv + LayerNorm), blocks of 7x7
depthwise conv -> LayerNorm -> 1x1 conv to 4x width -> GELU -> 1x1 conv back (the inverted
bottleneck) scaled by a learnable per-channel layer scale and added to the input, and separate
downsampling layers (LayerNorm + 2x2 stride-2 conv). LayerNorm is the channels-first form
(normalising over channels at each pixel), so the 1x1 convs replace the paper's permute+Linear
and the graph stays plain. Two stages (32 channels at 14x14, 64 at 7x7) of two blocks; no
stochastic depth. Activation: GELU by default (the paper's single activation per block);
`activation=` also takes relu, leaky_relu or swish.
"""

from __future__ import annotations

import torch
from torch import nn

from training.models.layers import make_activation
from training.models.spec import ModelSpec

STAGES = ((32, 2), (64, 2))  # (channels, blocks): 14x14, then 7x7
LAYER_SCALE_INIT = 1e-6


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel dimension of an [N, C, H, W] tensor."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return x * self.weight[:, None, None] + self.bias[:, None, None]


class ConvNeXtBlock(nn.Module):
    """x + gamma * pw2(GELU(pw1(LN(dw7x7(x)))))."""

    def __init__(self, channels: int, activation: str = "gelu") -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(channels, channels, 7, padding=3, groups=channels)
        self.norm = LayerNorm2d(channels)
        self.pwconv1 = nn.Conv2d(channels, 4 * channels, 1)
        self.act = nn.GELU() if activation == "gelu" else make_activation(activation)
        self.pwconv2 = nn.Conv2d(4 * channels, channels, 1)
        self.gamma = nn.Parameter(torch.full((channels,), LAYER_SCALE_INIT))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.pwconv2(self.act(self.pwconv1(self.norm(self.dwconv(x)))))
        return x + self.gamma[:, None, None] * out


class ConvNeXt(nn.Module):
    """2x2/2 patchify stem (28 -> 14), stage, LN + 2x2/2 downsample (-> 7), stage, GAP, LN, fc."""

    def __init__(self, num_classes: int = 10, activation: str = "gelu") -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 1
        for index, (channels, blocks) in enumerate(STAGES):
            if index == 0:
                layers.append(
                    nn.Sequential(nn.Conv2d(in_ch, channels, 2, stride=2), LayerNorm2d(channels))
                )
            else:
                layers.append(
                    nn.Sequential(LayerNorm2d(in_ch), nn.Conv2d(in_ch, channels, 2, stride=2))
                )
            layers.append(
                nn.Sequential(*(ConvNeXtBlock(channels, activation) for _ in range(blocks)))
            )
            in_ch = channels
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.norm = nn.LayerNorm(in_ch, eps=1e-6)
        self.fc = nn.Linear(in_ch, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return self.fc(self.norm(torch.flatten(self.avgpool(x), 1)))


SPEC = ModelSpec(
    name="convnext",
    build=ConvNeXt,
    # ConvNeXt blocks end in a residual sum, with no activation after it: target the last block.
    gradcam_layer=f"features.{2 * len(STAGES) - 1}.{STAGES[-1][1] - 1}",
    description="ConvNeXt (2022): 7x7 depthwise conv, LayerNorm, GELU, inverted bottleneck",
    # Adadelta barely moves the near-zero layer scales (37.6% after an epoch); AdamW, as in the
    # paper, reached 98.08% in 3 epochs here and 98.62% in 6 with the classic step schedule; the
    # modern recipe (one-cycle, label smoothing, shifts and rotations) 99.17% in 6.
    epochs=6,
    recipe="modern",
    optimizer="adamw",
    lr=2e-3,
    weight_decay=0.05,
)
