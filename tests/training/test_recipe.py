"""Training recipes: the augmentation's geometry and seeding, the schedule, the checkpoint's record."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.training.test_training import TINY
from training.checkpoint import load_checkpoint
from training.mnist import load_mnist
from training.models import MODELS
from training.recipe import affine, make_optimizer, random_affine, resolve_recipe
from training.train import BACKGROUND, build_parser, to_tensor, train


def _digits(count: int) -> torch.Tensor:
    return to_tensor(load_mnist("test")[0][:count])


def _centroid(picture: torch.Tensor) -> tuple[float, float]:
    """(row, column) centre of mass of one [H, W] picture above its background."""
    mass = picture - picture.min()
    rows = torch.arange(picture.shape[0], dtype=picture.dtype)
    cols = torch.arange(picture.shape[1], dtype=picture.dtype)
    total = mass.sum()
    return float((mass.sum(1) * rows).sum() / total), float((mass.sum(0) * cols).sum() / total)


@pytest.mark.parametrize("shape", [(5, 1, 28, 28), (2, 1, 8, 32, 32), (3, 2, 20, 24)])
def test_augmentation_keeps_shape_and_dtype(shape: tuple[int, ...]) -> None:
    x = torch.randn(shape)
    out = random_affine(x, torch.Generator().manual_seed(0), 2.0, 10.0, BACKGROUND)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.isfinite(out).all()
    assert not torch.equal(out, x)


def test_augmentation_is_fixed_by_its_generator_seed() -> None:
    x = _digits(16)
    first = random_affine(x, torch.Generator().manual_seed(3), 2.0, 10.0, BACKGROUND)
    again = random_affine(x, torch.Generator().manual_seed(3), 2.0, 10.0, BACKGROUND)
    other = random_affine(x, torch.Generator().manual_seed(4), 2.0, 10.0, BACKGROUND)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


def test_a_shift_moves_a_pixel_and_a_digit_by_whole_pixels() -> None:
    dot = torch.zeros(1, 1, 28, 28)
    dot[0, 0, 10, 10] = 1.0
    moved = affine(dot, torch.tensor([[2.0, 1.0]]), torch.zeros(1))  # 2 px right, 1 px down
    assert moved[0, 0, 11, 12] == pytest.approx(1.0, abs=1e-5)
    assert float(moved.sum()) == pytest.approx(1.0, abs=1e-5)
    digits = _digits(4)
    shifts = torch.tensor([[2.0, 0.0], [0.0, -2.0], [-1.0, 1.0], [1.5, 0.0]])
    out = affine(digits, shifts, torch.zeros(4), BACKGROUND)
    for picture, shifted, (dx, dy) in zip(digits, out, shifts.tolist(), strict=True):
        row, col = _centroid(picture[0])
        new_row, new_col = _centroid(shifted[0])
        assert new_col - col == pytest.approx(dx, abs=0.02)
        assert new_row - row == pytest.approx(dy, abs=0.02)


def test_what_comes_in_at_the_border_is_the_background() -> None:
    blank = torch.full((2, 1, 28, 28), BACKGROUND)
    out = affine(
        blank, torch.tensor([[2.0, 2.0], [-2.0, 1.0]]), torch.tensor([10.0, -10.0]), BACKGROUND
    )
    torch.testing.assert_close(out, blank)


def test_a_quarter_turn_is_rot90_counter_clockwise() -> None:
    x = _digits(2)
    out = affine(x, torch.zeros(2, 2), torch.full((2,), 90.0), BACKGROUND)
    torch.testing.assert_close(out, torch.rot90(x, 1, dims=(-2, -1)), atol=1e-4, rtol=0)
    assert not torch.allclose(out, torch.rot90(x, -1, dims=(-2, -1)), atol=1e-2)


def test_zero_ranges_leave_the_batch_as_it_was() -> None:
    x = _digits(3)
    out = random_affine(x, torch.Generator().manual_seed(0), 0.0, 0.0, BACKGROUND)
    torch.testing.assert_close(out, x, atol=1e-5, rtol=0)


def test_defaults_and_overrides_of_the_recipes() -> None:
    assert resolve_recipe(MODELS["mnist_cnn"]).name == "modern"
    assert resolve_recipe(MODELS["lenet5"]).name == "modern"
    assert resolve_recipe(MODELS["convnext"]).name == "modern"
    assert resolve_recipe(MODELS["alexnet"]).name == "modern"
    classic = resolve_recipe(MODELS["mnist_cnn"], "classic", gamma=0.5)
    assert (classic.optimizer, classic.lr, classic.gamma, classic.augments) == (
        "adadelta",
        1.0,
        0.5,
        False,
    )
    modern = resolve_recipe(MODELS["convnext"], "modern", lr=1e-3)
    assert (modern.optimizer, modern.lr, modern.schedule) == ("adamw", 1e-3, "onecycle")
    assert modern.augments and modern.label_smoothing == 0.1
    with pytest.raises(ValueError, match="unknown recipe 'fancy'"):
        resolve_recipe(MODELS["vgg"], "fancy")


def test_one_cycle_warms_up_to_the_peak_then_decays_to_near_zero() -> None:
    recipe = resolve_recipe(MODELS["mnist_cnn"], "modern")
    optimizer, scheduler = make_optimizer(recipe, torch.nn.Linear(2, 2), total_steps=100)
    lrs = []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    peak = max(range(100), key=lrs.__getitem__)
    assert peak == pytest.approx(100 * recipe.warmup, abs=1)
    assert lrs[peak] == pytest.approx(recipe.lr)
    assert lrs[0] < recipe.lr / 10 and lrs[-1] < recipe.lr / 1000


def test_the_default_recipe_is_recorded_in_the_checkpoint(mnist_checkpoint: Path) -> None:
    config = load_checkpoint(mnist_checkpoint).config
    assert config.recipe == resolve_recipe(MODELS["mnist_cnn"]).to_dict()
    assert config.recipe["name"] == "modern" and config.recipe["max_shift"] == 2.0


def test_a_chosen_recipe_is_recorded_in_the_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "classic.pt"
    train(
        build_parser().parse_args(
            [*TINY, "--recipe", "classic", "--gamma", "0.5", "--out", str(out)]
        )
    )
    recipe = load_checkpoint(out).config.recipe
    assert recipe["name"] == "classic" and recipe["gamma"] == 0.5
    assert recipe["max_shift"] == 0.0 and recipe["label_smoothing"] == 0.0
