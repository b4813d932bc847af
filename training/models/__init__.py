"""The model zoo: one module per architecture, each exporting a `SPEC`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from torch import nn

from training.models import (
    alexnet,
    cnn3d,
    convnext,
    efficientnet,
    googlenet,
    lenet5,
    mnist_cnn,
    mobilenet,
    resnet,
    vgg,
)


@dataclass(frozen=True)
class ModelSpec:
    """What the training and export steps need to know about one architecture."""

    name: str
    build: Callable[..., nn.Module]  # build(num_classes=..., activation=...) -> nn.Module
    gradcam_layer: str  # dotted module name: the last conv block, after its activation
    description: str
    input_shape: tuple[int, ...] = (1, 28, 28)  # without the batch dimension
    dataset: str = "mnist"
    epochs: int = 3  # default epochs of a full run
    lr: float = 1.0  # learning rate of the optimizer below
    optimizer: str = "adadelta"  # adadelta (the classic recipe) or adamw
    weight_decay: float = 0.0
    build_kwargs: dict[str, Any] = field(default_factory=dict)


_ZOO: tuple[ModuleType, ...] = (
    mnist_cnn,
    lenet5,
    alexnet,
    vgg,
    googlenet,
    resnet,
    mobilenet,
    efficientnet,
    convnext,
    cnn3d,
)
MODELS: dict[str, ModelSpec] = {module.SPEC["name"]: ModelSpec(**module.SPEC) for module in _ZOO}


def get_spec(name: str) -> ModelSpec:
    """The spec of a model by name, with the known names in the error."""
    try:
        return MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}") from None
