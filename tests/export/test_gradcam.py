"""Grad-CAM explainer graphs: ONNX Runtime against PyTorch autograd, the hand-written backward
replacements against autograd, and the traced route across every zoo model and probe module.

Exports cost 5-20 s each on two shared cores: mnist_cnn's explainer is exported once per module;
the other models' traced graphs are checked in PyTorch (the same decompositions, no ONNX step),
and their full ONNX round trips are marked `slow`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from export.errors import ExportVerificationError
from export.gradcam import (
    OUTPUT_NAMES,
    TargetLayerError,
    export_gradcam,
    gradcam_graph,
    gradcam_reference,
    run_explainer,
    verify_gradcam,
)
from export.gradcam import decompositions as dec
from modelrepo import (
    ACTIVATIONS,
    CAM,
    CAM_RAW,
    EXPLAINED_CLASS,
    GRADIENTS,
    INPUT,
    LOGITS,
    PROBABILITIES,
    TARGET_CLASS,
)
from tests.support.gradcam_probes import EXPLAINED, BasicBlock, realistic_init
from training.mnist import MEAN, STD, load_mnist
from training.models import MODELS

NUM_CLASSES = 10
TOL = 1e-4


def mixed_targets(labels: np.ndarray) -> np.ndarray:
    """-1 (predicted) for every third image, the true label or another class for the rest."""
    i = np.arange(len(labels))
    other = (labels + 1 + i) % NUM_CLASSES
    return np.where(i % 3 == 0, -1, np.where(i % 3 == 1, labels, other)).astype(np.int64)


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    """Max abs difference over the largest |value| of the reference (per image, worst image)."""
    n = len(want)
    diff = np.abs(got.reshape(n, -1) - want.reshape(n, -1)).max(axis=1)
    scale = np.abs(want.reshape(n, -1)).max(axis=1)
    return float((diff / np.maximum(scale, 1e-12)).max())


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    """96 real MNIST test digits as float32 [N, 1, 28, 28] in [0, 1], and their labels."""
    images, labels = load_mnist("test")
    return (images[:96].astype(np.float32) / 255.0)[:, None], labels[:96].astype(np.int64)


@pytest.fixture(scope="module")
def mnist_model() -> nn.Module:
    """mnist_cnn, untrained but He-initialised (default init gives near-zero maps)."""
    torch.manual_seed(0)
    return realistic_init(MODELS["mnist_cnn"].build())


@pytest.fixture(scope="module")
def mnist_explainer(tmp_path_factory: pytest.TempPathFactory, mnist_model: nn.Module) -> Path:
    path = tmp_path_factory.mktemp("gradcam") / "mnist_cnn_gradcam.onnx"
    export_gradcam(mnist_model, "act2", (1, 28, 28), MEAN, STD, NUM_CLASSES, path)
    return path


def reference(
    model: nn.Module, layer: str, pixels: np.ndarray, targets: np.ndarray
) -> dict[str, np.ndarray]:
    ref = gradcam_reference(
        model, layer, torch.from_numpy(pixels), torch.from_numpy(targets), MEAN, STD
    )
    return {name: value.numpy() for name, value in ref.items()}


# --- mnist_cnn: the ONNX explainer against PyTorch autograd -------------------------------------


@pytest.mark.parametrize("batch", [1, 64])
def test_mnist_explainer_matches_autograd(
    mnist_explainer: Path,
    mnist_model: nn.Module,
    digits: tuple[np.ndarray, np.ndarray],
    batch: int,
) -> None:
    pixels, labels = digits[0][:batch], digits[1][:batch]
    targets = mixed_targets(labels) if batch > 1 else np.array([3], dtype=np.int64)
    diff = verify_gradcam(mnist_explainer, mnist_model, "act2", pixels, targets, MEAN, STD)
    assert diff <= TOL

    got = run_explainer(mnist_explainer, pixels, targets)
    want = reference(mnist_model, "act2", pixels, targets)
    assert list(got) == list(OUTPUT_NAMES)
    np.testing.assert_array_equal(got[EXPLAINED_CLASS], want[EXPLAINED_CLASS])
    assert relative_error(got[CAM_RAW], want[CAM_RAW]) < 1e-4
    for name in (CAM, ACTIVATIONS, LOGITS, PROBABILITIES):
        assert np.abs(got[name] - want[name]).max() <= TOL, name
    assert relative_error(got[GRADIENTS], want[GRADIENTS]) < 1e-4
    # The maps are far from zero and far apart between classes: parity means something.
    assert np.median(want[CAM_RAW].reshape(batch, -1).max(axis=1)) > 100 * max(diff, 1e-6)
    other = reference(mnist_model, "act2", pixels, (want[EXPLAINED_CLASS] + 1) % NUM_CLASSES)
    assert np.abs(other[CAM_RAW] - want[CAM_RAW]).max() > 100 * max(diff, 1e-6)


def test_explainer_outputs_and_graph(mnist_explainer: Path) -> None:
    assert not list(mnist_explainer.parent.glob("*.data")), "weights must stay inside the file"
    proto = onnx.load(str(mnist_explainer))
    onnx.checker.check_model(proto)
    assert {node.domain for node in proto.graph.node} <= {"", "ai.onnx"}
    assert {opset.domain for opset in proto.opset_import} <= {"", "ai.onnx"}
    assert all(onnx.defs.has(node.op_type) for node in proto.graph.node)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)

    def signature(values: Any) -> dict[str, tuple[int, list[int | str]]]:
        return {
            v.name: (
                v.type.tensor_type.elem_type,
                [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim],
            )
            for v in values
        }

    f32, i64 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64
    assert signature(proto.graph.input) == {
        INPUT: (f32, ["batch", 1, 28, 28]),
        TARGET_CLASS: (i64, ["batch"]),
    }
    assert signature(proto.graph.output) == {
        CAM: (f32, ["batch", 28, 28]),
        CAM_RAW: (f32, ["batch", 24, 24]),
        ACTIVATIONS: (f32, ["batch", 64, 24, 24]),
        GRADIENTS: (f32, ["batch", 64, 24, 24]),
        LOGITS: (f32, ["batch", 10]),
        PROBABILITIES: (f32, ["batch", 10]),
        EXPLAINED_CLASS: (i64, ["batch"]),
    }


@pytest.mark.parametrize("batch", [1, 3, 16, 33])
def test_dynamic_batch_and_same_map_alone_or_in_a_batch(
    mnist_explainer: Path, digits: tuple[np.ndarray, np.ndarray], batch: int
) -> None:
    pixels, labels = digits[0][:batch], digits[1][:batch]
    targets = mixed_targets(labels)
    got = run_explainer(mnist_explainer, pixels, targets)
    assert got[CAM].shape == (batch, 28, 28)
    assert got[EXPLAINED_CLASS].shape == (batch,)
    alone = run_explainer(mnist_explainer, pixels[-1:], targets[-1:])
    for name in (CAM, CAM_RAW, LOGITS):
        np.testing.assert_allclose(got[name][-1], alone[name][0], rtol=1e-5, atol=1e-6)


def test_target_minus_one_explains_the_predicted_class(
    mnist_explainer: Path, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    pixels = digits[0][:8]
    predicted = run_explainer(mnist_explainer, pixels, np.full(8, -1, dtype=np.int64))
    argmax = predicted[LOGITS].argmax(axis=1)
    np.testing.assert_array_equal(predicted[EXPLAINED_CLASS], argmax)
    explicit = run_explainer(mnist_explainer, pixels, argmax.astype(np.int64))
    np.testing.assert_array_equal(predicted[CAM_RAW], explicit[CAM_RAW])
    np.testing.assert_allclose(predicted[PROBABILITIES].sum(axis=1), 1.0, atol=1e-5)
    cam = predicted[CAM].reshape(8, -1)
    assert cam.min() >= 0.0 and np.allclose(cam.max(axis=1), 1.0, atol=1e-6)


def test_black_image_gives_a_zero_map_not_nan(
    mnist_explainer: Path, mnist_model: nn.Module
) -> None:
    black = np.zeros((2, 1, 28, 28), dtype=np.float32)
    got = run_explainer(mnist_explainer, black, np.array([-1, 4], dtype=np.int64))
    assert np.isfinite(got[CAM]).all() and np.isfinite(got[CAM_RAW]).all()
    # A constant image gives a spatially constant map (mnist_cnn pads nothing): zero once
    # normalised, and the same in the reference.
    np.testing.assert_array_equal(got[CAM], 0.0)
    want = reference(mnist_model, "act2", black, np.array([-1, 4], dtype=np.int64))
    np.testing.assert_array_equal(want[CAM], 0.0)


def test_verify_reports_by_how_much(
    mnist_explainer: Path, mnist_model: nn.Module, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    pixels, labels = digits[0][:8], digits[1][:8]
    drifted = realistic_init(MODELS["mnist_cnn"].build())
    drifted.load_state_dict(mnist_model.state_dict())
    with torch.no_grad():
        drifted.conv2.weight.mul_(1.01)
    with pytest.raises(ExportVerificationError, match=r"cam_raw by [0-9.e-]+ \(max abs\)"):
        verify_gradcam(mnist_explainer, drifted, "act2", pixels, mixed_targets(labels), MEAN, STD)
    # The relative tolerance is opt-in: a 1% weight drift stays within 50% of the map's scale.
    loose = verify_gradcam(
        mnist_explainer, drifted, "act2", pixels, mixed_targets(labels), MEAN, STD, rtol=0.5
    )
    assert loose > TOL
    # uint8 pixels are scaled to [0, 1].
    raw = np.round(pixels * 255).astype(np.uint8)
    assert verify_gradcam(mnist_explainer, mnist_model, "act2", raw, labels, MEAN, STD) <= TOL


# --- the reference and the target-layer split ----------------------------------------------


def test_reference_matches_autograd_on_an_explicitly_split_model(
    mnist_model: nn.Module, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    pixels, labels = digits[0][:16], digits[1][:16]
    targets = mixed_targets(labels)
    ref = reference(mnist_model, "act2", pixels, targets)

    m: Any = mnist_model
    x = (torch.from_numpy(pixels) - MEAN) / STD
    act = m.act2(m.conv2(m.act1(m.conv1(x)))).detach().requires_grad_()
    logits = m.fc2(m.act3(m.fc1(torch.flatten(m.pool(act), 1))))
    chosen = torch.where(torch.from_numpy(targets) < 0, logits.argmax(1), torch.from_numpy(targets))
    (grad,) = torch.autograd.grad(logits.gather(1, chosen[:, None]).sum(), act)
    cam_raw = torch.relu((grad.mean((2, 3), keepdim=True) * act).sum(1)).detach().numpy()
    np.testing.assert_allclose(ref[CAM_RAW], cam_raw, rtol=1e-5, atol=1e-9)
    np.testing.assert_array_equal(ref[EXPLAINED_CLASS], chosen.numpy())


def test_reference_survives_in_place_ops_after_the_target() -> None:
    """`out += identity` and ReLU(inplace=True) run on the target's output (bn2) in place."""
    torch.manual_seed(0)
    block = realistic_init(nn.Sequential(BasicBlock(4, 4, 1), nn.Flatten(), nn.Linear(4 * 36, 3)))
    pixels = torch.rand(5, 4, 6, 6)
    targets = torch.tensor([-1, 0, 1, 2, -1])
    ref = gradcam_reference(block, "0.bn2", pixels, targets, 0.0, 1.0)

    b: Any = block[0]
    act = b.bn2(b.conv2(b.act1(b.bn1(b.conv1(pixels))))).detach().requires_grad_()
    logits = block[2](torch.relu(act + pixels).flatten(1))
    chosen = torch.where(targets < 0, logits.argmax(1), targets)
    (grad,) = torch.autograd.grad(logits.gather(1, chosen[:, None]).sum(), act)
    cam_raw = torch.relu((grad.mean((2, 3), keepdim=True) * act).sum(1))
    torch.testing.assert_close(ref[CAM_RAW], cam_raw.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ref[ACTIVATIONS], act.detach())


class SharedRelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 2, 3)
        self.conv2 = nn.Conv2d(2, 2, 3)
        self.act = nn.ReLU()
        self.unused = nn.ReLU()
        self.fc = nn.Linear(2 * 24 * 24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.conv2(self.act(self.conv1(x))))
        return self.fc(x.flatten(1))


@pytest.mark.parametrize(
    ("layer", "message"),
    [
        ("act", "'act' is called more than once"),
        ("unused", "'unused' is never called"),
        ("missing", "no module named 'missing'"),
        ("fc", "'fc' must output a feature map"),
    ],
)
def test_target_layer_must_run_exactly_once_with_a_feature_map(layer: str, message: str) -> None:
    with pytest.raises(TargetLayerError, match=message):
        gradcam_reference(
            SharedRelu(), layer, torch.rand(2, 1, 28, 28), torch.tensor([-1, 1]), MEAN, STD
        )
    with pytest.raises(TargetLayerError, match=message):
        gradcam_graph(SharedRelu(), layer, (1, 28, 28), MEAN, STD, NUM_CLASSES)


def test_reference_rejects_out_of_range_targets(mnist_model: nn.Module) -> None:
    for bad in (10, -2):
        with pytest.raises(ValueError, match=r"target_class must be -1 .* \[0, 10\)"):
            gradcam_reference(
                mnist_model, "act2", torch.rand(2, 1, 28, 28), torch.tensor([0, bad]), MEAN, STD
            )


