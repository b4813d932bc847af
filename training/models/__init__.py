"""The model zoo: one module per architecture, each exporting a `SPEC` (a `ModelSpec`)."""

from __future__ import annotations

from types import ModuleType

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
from training.models.spec import ModelSpec

__all__ = ["MODELS", "ModelSpec", "get_spec"]

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
MODELS: dict[str, ModelSpec] = {module.SPEC.name: module.SPEC for module in _ZOO}


def get_spec(name: str) -> ModelSpec:
    """The spec of a model by name, with the known names in the error."""
    try:
        return MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}") from None
