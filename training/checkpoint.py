"""Checkpoints: weights plus everything later steps need, loadable with weights_only=True."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from training.models import ModelSpec, get_spec

FORMAT_VERSION = 1


@dataclass(frozen=True)
class CheckpointConfig:
    """How to rebuild the trained model; saved inside the checkpoint as a plain dict.

    The dict keys are the field names, the same keys checkpoints carried before this class
    existed, so those still load.
    """

    model: str  # the zoo name
    input_shape: tuple[int, ...]  # without the batch dimension
    gradcam_layer: str
    num_classes: int
    build_kwargs: dict[str, Any] = field(default_factory=dict)
    recipe: dict[str, Any] = field(default_factory=dict)  # how it was trained (training.recipe)

    def to_dict(self) -> dict[str, Any]:
        """Plain data only (str, int, list, dict), as `torch.load(weights_only=True)` accepts."""
        return {
            "model": self.model,
            "build_kwargs": dict(self.build_kwargs),
            "input_shape": list(self.input_shape),
            "gradcam_layer": self.gradcam_layer,
            "num_classes": self.num_classes,
            "recipe": dict(self.recipe),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CheckpointConfig:
        """The config of a checkpoint, from the dict `to_dict` (or an older version) wrote."""
        return cls(
            model=str(data["model"]),
            input_shape=tuple(int(d) for d in data["input_shape"]),
            gradcam_layer=str(data["gradcam_layer"]),
            num_classes=int(data["num_classes"]),
            build_kwargs=dict(data.get("build_kwargs", {})),
            recipe=dict(data.get("recipe", {})),
        )


@dataclass
class Checkpoint:
    """A trained model with its configuration, normalisation, labels and metrics."""

    model: nn.Module
    spec: ModelSpec
    config: CheckpointConfig
    mean: float
    std: float
    labels: list[str]
    metrics: dict[str, Any]

    @property
    def name(self) -> str:
        return self.config.model

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.config.input_shape


def save_checkpoint(
    path: Path,
    model: nn.Module,
    config: CheckpointConfig,
    *,
    mean: float,
    std: float,
    labels: list[str],
    metrics: dict[str, Any],
    train_args: dict[str, Any],
) -> None:
    """Write the checkpoint atomically (a half-written file never replaces a good one)."""
    payload = {
        "format": FORMAT_VERSION,
        "config": config.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "normalisation": {"mean": mean, "std": std},
        "labels": labels,
        "metrics": metrics,
        "train_args": train_args,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def load_checkpoint(path: Path | str) -> Checkpoint:
    """Load a checkpoint and rebuild its model in eval mode."""
    payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    if payload.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported checkpoint format {payload.get('format')!r}")
    config = CheckpointConfig.from_dict(payload["config"])
    spec = get_spec(config.model)
    model = spec.build(num_classes=config.num_classes, **config.build_kwargs)
    model.load_state_dict(payload["state_dict"])
    model.eval()
    return Checkpoint(
        model=model,
        spec=spec,
        config=config,
        mean=float(payload["normalisation"]["mean"]),
        std=float(payload["normalisation"]["std"]),
        labels=list(payload["labels"]),
        metrics=payload["metrics"],
    )
