"""The explanation methods' arithmetic as small weight-free ONNX graphs, one file per method.

Each follows pytorch-grad-cam 1.5.7 (`get_cam_weights` / `get_cam_image` of its class) or Captum
0.9 (Saliency, IntegratedGradients) step for step, written with plain ONNX operators so ONNX
Runtime (or Triton, or anything that runs ONNX) computes the map from the explainer's outputs.
ONNX has no SVD: EigenCAM and EigenGradCAM take the first principal direction by repeated
squaring of the (smaller) Gram matrix, then power steps, and fix its sign as described at
`_first_component`. Shapes are fixed per model (channels, layer and input sizes); the batch is
symbolic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from modelrepo import (
    ABLATE_FILE,
    ABLATED_INPUT,
    ABLATED_LOGITS,
    ACTIVATIONS,
    CAM,
    CAM_RAW,
    EXPLAINED_CLASS,
    GRADIENTS,
    HEAD_INPUT,
    IG_STEPS,
    INPUT,
    INPUT_GRADIENT,
    LOGITS,
    MASKED,
    MASKED_LOGITS,
    MASKS_FILE,
    MAX_IG_STEPS,
    PROJECTION,
    SCALED,
    SCALED_FILE,
)

OPSET = 20
# The min-max normaliser of the explainer's `cam` (export.gradcam.reference.cam_from_raw).
NORM_EPS = 1e-6
FLAT_RELATIVE = 1e-4
# pytorch-grad-cam's AblationLayer: a channel is set to 0 where the image's activations have
# minimum 0, else to (that minimum - k * 1e7), k the channel's 1-based place in its batch of
# AblationCAM's default batch_size (32): the value is re-read from the batch it already lowered.
ABLATION_VALUE = 1e7
ABLATION_BATCH = 32
# Repeated squarings of the Gram matrix (power 2**k), then plain power steps, for EigenCAM.
EIGEN_SQUARINGS = 12
EIGEN_POWER_STEPS = 4


@dataclass(frozen=True)
class Shapes:
    """What the method graphs are built for: channels and sizes of one model's explainer."""

    channels: int  # at the target layer
    layer: tuple[int, ...]  # the target layer's spatial size
    input: tuple[int, ...]  # the model's input shape without the batch (channels first)
    classes: int


class _Graph:
    """A tiny builder: each `op` adds one node and returns its output's name."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._count = 0

    def _name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def input(self, name: str, elem: int, dims: Sequence[Any]) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem, list(dims)))
        return name

    def output(self, value: str, name: str, elem: int, dims: Sequence[Any]) -> None:
        self.nodes.append(helper.make_node("Identity", [value], [name]))
        self.outputs.append(helper.make_tensor_value_info(name, elem, list(dims)))

    def const(self, value: object, hint: str = "c") -> str:
        array = np.asarray(value)
        if array.dtype == np.float64:
            array = array.astype(np.float32)
        name = self._name(hint)
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def ints(self, values: Sequence[int]) -> str:
        return self.const(np.asarray(values, dtype=np.int64), "i")

    def op(self, op_type: str, *inputs: str, **attrs: Any) -> str:
        out = self._name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def model(self, name: str) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, name, self.inputs, self.outputs, initializer=self.initializers
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        model.ir_version = 10
        onnx.checker.check_model(model, full_check=True)
        return model


def _spatial_axes(shapes: Shapes) -> list[int]:
    return list(range(2, 2 + len(shapes.layer)))


def _sum(g: _Graph, x: str, axes: Sequence[int], keepdims: int) -> str:
    return g.op("ReduceSum", x, g.ints(axes), keepdims=keepdims)


def _weighted_map(g: _Graph, weights: str, activations: str) -> str:
    """ReLU(sum over channels of weights [N, C, 1..] x activations): pytorch-grad-cam's base."""
    return g.op("Relu", _sum(g, g.op("Mul", weights, activations), [1], 0))


