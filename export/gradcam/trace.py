"""Grad-CAM traced and exported: forward and backward as one graph of plain ONNX operators.

Exporting a module that calls `torch.autograd.grad` fails, so the forward and backward passes of
`gradcam_core` are traced together with `make_fx` (a symbolic batch, the decompositions in
`export.gradcam.decompositions`), and that graph, wrapped with the upsampling and normalisation,
goes through `torch.export` and the dynamo ONNX exporter into one self-contained file.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

from export.gradcam.decompositions import gradcam_decompositions
from export.gradcam.reference import cam_from_raw, frozen, gradcam_core, input_gradient_core
from export.gradcam.verify import check_graph
from export.onnx_export import OPSET
from modelrepo import (
    ACTIVATIONS,
    CAM,
    CAM_RAW,
    EXPLAINED_CLASS,
    GRADIENTS,
    HEAD_INPUT,
    INPUT,
    INPUT_GRADIENT,
    LOGITS,
    PROBABILITIES,
    TARGET_CLASS,
)

INPUT_NAMES = (INPUT, TARGET_CLASS)
OUTPUT_NAMES = (CAM, CAM_RAW, ACTIVATIONS, GRADIENTS, LOGITS, PROBABILITIES, EXPLAINED_CLASS)
SALIENCY_OUTPUT_NAMES = (INPUT_GRADIENT, LOGITS, EXPLAINED_CLASS)


class _Explainer(nn.Module):
    """The traced forward+backward graph plus the upsampling, normalisation and softmax."""

    def __init__(self, core: torch.fx.GraphModule, spatial: tuple[int, ...]) -> None:
        super().__init__()
        self.core = core
        self.spatial = spatial

    def forward(self, input: torch.Tensor, target_class: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cam_raw, activations, grads, logits, explained = self.core(input, target_class)
        cam = cam_from_raw(cam_raw, self.spatial)
        return cam, cam_raw, activations, grads, logits, logits.softmax(dim=1), explained


class _InputGradient(nn.Module):
    """The traced forward+backward down to the pixels: (input_gradient, logits, explained)."""

    def __init__(self, core: torch.fx.GraphModule) -> None:
        super().__init__()
        self.core = core

    def forward(self, input: torch.Tensor, target_class: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.core(input, target_class))


def gradcam_graph(
    model: nn.Module,
    target_layer: str,
    input_shape: tuple[int, ...],
    mean: float,
    std: float,
    num_classes: int,
) -> nn.Module:
    """Grad-CAM of `model` as a module of plain forward ops (backward traced with make_fx).

    Its forward takes (input [N, *input_shape], target_class [N]) and returns the tensors named
    in OUTPUT_NAMES; the batch size is symbolic.
    """
    model.eval()

    def core(pixels: torch.Tensor, target_class: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return gradcam_core(model, target_layer, mean, std, pixels, target_class)

    traced = _trace(model, core, input_shape, num_classes)
    return _Explainer(traced, tuple(input_shape[1:])).eval()


def saliency_graph(
    model: nn.Module, input_shape: tuple[int, ...], mean: float, std: float, num_classes: int
) -> nn.Module:
    """The target score's gradient at the raw pixels as a module of plain forward ops.

    Its forward takes (input [N, *input_shape], target_class [N]) and returns
    SALIENCY_OUTPUT_NAMES: input_gradient [N, *input_shape], logits, explained_class.
    """
    model.eval()

    def core(pixels: torch.Tensor, target_class: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return input_gradient_core(model, mean, std, pixels, target_class)

    return _InputGradient(_trace(model, core, input_shape, num_classes)).eval()


def _trace(
    model: nn.Module,
    core: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]],
    input_shape: tuple[int, ...],
    num_classes: int,
) -> torch.fx.GraphModule:
    """Forward and backward of `core` traced into one graph of forward ops, batch symbolic."""
    example, targets = _example_inputs(input_shape, num_classes)
    # Only the batch is symbolic: static spatial sizes make the trace ~3x faster and keep shape
    # arithmetic out of the graph. (Entering this fake mode around make_fx instead of handing it
    # the fake inputs specialised the batch to 2 behind F.pad in LocalResponseNorm.)
    fake_mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)
    fake_pixels = fake_mode.from_tensor(
        example,
        symbolic_context=StatelessSymbolicContext(
            dynamic_sizes=[DimDynamic.DYNAMIC] + [DimDynamic.STATIC] * len(input_shape)
        ),
    )
    fake_targets = fake_mode.from_tensor(
        targets, symbolic_context=StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC])
    )
    with frozen(model):
        traced = make_fx(
            core,
            decomposition_table=gradcam_decompositions(),
            tracing_mode="symbolic",
            _allow_non_fake_inputs=True,
        )(fake_pixels, fake_targets)
    return traced


def _example_inputs(
    input_shape: tuple[int, ...], num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    # Batch 2 (not 1, which the tracer would specialise), one predicted and one explicit target.
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand((2, *input_shape), generator=generator)
    targets = torch.tensor([-1, min(1, num_classes - 1)], dtype=torch.int64)
    return pixels, targets


def export_gradcam(
    model: nn.Module,
    target_layer: str,
    input_shape: tuple[int, ...],
    mean: float,
    std: float,
    num_classes: int,
    path: Path,
    opset: int = OPSET,
) -> None:
    """Write the Grad-CAM explainer of `model` as one self-contained ONNX file at `path`.

    Inputs: `input` FP32 [-1, *input_shape] (raw pixels in [0, 1], normalised inside) and
    `target_class` INT64 [-1] (-1 = the predicted class; others must be < num_classes).
    Outputs: cam [-1, *input spatial] in [0, 1], cam_raw [-1, *layer spatial],
    activations and gradients [-1, C, *layer spatial], logits, probabilities, explained_class.
    Raises ExportVerificationError when the graph lost its dynamic batch or uses a custom domain.
    """
    explainer = gradcam_graph(model, target_layer, input_shape, mean, std, num_classes)
    _export_traced(explainer, OUTPUT_NAMES, input_shape, num_classes, Path(path), opset)


def export_saliency(
    model: nn.Module,
    input_shape: tuple[int, ...],
    mean: float,
    std: float,
    num_classes: int,
    path: Path,
    opset: int = OPSET,
) -> None:
    """Write the input-gradient graph of `model` (inputs as the explainer's) at `path`."""
    graph = saliency_graph(model, input_shape, mean, std, num_classes)
    _export_traced(graph, SALIENCY_OUTPUT_NAMES, input_shape, num_classes, Path(path), opset)


def _export_traced(
    module: nn.Module,
    output_names: tuple[str, ...],
    input_shape: tuple[int, ...],
    num_classes: int,
    path: Path,
    opset: int,
) -> None:
    """torch.export + the dynamo ONNX exporter, batch dynamic, one self-contained file."""
    example, targets = _example_inputs(input_shape, num_classes)
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings():
        # Noise from torch's own internals (pytree deprecation, a dim-name notice).
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*LeafSpec.*")
        warnings.filterwarnings("ignore", message=".*axis name: batch will not be used.*")
        onnx_program = torch.onnx.export(
            module,
            (example, targets),
            input_names=list(INPUT_NAMES),
            output_names=list(output_names),
            dynamic_shapes=({0: batch}, {0: batch}),  # by position, as forward() takes them
            opset_version=opset,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    if onnx_program is None:  # pragma: no cover - the dynamo exporter always returns a program
        raise RuntimeError("torch.onnx.export returned no program")
    check_graph(onnx_program.model_proto, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx_program.save(str(path), external_data=False)


class _Head(nn.Module):
    """The model from the target layer on: its output replaced by `head_input`.

    Layers before the target still run on `input` where the head reads them (a skip connection
    across the target); elsewhere the exporter drops them as dead code.
    """

    def __init__(self, model: nn.Module, target_layer: str, mean: float, std: float) -> None:
        super().__init__()
        self.model = model
        self.target = dict(model.named_modules())[target_layer]
        self.mean = mean
        self.std = std

    def forward(self, input: torch.Tensor, head_input: torch.Tensor) -> torch.Tensor:
        def replace(_module: nn.Module, _args: object, _output: object) -> torch.Tensor:
            return head_input.clone()

        handle = self.target.register_forward_hook(replace)
        try:
            return self.model((input - self.mean) / self.std)
        finally:
            handle.remove()


def export_head(
    model: nn.Module,
    target_layer: str,
    input_shape: tuple[int, ...],
    layer_shape: tuple[int, ...],
    mean: float,
    std: float,
    path: Path,
    opset: int = OPSET,
) -> None:
    """Write (input [N, *input_shape], head_input [N, *layer_shape]) -> logits at `path`."""
    head = _Head(model.eval(), target_layer, mean, std).eval()
    generator = torch.Generator().manual_seed(0)
    example = (
        torch.rand((2, *input_shape), generator=generator),
        torch.rand((2, *layer_shape), generator=generator),
    )
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            head,
            example,
            input_names=[INPUT, HEAD_INPUT],
            output_names=[LOGITS],
            dynamic_shapes=({0: batch}, {0: batch}),
            opset_version=opset,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    if program is None:  # pragma: no cover - the dynamo exporter always returns a program
        raise RuntimeError("torch.onnx.export returned no program")
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(path), external_data=False)
