"""The sanity check's machinery (bench/sanity.py) on one small model, maps from eager Grad-CAM."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from bench.sanity import cascading, layers_top_down, randomise, rank_correlation
from export.gradcam import gradcam_reference
from tests.support.gradcam_probes import TanhAvgPool, realistic_init
from training.mnist import MEAN, STD, load_mnist


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return realistic_init(TanhAvgPool())


def digits() -> np.ndarray:
    images, _ = load_mnist("test")
    return (images[:16].astype(np.float32) / 255.0)[:, None]


def test_layers_come_top_down_and_randomising_touches_only_those() -> None:
    model = small_model()
    assert layers_top_down(model) == ["fc", "conv2", "conv1"]
    changed = randomise(model, ["fc", "conv2"], seed=1)
    before, after = dict(model.named_parameters()), dict(changed.named_parameters())
    assert torch.equal(before["conv1.weight"], after["conv1.weight"])
    assert not torch.equal(before["conv2.weight"], after["conv2.weight"])
    assert not torch.equal(before["fc.bias"], after["fc.bias"])


def test_rank_correlation() -> None:
    maps = np.random.default_rng(0).random((4, 28, 28))
    assert rank_correlation(maps, maps) == 1.0
    assert rank_correlation(maps, -maps) == -1.0
    assert rank_correlation(maps, np.zeros_like(maps)) == 0.0  # a flat map ranks nothing


def test_cascading_separates_a_model_blind_map_from_grad_cam() -> None:
    pixels = digits()
    targets = torch.full((len(pixels),), -1)

    def gradcam(model: nn.Module) -> dict[str, np.ndarray]:
        ref = gradcam_reference(model, "act2", torch.from_numpy(pixels), targets, MEAN, STD)
        return {"gradcam": ref["cam"].numpy(), "edges": np.abs(np.diff(pixels[:, 0], axis=1))}

    rows = cascading(small_model(), gradcam, seed=1)
    assert [r["randomised_down_to"] for r in rows] == ["fc", "conv2", "conv1"]
    # A map of the input alone (an edge detector) passes every randomisation unchanged: the
    # failure the check exists to catch. Grad-CAM's map follows the weights.
    assert all(r["correlation"]["edges"] == 1.0 for r in rows)  # type: ignore[index]
    assert rows[-1]["correlation"]["gradcam"] < 0.9  # type: ignore[index]
