"""Datasets by name, as training and export see them: uint8 inputs, int64 labels, class labels.

`mnist` is the vendored MNIST (`training.mnist`); `moving_mnist` is clips generated from it
(`training.clips`).
"""

from __future__ import annotations

import numpy as np

from training import clips, mnist

__all__ = ["DATASETS", "load_dataset"]

DATASETS = ("mnist", "moving_mnist")


def load_dataset(name: str, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(uint8 inputs without the channel axis, int64 labels, class labels) of a named dataset."""
    if name == "mnist":
        images, labels = mnist.load_mnist(split)
        return images, labels, list(mnist.LABELS)
    if name == "moving_mnist":
        frames, labels = clips.load_moving_mnist(split)
        return frames, labels, list(clips.LABELS)
    raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
