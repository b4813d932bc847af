"""What the training and export steps need to know about one architecture of the zoo."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn


@dataclass(frozen=True)
class ModelSpec:
    """One architecture: how to build it, what it eats, how to train it, where to explain it."""

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
    recipe: str = "classic"  # the default recipe (training.recipe): classic or modern
    modern_lr: float = 3e-3  # the modern recipe's peak AdamW learning rate
    modern_weight_decay: float = 0.01  # and its AdamW weight decay
    build_kwargs: dict[str, Any] = field(default_factory=dict)
