"""Image decoding and pictures of the explain API, without a server."""

from __future__ import annotations

import io
import struct
import time
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from bench.pictures import jpeg_claiming as _jpeg_claiming
from bench.pictures import png_claiming as _png_claiming
from service.core.errors import DeadlineExceeded, InvalidInput
from service.explain.imaging import (
    MAX_DECODED_PIXELS,
    MAX_IMAGE_PIXELS,
    MAX_OVERLAY_SIDE,
    Cancelled,
    Stop,
    colormap,
    decode_image,
    feature_grid_png,
    overlay_png,
)
from service.explain.pipeline import ModelInput, _draw
from training.mnist import load_mnist


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


# Bounds: the header is checked before decoding, big pictures are handled at a bounded size, and
# the work stops between steps when the client has gone.


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA"])
def test_a_20000x1000_png_fits_the_model_input_quickly_without_a_big_canvas(mode: str) -> None:
    picture = Image.new(mode, (20000, 1000))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    start = time.process_time()
    decoded = decode_image(buffer.getvalue(), (28, 28))
    assert time.process_time() - start < 1.0
    assert decoded.pixels.shape == (28, 28) and not decoded.pixels.any()
    assert decoded.original.shape == (26, 512)  # the working copy: longer side MAX_OVERLAY_SIDE
    with Image.open(io.BytesIO(overlay_png(decoded.original, np.ones((28, 28))))) as overlay:
        assert overlay.size == (512, 26)


def test_a_wide_stripe_lands_in_the_middle_rows_of_the_model_input() -> None:
    stripe = np.full((1000, 20000), 255, dtype=np.uint8)
    decoded = decode_image(_encode(stripe), (28, 28), "as_is")
    rows = decoded.pixels.mean(axis=1)
    assert rows[13] > 0.9 and rows[:13].max() == 0 and rows[14:].max() == 0


@pytest.mark.parametrize(
    ("payload", "limit"),
    [
        (_png_claiming(100_000, 100_000), MAX_IMAGE_PIXELS),
        (_png_claiming(6000, 6000), MAX_DECODED_PIXELS),
        (_jpeg_claiming(60_000, 60_000), MAX_IMAGE_PIXELS),
    ],
    ids=["png-header", "png-decoded", "jpeg-header"],
)
def test_a_picture_over_the_limits_is_refused_from_its_header(payload: bytes, limit: int) -> None:
    start = time.process_time()
    with pytest.raises(InvalidInput, match=f"{limit:,}-pixel limit"):
        decode_image(payload, (28, 28))
    assert time.process_time() - start < 0.1
    assert len(payload) < 1000


def test_a_large_jpeg_is_decoded_reduced(
    digit: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    big = np.kron(digit, np.ones((100, 100), dtype=np.uint8))  # 2800 x 2800
    data = _encode(big, "JPEG")
    decoded_sizes: list[tuple[int, int]] = []
    draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self: Image.Image, mode: str | None, size: tuple[int, int] | None) -> object:
        result = draft(self, mode, size)  # type: ignore[arg-type]
        decoded_sizes.append(self.size)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    decoded = decode_image(data, (28, 28))
    assert decoded_sizes == [(700, 700)]  # decoded at 1/4: the smallest scale of at least 512
    assert decoded.original.shape == (512, 512)
    assert np.abs(decoded.pixels - digit / 255.0).mean() < 0.05


def test_overlays_of_a_large_picture_are_drawn_at_a_bounded_size() -> None:
    original = np.zeros((1500, 3000), dtype=np.uint8)
    with Image.open(io.BytesIO(overlay_png(original, np.ones((28, 28))))) as img:
        assert img.size == (MAX_OVERLAY_SIDE, 256)


def test_decoding_stops_when_cancelled_or_past_the_deadline(digit: np.ndarray) -> None:
    cancelled = Stop()
    cancelled.cancel()
    with pytest.raises(Cancelled):
        decode_image(_encode(digit), (28, 28), stop=cancelled)
    with pytest.raises(DeadlineExceeded):
        decode_image(_encode(digit), (28, 28), stop=Stop(timeout_s=-1.0))
    assert Stop(timeout_s=60).remaining() > 59  # type: ignore[operator]


class _StopAfter(Stop):
    """Lets `count` checks pass, then reports a cancel."""

    def __init__(self, count: int) -> None:
        super().__init__()
        self.checks = 0
        self.count = count

    def check(self, step: str) -> None:
        self.checks += 1
        if self.checks > self.count:
            raise Cancelled(step)


def test_drawing_stops_between_overlays(digit: np.ndarray) -> None:
    item = ModelInput(digit[np.newaxis] / 255.0, digit)
    cams = [np.ones((28, 28), dtype=np.float32)] * 8
    stop = _StopAfter(2)
    with pytest.raises(Cancelled, match="overlay"):
        _draw(item, cams, None, False, stop)
    assert stop.checks == 3
    assert len(_draw(item, cams, None, False).overlays) == 8


def test_pictures_of_nan_or_infinite_maps_are_drawn_without_warnings(digit: np.ndarray) -> None:
    odd = np.full((28, 28), np.nan, dtype=np.float32)
    odd[0, :4] = [np.inf, -np.inf, 1e30, -1e30]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        overlay_png(digit, odd)
        feature_grid_png(np.stack([odd, np.ones_like(odd)]))
        assert colormap(odd).dtype == np.uint8
