"""Checkpoints: weights plus everything later steps need, loadable with weights_only=True."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from training.models import ModelSpec, get_spec

FORMAT_VERSION = 1


@dataclass
class Checkpoint:
    """A trained model with its configuration, normalisation, labels and metrics."""

    model: nn.Module
    spec: ModelSpec
    config: dict[str, Any]  # model name, build kwargs, input shape, gradcam layer
    mean: float
    std: float
    labels: list[str]
    metrics: dict[str, Any]

    @property
    def name(self) -> str:
        return str(self.config["model"])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.config["input_shape"])


def save_checkpoint(
    path: Path,
    model: nn.Module,
    spec: ModelSpec,
    *,
    build_kwargs: dict[str, Any],
    mean: float,
    std: float,
    labels: list[str],
    metrics: dict[str, Any],
    train_args: dict[str, Any],
) -> None:
    """Write the checkpoint atomically (a half-written file never replaces a good one)."""
    payload = {
        "format": FORMAT_VERSION,
        "config": {
            "model": spec.name,
            "build_kwargs": build_kwargs,
            "input_shape": list(spec.input_shape),
            "gradcam_layer": spec.gradcam_layer,
            "num_classes": len(labels),
        },
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
    config = payload["config"]
    spec = get_spec(config["model"])
    model = spec.build(num_classes=config["num_classes"], **config["build_kwargs"])
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
