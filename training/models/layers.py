"""Building blocks shared by the zoo."""

from __future__ import annotations

from torch import nn

ACTIVATIONS = ("relu", "leaky_relu", "swish")


def make_activation(name: str = "relu") -> nn.Module:
    """A fresh activation module by name: relu, leaky_relu or swish (SiLU)."""
    if name == "relu":
        return nn.ReLU()
    if name == "leaky_relu":
        return nn.LeakyReLU(0.01)
    if name == "swish":
        return nn.SiLU()
    raise ValueError(f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}")
