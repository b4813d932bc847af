"""The explainer's version folder: its graphs, and their weights stored once (ONNX external data).

The explainer (`model.onnx`), the input-gradient graph, the forward graph (ScoreCAM's masked
inputs), the head (AblationCAM's ablated activations) and the features graph (the explainer's
forward pass alone, for the gradient-free CAMs) all hold the classifier's weights. They
are written to one file, WEIGHTS_FILE, each tensor once (identical tensors are found by their
bytes, whatever the exporter named them), at page-aligned offsets, and every graph points into
it; tensors under INLINE_BYTES stay inside their graph. The method graphs hold no weights.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

import onnx
import onnx.utils
from onnx import helper, numpy_helper
from torch import nn

from modelrepo import (
    ACTIVATIONS,
    FEATURES_FILE,
    FORWARD_FILE,
    HEAD_FILE,
    INPUT,
    LOGITS,
    METHODS_DIR,
    MODEL_FILE,
    SALIENCY_FILE,
    WEIGHTS_FILE,
)

INLINE_BYTES = 4096
ALIGN = 4096  # ONNX Runtime can map page-aligned external tensors instead of copying them


def _raw(tensor: onnx.TensorProto) -> bytes:
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    return numpy_helper.to_array(tensor).tobytes()


def _key(data_type: int, dims: tuple[int, ...], raw: bytes) -> tuple[int, tuple[int, ...], str]:
    return data_type, dims, hashlib.sha256(raw).hexdigest()


def _point_at(
    tensor: onnx.TensorProto, name: str, dims: list[int], offset: int, length: int
) -> None:
    """Make `tensor` an external tensor `name` of `dims` at `offset` in WEIGHTS_FILE."""
    data_type = tensor.data_type
    tensor.Clear()
    tensor.name, tensor.data_type = name, data_type
    tensor.dims.extend(dims)
    for key, value in (
        ("location", WEIGHTS_FILE),
        ("offset", str(offset)),
        ("length", str(length)),
    ):
        tensor.external_data.add(key=key, value=value)
    tensor.data_location = onnx.TensorProto.EXTERNAL


def write_sharing_weights(graphs: dict[str, onnx.ModelProto], folder: Path) -> dict[str, int]:
    """Save each graph as `folder/<name>`, large tensors in one shared WEIGHTS_FILE.

    A matrix one graph stores transposed (the traced explainer folds `W.T` for its MatMul) points
    at the other's bytes through a Transpose node, which ONNX Runtime folds at load. Graphs are
    taken in the order given: the first to hold a tensor sets its layout. Returns the bytes
    written per file.
    """
    folder.mkdir(parents=True, exist_ok=True)
    offsets: dict[tuple[int, tuple[int, ...], str], tuple[int, int]] = {}
    sizes: dict[str, int] = {}
    with (folder / WEIGHTS_FILE).open("wb") as data:
        for name, model in graphs.items():
            transposes: list[onnx.NodeProto] = []
            for tensor in model.graph.initializer:
                raw = _raw(tensor)
                if len(raw) < INLINE_BYTES:
                    continue
                dims = list(tensor.dims)
                key = _key(tensor.data_type, tuple(dims), raw)
                if key not in offsets and len(dims) == 2:
                    array = numpy_helper.to_array(tensor)
                    flipped = _key(tensor.data_type, (dims[1], dims[0]), array.T.tobytes())
                    if flipped in offsets:
                        offset, length = offsets[flipped]
                        stored = f"{tensor.name}__transposed"
                        transposes.append(
                            helper.make_node("Transpose", [stored], [tensor.name], perm=[1, 0])
                        )
                        _point_at(tensor, stored, [dims[1], dims[0]], offset, length)
                        continue
                if key not in offsets:
                    position = data.tell()
                    padding = (-position) % ALIGN
                    data.write(b"\0" * padding)
                    offsets[key] = (position + padding, len(raw))
                    data.write(raw)
                offset, length = offsets[key]
                _point_at(tensor, tensor.name, dims, offset, length)
            if transposes:
                nodes = list(model.graph.node)
                del model.graph.node[:]
                model.graph.node.extend(transposes + nodes)
            path = folder / name
            path.parent.mkdir(parents=True, exist_ok=True)
            onnx.save(model, str(path))
            sizes[name] = path.stat().st_size
        sizes[WEIGHTS_FILE] = data.tell()
    return sizes


def features_graph(explainer: onnx.ModelProto) -> onnx.ModelProto:
    """The explainer cut to its forward pass: input -> activations, logits (no backward nodes)."""
    return onnx.utils.Extractor(explainer).extract_model([INPUT], [ACTIVATIONS, LOGITS])


def load_inline(path: Path) -> onnx.ModelProto:
    """An ONNX file with its external tensors read in (for rewriting it elsewhere)."""
    return onnx.load(str(path), load_external_data=True)


def tensor_bytes(model: onnx.ModelProto) -> int:
    """The bytes of a graph's initializers (inline or external)."""
    total = 0
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            total += int({e.key: e.value for e in tensor.external_data}.get("length", 0))
        else:
            total += len(_raw(tensor))
    return total


def layer_shape(explainer: onnx.ModelProto) -> tuple[int, ...]:
    """The target layer's [C, *spatial] read from the explainer's activations output."""
    from modelrepo import ACTIVATIONS

    for value in explainer.graph.output:
        if value.name == ACTIVATIONS:
            return tuple(d.dim_value for d in value.type.tensor_type.shape.dim[1:])
    raise ValueError("the explainer graph has no activations output")


def export_bundle(
    model: nn.Module,
    target_layer: str,
    input_shape: tuple[int, ...],
    mean: float,
    std: float,
    num_classes: int,
    folder: Path,
) -> dict[str, int]:
    """Export every graph of the explainer's version folder into `folder`; bytes per file."""
    from export.gradcam.methods import Shapes, write_method_graphs
    from export.gradcam.trace import export_gradcam, export_head, export_saliency
    from export.onnx_export import export_classifier

    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        export_gradcam(
            model, target_layer, input_shape, mean, std, num_classes, scratch / MODEL_FILE
        )
        explainer = onnx.load(str(scratch / MODEL_FILE))
        shape = layer_shape(explainer)
        export_saliency(model, input_shape, mean, std, num_classes, scratch / SALIENCY_FILE)
        export_classifier(model, input_shape, mean, std, scratch / FORWARD_FILE)
        export_head(model, target_layer, input_shape, shape, mean, std, scratch / HEAD_FILE)
        # The classifier first: its layout (as PyTorch stores the weights) is the one kept.
        graphs = {FORWARD_FILE: onnx.load(str(scratch / FORWARD_FILE)), MODEL_FILE: explainer}
        for name in (SALIENCY_FILE, HEAD_FILE):
            graphs[name] = onnx.load(str(scratch / name))
        graphs[FEATURES_FILE] = features_graph(explainer)
        sizes = write_sharing_weights(graphs, folder)
    shapes = Shapes(shape[0], tuple(shape[1:]), tuple(input_shape), num_classes)
    for path in write_method_graphs(shapes, folder / METHODS_DIR):
        sizes[f"{METHODS_DIR}/{path.name}"] = path.stat().st_size
    return sizes
