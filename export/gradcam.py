"""Grad-CAM as a self-contained ONNX graph: forward, backward and the map, no PyTorch at serve time.

Grad-CAM (Selvaraju et al. 2017): the channel weights are the spatial mean of the gradient of the
pre-softmax class score with respect to a target layer's activations; the map is the ReLU of the
activations weighted by them. Exporting a module that calls `torch.autograd.grad` fails, so the
forward and backward passes are traced together into one graph with `make_fx` (a symbolic batch,
the decompositions in `export.decompositions`), and that graph, wrapped with the upsampling and
normalisation, goes through `torch.export` and the dynamo ONNX exporter. Nothing here knows an
architecture: a forward hook splits the model at the named module.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

from export.decompositions import gradcam_decompositions
from export.errors import ExportVerificationError

__all__ = [
    "INPUT_NAMES",
    "OUTPUT_NAMES",
    "ExportVerificationError",
    "TargetLayerError",
    "export_gradcam",
    "gradcam_graph",
    "gradcam_reference",
    "run_explainer",
    "verify_gradcam",
]

INPUT_NAMES = ("input", "target_class")
OUTPUT_NAMES = ("cam", "cam_raw", "activations", "logits", "probabilities", "explained_class")
# Floor of the min-max normaliser, so an all-zero map divides by it, not by zero. Not `+ eps`:
# the ONNX optimiser folds a tiny added constant away (FIELD-NOTES).
NORM_EPS = 1e-6
# A map whose spread is below this fraction of its peak is flat (an all-black image gives a
# constant map): it normalises to zero. Stretching it would show only float rounding, which
# differs between PyTorch and ONNX Runtime (~1e-10 on a constant mnist_cnn map, x1e6 by NORM_EPS).
FLAT_RELATIVE = 1e-4


class TargetLayerError(ValueError):
    """The Grad-CAM target layer is missing, never called, called twice or not a feature map."""


@dataclass
class _Capture:
    """The grad-requiring leaf that stands in for the target layer's output."""

    name: str
    leaf: torch.Tensor | None = None
    calls: int = 0


def _find_module(model: nn.Module, target_layer: str) -> nn.Module:
    modules = dict(model.named_modules())
    if target_layer not in modules or not target_layer:
        names = [name for name in modules if name]
        shown = ", ".join(names[:40]) + (" ..." if len(names) > 40 else "")
        raise TargetLayerError(f"no module named {target_layer!r} in the model; modules: {shown}")
    return modules[target_layer]


@contextmanager
def _split_at(model: nn.Module, target_layer: str) -> Iterator[_Capture]:
    """Replace the target module's output with a clone of a detached, grad-requiring leaf.

    The clone keeps the leaf intact when a later op works in place on the output
    (`out += identity`, `ReLU(inplace=True)`); the rest of the model runs unchanged.
    """
    module = _find_module(model, target_layer)
    capture = _Capture(target_layer)

    def hook(_module: nn.Module, _args: Any, output: Any) -> torch.Tensor:
        capture.calls += 1
        if capture.calls > 1:
            raise TargetLayerError(
                f"target layer {target_layer!r} is called more than once in a forward pass "
                "(a shared module?); Grad-CAM needs a module that runs exactly once: "
                "name another layer"
            )
        if not isinstance(output, torch.Tensor) or output.dim() < 3:
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output)
            raise TargetLayerError(
                f"target layer {target_layer!r} must output a feature map [N, C, *spatial], "
                f"got {shape}"
            )
        capture.leaf = output.detach().requires_grad_()
        return capture.leaf.clone()

    handle = module.register_forward_hook(hook)
    try:
        yield capture
    finally:
        handle.remove()


@contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """Parameters stop requiring grad (only the activation's gradient is wanted), then restore."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _gradcam_core(
    model: nn.Module,
    target_layer: str,
    mean: float,
    std: float,
    pixels: torch.Tensor,
    target_class: torch.Tensor,
    validate: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(cam_raw, activations, logits, explained_class) for raw pixels in [0, 1].

    `validate` checks the targets against the number of classes (eagerly; not while tracing).
    """
    with _split_at(model, target_layer) as capture, torch.enable_grad():
        logits = model((pixels - mean) / std)
    if capture.leaf is None:
        raise TargetLayerError(
            f"target layer {target_layer!r} is never called in the forward pass; "
            "name a module that runs exactly once"
        )
    activations = capture.leaf
    if validate:
        _check_targets(target_class, logits.shape[1])
    explained = torch.where(target_class < 0, logits.argmax(dim=1), target_class)
    # Samples are independent in eval mode, so one backward of the summed scores serves the batch.
    score = logits.gather(1, explained.unsqueeze(1)).sum()
    (grads,) = torch.autograd.grad(score, activations)
    spatial = tuple(range(2, activations.dim()))
    weights = grads.mean(dim=spatial, keepdim=True)
    cam_raw = torch.relu((weights * activations).sum(dim=1))
    return cam_raw, activations.detach(), logits.detach(), explained


