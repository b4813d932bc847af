"""Pictures for the explain API: decode PNG/JPEG into model pixels, draw heatmaps and grids.

Pure numpy + Pillow, synchronous, run in worker threads. Every size here is bounded before
anything is allocated: the picture's header is checked before decoding, large JPEGs are decoded
reduced, the picture is scaled down to a working copy at once, the model input is fitted without
a padded canvas bigger than the model's input, and overlays are drawn at a bounded size. A `Stop`
lets the caller abandon the work between steps when the client cancels or the deadline passes.
"""

from __future__ import annotations

import io
import threading
import time
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..core.errors import Cancelled, DeadlineExceeded, InvalidInput, ServingError

FORMATS = ("PNG", "JPEG")
# The picture's size as its header states it, in pixels: a JPEG this big is still decoded reduced
# (below), so this bounds the compressed data a decoder walks through.
MAX_IMAGE_PIXELS = 8192 * 8192
# Pixels actually decoded into memory (a PNG at full size, a JPEG after its reduced decode). At
# its peak a decode holds about 6 bytes a pixel (an RGBA picture, its grey and its alpha): 150 MB.
MAX_DECODED_PIXELS = 25_000_000
# Longer side of the grey working copy the overlays are drawn on (and the model input is fitted
# from, unless the model's input is larger): a bigger picture is scaled down once, after decoding.
MAX_OVERLAY_SIDE = 512
OVERLAY_ALPHA = 0.45

# Pillow warns at open about pictures between its own limit and twice it; ours is lower and
# refuses them with a clear message, so the warning would only let clients write to the log.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class Stop:
    """When work in a worker thread should give up: a deadline, or a flag the event loop sets."""

    def __init__(self, timeout_s: float | None = None) -> None:
        self.deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    def remaining(self) -> float | None:
        """Seconds left before the deadline (None: no deadline)."""
        return None if self.deadline is None else self.deadline - time.monotonic()

    def check(self, step: str) -> None:
        """Raise if the work should stop; called between steps."""
        if self._cancelled.is_set():
            raise Cancelled(f"{step}: the request was cancelled")
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise DeadlineExceeded(f"{step}: the deadline passed")


NEVER = Stop()


@dataclass(frozen=True)
class DecodedImage:
    """Model pixels (float32 [H, W] in [0, 1]) and the picture as sent, in grey, for the overlay."""

    pixels: np.ndarray
    original: np.ndarray  # uint8 [height, width], after the polarity decision, at most work side


def decode_image(
    data: bytes, size: tuple[int, int], polarity: str = "auto", stop: Stop = NEVER
) -> DecodedImage:
    """PNG or JPEG bytes of any size -> grey pixels of `size` (H, W), light strokes on black."""
    if not data:
        raise InvalidInput("image: empty; send PNG or JPEG bytes")
    work_side = max(MAX_OVERLAY_SIDE, *size)
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as img:
            _check_header(img)
            if img.format == "JPEG":
                # Decode at 1/2, 1/4 or 1/8 scale when the working copy needs no more.
                img.draft("L", _scaled(img.size, work_side))
            if img.width * img.height > MAX_DECODED_PIXELS:
                raise InvalidInput(
                    f"image: {img.width}x{img.height} is over the "
                    f"{MAX_DECODED_PIXELS:,}-pixel limit for {img.format} pictures"
                )
            stop.check("image")
            img.load()
            stop.check("image")
            grey = _to_grey(img)
    except ServingError:
        raise
    except Image.DecompressionBombError:  # Pillow's own check at open, far over ours
        raise InvalidInput(f"image: over the {MAX_IMAGE_PIXELS:,}-pixel limit") from None
    except (
        UnidentifiedImageError,
        OSError,
        ValueError,
        SyntaxError,
        EOFError,
    ) as exc:
        raise InvalidInput(
            f"image: not a decodable PNG or JPEG ({exc.__class__.__name__})"
        ) from None
    stop.check("image")
    light = polarity == "invert" or (polarity == "auto" and _light_background(grey))
    working = grey.size
    if max(working) > work_side:
        working = _scaled(grey.size, work_side)
        grey = grey.resize(working, Image.Resampling.LANCZOS, reducing_gap=3.0)
    original = np.asarray(grey, dtype=np.uint8)
    if light:
        original = 255 - original
    stop.check("image")
    return DecodedImage(_fit(original, size), original)


def _check_header(img: Image.Image) -> None:
    width, height = img.size
    if width < 1 or height < 1:
        raise InvalidInput(f"image: {width}x{height} has no pixels")
    if width * height > MAX_IMAGE_PIXELS:
        raise InvalidInput(f"image: {width}x{height} is over the {MAX_IMAGE_PIXELS:,}-pixel limit")


def _scaled(size: tuple[int, int], side: int) -> tuple[int, int]:
    """(width, height) scaled so the longer side is at most `side`, each at least 1."""
    width, height = size
    factor = max(width, height) / side
    if factor <= 1:
        return size
    return max(1, round(width / factor)), max(1, round(height / factor))


