"""Moving MNIST clips: a real MNIST digit bouncing inside a small frame, for the 3D CNN.

Each clip is T=8 frames of 32x32. One digit (the full 28x28 MNIST image) starts at a random
position and moves with a random integer velocity, bouncing off the walls; the frame is a 32x32
window on a 40x40 canvas, so a digit at the edge may lose a few of its (nearly always blank)
border rows. The label is the digit: the same ten classes (and label file) as MNIST, so the
serving and explain paths need nothing new, and the spatio-temporal Grad-CAM can be checked by
eye against a known answer (it should follow the digit from frame to frame). Labelling by the
motion instead would be solvable from a blob's centroid without reading the digit at all.

Generation is deterministic (the seed comes from the split name), vectorised numpy and takes
about a second, so nothing is cached. Train clips draw digits from the MNIST training set (with
replacement, `num_clips` of them), test clips use each MNIST test image once, in order.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from training.mnist import DATA_DIR, load_mnist

FRAMES = 8
SIZE = 32  # frame height and width
DIGIT = 28  # MNIST image size
MARGIN = 4  # canvas border cut off by the frame window: canvas is SIZE + 2 * MARGIN
MAX_SPEED = 3  # pixels per frame on each axis
LABELS = [str(digit) for digit in range(10)]
DEFAULT_CLIPS = {"train": 30_000, "test": 10_000}
CHUNK = 2048  # clips rendered at once, to bound the index arrays' memory


def _seed(split: str) -> int:
    return zlib.crc32(f"moving_mnist/{split}".encode())


def _bounce(start: np.ndarray, velocity: np.ndarray, span: int) -> np.ndarray:
    """Positions [N, FRAMES] of a point moving in [0, span] with reflection at both ends."""
    unfolded = start[:, None] + velocity[:, None] * np.arange(FRAMES)[None, :]
    folded = np.mod(unfolded, 2 * span)
    return span - np.abs(span - folded)


def render_clips(digits: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Paste digits [N, 28, 28] at canvas positions ys, xs [N, FRAMES]: uint8 [N, T, H, W]."""
    n = digits.shape[0]
    canvas_size = SIZE + 2 * MARGIN
    clips = np.empty((n, FRAMES, SIZE, SIZE), dtype=np.uint8)
    offsets = np.arange(DIGIT)
    for begin in range(0, n, CHUNK):
        end = min(begin + CHUNK, n)
        count = end - begin
        canvas = np.zeros((count, FRAMES, canvas_size, canvas_size), dtype=np.uint8)
        canvas[
            np.arange(count)[:, None, None, None],
            np.arange(FRAMES)[None, :, None, None],
            ys[begin:end, :, None, None] + offsets[None, None, :, None],
            xs[begin:end, :, None, None] + offsets[None, None, None, :],
        ] = digits[begin:end, None, :, :]
        clips[begin:end] = canvas[:, :, MARGIN : MARGIN + SIZE, MARGIN : MARGIN + SIZE]
    return clips


def load_moving_mnist(
    split: str = "train", num_clips: int | None = None, data_dir: Path | str = DATA_DIR
) -> tuple[np.ndarray, np.ndarray]:
    """(clips uint8 [N, 8, 32, 32], labels int64 [N]) of `train` or `test`, deterministic."""
    images, labels = load_mnist(split, data_dir)
    count = DEFAULT_CLIPS[split] if num_clips is None else num_clips
    rng = np.random.default_rng(_seed(split))
    if split == "test" and count <= len(images):
        picks = np.arange(count)
    else:
        picks = rng.integers(0, len(images), size=count)
    span = SIZE + 2 * MARGIN - DIGIT  # positions 0..span keep the digit on the canvas
    start = rng.integers(0, span + 1, size=(count, 2))
    velocity = rng.integers(-MAX_SPEED, MAX_SPEED + 1, size=(count, 2))
    still = (velocity == 0).all(axis=1)  # every clip moves
    velocity[still, 0] = rng.choice([-MAX_SPEED, MAX_SPEED], size=int(still.sum()))
    ys = _bounce(start[:, 0], velocity[:, 0], span)
    xs = _bounce(start[:, 1], velocity[:, 1], span)
    return render_clips(images[picks], ys, xs), labels[picks]
