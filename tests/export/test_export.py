"""Export: one-file ONNX with dynamic batch, parity with PyTorch, Triton config round-trip, versions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from google.protobuf import text_format

from export.__main__ import export_checkpoint, real_test_inputs
from export.errors import ExportVerificationError
from export.onnx_export import verify_classifier
from export.repository import read_config
from pb import model_config_pb2 as mc
from training.checkpoint import load_checkpoint


def test_classifier_is_one_file_with_dynamic_batch_and_named_io(mnist_repository: Path) -> None:
    version_dir = mnist_repository / "mnist_cnn" / "1"
    assert sorted(p.name for p in version_dir.iterdir()) == ["model.onnx"]
    model = onnx.load(str(version_dir / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    (inp,) = model.graph.input
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert inp.name == "input" and isinstance(dims[0], str) and dims[1:] == [1, 28, 28]
    assert [o.name for o in model.graph.output] == ["logits", "probabilities"]


def test_onnx_runtime_matches_pytorch_on_real_images(
    mnist_repository: Path, mnist_checkpoint: Path
) -> None:
    ckpt = load_checkpoint(mnist_checkpoint)
    pixels, labels = real_test_inputs(ckpt, 64)
    onnx_path = mnist_repository / "mnist_cnn" / "1" / "model.onnx"
    assert verify_classifier(onnx_path, ckpt.model, pixels, ckpt.mean, ckpt.std) < 1e-4
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    for batch in (1, 7, 64):
        probs = session.run(["probabilities"], {"input": pixels[:batch]})[0]
        assert probs.shape == (batch, 10)
    assert float((probs.argmax(1) == labels).mean()) > 0.9  # a trained model, not noise


def test_verification_fails_and_says_by_how_much(
    mnist_repository: Path, mnist_checkpoint: Path
) -> None:
    ckpt = load_checkpoint(mnist_checkpoint)
    with torch.no_grad():
        ckpt.model.fc2.bias += 0.01  # a model that is no longer the exported one
    pixels, _ = real_test_inputs(ckpt, 64)
    onnx_path = mnist_repository / "mnist_cnn" / "1" / "model.onnx"
    with pytest.raises(ExportVerificationError, match=r"differ from PyTorch by 0\.01.* at batch 1"):
        verify_classifier(onnx_path, ckpt.model, pixels, ckpt.mean, ckpt.std)


def test_config_pbtxt_is_tritons_model_config_and_round_trips(mnist_repository: Path) -> None:
    text = (mnist_repository / "mnist_cnn" / "config.pbtxt").read_text()
    config = text_format.Parse(text, mc.ModelConfig())
    assert text_format.Parse(text_format.MessageToString(config), mc.ModelConfig()) == config
    assert config.name == "mnist_cnn" and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 128
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [
        ("input", mc.TYPE_FP32, [1, 28, 28])
    ]
    outputs = {o.name: o for o in config.output}
    assert list(outputs["logits"].dims) == [10] == list(outputs["probabilities"].dims)
    assert outputs["probabilities"].label_filename == "labels.txt"
    assert config.dynamic_batching.max_queue_delay_microseconds > 0
    labels = (mnist_repository / "mnist_cnn" / "labels.txt").read_text().split()
    assert labels == [str(d) for d in range(10)]


def test_exporting_again_adds_a_version_beside_the_first(
    tmp_path: Path, mnist_checkpoint: Path
) -> None:
    for _ in range(2):
        export_checkpoint(mnist_checkpoint, tmp_path, gradcam=False)
    assert sorted(p.name for p in (tmp_path / "mnist_cnn").iterdir()) == [
        "1", "2", "config.pbtxt", "labels.txt"
    ]  # fmt: skip
    one, two = (
        np.frombuffer((tmp_path / "mnist_cnn" / v / "model.onnx").read_bytes(), np.uint8)
        for v in "12"
    )
    assert one.size == two.size
    assert read_config(tmp_path / "mnist_cnn").version_policy.latest.num_versions == 1