def _cam_from_raw(cam_raw: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Upsample (bi/trilinear) to the input's spatial size, then min-max normalise per image.

    All-zero and flat maps (spread <= FLAT_RELATIVE x peak) become all zero, never NaN.
    """
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(size)]
    cam = F.interpolate(cam_raw.unsqueeze(1), size=size, mode=mode, align_corners=False)
    cam = cam.squeeze(1)
    shape = (-1,) + (1,) * len(size)
    low = cam.flatten(1).amin(dim=1).view(shape)
    high = cam.flatten(1).amax(dim=1).view(shape)
    spread = high - low
    scaled = (cam - low) / spread.clamp_min(NORM_EPS)
    return torch.where(spread > FLAT_RELATIVE * high.abs(), scaled, torch.zeros_like(cam))


def _check_targets(target_class: torch.Tensor, num_classes: int) -> None:
    bad = (target_class < -1) | (target_class >= num_classes)
    if bool(bad.any()):
        raise ValueError(
            f"target_class must be -1 (the predicted class) or in [0, {num_classes}), "
            f"got {target_class[bad].tolist()}"
        )


def gradcam_reference(
    model: nn.Module,
    target_layer: str,
    pixels: torch.Tensor,
    target_class: torch.Tensor,
    mean: float,
    std: float,
) -> dict[str, torch.Tensor]:
    """Grad-CAM with PyTorch autograd, eagerly: the reference the ONNX graph is checked against.

    `pixels` is [N, *input_shape] in [0, 1]; `target_class` [N] (-1 = the predicted class).
    Returns cam_raw, cam, activations, logits, probabilities and explained_class.
    """
    model.eval()
    pixels = pixels.detach().float()
    target_class = target_class.detach().long()
    with _frozen(model):
        cam_raw, activations, logits, explained = _gradcam_core(
            model, target_layer, mean, std, pixels, target_class, validate=True
        )
    cam = _cam_from_raw(cam_raw.detach(), tuple(pixels.shape[2:]))
    return {
        "cam": cam,
        "cam_raw": cam_raw.detach(),
        "activations": activations,
        "logits": logits,
        "probabilities": logits.softmax(dim=1),
        "explained_class": explained,
    }


class _Explainer(nn.Module):
    """The traced forward+backward graph plus the upsampling, normalisation and softmax."""

    def __init__(self, core: torch.fx.GraphModule, spatial: tuple[int, ...]) -> None:
        super().__init__()
        self.core = core
        self.spatial = spatial

    def forward(self, input: torch.Tensor, target_class: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cam_raw, activations, logits, explained = self.core(input, target_class)
        cam = _cam_from_raw(cam_raw, self.spatial)
        return cam, cam_raw, activations, logits, logits.softmax(dim=1), explained


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
    example, targets = _example_inputs(input_shape, num_classes)

    def core(pixels: torch.Tensor, target_class: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return _gradcam_core(model, target_layer, mean, std, pixels, target_class)

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
    with _frozen(model):
        traced = make_fx(
            core,
            decomposition_table=gradcam_decompositions(),
            tracing_mode="symbolic",
            _allow_non_fake_inputs=True,
        )(fake_pixels, fake_targets)
    return _Explainer(traced, tuple(input_shape[1:])).eval()


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
    opset: int = 20,
) -> None:
    """Write the Grad-CAM explainer of `model` as one self-contained ONNX file at `path`.

    Inputs: `input` FP32 [-1, *input_shape] (raw pixels in [0, 1], normalised inside) and
    `target_class` INT64 [-1] (-1 = the predicted class; others must be < num_classes).
    Outputs: cam [-1, *input spatial] in [0, 1], cam_raw [-1, *layer spatial],
    activations [-1, C, *layer spatial], logits, probabilities, explained_class.
    Raises ExportVerificationError when the graph lost its dynamic batch or uses a custom domain.
    """
    explainer = gradcam_graph(model, target_layer, input_shape, mean, std, num_classes)
    example, targets = _example_inputs(input_shape, num_classes)
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings():
        # Noise from torch's own internals (pytree deprecation, a dim-name notice).
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*LeafSpec.*")
        warnings.filterwarnings("ignore", message=".*axis name: batch will not be used.*")
        onnx_program = torch.onnx.export(
            explainer,
            (example, targets),
            input_names=list(INPUT_NAMES),
            output_names=list(OUTPUT_NAMES),
            dynamic_shapes={"input": {0: batch}, "target_class": {0: batch}},
            opset_version=opset,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    if onnx_program is None:  # pragma: no cover - the dynamo exporter always returns a program
        raise RuntimeError("torch.onnx.export returned no program")
    _check_graph(onnx_program.model_proto, Path(path))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx_program.save(str(path), external_data=False)


def _check_graph(proto: Any, path: Path) -> None:
    """Every input and output keeps a symbolic batch; only the standard ONNX domain is used."""
    static = []
    for value in [*proto.graph.input, *proto.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if not dims or not dims[0].dim_param:
            static.append(value.name)
    if static:
        raise ExportVerificationError(
            f"{path}: the explainer graph lost its dynamic batch dimension on {static} "
            "(the tracer specialised the example's batch of 2)"
        )
    domains = {node.domain for node in proto.graph.node} | {
        opset.domain for opset in proto.opset_import
    }
    custom = sorted(domains - {"", "ai.onnx"})
    if custom or len(proto.functions):
        raise ExportVerificationError(
            f"{path}: the explainer graph uses custom domains {custom} or local functions; "
            "plain ONNX Runtime must run it"
        )


def run_explainer(
    path: Path, pixels: np.ndarray, target_class: np.ndarray, threads: int = 1
) -> dict[str, np.ndarray]:
    """Run an explainer ONNX file in plain ONNX Runtime (CPU); outputs by name."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(
        str(path), sess_options=options, providers=["CPUExecutionProvider"]
    )
    names = [output.name for output in session.get_outputs()]
    feeds = {
        "input": np.ascontiguousarray(pixels, dtype=np.float32),
        "target_class": np.ascontiguousarray(target_class, dtype=np.int64),
    }
    return dict(zip(names, session.run(names, feeds), strict=True))


