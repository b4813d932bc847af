"""Small modules with the building blocks of the zoo, to prove the Grad-CAM export generic.

Each carries one family's idea (tanh + avg-pool, LRN + overlapping ceil-mode max-pool,
BatchNorm + in-place residual adds, depthwise + ReLU6, MBConv + SE + SiLU/Mish, Inception with
concatenation and adaptive pooling, ConvNeXt LayerNorm + GELU + layer scale, Conv3d) and a
Grad-CAM target with more of the network after it, so the traced backward has to cross it.
`EXPLAINED` adds the zoo models, so one parametrised test covers probes and zoo alike.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from training.models.convnext import LayerNorm2d


def realistic_init(model: nn.Module, seed: int = 0) -> nn.Module:
    """He-initialised weights and non-trivial BatchNorm statistics, so maps are not near zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Linear):
                fan_in = module.weight[0].numel()
                module.weight.normal_(0.0, (2.0 / fan_in) ** 0.5, generator=generator)
                if module.bias is not None:
                    module.bias.uniform_(-0.1, 0.1, generator=generator)
            elif isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d):
                n = module.num_features
                module.weight.uniform_(0.5, 1.5, generator=generator)
                module.bias.uniform_(-0.2, 0.2, generator=generator)
                assert module.running_mean is not None and module.running_var is not None
                module.running_mean.uniform_(-0.2, 0.2, generator=generator)
                module.running_var.uniform_(0.5, 2.0, generator=generator)
                del n
            elif isinstance(module, nn.LayerNorm) and module.weight is not None:
                module.weight.uniform_(0.5, 1.5, generator=generator)
                module.bias.uniform_(-0.2, 0.2, generator=generator)
    return model.eval()


class TanhAvgPool(nn.Module):
    """LeNet-5: conv-tanh-avgpool twice; target the second tanh (avg-pool and fc after it)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5, padding=2)
        self.act1 = nn.Tanh()
        self.pool1 = nn.AvgPool2d(2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.act2 = nn.Tanh()
        self.pool2 = nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=False)
        self.fc = nn.Linear(16 * 6 * 6, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.act1(self.conv1(x)))
        x = self.pool2(self.act2(self.conv2(x)))
        return self.fc(x.flatten(1))


class LrnCeilPool(nn.Module):
    """AlexNet: ReLU, LRN, overlapping ceil-mode max-pool, dropout; target in the middle."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 5, padding=2)
        self.act1 = nn.ReLU(inplace=True)
        self.lrn1 = nn.LocalResponseNorm(5, alpha=1e-3, beta=0.75, k=2.0)
        self.pool1 = nn.MaxPool2d(3, stride=2, ceil_mode=True)  # 28 -> 14
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.act2 = nn.ReLU(inplace=True)
        self.lrn2 = nn.LocalResponseNorm(5, alpha=1e-3, beta=0.75, k=2.0)
        self.pool2 = nn.MaxPool2d(3, stride=2, ceil_mode=True)  # 14 -> 7
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1)
        self.act3 = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(0.5)
        self.fc = nn.Linear(32 * 7 * 7, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.lrn1(self.act1(self.conv1(x))))
        x = self.pool2(self.lrn2(self.act2(self.conv2(x))))
        x = self.act3(self.conv3(x))
        return self.fc(self.dropout(x.flatten(1)))


class BasicBlock(nn.Module):
    """ResNet basic block: the residual add and the final ReLU work in place."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act2 = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        out += self.shortcut(x)
        return self.act2(out)


class ResidualBn(nn.Module):
    """ResNet: stem, three basic blocks (one downsampling), GAP, fc; target a middle block's act1."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16))
        self.stem_act = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(BasicBlock(16, 16, 1), BasicBlock(16, 32, 2))
        self.layer2 = nn.Sequential(BasicBlock(32, 32, 1))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.stem_act(self.stem(x))))
        return self.fc(self.pool(x).flatten(1))


class DepthwiseRelu6(nn.Module):
    """MobileNet: depthwise separable convs with BN and ReLU6, stride-2 depthwise, GAP."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(1, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16)]
        layers.append(nn.ReLU6(inplace=True))
        for cin, cout, stride in ((16, 32, 1), (32, 48, 2), (48, 64, 1)):
            layers += [
                nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False),
                nn.BatchNorm2d(cin),
                nn.ReLU6(inplace=True),
                nn.Conv2d(cin, cout, 1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU6(inplace=True),
            ]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, squeezed: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, squeezed, 1)
        self.act = nn.SiLU()
        self.expand = nn.Conv2d(squeezed, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.expand(self.act(self.reduce(self.pool(x)))))


class MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int = 4) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = nn.Sequential(nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid))
        self.act1 = nn.SiLU()
        self.dw = nn.Sequential(
            nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False), nn.BatchNorm2d(mid)
        )
        self.act2 = nn.SiLU()
        self.se = SqueezeExcite(mid, max(1, cin // 4))
        self.project = nn.Sequential(nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.se(self.act2(self.dw(self.act1(self.expand(x))))))
        return out + x if self.residual else out


class SeSilu(nn.Module):
    """EfficientNet: MBConv blocks with SE and SiLU, a Mish head; target inside the first block."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16))
        self.stem_act = nn.SiLU()
        self.blocks = nn.Sequential(MBConv(16, 16, 1), MBConv(16, 24, 2))
        self.head = nn.Conv2d(24, 64, 1)
        self.head_act = nn.Mish()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head_act(self.head(self.blocks(self.stem_act(self.stem(x)))))
        return self.fc(self.pool(x).flatten(1))