def _normalised(g: _Graph, cam_raw: str, shapes: Shapes, upsample: bool) -> str:
    """Upsample to the input's spatial size (as F.interpolate, align_corners=False), min-max."""
    spatial = list(shapes.input[1:])
    cam = cam_raw
    if upsample and list(shapes.layer) != spatial:
        with_channel = g.op("Unsqueeze", cam_raw, g.ints([1]))
        sizes = g.op("Concat", g.op("Shape", with_channel, start=0, end=2), g.ints(spatial), axis=0)
        resized = g.op(
            "Resize",
            with_channel,
            "",
            "",
            sizes,
            mode="linear",
            coordinate_transformation_mode="half_pixel",
        )
        cam = g.op("Squeeze", resized, g.ints([1]))
    flat = g.op("Flatten", cam, axis=1)
    low = g.op("ReduceMin", flat, g.ints([1]), keepdims=1)
    high = g.op("ReduceMax", flat, g.ints([1]), keepdims=1)
    spread = g.op("Sub", high, low)
    scaled = g.op("Div", g.op("Sub", flat, low), g.op("Max", spread, g.const(NORM_EPS)))
    flat_enough = g.op("Greater", spread, g.op("Mul", g.op("Abs", high), g.const(FLAT_RELATIVE)))
    normalised = g.op("Where", flat_enough, scaled, g.const(np.float32(0.0)))
    return g.op("Reshape", normalised, g.op("Shape", cam))


def _finish(
    g: _Graph, cam_raw: str, raw_dims: Sequence[int], shapes: Shapes, upsample: bool
) -> None:
    f32 = TensorProto.FLOAT
    g.output(cam_raw, CAM_RAW, f32, ["batch", *raw_dims])
    g.output(_normalised(g, cam_raw, shapes, upsample), CAM, f32, ["batch", *shapes.input[1:]])


def _first_component(g: _Graph, matrix: str, shapes: Shapes) -> str:
    """pytorch-grad-cam's get_2d_projection: centred [N, HW, C] times its first right singular
    vector, [N, *S]. The sign of an SVD's vector is arbitrary; LAPACK's is whatever its
    Householder steps leave. Here the sign makes the projection's entry of largest magnitude
    positive; how often that agrees with LAPACK is measured by the verification, not assumed.
    """
    channels, positions = shapes.channels, int(np.prod(shapes.layer))
    rows = g.op(
        "Transpose", g.op("Reshape", matrix, g.ints([0, channels, positions])), perm=[0, 2, 1]
    )
    centred = g.op("Sub", rows, g.op("ReduceMean", rows, g.ints([1]), keepdims=1))  # [N, HW, C]
    transposed = g.op("Transpose", centred, perm=[0, 2, 1])  # [N, C, HW]
    # The Gram matrix of the smaller side: its leading eigenvector gives the same projection.
    small_is_channels = channels <= positions
    gram = (
        g.op("MatMul", transposed, centred)
        if small_is_channels
        else g.op("MatMul", centred, transposed)
    )
    power = gram
    for _ in range(EIGEN_SQUARINGS):
        scale = g.op("ReduceMax", g.op("Abs", power), g.ints([1, 2]), keepdims=1)
        power = g.op("Div", power, g.op("Max", scale, g.const(np.float32(1e-30))))
        power = g.op("MatMul", power, power)
    # The column of largest norm is the leading eigenvector times one of its larger entries.
    norms = _sum(g, g.op("Mul", power, power), [1], 0)  # [N, D]
    best = g.op("Unsqueeze", g.op("ArgMax", norms, axis=1, keepdims=1), g.ints([1]))  # [N, 1, 1]
    size = channels if small_is_channels else positions
    index = g.op("Expand", best, g.ints([1, size, 1]))
    vector = g.op("GatherElements", power, index, axis=2)  # [N, D, 1]
    for _ in range(EIGEN_POWER_STEPS):
        norm = g.op("Sqrt", _sum(g, g.op("Mul", vector, vector), [1], 1))
        vector = g.op("Div", vector, g.op("Max", norm, g.const(np.float32(1e-30))))
        vector = g.op("MatMul", gram, vector)
    norm = g.op("Sqrt", _sum(g, g.op("Mul", vector, vector), [1], 1))
    unit = g.op("Div", vector, g.op("Max", norm, g.const(np.float32(1e-30))))
    if small_is_channels:
        projection = g.op("MatMul", centred, unit)  # [N, HW, 1]
    else:  # u is the left vector: the projection is Gram u / sigma, sigma = sqrt(u . Gram u)
        gram_u = g.op("MatMul", gram, unit)
        sigma = g.op(
            "Sqrt",
            g.op("Max", _sum(g, g.op("Mul", unit, gram_u), [1], 1), g.const(np.float32(0.0))),
        )
        projection = g.op("Div", gram_u, g.op("Max", sigma, g.const(np.float32(1e-30))))
    flat = g.op("Flatten", projection, axis=1)  # [N, HW]
    peak = g.op("ArgMax", g.op("Abs", flat), axis=1, keepdims=1)
    sign = g.op("Sign", g.op("GatherElements", flat, peak, axis=1))
    sign = g.op(
        "Where", g.op("Equal", sign, g.const(np.float32(0.0))), g.const(np.float32(1.0)), sign
    )
    oriented = g.op("Mul", flat, sign)
    return g.op("Reshape", oriented, g.ints([-1, *shapes.layer]))


