"""Small ONNX models and repositories built with onnx.helper, for tests that need no training.

`classifier_graph` mimics mnist_cnn's interface (input FP32 [-1,1,28,28], logits and
probabilities [-1,10]); `explainer_graph` mimics `<model>_gradcam` (input + target_class INT64,
reshape [1] -> [], outputs cam, logits, probabilities, explained_class). Their configs come from
the export step's own config writer (`export.repository.config_from_graph`, torch-free), so they
are what the exporter would write for these graphs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from export.repository import BatchingPolicy, config_from_graph
from modelrepo import (
    CAM,
    EXPLAINED_CLASS,
    INPUT,
    LOGITS,
    MODEL_FILE,
    PROBABILITIES,
    TARGET_CLASS,
    write_config,
    write_labels,
)
from modelrepo import NUM_CLASSES as NUM_CLASSES_PARAMETER
from pb import model_config_pb2 as mc

NUM_CLASSES = 10
OPSET = 17


def classifier_weights(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The linear layer's weights and bias (so tests can compute expected outputs)."""
    rng = np.random.default_rng(seed)
    weight = rng.normal(0, 0.05, size=(784, NUM_CLASSES)).astype(np.float32)
    bias = rng.normal(0, 0.1, size=(NUM_CLASSES,)).astype(np.float32)
    return weight, bias


def reference_logits(images: np.ndarray, seed: int = 0) -> np.ndarray:
    """What the test classifier computes, in numpy."""
    weight, bias = classifier_weights(seed)
    return images.reshape(len(images), -1).astype(np.float32) @ weight + bias


