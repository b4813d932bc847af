"""Image decoding and pictures of the explain API, without a server."""

from __future__ import annotations

import io
import struct
import time
import warnings
import zlib
from typing import Any

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
    Caption,
    Stop,
    annotated_png,
    colormap,
    decode_image,
    feature_grid_png,
    overlay_png,
    picture_warnings,
    shared_scale,
)
from service.explain.pipeline import ExplainQuery, ModelInput, RawTensor, _draw, read_input
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


# Overlays of pictures that are not square: the model sees the picture letterboxed into its
# canvas, so only the part of the heatmap over the picture may be stretched over it.


def _hottest(png: bytes) -> tuple[int, int]:
    """(row, column) of the overlay's hottest pixel: most red against blue."""
    with Image.open(io.BytesIO(png)) as img:
        rgb = np.asarray(img.convert("RGB"), dtype=np.int32)
    heat = rgb[..., 0] - rgb[..., 2]
    row, col = np.unravel_index(int(np.argmax(heat)), heat.shape)
    return int(row), int(col)


@pytest.mark.parametrize(
    ("size", "mark"),
    [
        # (width, height) of the picture; the mark's (top, left, height, width) in the picture
        ((480, 240), (10, 40, 50, 50)),  # wide: near the top edge, off the centre rows
        ((240, 480), (360, 170, 50, 50)),  # tall: near the right edge, low
        ((510, 170), (120, 420, 40, 40)),  # wide 3:1, bottom right
    ],
    ids=["wide", "tall", "wide-3to1"],
)
def test_the_hottest_region_of_an_overlay_falls_on_the_mark(
    size: tuple[int, int], mark: tuple[int, int, int, int], tmp_path_factory: pytest.TempPathFactory
) -> None:
    width, height = size
    top, left, mark_h, mark_w = mark
    picture = np.zeros((height, width), dtype=np.uint8)
    picture[top : top + mark_h, left : left + mark_w] = 255
    decoded = decode_image(_encode(picture), (28, 28), "as_is")
    # A model that looks exactly at the mark: its heatmap is the model input itself.
    png = overlay_png(decoded.original, decoded.pixels, decoded.box)
    (tmp_path_factory.mktemp("overlays") / f"{width}x{height}.png").write_bytes(png)
    with Image.open(io.BytesIO(png)) as img:
        assert img.size == (width, height)
    row, col = _hottest(png)
    assert top <= row < top + mark_h and left <= col < left + mark_w, (row, col)


def test_the_box_is_where_the_picture_lies_in_the_canvas() -> None:
    decoded = decode_image(_encode(np.full((280, 560), 255, dtype=np.uint8)), (28, 28), "as_is")
    box = decoded.box
    assert (box.top, box.left, box.height, box.width) == (7, 0, 14, 28)
    assert box.crop(decoded.pixels).min() == 1.0
    assert decoded.pixels.sum() == box.height * box.width


# A phone photo is stored as the sensor saw it, with an EXIF tag saying how to turn it upright.


def _jpeg_turned(upright: np.ndarray, orientation: int) -> bytes:
    """`upright` stored as a camera would with EXIF `orientation` (6: turn 90° clockwise to view,
    8: 90° counter-clockwise, 3: 180°)."""
    stored = {6: np.rot90(upright, 1), 8: np.rot90(upright, -1), 3: np.rot90(upright, 2)}
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(stored[orientation])).save(
        buffer, format="JPEG", quality=95, exif=exif
    )
    return buffer.getvalue()


@pytest.mark.parametrize("orientation", [6, 8, 3])
def test_a_jpeg_is_turned_as_its_exif_orientation_says(digit: np.ndarray, orientation: int) -> None:
    upright = np.kron(255 - digit, np.ones((4, 4), dtype=np.uint8))  # dark digit on paper
    decoded = decode_image(_jpeg_turned(upright, orientation), (28, 28))
    expected = digit.astype(np.float32) / 255.0
    assert np.abs(decoded.pixels - expected).mean() < 0.03
    assert np.abs(decoded.pixels - np.rot90(expected, 1)).mean() > 0.1


