"""Image decoding and pictures of the explain API, without a server."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from service.errors import InvalidInput
from service.imaging import colormap, decode_image, feature_grid_png, overlay_png
from training.data import load_mnist


def _encode(pixels: np.ndarray, fmt: str = "PNG", mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    img = Image.fromarray(pixels)
    if mode:
        img = img.convert(mode)
    img.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def digit() -> np.ndarray:
    images, _ = load_mnist("test")
    return images[0]


def test_a_28x28_png_of_an_mnist_digit_decodes_to_exactly_its_pixels(digit: np.ndarray) -> None:
    decoded = decode_image(_encode(digit), (28, 28))
    np.testing.assert_array_equal(decoded.pixels, digit.astype(np.float32) / 255.0)
    assert decoded.original.shape == (28, 28)


def test_dark_on_light_pictures_are_inverted_unless_asked_not_to(digit: np.ndarray) -> None:
    paper = _encode(255 - digit, mode="RGB")
    auto = decode_image(paper, (28, 28))
    np.testing.assert_allclose(auto.pixels, digit / 255.0, atol=1 / 255)
    as_is = decode_image(paper, (28, 28), "as_is")
    assert as_is.pixels.mean() > 0.5


def test_any_size_and_format_is_fitted_to_the_model_input(digit: np.ndarray) -> None:
    big = np.kron(digit, np.ones((10, 14), dtype=np.uint8))  # 280 x 392, not square
    decoded = decode_image(_encode(big, "JPEG"), (28, 28))
    assert decoded.pixels.shape == (28, 28) and decoded.pixels.dtype == np.float32
    assert decoded.original.shape == (280, 392)
    assert decoded.pixels.min() >= 0.0 and decoded.pixels.max() <= 1.0


def test_transparent_png_becomes_a_light_stroke_on_black() -> None:
    rgba = np.zeros((40, 40, 4), dtype=np.uint8)
    rgba[10:30, 18:22] = (0, 0, 0, 255)  # a black bar on transparent paper
    decoded = decode_image(_encode(rgba), (28, 28))
    assert decoded.pixels[14, 14] > 0.9 and decoded.pixels[1, 1] < 0.05


@pytest.mark.parametrize(
    "payload",
    [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, b"GIF89a" + b"\x00" * 40],
    ids=["empty", "text", "truncated-png", "gif"],
)
def test_bytes_that_are_not_png_or_jpeg_are_invalid_input(payload: bytes) -> None:
    with pytest.raises(InvalidInput, match="image"):
        decode_image(payload, (28, 28))


def test_overlay_png_has_the_input_pictures_size(digit: np.ndarray) -> None:
    original = np.kron(digit, np.ones((3, 5), dtype=np.uint8))
    cam = np.zeros((28, 28), dtype=np.float32)
    cam[10:20, 10:20] = 1.0
    png = overlay_png(original, cam)
    with Image.open(io.BytesIO(png)) as img:
        assert img.format == "PNG" and img.size == (140, 84) and img.mode == "RGB"
        rgb = np.asarray(img)
    assert rgb[45, 75, 0] > rgb[45, 75, 2]  # hot centre is red
    assert rgb[2, 2, 2] >= rgb[2, 2, 0]  # cold corner is blue-ish or grey


def test_colormap_runs_blue_to_red() -> None:
    low, high = colormap(np.array([0.0, 1.0]))
    assert low[2] > low[0] and high[0] > high[2]


def test_feature_grid_tiles_every_map() -> None:
    maps = np.random.default_rng(0).random((64, 12, 12)).astype(np.float32)
    with Image.open(io.BytesIO(feature_grid_png(maps))) as img:
        width, height = img.size
    assert width > 8 * 48 and height > 8 * 48