VERIFY_CHUNK = 256  # images per reference/ONNX run, to bound memory on large checks


def verify_gradcam(
    path: Path,
    model: nn.Module,
    target_layer: str,
    pixels: np.ndarray,
    target_class: np.ndarray,
    mean: float,
    std: float,
    tol: float = 1e-4,
    *,
    rtol: float = 0.0,
) -> float:
    """Check the explainer at `path` against `gradcam_reference`; return the max abs difference.

    `pixels` is [N, *input_shape] in [0, 1] (uint8 is scaled by 1/255); `target_class` [N].
    Compares cam_raw and logits (max abs) and requires the same explained classes; raises
    ExportVerificationError when a difference exceeds `tol` + `rtol` * (the largest |value| of
    that image's reference output; 0 by default: absolute only).
    """
    images = np.asarray(pixels)
    images = (images.astype(np.float32) / 255.0) if images.dtype == np.uint8 else images
    images = images.astype(np.float32, copy=False)
    targets = np.asarray(target_class).astype(np.int64)
    if images.shape[0] != targets.shape[0] or targets.ndim != 1:
        raise ValueError(
            f"pixels {images.shape} and target_class {targets.shape} need one target per image"
        )
    worst: dict[str, float] = {"cam_raw": 0.0, "logits": 0.0}
    excess: dict[str, float] = {"cam_raw": 0.0, "logits": 0.0}
    for start in range(0, len(images), VERIFY_CHUNK):
        chunk = slice(start, start + VERIFY_CHUNK)
        reference = gradcam_reference(
            model,
            target_layer,
            torch.from_numpy(images[chunk]),
            torch.from_numpy(targets[chunk]),
            mean,
            std,
        )
        got = run_explainer(path, images[chunk], targets[chunk])
        explained = reference["explained_class"].numpy()
        if not np.array_equal(got["explained_class"], explained):
            wrong = np.flatnonzero(got["explained_class"] != explained)[:10]
            raise ExportVerificationError(
                f"{path}: the explainer explains other classes than PyTorch for images "
                f"{(wrong + start).tolist()} (ONNX {got['explained_class'][wrong].tolist()}, "
                f"PyTorch {explained[wrong].tolist()})"
            )
        for name in worst:
            want = reference[name].numpy().reshape(len(explained), -1)
            diff = np.abs(got[name].reshape(want.shape) - want).max(axis=1)
            allowed = tol + rtol * np.abs(want).max(axis=1)
            worst[name] = max(worst[name], float(diff.max()))
            excess[name] = max(excess[name], float((diff / allowed).max()))
    failed = [name for name in worst if excess[name] > 1.0]
    if failed:
        relative = f" + {rtol:.3g} x the image's largest |value|" if rtol else ""
        raise ExportVerificationError(
            f"{path}: Grad-CAM outputs differ from the PyTorch autograd reference over "
            f"{len(images)} images: "
            + ", ".join(f"{name} by {worst[name]:.3g} (max abs)" for name in failed)
            + f"; tolerance {tol:.3g}{relative}"
        )
    return max(worst.values())