@pytest.mark.parametrize(("low", "high"), [(-0.5, 1.0), (0.0, 255.0), (0.0, 1.0001)])
def test_explain_tensors_outside_0_1_are_refused(low: float, high: float) -> None:
    pixels = np.zeros((1, 28, 28), dtype="<f4")
    pixels[0, 0, :2] = [low, high]
    query = ExplainQuery(model="m", tensor=RawTensor((1, 28, 28), pixels.tobytes()))
    with pytest.raises(InvalidInput, match=r"\[0, 1\]"):
        read_input(query, (1, 28, 28))
    pixels[0, 0, :2] = [0.0, 1.0]
    query = ExplainQuery(model="m", tensor=RawTensor((1, 28, 28), pixels.tobytes()))
    assert read_input(query, (1, 28, 28)).pixels.max() == 1.0


# Pictures for people: the annotated overlay, the shared scale, the warnings.


def test_an_annotated_overlay_of_a_5x5_picture_is_readable_and_keeps_its_pixels_sharp() -> None:
    rgb = np.zeros((5, 5, 3), dtype=np.uint8)
    rgb[2, 2] = 255
    caption = Caption("7", 0.982, notes=("note: the picture is 5x5 px",))
    with Image.open(io.BytesIO(annotated_png(rgb, caption))) as img:
        width, height = img.size
        out = np.asarray(img.convert("RGB"))
    assert width >= 224 and height > 225  # the picture (225 px: 45 x 5) and the caption below
    left = (width - 225) // 2
    assert out[2 * 45 + 1, left + 2 * 45 + 1].tolist() == [255, 255, 255]  # whole-pixel blocks
    assert out[0, left].tolist() == [0, 0, 0]
    caption_band = out[225:]
    assert (caption_band < 100).all(axis=2).any()  # dark text under the picture
    red, blue = caption_band[..., 0].astype(int), caption_band[..., 2].astype(int)
    assert ((red - blue) > 150).any() and ((blue - red) > 150).any()  # the colour scale's ends


def test_a_shared_scale_keeps_a_weak_class_cold() -> None:
    strong, weak = np.zeros((7, 7), np.float32), np.zeros((7, 7), np.float32)
    strong[3, 3], weak[1, 1] = 4.0, 0.4
    cams = [np.ones((28, 28), np.float32), np.ones((28, 28), np.float32)]  # each max 1 alone
    shared = shared_scale(cams, [strong, weak])
    assert shared[0].max() == pytest.approx(1.0) and shared[1].max() == pytest.approx(0.1)
    assert [s.max() for s in shared_scale(cams, [np.zeros((7, 7))] * 2)] == [0.0, 0.0]


def _photo() -> bytes:
    noise = np.random.default_rng(0).random((8, 8)) * 255
    photo = Image.fromarray(noise.astype(np.uint8)).resize((300, 200), Image.Resampling.BICUBIC)
    return _encode(np.asarray(photo), "JPEG")


def _transparent() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGBA", (100, 100), (0, 0, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("make", "says"),
    [(_photo, "does not look like a digit"), (_transparent, "blank")],
    ids=["grey-photo", "blank-transparent-png"],
)
def test_pictures_that_are_not_digits_are_warned_about(make: Any, says: str) -> None:
    decoded = decode_image(make(), (28, 28))
    (warning,) = picture_warnings(decoded.pixels, decoded.box, decoded.size)
    assert says in warning


def test_mnist_digits_get_no_warning() -> None:
    images, _ = load_mnist("test")
    for pixels in images[:500]:
        decoded = decode_image(_encode(pixels), (28, 28))
        assert picture_warnings(decoded.pixels, decoded.box, decoded.size) == []


def test_a_dark_on_light_picture_says_it_was_inverted(digit: np.ndarray) -> None:
    assert decode_image(_encode(255 - digit), (28, 28)).inverted
    assert not decode_image(_encode(digit), (28, 28)).inverted
    assert not decode_image(_encode(255 - digit), (28, 28), "as_is").inverted