def classifier_graph(seed: int = 0) -> onnx.ModelProto:
    """input [-1,1,28,28] -> flatten -> linear -> logits [-1,10], softmax -> probabilities."""
    weight, bias = classifier_weights(seed)
    nodes = [
        helper.make_node("Flatten", [INPUT], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "W"], ["scores"]),
        helper.make_node("Add", ["scores", "b"], [LOGITS]),
        helper.make_node("Softmax", [LOGITS], [PROBABILITIES], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "classifier",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["batch", 1, 28, 28])],
        [
            helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, ["batch", NUM_CLASSES]),
            helper.make_tensor_value_info(PROBABILITIES, TensorProto.FLOAT, ["batch", NUM_CLASSES]),
        ],
        [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    onnx.checker.check_model(model)
    return model


def explainer_graph(seed: int = 0) -> onnx.ModelProto:
    """A stand-in Grad-CAM graph: the same classifier plus a target-dependent fake map."""
    weight, bias = classifier_weights(seed)
    nodes = [
        helper.make_node("Flatten", [INPUT], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "W"], ["scores"]),
        helper.make_node("Add", ["scores", "b"], [LOGITS]),
        helper.make_node("Softmax", [LOGITS], [PROBABILITIES], axis=1),
        helper.make_node("ArgMax", [LOGITS], ["predicted"], axis=1, keepdims=0),
        helper.make_node("Equal", [TARGET_CLASS, "minus_one"], ["use_predicted"]),
        helper.make_node("Where", ["use_predicted", "predicted", TARGET_CLASS], [EXPLAINED_CLASS]),
        # cam = image * (explained_class + 1) / 10, shaped [-1, 28, 28]
        helper.make_node("Reshape", [INPUT, "cam_shape"], ["image"]),
        helper.make_node("Cast", [EXPLAINED_CLASS], ["class_f"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["class_f", "one"], ["class_p1"]),
        helper.make_node("Div", ["class_p1", "ten"], ["scale"]),
        helper.make_node("Unsqueeze", ["scale", "axes12"], ["scale3"]),
        helper.make_node("Mul", ["image", "scale3"], [CAM]),
    ]
    inits = [
        numpy_helper.from_array(weight, "W"),
        numpy_helper.from_array(bias, "b"),
        numpy_helper.from_array(np.array(-1, dtype=np.int64), "minus_one"),
        numpy_helper.from_array(np.array([-1, 28, 28], dtype=np.int64), "cam_shape"),
        numpy_helper.from_array(np.array(1.0, dtype=np.float32), "one"),
        numpy_helper.from_array(np.array(10.0, dtype=np.float32), "ten"),
        numpy_helper.from_array(np.array([1, 2], dtype=np.int64), "axes12"),
    ]
    graph = helper.make_graph(
        nodes,
        "explainer",
        [
            helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["batch", 1, 28, 28]),
            helper.make_tensor_value_info(TARGET_CLASS, TensorProto.INT64, ["batch"]),
        ],
        [
            helper.make_tensor_value_info(CAM, TensorProto.FLOAT, ["batch", 28, 28]),
            helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, ["batch", NUM_CLASSES]),
            helper.make_tensor_value_info(PROBABILITIES, TensorProto.FLOAT, ["batch", NUM_CLASSES]),
            helper.make_tensor_value_info(EXPLAINED_CLASS, TensorProto.INT64, ["batch"]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    onnx.checker.check_model(model)
    return model


def classifier_config(
    name: str,
    max_batch_size: int = 32,
    *,
    max_queue_size: int = 0,
    max_queue_delay_us: int = 0,
    preferred: Sequence[int] = (),
    instances: int = 1,
    versions: mc.ModelVersionPolicy | None = None,
) -> mc.ModelConfig:
    """The config the export step writes for `classifier_graph`, with these batching settings."""
    policy = BatchingPolicy(
        max_batch_size=max_batch_size,
        max_queue_delay_microseconds=max_queue_delay_us,
        preferred_batch_size=list(preferred),
        max_queue_size=max_queue_size,
        instance_count=instances,
    )
    config = config_from_graph(name, classifier_graph().graph, policy)
    # The exporter asks for KIND_AUTO; these test classifiers stay on the CPU wherever they run.
    config.instance_group[0].kind = mc.ModelInstanceGroup.KIND_CPU
    if versions is not None:
        config.version_policy.CopyFrom(versions)
    return config


def explainer_config(name: str, max_batch_size: int = 32) -> mc.ModelConfig:
    """The config the export step writes for `explainer_graph` (as `<model>_gradcam`)."""
    policy = BatchingPolicy(
        max_batch_size=max_batch_size, max_queue_delay_microseconds=0, max_queue_size=0
    )
    parameters = {NUM_CLASSES_PARAMETER: str(NUM_CLASSES)}
    return config_from_graph(name, explainer_graph().graph, policy, parameters=parameters)


def write_model(
    repository: Path,
    config: mc.ModelConfig,
    graph: onnx.ModelProto | bytes | None,
    versions: Sequence[int] = (1,),
    labels: Sequence[str] | None = None,
) -> Path:
    """Write <repository>/<name>/config.pbtxt, labels.txt and <version>/model.onnx files."""
    directory = repository / config.name
    directory.mkdir(parents=True, exist_ok=True)
    write_config(directory, config)
    write_labels(
        directory,
        list(labels) if labels is not None else [f"digit_{i}" for i in range(NUM_CLASSES)],
    )
    for version in versions:
        (directory / str(version)).mkdir(exist_ok=True)
        if graph is not None:
            data = graph if isinstance(graph, bytes) else graph.SerializeToString()
            (directory / str(version) / MODEL_FILE).write_bytes(data)
    return directory


def write_test_repository(repository: Path, *, broken: bool = True) -> Path:
    """Models `classifier`, `classifier_gradcam`, `fragile` (fails at batch > 1), `broken`."""
    write_model(repository, classifier_config("classifier"), classifier_graph())
    write_model(repository, classifier_config("fragile", max_batch_size=4), fragile_graph())
    write_model(repository, explainer_config("classifier_gradcam"), explainer_graph())
    if broken:
        write_model(repository, classifier_config("broken"), b"this is not an onnx file")
    return repository


def images(count: int, seed: int = 1) -> np.ndarray:
    """Random images in [0, 1], shaped [count, 1, 28, 28] FP32."""
    return np.random.default_rng(seed).random((count, 1, 28, 28), dtype=np.float32)


def fragile_graph(seed: int = 0) -> onnx.ModelProto:
    """Like the classifier, but fails inside ONNX Runtime for any batch larger than 1."""
    model = classifier_graph(seed)
    graph = model.graph
    flatten = graph.node[0]
    graph.node.remove(flatten)
    graph.node.insert(0, helper.make_node("Reshape", [INPUT, "one_row"], ["flat"]))
    graph.initializer.append(numpy_helper.from_array(np.array([1, 784], np.int64), "one_row"))
    onnx.checker.check_model(model)
    return model


def mismatched_graph(seed: int = 0) -> onnx.ModelProto:
    """The classifier taking flat images ([-1,784]): it does not fit `classifier_config`."""
    model = classifier_graph(seed)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    del dims[1:]
    dims.add().dim_value = 784
    onnx.checker.check_model(model)
    return model


POISON = 2.0  # a pixel at or above this value makes `poisoned_graph` fail for its whole batch


def poisoned_graph(seed: int = 0) -> onnx.ModelProto:
    """Like the classifier, but fails inside ONNX Runtime for a batch holding a pixel >= POISON.

    The flattening Reshape's target is [-1, 784 + poisoned], poisoned being 1 when the batch's
    largest pixel reaches POISON: a batch of n images (n < 785) cannot take that shape, so ONNX
    Runtime fails the whole batch, and only that batch.
    """
    model = classifier_graph(seed)
    graph = model.graph
    graph.node.remove(graph.node[0])
    graph.node.insert(0, helper.make_node("ReduceMax", [INPUT], ["peak"], keepdims=0))
    graph.node.insert(1, helper.make_node("GreaterOrEqual", ["peak", "poison"], ["is_poisoned"]))
    graph.node.insert(2, helper.make_node("Cast", ["is_poisoned"], ["extra"], to=TensorProto.INT64))
    graph.node.insert(3, helper.make_node("Unsqueeze", ["extra", "axis0"], ["extra1"]))
    graph.node.insert(4, helper.make_node("Add", ["row", "extra1"], ["width"]))
    graph.node.insert(5, helper.make_node("Concat", ["minus_one", "width"], ["shape"], axis=0))
    graph.node.insert(6, helper.make_node("Reshape", [INPUT, "shape"], ["flat"]))
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array(POISON, np.float32), "poison"),
            numpy_helper.from_array(np.array([0], np.int64), "axis0"),
            numpy_helper.from_array(np.array([784], np.int64), "row"),
            numpy_helper.from_array(np.array([-1], np.int64), "minus_one"),
        ]
    )
    onnx.checker.check_model(model)
    return model