# --- hand-written backward replacements against autograd ----------------------------------


def vjp(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> tuple[Any, Any]:
    """(grad_output, autograd's input gradient) for a random upstream gradient."""
    x = x.detach().requires_grad_()
    y = fn(x)
    grad_output = torch.randn_like(y)
    (grad,) = torch.autograd.grad(y, x, grad_output)
    return grad_output, grad


CONV_CASES = [
    # (dims, in_channels, out_channels, kernel, stride, padding, dilation, groups, size)
    (2, 3, 4, 3, 1, 0, 1, 1, 9),
    (2, 3, 4, 3, 2, 1, 1, 1, 10),  # stride 2 on an even size: output padding needed
    (2, 2, 6, (5, 3), (2, 3), (2, 0), 1, 1, 11),
    (2, 4, 4, 3, 1, 2, 2, 1, 9),  # dilation
    (2, 6, 6, 7, 1, 3, 1, 6, 12),  # depthwise 7x7 (ConvNeXt)
    (2, 4, 8, 3, 2, 1, 1, 2, 9),  # grouped, strided
    (2, 4, 6, 2, 2, 0, 1, 1, 9),  # patchify, odd size drops a row
    (1, 3, 4, 3, 2, 1, 1, 1, 10),
    (3, 2, 3, 3, 1, 1, 1, 1, 6),
    (3, 2, 4, (3, 3, 3), (1, 2, 2), 1, 1, 2, 7),
]


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "-".join(map(str, c)))
def test_conv_input_grad_is_a_transposed_conv(case: tuple[Any, ...]) -> None:
    dims, cin, cout, kernel, stride, padding, dilation, groups, size = case
    torch.manual_seed(0)
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims](
        cin, cout, kernel, stride, padding, dilation, groups
    )
    x = torch.randn(2, cin, *([size] * dims))
    grad_output, want = vjp(conv, x)
    got, weight_grad, bias_grad = dec.convolution_backward(
        grad_output,
        x,
        conv.weight,
        None,
        conv.stride,
        conv.padding,
        conv.dilation,
        False,
        [0] * dims,
        groups,
        [True, False, False],
    )
    assert weight_grad is None and bias_grad is None
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stride,padding,output_padding", [(1, 0, 0), (2, 1, 1), (3, 2, 0)])
def test_transposed_conv_input_grad_is_a_conv(
    stride: int, padding: int, output_padding: int
) -> None:
    torch.manual_seed(0)
    deconv = nn.ConvTranspose2d(3, 4, 3, stride, padding, output_padding)
    x = torch.randn(2, 3, 7, 7)
    grad_output, want = vjp(deconv, x)
    got = dec.conv_input_grad(
        grad_output, x, deconv.weight, (stride,), (padding,), (1,), True, (output_padding,), 1
    )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_convolution_backward_refuses_weight_gradients() -> None:
    x, w = torch.randn(1, 1, 5, 5), torch.randn(1, 1, 3, 3)
    with pytest.raises(NotImplementedError, match="weight or bias gradient"):
        dec.convolution_backward(
            torch.randn(1, 1, 3, 3), x, w, None, [1], [0], [1], False, [0], 1, [True, True, False]
        )


