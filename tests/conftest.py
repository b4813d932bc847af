"""Shared fixtures: one short real training run, exported once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHORT_RUN = [
    "--model",
    "mnist_cnn",
    "--epochs",
    "1",
    "--max-steps",
    "300",
    "--seed",
    "1",
    "--quiet",
]


@pytest.fixture(scope="session")
def mnist_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint of mnist_cnn after a short (300-step) training run on real MNIST."""
    from training.train import build_parser, train

    out = tmp_path_factory.mktemp("checkpoints") / "mnist_cnn.pt"
    train(build_parser().parse_args([*SHORT_RUN, "--threads", "2", "--out", str(out)]))
    return out


@pytest.fixture(scope="session")
def mnist_repository(tmp_path_factory: pytest.TempPathFactory, mnist_checkpoint: Path) -> Path:
    """A model repository holding that checkpoint as mnist_cnn (and mnist_cnn_gradcam)."""
    from export.pipeline import export_checkpoint

    repository = tmp_path_factory.mktemp("model_repository")
    export_checkpoint(mnist_checkpoint, repository, gradcam=True)
    return repository