def gradient_cam(method: str, shapes: Shapes) -> onnx.ModelProto:
    """A CAM from the target layer's activations and gradients (EigenCAM: activations only)."""
    g = _Graph()
    f32 = TensorProto.FLOAT
    layer = ["batch", shapes.channels, *shapes.layer]
    a = g.input(ACTIVATIONS, f32, layer)
    grad = "" if method == "eigencam" else g.input(GRADIENTS, f32, layer)
    axes = _spatial_axes(shapes)
    if method == "gradcam":
        cam = _weighted_map(g, g.op("ReduceMean", grad, g.ints(axes), keepdims=1), a)
    elif method == "hirescam":
        cam = g.op("Relu", _sum(g, g.op("Mul", grad, a), [1], 0))
    elif method == "gradcam_elementwise":
        cam = g.op("Relu", _sum(g, g.op("Relu", g.op("Mul", grad, a)), [1], 0))
    elif method == "gradcam_plusplus":
        g2 = g.op("Mul", grad, grad)
        g3 = g.op("Mul", g2, grad)
        sum_a = _sum(g, a, axes, 1)
        denominator = g.op(
            "Add",
            g.op("Add", g.op("Mul", g.const(np.float32(2.0)), g2), g.op("Mul", sum_a, g3)),
            g.const(np.float32(1e-6)),
        )
        aij = g.op("Div", g2, denominator)
        nonzero = g.op("Not", g.op("Equal", grad, g.const(np.float32(0.0))))
        aij = g.op("Where", nonzero, aij, g.const(np.float32(0.0)))
        weights = _sum(g, g.op("Mul", g.op("Relu", grad), aij), axes, 1)
        cam = _weighted_map(g, weights, a)
    elif method == "xgradcam":
        sum_a = g.op("Add", _sum(g, a, axes, 1), g.const(np.float32(1e-7)))
        weights = _sum(g, g.op("Div", g.op("Mul", grad, a), sum_a), axes, 1)
        cam = _weighted_map(g, weights, a)
    elif method == "layercam":
        cam = g.op("Relu", _sum(g, g.op("Mul", g.op("Relu", grad), a), [1], 0))
    elif method in ("eigencam", "eigengradcam"):
        projection = _first_component(
            g, a if method == "eigencam" else g.op("Mul", grad, a), shapes
        )
        g.output(projection, PROJECTION, TensorProto.FLOAT, ["batch", *shapes.layer])
        cam = g.op("Relu", projection)
    else:
        raise ValueError(f"not a gradient CAM: {method!r}")
    _finish(g, cam, shapes.layer, shapes, upsample=True)
    return g.model(method)