AVG_CASES = [
    # (kernel, stride, padding, ceil_mode, count_include_pad, divisor_override, size)
    (2, None, 0, False, True, None, 8),
    (3, 2, 1, False, True, None, 9),
    (3, 2, 1, True, False, None, 10),  # ceil mode: the last window runs past the padding
    (3, 2, 1, True, True, None, 10),
    (3, 3, 0, True, True, None, 10),
    ((3, 2), (2, 1), (1, 0), False, False, None, 7),
    (3, 1, 1, False, True, 5, 6),
    (5, 2, 2, True, False, None, 11),
]


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("case", AVG_CASES, ids=lambda c: "-".join(map(str, c)))
def test_avg_pool_backward_is_a_pooling_matrix(case: tuple[Any, ...], dims: int) -> None:
    kernel, stride, padding, ceil_mode, count_include_pad, divisor, size = case
    if dims == 3 and isinstance(kernel, tuple):
        kernel, stride, padding = (*kernel, 2), (*stride, 2), (*padding, 1)
    pool = {2: F.avg_pool2d, 3: F.avg_pool3d}[dims]

    def fn(t: torch.Tensor) -> torch.Tensor:
        return pool(t, kernel, stride, padding, ceil_mode, count_include_pad, divisor)

    torch.manual_seed(0)
    x = torch.randn(2, 3, *([size] * dims))
    grad_output, want = vjp(fn, x)
    backward = {2: dec.avg_pool2d_backward, 3: dec.avg_pool3d_backward}[dims]
    listed = list(stride) if isinstance(stride, tuple) else ([] if stride is None else [stride])
    got = backward(
        grad_output,
        x,
        list(kernel) if isinstance(kernel, tuple) else [kernel],
        listed,
        list(padding) if isinstance(padding, tuple) else [padding],
        ceil_mode,
        count_include_pad,
        divisor,
    )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("size", "out"), [((7, 7), (1, 1)), ((7, 7), (3, 2)), ((6, 9), (4, 5)), ((5, 5), (5, 5))]
)
def test_adaptive_avg_pool2d_backward_any_output_size(
    size: tuple[int, int], out: tuple[int, int]
) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, *size)
    grad_output, want = vjp(lambda t: F.adaptive_avg_pool2d(t, out), x)
    torch.testing.assert_close(
        dec.adaptive_avg_pool2d_backward(grad_output, x), want, rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("out", [(1, 1, 1), (1, 2, 2), (3, 2, 4)])
def test_adaptive_avg_pool3d_forward_and_backward(out: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 7, 6)
    torch.testing.assert_close(
        dec.adaptive_avg_pool3d(x, list(out)), F.adaptive_avg_pool3d(x, out), rtol=1e-5, atol=1e-6
    )
    grad_output, want = vjp(lambda t: F.adaptive_avg_pool3d(t, out), x)
    torch.testing.assert_close(
        dec.adaptive_avg_pool3d_backward(grad_output, x), want, rtol=1e-5, atol=1e-6
    )


MAX3D_CASES = [
    # (kernel, stride, padding, dilation, ceil_mode)
    (2, 2, 0, 1, False),
    ((1, 2, 2), (1, 2, 2), 0, 1, False),
    (3, 2, 1, 1, True),  # overlapping windows, ceil mode
    (3, 1, 1, 1, False),
    (2, 2, 0, 2, False),
    (3, (1, 2, 2), (1, 0, 1), 1, True),
]


@pytest.mark.parametrize("case", MAX3D_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("ties", [False, True])
def test_max_pool3d_backward_is_a_scatter_add(case: tuple[Any, ...], ties: bool) -> None:
    kernel, stride, padding, dilation, ceil_mode = case
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 7, 8)
    if ties:  # a flat background, as in MNIST: the gradient must follow the indices
        x = torch.relu(x - 1.0)

    def fn(t: torch.Tensor) -> torch.Tensor:
        return F.max_pool3d(t, kernel, stride, padding, dilation, ceil_mode)

    grad_output, want = vjp(fn, x)
    _, indices = F.max_pool3d(x, kernel, stride, padding, dilation, ceil_mode, return_indices=True)
    got = dec.max_pool3d_with_indices_backward(grad_output, x, [], [], [], [], ceil_mode, indices)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


MAX_WINDOWS = [
    # (dims, kernel, stride, ceil_mode, size): non-overlapping windows, odd sizes drop or
    # (ceil mode) would hang over the edge
    (2, 2, None, False, 24),
    (2, 2, 2, False, 9),
    (2, 3, 3, False, 10),
    (2, 2, None, True, 8),
    (3, 2, None, False, 8),
    (3, (1, 2, 2), (1, 2, 2), False, 7),
    (3, (2, 3, 1), None, False, 9),
]


@pytest.mark.parametrize("case", MAX_WINDOWS, ids=lambda c: "-".join(map(str, c)))
def test_max_pool_with_indices_reshape_matches_pytorch_ties_included(case: tuple[Any, ...]) -> None:
    dims, kernel, stride, ceil_mode, size = case
    torch.manual_seed(0)
    x = torch.relu(torch.randn(2, 3, *([size] * dims)) - 0.7)  # many tied zeros
    pool = {2: F.max_pool2d, 3: F.max_pool3d}[dims]
    want_values, want_indices = pool(x, kernel, stride, 0, 1, ceil_mode, return_indices=True)
    decomposition = {2: dec.max_pool2d_with_indices, 3: dec.max_pool3d_with_indices}[dims]
    listed = list(kernel) if isinstance(kernel, tuple) else [kernel]
    strides = [] if stride is None else (list(stride) if isinstance(stride, tuple) else [stride])
    values, indices = decomposition(x, listed, strides, [0], [1], ceil_mode)
    torch.testing.assert_close(values, want_values, rtol=0, atol=0)
    torch.testing.assert_close(indices, want_indices, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("kernel", "stride", "padding", "ceil_mode", "size"),
    [(3, 2, 0, False, 9), (2, 2, 1, False, 8), (2, 2, 0, True, 9), (3, 1, 1, False, 7)],
)
def test_max_pool_with_indices_leaves_other_windows_to_onnx_maxpool(
    kernel: int, stride: int, padding: int, ceil_mode: bool, size: int
) -> None:
    x = torch.randn(1, 2, size, size)
    result = dec.max_pool2d_with_indices(x, [kernel], [stride], [padding], [1], ceil_mode)
    assert result is NotImplemented


@pytest.mark.parametrize(
    ("backward", "forward"), [(dec.silu_backward, F.silu), (dec.mish_backward, F.mish)]
)
def test_activation_backward(
    backward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    forward: Callable[[torch.Tensor], torch.Tensor],
) -> None:
    x = torch.linspace(-12, 12, 2001).reshape(3, 667)
    grad_output, want = vjp(forward, x)
    torch.testing.assert_close(backward(grad_output, x), want, rtol=1e-5, atol=1e-6)


def test_separable_matrix_equals_the_forward_pool() -> None:
    x = torch.randn(2, 3, 10, 9)
    rows = dec.avg_pool_matrix(10, 3, 2, 1, True, False)
    cols = dec.avg_pool_matrix(9, 3, 2, 1, True, False)
    want = F.avg_pool2d(x, 3, 2, 1, ceil_mode=True, count_include_pad=False)
    torch.testing.assert_close(dec.apply_along_last_dims(x, [rows, cols]), want)


# --- the traced route across architectures ----------------------------------------------


NO_ONNX_TRANSLATION = {
    "convolution_backward",
    "avg_pool2d_backward",
    "avg_pool3d_backward",
    "max_pool3d_with_indices_backward",
    "_adaptive_avg_pool2d_backward",
    "_adaptive_avg_pool3d_backward",
    "silu_backward",
    "mish_backward",
    "_adaptive_avg_pool3d",
}


def check_traced_graph(
    model: nn.Module, layer: str, input_shape: tuple[int, ...], pixels: np.ndarray
) -> float:
    """Trace the explainer, run it in PyTorch, compare with autograd; return the relative error."""
    explainer = gradcam_graph(model, layer, input_shape, MEAN, STD, NUM_CLASSES)
    core: Any = explainer.core
    ops = {getattr(node.target, "_opname", "") for node in core.graph.nodes}
    leftover = sorted(ops & NO_ONNX_TRANSLATION)
    assert not leftover, f"ops without an ONNX translation remain: {leftover}"
    targets = np.array([-1, 3, 7, -1, 0][: len(pixels)], dtype=np.int64)
    with torch.no_grad():
        outputs = explainer(torch.from_numpy(pixels), torch.from_numpy(targets))
    got = {name: value.numpy() for name, value in zip(OUTPUT_NAMES, outputs, strict=True)}
    want = reference(model, layer, pixels, targets)
    np.testing.assert_array_equal(got[EXPLAINED_CLASS], want[EXPLAINED_CLASS])
    assert got[CAM].shape == (len(pixels), *input_shape[1:])
    assert want[CAM_RAW].max() > 1e-3, "near-zero maps prove nothing: use realistic weights"
    assert np.abs(got[CAM] - want[CAM]).max() < TOL
    return relative_error(got[CAM_RAW], want[CAM_RAW])


def sample_pixels(input_shape: tuple[int, ...], batch: int, seed: int = 1) -> np.ndarray:
    """Real digits for 28x28 models, smooth random volumes otherwise."""
    if input_shape == (1, 28, 28):
        images, _ = load_mnist("test")
        return (images[seed : seed + batch].astype(np.float32) / 255.0)[:, None]
    generator = torch.Generator().manual_seed(seed)
    return torch.rand((batch, *input_shape), generator=generator).numpy()


@pytest.mark.parametrize("case", sorted(EXPLAINED))
def test_traced_graph_matches_autograd(case: str) -> None:
    probe = EXPLAINED[case]
    model = realistic_init(probe.build())
    pixels = sample_pixels(probe.input_shape, 3)
    assert check_traced_graph(model, probe.target_layer, probe.input_shape, pixels) < 1e-4


def check_onnx_round_trip(
    model: nn.Module, layer: str, input_shape: tuple[int, ...], path: Path
) -> None:
    export_gradcam(model, layer, input_shape, MEAN, STD, NUM_CLASSES, path)
    proto = onnx.load(str(path))
    assert {node.domain for node in proto.graph.node} <= {"", "ai.onnx"}
    for batch in (1, 3, 16):
        pixels = sample_pixels(input_shape, batch, seed=batch)
        targets = np.resize(np.array([-1, 2, 9], dtype=np.int64), batch)
        assert verify_gradcam(path, model, layer, pixels, targets, MEAN, STD) <= TOL
        got = run_explainer(path, pixels, targets)
        want = reference(model, layer, pixels, targets)
        assert relative_error(got[CAM_RAW], want[CAM_RAW]) < 1e-4
        assert np.abs(got[CAM] - want[CAM]).max() < TOL
        assert math.isfinite(float(got[CAM].sum()))


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(set(EXPLAINED) - {"zoo-mnist_cnn"}))  # exported above
def test_onnx_explainer_matches_autograd(case: str, tmp_path: Path) -> None:
    probe = EXPLAINED[case]
    model = realistic_init(probe.build())
    check_onnx_round_trip(model, probe.target_layer, probe.input_shape, tmp_path / "e.onnx")
