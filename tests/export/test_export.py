"""Export: one-file ONNX with dynamic batch, parity with PyTorch (mnist_cnn and the zoo), Triton
config round-trip, versions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from google.protobuf import text_format

from export import pipeline
from export.errors import ExportVerificationError
from export.onnx_export import export_classifier, verify_classifier
from export.pipeline import export_checkpoint, real_test_inputs
from modelrepo import (
    ALL_METHODS,
    CLASSIFIER,
    CONFIG_FILE,
    INPUT,
    LABELS_FILE,
    LOGITS,
    METHODS,
    MODEL_FILE,
    NUM_CLASSES,
    PROBABILITIES,
    TARGET_CLASS,
    TARGET_LAYER,
    explainer_name,
    read_config,
    read_labels,
)
from pb import model_config_pb2 as mc
from tests.support.zoo import build, inputs
from training.checkpoint import load_checkpoint
from training.models import MODELS


def test_classifier_is_one_file_with_dynamic_batch_and_named_io(mnist_repository: Path) -> None:
    version_dir = mnist_repository / "mnist_cnn" / "1"
    assert sorted(p.name for p in version_dir.iterdir()) == [MODEL_FILE]
    model = onnx.load(str(version_dir / MODEL_FILE))
    onnx.checker.check_model(model, full_check=True)
    (inp,) = model.graph.input
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert inp.name == INPUT and isinstance(dims[0], str) and dims[1:] == [1, 28, 28]
    assert [o.name for o in model.graph.output] == [LOGITS, PROBABILITIES]


def test_onnx_runtime_matches_pytorch_on_real_images(
    mnist_repository: Path, mnist_checkpoint: Path
) -> None:
    ckpt = load_checkpoint(mnist_checkpoint)
    pixels, labels = real_test_inputs(ckpt, 64)
    onnx_path = mnist_repository / "mnist_cnn" / "1" / MODEL_FILE
    assert verify_classifier(onnx_path, ckpt.model, pixels, ckpt.mean, ckpt.std) < 1e-4
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    for batch in (1, 7, 64):
        probs = session.run([PROBABILITIES], {INPUT: pixels[:batch]})[0]
        assert probs.shape == (batch, 10)
    assert float((probs.argmax(1) == labels).mean()) > 0.9  # a trained model, not noise


def test_verification_fails_and_says_by_how_much(
    mnist_repository: Path, mnist_checkpoint: Path
) -> None:
    ckpt = load_checkpoint(mnist_checkpoint)
    with torch.no_grad():
        ckpt.model.fc2.bias += 0.01  # a model that is no longer the exported one
    pixels, _ = real_test_inputs(ckpt, 64)
    onnx_path = mnist_repository / "mnist_cnn" / "1" / MODEL_FILE
    with pytest.raises(ExportVerificationError, match=r"differ from PyTorch by 0\.01.* at batch 1"):
        verify_classifier(onnx_path, ckpt.model, pixels, ckpt.mean, ckpt.std)


def test_config_pbtxt_is_tritons_model_config_and_round_trips(mnist_repository: Path) -> None:
    text = (mnist_repository / "mnist_cnn" / CONFIG_FILE).read_text()
    config = text_format.Parse(text, mc.ModelConfig())
    assert text_format.Parse(text_format.MessageToString(config), mc.ModelConfig()) == config
    assert config.name == "mnist_cnn" and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 128
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [
        (INPUT, mc.TYPE_FP32, [1, 28, 28])
    ]
    outputs = {o.name: o for o in config.output}
    assert list(outputs[LOGITS].dims) == [10] == list(outputs[PROBABILITIES].dims)
    assert outputs[PROBABILITIES].label_filename == LABELS_FILE
    assert config.dynamic_batching.max_queue_delay_microseconds > 0
    assert read_labels(mnist_repository / "mnist_cnn") == [str(d) for d in range(10)]


def test_explainer_config_names_its_classifier_layer_and_classes(mnist_repository: Path) -> None:
    config = read_config(mnist_repository / explainer_name("mnist_cnn"))
    assert config.name == explainer_name("mnist_cnn")
    parameters = {key: value.string_value for key, value in config.parameters.items()}
    assert parameters == {
        NUM_CLASSES: "10",
        TARGET_LAYER: "act2",
        CLASSIFIER: "mnist_cnn",
        METHODS: ",".join(ALL_METHODS),
    }
    assert [i.name for i in config.input] == [INPUT, TARGET_CLASS]
    assert read_labels(mnist_repository / explainer_name("mnist_cnn")) == [
        str(d) for d in range(10)
    ]


def test_exporting_again_adds_a_version_beside_the_first(
    tmp_path: Path, mnist_checkpoint: Path
) -> None:
    for _ in range(2):
        export_checkpoint(mnist_checkpoint, tmp_path, gradcam=False)
    assert sorted(p.name for p in (tmp_path / "mnist_cnn").iterdir()) == [
        "1", "2", CONFIG_FILE, LABELS_FILE
    ]  # fmt: skip
    one, two = (
        np.frombuffer((tmp_path / "mnist_cnn" / v / MODEL_FILE).read_bytes(), np.uint8)
        for v in "12"
    )
    assert one.size == two.size
    assert read_config(tmp_path / "mnist_cnn").version_policy.latest.num_versions == 1


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_zoo_classifier_exports_with_parity_at_any_batch(name: str, tmp_path: Path) -> None:
    spec = MODELS[name]
    model = build(spec)
    path = tmp_path / MODEL_FILE
    # mean 0, std 1: the graph sees the same inputs as the model.
    export_classifier(model, spec.input_shape, 0.0, 1.0, path)
    for batch in (1, 5):
        pixels = inputs(spec, batch).numpy()
        assert verify_classifier(path, model, pixels, 0.0, 1.0, batch_sizes=(batch,)) <= 1e-4


def test_nothing_is_written_when_a_graph_fails_verification(
    tmp_path: Path, mnist_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing(*_args: object) -> None:
        raise ExportVerificationError("the explainer differs")

    monkeypatch.setattr(pipeline, "build_explainer", failing)
    with pytest.raises(ExportVerificationError, match="the explainer differs"):
        export_checkpoint(mnist_checkpoint, tmp_path / "repository")
    assert not (tmp_path / "repository").exists()