def _target_scores(g: _Graph, logits: str, explained: str, shapes: Shapes) -> str:
    """[N * C, K] logits of per-channel variants -> [N, C] scores of each image's class."""
    per_image = g.op("Reshape", logits, g.ints([-1, shapes.channels, shapes.classes]))
    index = g.op(
        "Expand",
        g.op("Unsqueeze", explained, g.ints([1, 2])),
        g.op("Concat", g.op("Shape", per_image, start=0, end=2), g.ints([1]), axis=0),
    )
    return g.op("Squeeze", g.op("GatherElements", per_image, index, axis=2), g.ints([2]))


def _unsqueeze_spatial(g: _Graph, weights: str, shapes: Shapes) -> str:
    return g.op("Unsqueeze", weights, g.ints(_spatial_axes(shapes)))


def score_masks(shapes: Shapes) -> onnx.ModelProto:
    """ScoreCAM's masked inputs: each channel upsampled (align_corners=True), min-max scaled."""
    if len(shapes.layer) != 2:
        raise ValueError("ScoreCAM (as pytorch-grad-cam's) is defined for 2-D inputs only")
    g = _Graph()
    f32 = TensorProto.FLOAT
    a = g.input(ACTIVATIONS, f32, ["batch", shapes.channels, *shapes.layer])
    x = g.input(INPUT, f32, ["batch", *shapes.input])
    sizes = g.op("Concat", g.op("Shape", a, start=0, end=2), g.ints(list(shapes.input[1:])), axis=0)
    up = g.op(
        "Resize", a, "", "", sizes, mode="linear", coordinate_transformation_mode="align_corners"
    )
    flat = g.op("Reshape", up, g.ints([0, 0, -1]))
    high = g.op("Unsqueeze", g.op("ReduceMax", flat, g.ints([2]), keepdims=0), g.ints([2, 3]))
    low = g.op("Unsqueeze", g.op("ReduceMin", flat, g.ints([2]), keepdims=0), g.ints([2, 3]))
    scaled = g.op(
        "Div",
        g.op("Sub", up, low),
        g.op("Add", g.op("Sub", high, low), g.const(np.float32(1e-8))),
    )
    masked = g.op("Mul", g.op("Unsqueeze", x, g.ints([1])), g.op("Unsqueeze", scaled, g.ints([2])))
    flat_masked = g.op("Reshape", masked, g.ints([-1, *shapes.input]))
    g.output(flat_masked, MASKED, f32, ["masked", *shapes.input])
    return g.model("score_masks")


def scorecam(shapes: Shapes) -> onnx.ModelProto:
    """ScoreCAM: softmax over channels of the masked inputs' target scores weighs the channels."""
    g = _Graph()
    f32 = TensorProto.FLOAT
    a = g.input(ACTIVATIONS, f32, ["batch", shapes.channels, *shapes.layer])
    logits = g.input(MASKED_LOGITS, f32, ["masked", shapes.classes])
    explained = g.input(EXPLAINED_CLASS, TensorProto.INT64, ["batch"])
    weights = g.op("Softmax", _target_scores(g, logits, explained, shapes), axis=1)
    cam = _weighted_map(g, _unsqueeze_spatial(g, weights, shapes), a)
    _finish(g, cam, shapes.layer, shapes, upsample=True)
    return g.model("scorecam")