def _to_grey(img: Image.Image) -> Image.Image:
    """The decoded picture in grey; closes `img` as soon as it can, to free its pixels."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Transparent areas become white paper, as a viewer would show them. Blending in grey
        # (a byte a pixel) equals compositing in colour and then converting.
        source = img if img.mode in ("RGBA", "LA") else img.convert("LA")
        grey, alpha = source.convert("L"), source.getchannel("A")
        del source
        img.close()
        return Image.composite(grey, Image.new("L", grey.size, 255), alpha)
    grey = img.convert("L")
    img.close()
    return grey


def _light_background(grey: Image.Image) -> bool:
    pixels = np.asarray(grey)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    return float(border.mean()) > 127.5


def _fit(grey: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Scale to fit `size` (H, W) with antialiasing, then pad with black (centred).

    Scaling first keeps the canvas at the model's input size, whatever the picture's shape.
    """
    height, width = grey.shape
    target_h, target_w = size
    scale = max(height / target_h, width / target_w)
    fitted_w = min(target_w, max(1, round(width / scale)))
    fitted_h = min(target_h, max(1, round(height / scale)))
    img = Image.fromarray(grey)
    if img.size != (fitted_w, fitted_h):
        img = img.resize((fitted_w, fitted_h), Image.Resampling.LANCZOS)
    canvas = np.zeros((target_h, target_w), dtype=np.float32)
    top, left = (target_h - fitted_h) // 2, (target_w - fitted_w) // 2
    canvas[top : top + fitted_h, left : left + fitted_w] = np.asarray(img, dtype=np.float32)
    return canvas / 255.0


def colormap(values: np.ndarray) -> np.ndarray:
    """The classic 'jet' colour map: [0, 1] floats -> uint8 RGB (blue cold, red hot)."""
    v = _unit(values)[..., np.newaxis]
    centres = np.array([0.75, 0.5, 0.25])  # red, green, blue
    rgb = np.clip(1.5 - np.abs(4.0 * (v - centres)), 0.0, 1.0)
    return (rgb * 255.0 + 0.5).astype(np.uint8)


def _unit(values: np.ndarray) -> np.ndarray:
    """Values clipped to [0, 1], NaN as 0: a model fed odd pixels may answer with NaN."""
    return np.clip(np.nan_to_num(values, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)


def _resize_float(values: np.ndarray, width: int, height: int) -> np.ndarray:
    img = Image.fromarray(values.astype(np.float32), mode="F")
    return np.asarray(img.resize((width, height), Image.Resampling.BILINEAR))


def _png(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def as_frames(values: np.ndarray) -> np.ndarray:
    """[H, W] stays; [T, H, W] (a clip) becomes its frames side by side, 2 px apart."""
    if values.ndim == 2:
        return values
    frames = [np.pad(f, ((0, 0), (0, 2))) for f in values[:-1]] + [values[-1]]
    return np.concatenate(frames, axis=1)


def overlay_png(original: np.ndarray, heatmap: np.ndarray) -> bytes:
    """The heatmap, resized to the picture, blended over it: a PNG of the picture's size, scaled
    down so its longer side is at most MAX_OVERLAY_SIDE."""
    height, width = original.shape
    if max(height, width) > MAX_OVERLAY_SIDE:
        width, height = _scaled((width, height), MAX_OVERLAY_SIDE)
        base_img = Image.fromarray(original).resize((width, height), Image.Resampling.LANCZOS)
        original = np.asarray(base_img, dtype=np.uint8)
    heat = _resize_float(_unit(as_frames(heatmap)), width, height)
    base = np.repeat(original[..., np.newaxis].astype(np.float32), 3, axis=2)
    # Cold regions keep the picture; hot ones take the colour.
    alpha = OVERLAY_ALPHA + (1.0 - OVERLAY_ALPHA) * 0.5 * heat[..., np.newaxis]
    blended = (1.0 - alpha) * base + alpha * colormap(heat).astype(np.float32)
    return _png(np.clip(blended + 0.5, 0, 255).astype(np.uint8))


def feature_grid_png(activations: np.ndarray, tile: int = 56) -> bytes:
    """Feature maps [C, h, w] (or [C, T, h, w]) as a grid of tiles, each min-max scaled."""
    maps = np.stack([as_frames(a) for a in activations]).astype(np.float32)
    maps = np.nan_to_num(maps, nan=0.0, posinf=0.0, neginf=0.0)
    lo = maps.min(axis=(1, 2), keepdims=True)
    span = maps.max(axis=(1, 2), keepdims=True) - lo
    maps = (maps - lo) / np.where(span > 0, span, 1.0)
    count, h, w = maps.shape
    scale = max(1, tile // max(h, 1))
    cols = int(np.ceil(np.sqrt(count * h / w)))
    rows = int(np.ceil(count / cols))
    gap = 2
    th, tw = h * scale, w * scale
    grid = np.full((rows * (th + gap) + gap, cols * (tw + gap) + gap, 3), 255, dtype=np.uint8)
    for index in range(count):
        r, c = divmod(index, cols)
        y, x = gap + r * (th + gap), gap + c * (tw + gap)
        big = np.kron(maps[index], np.ones((scale, scale), dtype=np.float32))
        grid[y : y + th, x : x + tw] = colormap(big)
    return _png(grid)


def pixels_png(pixels: np.ndarray) -> np.ndarray:
    """Model pixels in [0, 1] -> the uint8 grey picture used as the overlay's base."""
    return (np.clip(as_frames(pixels), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
