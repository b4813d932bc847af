"""Zoo models for tests: built in eval mode with non-trivial BatchNorm statistics, and inputs."""

from __future__ import annotations

import torch
from torch import nn

from training.models import ModelSpec


def build(spec: ModelSpec, **kwargs: object) -> nn.Module:
    """The model in eval mode, with non-trivial BatchNorm statistics so parity means something."""
    torch.manual_seed(0)
    model = spec.build(num_classes=10, **{**spec.build_kwargs, **kwargs})
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.5, 0.5)  # type: ignore[union-attr]
            module.running_var.uniform_(0.5, 2.0)  # type: ignore[union-attr]
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, -0.2, 0.2)
    return model.eval()


def inputs(spec: ModelSpec, batch: int) -> torch.Tensor:
    """Random normal inputs of the model's shape, the same for the same batch size."""
    return torch.randn(batch, *spec.input_shape, generator=torch.Generator().manual_seed(batch))