def ablate(shapes: Shapes) -> onnx.ModelProto:
    """AblationCAM's N x C head inputs, channel c of copy c ablated as pytorch-grad-cam does."""
    g = _Graph()
    f32 = TensorProto.FLOAT
    c = shapes.channels
    a = g.input(ACTIVATIONS, f32, ["batch", c, *shapes.layer])
    x = g.input(INPUT, f32, ["batch", *shapes.input])
    ones = [1] * len(shapes.layer)
    low = g.op("ReduceMin", g.op("Flatten", a, axis=1), g.ints([1]), keepdims=1)  # [N, 1]
    place = (np.arange(c) % ABLATION_BATCH + 1).astype(np.float32) * np.float32(ABLATION_VALUE)
    lowered = g.op("Sub", low, g.const(place[None, :]))  # [N, C]
    value = g.op(
        "Where", g.op("Equal", low, g.const(np.float32(0.0))), g.const(np.float32(0.0)), lowered
    )
    value = g.op("Reshape", value, g.ints([-1, c, 1, *ones]))
    eye = g.const(np.eye(c, dtype=bool).reshape(1, c, c, *ones))
    ablated = g.op("Where", eye, value, g.op("Unsqueeze", a, g.ints([1])))  # [N, C, C, *S]
    g.output(
        g.op("Reshape", ablated, g.ints([-1, c, *shapes.layer])),
        HEAD_INPUT,
        f32,
        ["ablated", c, *shapes.layer],
    )
    repeated = g.op(
        "Expand", g.op("Unsqueeze", x, g.ints([1])), g.ints([1, c, *[1] * len(shapes.input)])
    )
    g.output(
        g.op("Reshape", repeated, g.ints([-1, *shapes.input])),
        ABLATED_INPUT,
        f32,
        ["ablated", *shapes.input],
    )
    return g.model("ablate")


def ablationcam(shapes: Shapes) -> onnx.ModelProto:
    """AblationCAM: channel weight (score - ablated score) / score."""
    g = _Graph()
    f32 = TensorProto.FLOAT
    a = g.input(ACTIVATIONS, f32, ["batch", shapes.channels, *shapes.layer])
    logits = g.input(LOGITS, f32, ["batch", shapes.classes])
    ablated = g.input(ABLATED_LOGITS, f32, ["ablated", shapes.classes])
    explained = g.input(EXPLAINED_CLASS, TensorProto.INT64, ["batch"])
    original = g.op("GatherElements", logits, g.op("Unsqueeze", explained, g.ints([1])), axis=1)
    scores = _target_scores(g, ablated, explained, shapes)
    weights = g.op("Div", g.op("Sub", original, scores), original)
    cam = _weighted_map(g, _unsqueeze_spatial(g, weights, shapes), a)
    _finish(g, cam, shapes.layer, shapes, upsample=True)
    return g.model("ablationcam")


def _abs_channel_sum(g: _Graph, attribution: str) -> str:
    return _sum(g, g.op("Abs", attribution), [1], 0)


def saliency(shapes: Shapes) -> onnx.ModelProto:
    """Captum's Saliency (abs=True): |d score / d input|."""
    g = _Graph()
    f32 = TensorProto.FLOAT
    grad = g.input(INPUT_GRADIENT, f32, ["batch", *shapes.input])
    attribution = g.op("Abs", grad)
    g.output(attribution, CAM_RAW, f32, ["batch", *shapes.input])
    cam = _normalised(g, _abs_channel_sum(g, attribution), shapes, upsample=False)
    g.output(cam, CAM, f32, ["batch", *shapes.input[1:]])
    return g.model("saliency")


def _gauss_legendre_tables() -> tuple[np.ndarray, np.ndarray]:
    """Captum's gausslegendre alphas and step sizes for 1..MAX_IG_STEPS steps, zero-padded."""
    alphas = np.zeros((MAX_IG_STEPS, MAX_IG_STEPS), dtype=np.float32)
    sizes = np.zeros((MAX_IG_STEPS, MAX_IG_STEPS), dtype=np.float32)
    for n in range(1, MAX_IG_STEPS + 1):
        nodes, weights = np.polynomial.legendre.leggauss(n)
        alphas[n - 1, :n] = 0.5 * (1 + nodes)
        sizes[n - 1, :n] = 0.5 * weights
    return alphas, sizes


