"""The model zoo: shapes, Grad-CAM targets, sizes, activations, and the 3D task's clips.

Each model's ONNX export is checked in tests/export (classifier parity, Grad-CAM grid)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from tests.support.zoo import build, inputs
from training.clips import FRAMES, LABELS, SIZE, load_moving_mnist
from training.mnist import load_mnist
from training.models import MODELS
from training.models.layers import ACTIVATIONS

NAMES = sorted(MODELS)
MAX_PARAMS = 2_000_000  # "compact": the largest, the classic CNN, has 1.2M


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("batch", [1, 3])
def test_forward_gives_one_logit_per_class(name: str, batch: int) -> None:
    spec = MODELS[name]
    with torch.no_grad():
        logits = build(spec)(inputs(spec, batch))
    assert logits.shape == (batch, 10)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", NAMES)
def test_gradcam_layer_is_called_once_with_a_feature_map(name: str) -> None:
    spec = MODELS[name]
    model = build(spec)
    target = model.get_submodule(spec.gradcam_layer)
    outputs: list[torch.Tensor] = []
    target.register_forward_hook(lambda _module, _args, out: outputs.append(out))
    with torch.no_grad():
        model(inputs(spec, 2))
    assert len(outputs) == 1, f"{spec.gradcam_layer} ran {len(outputs)} times"
    # [N, C, H, W] for images, [N, C, T, H, W] for clips.
    assert outputs[0].dim() == len(spec.input_shape) + 1
    assert outputs[0].shape[0] == 2
    # Not shared: no other name refers to the same module object.
    owners = [n for n, m in model.named_modules(remove_duplicate=False) if m is target]
    assert owners == [spec.gradcam_layer]


@pytest.mark.parametrize("name", NAMES)
def test_model_is_compact(name: str) -> None:
    params = sum(p.numel() for p in build(MODELS[name]).parameters())
    assert 1_000 < params < MAX_PARAMS


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("activation", [a for a in ACTIVATIONS if a != "relu"])
def test_activation_can_be_chosen(name: str, activation: str) -> None:
    spec = MODELS[name]
    model = build(spec, activation=activation)
    acts = {type(m) for m in model.modules()}
    expected = {"leaky_relu": nn.LeakyReLU, "swish": nn.SiLU}[activation]
    assert expected in acts
    with torch.no_grad():
        assert model(inputs(spec, 1)).shape == (1, 10)


def test_clips_are_deterministic_moving_digits() -> None:
    clips, labels = load_moving_mnist("train", num_clips=64)
    again, labels_again = load_moving_mnist("train", num_clips=64)
    assert clips.shape == (64, FRAMES, SIZE, SIZE) and clips.dtype == np.uint8
    assert labels.shape == (64,) and labels.dtype == np.int64
    np.testing.assert_array_equal(clips, again)
    np.testing.assert_array_equal(labels, labels_again)
    assert set(labels.tolist()) <= set(range(len(LABELS)))
    # Every clip shows a digit in every frame, and it moves.
    assert (clips.reshape(64, FRAMES, -1).max(axis=2) > 128).all()
    assert (np.abs(np.diff(clips.astype(np.int16), axis=1)).sum(axis=(1, 2, 3)) > 0).all()
    # The test split is a different, equally fixed draw: MNIST's test digits in order.
    test_clips, test_labels = load_moving_mnist("test", num_clips=64)
    assert not np.array_equal(test_clips, clips)
    np.testing.assert_array_equal(test_labels, load_mnist("test")[1][:64])


def test_clip_spec_matches_the_data() -> None:
    spec = MODELS["cnn3d"]
    assert spec.dataset == "moving_mnist"
    assert spec.input_shape == (1, FRAMES, SIZE, SIZE)
