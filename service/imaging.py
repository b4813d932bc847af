"""Pictures for the explain API: decode PNG/JPEG into model pixels, draw heatmaps and grids.

Pure numpy + Pillow; everything here is synchronous and small enough for a worker thread.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import InvalidInput

FORMATS = ("PNG", "JPEG")
MAX_PIXELS = 40_000_000  # refuse decompression bombs long before Pillow's own limit
OVERLAY_ALPHA = 0.45


@dataclass(frozen=True)
class DecodedImage:
    """Model pixels (float32 [H, W] in [0, 1]) and the picture as sent, in grey, for the overlay."""

    pixels: np.ndarray
    original: np.ndarray  # uint8 [height, width], after the polarity decision


def decode_image(data: bytes, size: tuple[int, int], polarity: str = "auto") -> DecodedImage:
    """PNG or JPEG bytes of any size -> grey pixels of `size` (H, W), light strokes on black."""
    if not data:
        raise InvalidInput("image: empty; send PNG or JPEG bytes")
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as img:
            if img.width * img.height > MAX_PIXELS:
                raise InvalidInput(
                    f"image: {img.width}x{img.height} is over the {MAX_PIXELS:,}-pixel limit"
                )
            img.load()
            grey = _to_grey(img)
    except InvalidInput:
        raise
    except (
        UnidentifiedImageError,
        OSError,
        ValueError,
        SyntaxError,
        Image.DecompressionBombError,
    ) as exc:
        raise InvalidInput(
            f"image: not a decodable PNG or JPEG ({exc.__class__.__name__})"
        ) from None
    original = np.asarray(grey, dtype=np.uint8)
    if polarity == "invert" or (polarity == "auto" and _light_background(original)):
        original = 255 - original
    return DecodedImage(_fit(original, size), original)


def _to_grey(img: Image.Image) -> Image.Image:
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Transparent areas become white paper, as a viewer would show them.
        rgba = img.convert("RGBA")
        paper = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(paper, rgba)
    return img.convert("L")


def _light_background(grey: np.ndarray) -> bool:
    border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    return float(border.mean()) > 127.5


def _fit(grey: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Pad to the target aspect ratio with black (centred), then resize with antialiasing."""
    height, width = grey.shape
    target_h, target_w = size
    scale = max(height / target_h, width / target_w)
    canvas_h, canvas_w = max(height, round(target_h * scale)), max(width, round(target_w * scale))
    canvas = np.zeros((canvas_h, canvas_w), dtype=np.uint8)
    top, left = (canvas_h - height) // 2, (canvas_w - width) // 2
    canvas[top : top + height, left : left + width] = grey
    img = Image.fromarray(canvas)
    if img.size != (target_w, target_h):
        img = img.resize((target_w, target_h), Image.Resampling.LANCZOS)
    return np.asarray(img, dtype=np.float32) / 255.0


def colormap(values: np.ndarray) -> np.ndarray:
    """The classic 'jet' colour map: [0, 1] floats -> uint8 RGB (blue cold, red hot)."""
    v = np.clip(values, 0.0, 1.0)[..., np.newaxis]
    centres = np.array([0.75, 0.5, 0.25])  # red, green, blue
    rgb = np.clip(1.5 - np.abs(4.0 * (v - centres)), 0.0, 1.0)
    return (rgb * 255.0 + 0.5).astype(np.uint8)


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
    """The heatmap, resized to the original picture, blended over it: a PNG of the same size."""
    height, width = original.shape
    heat = _resize_float(as_frames(heatmap), width, height)
    base = np.repeat(original[..., np.newaxis].astype(np.float32), 3, axis=2)
    # Cold regions keep the picture; hot ones take the colour.
    alpha = OVERLAY_ALPHA + (1.0 - OVERLAY_ALPHA) * 0.5 * heat[..., np.newaxis]
    blended = (1.0 - alpha) * base + alpha * colormap(heat).astype(np.float32)
    return _png(np.clip(blended + 0.5, 0, 255).astype(np.uint8))


def feature_grid_png(activations: np.ndarray, tile: int = 56) -> bytes:
    """Feature maps [C, h, w] (or [C, T, h, w]) as a grid of tiles, each min-max scaled."""
    maps = np.stack([as_frames(a) for a in activations]).astype(np.float32)
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