class Inception(nn.Module):
    """GoogLeNet: parallel 1x1 / 3x3 / 5x5 / pool branches, concatenated."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.b1 = nn.Sequential(nn.Conv2d(cin, 8, 1), nn.ReLU())
        self.b3 = nn.Sequential(nn.Conv2d(cin, 8, 1), nn.ReLU(), nn.Conv2d(8, 12, 3, padding=1))
        self.b5 = nn.Sequential(nn.Conv2d(cin, 4, 1), nn.ReLU(), nn.Conv2d(4, 6, 5, padding=2))
        self.bp = nn.Sequential(nn.MaxPool2d(3, 1, 1), nn.Conv2d(cin, 6, 1))
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(torch.cat([self.b1(x), self.b3(x), self.b5(x), self.bp(x)], dim=1))


class InceptionNet(nn.Module):
    """GoogLeNet: stem, two Inception modules, max-pool, adaptive avg-pool to 2x2 (not 1x1)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.inception1 = Inception(16)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.inception2 = Inception(32)
        self.avg = nn.AdaptiveAvgPool2d((3, 2))
        self.dropout = nn.Dropout(0.4)
        self.fc = nn.Linear(32 * 6, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inception2(self.pool(self.inception1(self.stem(x))))
        return self.fc(self.dropout(self.avg(x).flatten(1)))


class ConvNeXtBlock(nn.Module):
    """7x7 depthwise, LayerNorm (channels last), inverted bottleneck with GELU, layer scale."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        return x + (self.gamma * y).permute(0, 3, 1, 2)


class ConvNeXtLike(nn.Module):
    """ConvNeXt: patchify stem, blocks, LayerNorm2d + 2x2 strided downsample; target block 1."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 2, 2), LayerNorm2d(16))
        self.blocks = nn.Sequential(ConvNeXtBlock(16), ConvNeXtBlock(16))
        self.down = nn.Sequential(LayerNorm2d(16), nn.Conv2d(16, 32, 2, 2))
        self.last = ConvNeXtBlock(32)
        self.norm = nn.LayerNorm(32)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.last(self.down(self.blocks(self.stem(x))))
        return self.fc(self.norm(x.mean((2, 3))))


class Volumetric(nn.Module):
    """Conv3d with BN, 3-D max-pool and avg-pool; target in the middle, more convs after it."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(1, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm3d(8)
        self.act1 = nn.ReLU()
        self.pool1 = nn.MaxPool3d((1, 2, 2))
        self.conv2 = nn.Conv3d(8, 16, 3, padding=1)
        self.act2 = nn.ReLU()
        self.pool2 = nn.AvgPool3d(2, ceil_mode=True)
        self.conv3 = nn.Conv3d(16, 16, (3, 3, 3), stride=(1, 2, 2), padding=1)
        self.act3 = nn.ReLU()
        self.pool3 = nn.MaxPool3d(2, ceil_mode=True)
        self.avg = nn.AdaptiveAvgPool3d((1, 2, 2))
        self.fc = nn.Linear(16 * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.act1(self.bn1(self.conv1(x))))
        x = self.pool2(self.act2(self.conv2(x)))
        x = self.pool3(self.act3(self.conv3(x)))
        return self.fc(self.avg(x).flatten(1))


@dataclass(frozen=True)
class Probe:
    """A probe module, its Grad-CAM target and input shape (without the batch)."""

    build: Callable[[], nn.Module]
    target_layer: str
    input_shape: tuple[int, ...] = (1, 28, 28)


PROBES: dict[str, Probe] = {
    "tanh_avgpool": Probe(TanhAvgPool, "act2"),
    "lrn_ceil_maxpool": Probe(LrnCeilPool, "act2"),
    "residual_bn": Probe(ResidualBn, "layer1.1.act1"),
    "residual_bn_inplace_add": Probe(ResidualBn, "layer2.0.bn2"),
    "depthwise_relu6": Probe(DepthwiseRelu6, "features.8"),
    "se_silu_mish": Probe(SeSilu, "blocks.0.act2"),
    "inception": Probe(InceptionNet, "inception1"),
    "convnext": Probe(ConvNeXtLike, "blocks.1"),
    "conv3d": Probe(Volumetric, "act2", (1, 6, 16, 16)),
}


def zoo_probes() -> dict[str, Probe]:
    """Every model of the zoo as a probe: its spec's builder, Grad-CAM layer and input shape."""
    from training.models import MODELS

    return {
        name: Probe(spec.build, spec.gradcam_layer, spec.input_shape)
        for name, spec in MODELS.items()
    }


# The Grad-CAM export's grid: every probe and every zoo model, one table for one set of tests.
EXPLAINED: dict[str, Probe] = {
    **{f"probe-{name}": probe for name, probe in PROBES.items()},
    **{f"zoo-{name}": probe for name, probe in zoo_probes().items()},
}
