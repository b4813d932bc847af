"""Training: a short real run learns, runs are reproducible, checkpoints carry what export needs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT
from training.checkpoint import FORMAT_VERSION, CheckpointConfig, load_checkpoint
from training.models import MODELS
from training.recipe import resolve_recipe
from training.train import build_parser, train, weights_digest

TINY = [
    "--epochs",
    "1",
    "--max-steps",
    "15",
    "--test-limit",
    "200",
    "--quiet",
    "--no-plot",
    "--threads",
    "1",
]


def test_short_run_reaches_95_percent_on_the_full_test_set(mnist_checkpoint: Path) -> None:
    ckpt = load_checkpoint(mnist_checkpoint)
    assert ckpt.metrics["test_accuracy"] >= 0.95, ckpt.metrics["epochs"]
    assert ckpt.metrics["epochs"][0]["test_accuracy"] == ckpt.metrics["test_accuracy"]


def test_checkpoint_carries_weights_config_normalisation_labels_metrics(
    mnist_checkpoint: Path,
) -> None:
    payload = torch.load(mnist_checkpoint, weights_only=True)
    assert payload["config"]["model"] == "mnist_cnn"
    assert payload["config"]["input_shape"] == [1, 28, 28]
    assert payload["config"]["gradcam_layer"] == "act2"
    assert payload["normalisation"] == {"mean": 0.1307, "std": 0.3081}
    assert payload["labels"] == [str(d) for d in range(10)]
    assert payload["metrics"]["params"] == 1_199_882
    assert "conv1.weight" in payload["state_dict"]
    png = mnist_checkpoint.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(mnist_checkpoint.with_suffix(".json").read_text())["params"] == 1_199_882


def test_checkpoint_config_is_typed_and_saved_as_plain_data(mnist_checkpoint: Path) -> None:
    config = load_checkpoint(mnist_checkpoint).config
    assert config == CheckpointConfig(
        model="mnist_cnn",
        input_shape=(1, 28, 28),
        gradcam_layer="act2",
        num_classes=10,
        recipe=resolve_recipe(MODELS["mnist_cnn"]).to_dict(),
    )
    payload = torch.load(mnist_checkpoint, weights_only=True)
    assert payload["config"] == config.to_dict()
    assert CheckpointConfig.from_dict(config.to_dict()) == config


def test_checkpoint_with_the_older_dict_config_still_loads(tmp_path: Path) -> None:
    """A checkpoint as written before the config was typed: its config a dict built by hand."""
    torch.manual_seed(0)
    model = MODELS["lenet5"].build(num_classes=10, activation="swish")
    payload = {
        "format": FORMAT_VERSION,
        "config": {
            "model": "lenet5",
            "build_kwargs": {"activation": "swish"},
            "input_shape": [1, 28, 28],
            "gradcam_layer": "act2",
            "num_classes": 10,
        },
        "state_dict": model.state_dict(),
        "normalisation": {"mean": 0.1307, "std": 0.3081},
        "labels": [str(d) for d in range(10)],
        "metrics": {"params": 1},
        "train_args": {"model": "lenet5"},
    }
    path = tmp_path / "old.pt"
    torch.save(payload, path)
    ckpt = load_checkpoint(path)
    assert ckpt.name == "lenet5" and ckpt.input_shape == (1, 28, 28)
    assert ckpt.config.build_kwargs == {"activation": "swish"}
    assert ckpt.config.gradcam_layer == "act2" and ckpt.config.num_classes == 10
    assert weights_digest(ckpt.model) == weights_digest(model)
    assert not ckpt.model.training


def test_same_seed_same_weights_other_seed_other_weights(tmp_path: Path) -> None:
    digests = []
    for run, seed in enumerate((7, 7, 8)):
        out = tmp_path / f"run{run}.pt"
        train(build_parser().parse_args([*TINY, "--seed", str(seed), "--out", str(out)]))
        digests.append(weights_digest(load_checkpoint(out).model))
    assert digests[0] == digests[1]
    assert digests[0] != digests[2]


def test_two_process_torchrun_ends_with_identical_weights_on_both_ranks(tmp_path: Path) -> None:
    out = tmp_path / "ddp.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "training.train", *TINY, "--out", str(out)],
        cwd=ROOT, env=env, check=True, timeout=300,
    )  # fmt: skip
    metrics = load_checkpoint(out).metrics
    assert metrics["world_size"] == 2
    first, second = metrics["rank_weight_digests"]
    assert first == second


@pytest.mark.parametrize("module", ["training.train", "export"])
def test_cli_help_states_every_default(module: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", module, "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "usage: python -m" in result.stdout
    assert "(default:" in result.stdout
