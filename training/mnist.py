"""MNIST from the vendored IDX files, read with numpy (no torchvision): files, checks, splits."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np

DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "mnist"

# SHA-256 of the vendored files (data/mnist/README.md lists the same sums).
CHECKSUMS = {
    "train-images-idx3-ubyte.gz": "0a2d6bb76c55eb065c5fa71f2c8072e9087e3fb14529493645b8fce2b95013c4",
    "train-labels-idx1-ubyte.gz": "5cf0211665caba9171c4699f58f4155e86b9befd261c1916394c80d9334abe3e",
    "t10k-images-idx3-ubyte.gz": "2694b9711380c0d6e12c7770707691ed8c4efb5ceec8d40326cfeb704ea84adb",
    "t10k-labels-idx1-ubyte.gz": "f17521f10e395e6fb92fab59a6f3aee9e2e2e5009f456196a5e7f5257ec71986",
}
SPLITS = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
LABELS = [str(digit) for digit in range(10)]
MEAN, STD = 0.1307, 0.3081


class DatasetError(RuntimeError):
    """A data file is missing, corrupt or not in IDX format."""


def read_idx(path: Path, expected_sha256: str | None = None) -> np.ndarray:
    """Read one gzipped IDX file, checking its SHA-256 first when one is given."""
    fix = (
        f"restore it with `git checkout -- {path.name}` in {path.parent}, "
        "or copy it again from the MNIST distribution"
    )
    if not path.is_file():
        raise DatasetError(f"MNIST file missing: {path}; {fix}")
    blob = path.read_bytes()
    if expected_sha256 is not None:
        digest = hashlib.sha256(blob).hexdigest()
        if digest != expected_sha256:
            raise DatasetError(
                f"MNIST file corrupt: {path} has SHA-256 {digest}, expected {expected_sha256}; {fix}"
            )
    try:
        raw = gzip.decompress(blob)
    except (OSError, EOFError) as exc:
        raise DatasetError(f"MNIST file unreadable: {path} ({exc}); {fix}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DatasetError(f"MNIST file is not an unsigned-byte IDX file: {path}; {fix}")
    ndim = raw[3]
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    data = np.frombuffer(bytearray(raw), dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise DatasetError(f"MNIST file truncated: {path} holds {data.size} bytes for {shape}")
    return data.reshape(shape)


def load_mnist(
    split: str = "train", data_dir: Path | str = DATA_DIR
) -> tuple[np.ndarray, np.ndarray]:
    """Return (images uint8 [N, 28, 28], labels int64 [N]) for `train` or `test`."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, not {split!r}")
    images_name, labels_name = SPLITS[split]
    root = Path(data_dir)
    images = read_idx(root / images_name, CHECKSUMS[images_name])
    labels = read_idx(root / labels_name, CHECKSUMS[labels_name]).astype(np.int64)
    if images.shape[0] != labels.shape[0]:
        raise DatasetError(f"{images_name} and {labels_name} disagree on the number of examples")
    return images, labels
