"""Training recipes: the optimiser, schedule, loss and augmentation a model is trained with.

`classic` is the pytorch/examples MNIST recipe (Adadelta or the spec's AdamW, the learning rate
decayed by `gamma` every epoch, plain cross-entropy, no augmentation). `modern` is AdamW with a
one-cycle schedule (linear warm-up, cosine decay, stepped every batch), label smoothing and a
random affine augmentation of every training batch: shifts of up to `max_shift` pixels and
rotations of up to `max_rotation` degrees, done in torch with `affine_grid`/`grid_sample`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from training.models.spec import ModelSpec

RECIPES = ("classic", "modern")


@dataclass(frozen=True)
class Recipe:
    """Everything that turns a model and its data into a training run, besides epochs and seed."""

    name: str
    optimizer: str  # adadelta or adamw
    lr: float  # the peak learning rate for the one-cycle schedule
    weight_decay: float
    schedule: str  # "step" (lr x gamma every epoch) or "onecycle" (every batch)
    gamma: float = 1.0  # step schedule only
    warmup: float = 0.0  # one-cycle only: the fraction of all steps spent warming up
    label_smoothing: float = 0.0
    max_shift: float = 0.0  # pixels, each axis
    max_rotation: float = 0.0  # degrees

    @property
    def augments(self) -> bool:
        return self.max_shift > 0 or self.max_rotation > 0

    def to_dict(self) -> dict[str, Any]:
        """Plain data, as a checkpoint's config stores it."""
        return asdict(self)


def resolve_recipe(
    spec: ModelSpec, name: str | None = None, lr: float | None = None, gamma: float = 0.7
) -> Recipe:
    """The recipe `name` (default: the spec's) for `spec`, its learning rate overridden by `lr`."""
    name = name or spec.recipe
    if name == "classic":
        return Recipe(
            name="classic",
            optimizer=spec.optimizer,
            lr=spec.lr if lr is None else lr,
            weight_decay=spec.weight_decay,
            schedule="step",
            gamma=gamma,
        )
    if name == "modern":
        return Recipe(
            name="modern",
            optimizer="adamw",
            lr=spec.modern_lr if lr is None else lr,
            weight_decay=spec.modern_weight_decay,
            schedule="onecycle",
            warmup=0.2,
            label_smoothing=0.1,
            max_shift=2.0,
            max_rotation=10.0,
        )
    raise ValueError(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}")


def make_optimizer(
    recipe: Recipe, net: nn.Module, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The recipe's optimiser and schedule; `step_scheduler` says when to step the latter."""
    optimizer: torch.optim.Optimizer
    if recipe.optimizer == "adamw":
        optimizer = torch.optim.AdamW(
            net.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay
        )
    else:
        optimizer = torch.optim.Adadelta(
            net.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay
        )
    scheduler: torch.optim.lr_scheduler.LRScheduler
    if recipe.schedule == "onecycle":
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=recipe.lr,
            total_steps=max(total_steps, 2),
            pct_start=recipe.warmup,
            anneal_strategy="cos",
            cycle_momentum=recipe.optimizer == "adamw",
        )
    else:
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=recipe.gamma)
    return optimizer, scheduler


def affine(
    x: torch.Tensor,
    shifts: torch.Tensor,
    angles: torch.Tensor,
    background: float = 0.0,
) -> torch.Tensor:
    """Move each picture of `x` [N, ..., H, W] by `shifts` [N, 2] pixels (dx right, dy down).

    and rotate it by `angles` [N] degrees (counter-clockwise on screen) about its centre; what
    comes in from outside reads `background`. Every channel (and frame) of one item moves alike.
    """
    n, h, w = x.shape[0], x.shape[-2], x.shape[-1]
    flat = x.reshape(n, -1, h, w) - background
    rad = angles.to(x.dtype).to(x.device) * (math.pi / 180.0)
    cos, sin = torch.cos(rad), torch.sin(rad)
    shifts = shifts.to(x.dtype).to(x.device)
    # theta maps output coordinates to input ones (normalised to [-1, 1]): the inverse motion.
    # Rotating the picture by +a on screen (y down) samples the input at R(-a) applied in the
    # pixel frame; in normalised coordinates the aspect ratio enters the off-diagonal terms.
    theta = torch.zeros(n, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = cos
    theta[:, 0, 1] = -sin * h / w
    theta[:, 1, 0] = sin * w / h
    theta[:, 1, 1] = cos
    theta[:, 0, 2] = -2.0 * shifts[:, 0] / w
    theta[:, 1, 2] = -2.0 * shifts[:, 1] / h
    grid = F.affine_grid(theta, list(flat.shape), align_corners=False)
    out = F.grid_sample(flat, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return (out + background).reshape(x.shape)


def random_affine(
    x: torch.Tensor,
    generator: torch.Generator,
    max_shift: float,
    max_rotation: float,
    background: float = 0.0,
) -> torch.Tensor:
    """`affine` with shifts and angles drawn uniformly from +-max_shift px, +-max_rotation deg."""
    n = x.shape[0]
    shifts = (torch.rand(n, 2, generator=generator) * 2 - 1) * max_shift
    angles = (torch.rand(n, generator=generator) * 2 - 1) * max_rotation
    return affine(x, shifts, angles, background)
