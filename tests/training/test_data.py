"""The MNIST loader: shapes, labels, checksums, clear errors."""

from __future__ import annotations

import gzip
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT
from training.data import load_dataset
from training.mnist import DATA_DIR, DatasetError, load_mnist


def test_train_and_test_splits_have_the_documented_shape_and_labels() -> None:
    images, labels = load_mnist("train")
    assert images.shape == (60000, 28, 28) and images.dtype == np.uint8
    assert labels.dtype == np.int64 and labels.tolist()[:10] == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert abs(float(images.mean()) - 33.318) < 1e-3
    test_images, test_labels = load_mnist("test")
    assert test_images.shape == (10000, 28, 28)
    assert test_labels.tolist()[:10] == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert sorted(np.unique(test_labels).tolist()) == list(range(10))


def _copy_data(tmp_path: Path) -> Path:
    target = tmp_path / "mnist"
    shutil.copytree(DATA_DIR, target)
    for path in target.iterdir():
        path.chmod(0o644)
    return target


def test_corrupted_file_is_rejected_with_its_name(tmp_path: Path) -> None:
    root = _copy_data(tmp_path)
    victim = root / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(victim.read_bytes()))
    raw[100] ^= 0xFF
    victim.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(DatasetError, match=r"t10k-labels-idx1-ubyte\.gz.*corrupt"):
        load_mnist("test", root)


def test_missing_file_names_the_file_and_the_fix(tmp_path: Path) -> None:
    root = _copy_data(tmp_path)
    (root / "train-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DatasetError, match=r"missing: .*train-images-idx3-ubyte.gz; restore it"):
        load_mnist("train", root)


def test_datasets_by_name_and_an_unknown_one_refused() -> None:
    images, labels, classes = load_dataset("mnist", "test")
    assert images.shape == (10000, 28, 28) and labels.shape == (10000,)
    assert classes == [str(d) for d in range(10)]
    with pytest.raises(ValueError, match="unknown dataset 'cifar'; known: mnist, moving_mnist"):
        load_dataset("cifar", "test")


def test_mnist_and_clips_import_one_way() -> None:
    """training.mnist <- training.clips <- training.data: the lower two never import data."""
    code = "import sys, training.clips; assert 'training.data' not in sys.modules, sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_unknown_split_is_refused() -> None:
    with pytest.raises(ValueError, match="split"):
        load_mnist("validation")