def _steps_row(g: _Graph, steps: str, table: np.ndarray) -> str:
    """Row `steps[0] - 1` of a table, its first steps[0] entries: [steps]."""
    count = g.op("Slice", steps, g.ints([0]), g.ints([1]))  # [1]
    row = g.op("Gather", g.const(table, "table"), g.op("Sub", count, g.ints([1])), axis=0)
    return g.op("Slice", g.op("Squeeze", row, g.ints([0])), g.ints([0]), count, g.ints([0]))


def ig_scale(shapes: Shapes) -> onnx.ModelProto:
    """Integrated Gradients' scaled inputs, baseline zero: [N * steps, *input], image-major."""
    g = _Graph()
    f32 = TensorProto.FLOAT
    x = g.input(INPUT, f32, ["batch", *shapes.input])
    steps = g.input(IG_STEPS, TensorProto.INT64, ["batch"])
    alphas, _ = _gauss_legendre_tables()
    alpha = g.op("Reshape", _steps_row(g, steps, alphas), g.ints([1, -1, *[1] * len(shapes.input)]))
    scaled = g.op("Mul", g.op("Unsqueeze", x, g.ints([1])), alpha)
    g.output(
        g.op("Reshape", scaled, g.ints([-1, *shapes.input])), SCALED, f32, ["scaled", *shapes.input]
    )
    return g.model("ig_scale")


def integrated_gradients(shapes: Shapes) -> onnx.ModelProto:
    """Captum's IntegratedGradients (gausslegendre, zero baseline, multiply_by_inputs)."""
    g = _Graph()
    f32 = TensorProto.FLOAT
    x = g.input(INPUT, f32, ["batch", *shapes.input])
    steps = g.input(IG_STEPS, TensorProto.INT64, ["batch"])
    grads = g.input(INPUT_GRADIENT, f32, ["scaled", *shapes.input])
    _, sizes = _gauss_legendre_tables()
    size = g.op("Reshape", _steps_row(g, steps, sizes), g.ints([1, -1, *[1] * len(shapes.input)]))
    per_image = g.op(
        "Reshape",
        grads,
        g.op("Concat", g.op("Shape", x, start=0, end=1), g.ints([-1, *shapes.input]), axis=0),
    )
    total = _sum(g, g.op("Mul", per_image, size), [1], 0)
    attribution = g.op("Mul", total, x)
    g.output(attribution, CAM_RAW, f32, ["batch", *shapes.input])
    cam = _normalised(g, _abs_channel_sum(g, attribution), shapes, upsample=False)
    g.output(cam, CAM, f32, ["batch", *shapes.input[1:]])
    return g.model("integrated_gradients")


def method_graphs(shapes: Shapes) -> dict[str, onnx.ModelProto]:
    """Every method graph (and the helpers ScoreCAM, AblationCAM and IG need) by file name.

    ScoreCAM and AblationCAM only for 2-D inputs: pytorch-grad-cam's classes fail on 3-D ones
    (a bilinear upsampler; a 4-D repeat), so there is no reference to hold them to.
    """
    from modelrepo import ACTIVATION_CAMS, GRADIENT_CAMS

    graphs = {f"{m}.onnx": gradient_cam(m, shapes) for m in GRADIENT_CAMS + ACTIVATION_CAMS}
    if len(shapes.layer) == 2:
        graphs[MASKS_FILE] = score_masks(shapes)
        graphs["scorecam.onnx"] = scorecam(shapes)
        graphs[ABLATE_FILE] = ablate(shapes)
        graphs["ablationcam.onnx"] = ablationcam(shapes)
    graphs["saliency.onnx"] = saliency(shapes)
    graphs[SCALED_FILE] = ig_scale(shapes)
    graphs["integrated_gradients.onnx"] = integrated_gradients(shapes)
    return graphs


def write_method_graphs(shapes: Shapes, folder: Path) -> list[Path]:
    """Write `method_graphs` into `folder`; their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, model in method_graphs(shapes).items():
        path = folder / name
        onnx.save(model, str(path))
        paths.append(path)
    return paths
