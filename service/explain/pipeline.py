"""The explain pipeline: a picture in, predictions, Grad-CAM heatmaps and pictures out.

It adds no model code of its own: it decodes the picture, calls `<model>` or its explainer
`<model>_gradcam` through `ServedModel.infer` with arrays (so batching, statistics and metrics
apply as to any client), and draws the results. Plain dataclasses in and out, no protocol
messages: each front (`rpc/explain.py` for gRPC) turns its request into an `ExplainQuery` and the
`ExplainResult` into its answer. The tensor names are the repository's contract (`modelrepo`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

import modelrepo

from ..core.errors import InvalidInput
from ..core.model import ServedModel
from ..core.repository import ModelRepository
from . import methods
from .imaging import (
    NEVER,
    Box,
    Caption,
    Stop,
    annotated_png,
    decode_image,
    encode_png,
    feature_grid_png,
    overlay_rgb,
    picture_warnings,
    pixels_to_grey,
    shared_scale,
)

INPUT, TARGET = modelrepo.INPUT, modelrepo.TARGET_CLASS
PROBABILITIES, CAM = modelrepo.PROBABILITIES, modelrepo.CAM
MAX_TOP_K = 100
PER_CLASS, SHARED = "per_class", "shared"
INTEGRATED_GRADIENTS = "integrated_gradients"
T = TypeVar("T")


@dataclass(frozen=True)
class RawTensor:
    """A model input item as the client sent it: its shape and little-endian FP32 bytes."""

    shape: tuple[int, ...]
    data: bytes


@dataclass(frozen=True)
class ExplainOptions:
    """How to explain: predictions only, the feature-map grid, the picture's polarity."""

    predictions_only: bool = False
    feature_maps: bool = False
    polarity: str = "auto"
    annotated: bool = False  # also draw each overlay captioned for people
    heatmap_scale: str = "per_class"  # or SHARED: one scale across the classes of the request


@dataclass(frozen=True)
class ExplainQuery:
    """One explain request: which model, the picture (bytes) or tensor, and what to explain."""

    model: str
    version: str = ""
    image: bytes | None = None
    tensor: RawTensor | None = None
    target_classes: tuple[int, ...] = ()
    top_k: int = 0  # 0: one
    options: ExplainOptions = field(default_factory=ExplainOptions)
    method: str = ""  # "": Grad-CAM; the explainer's config lists the others (explain/methods.py)
    ig_steps: int = 0  # Integrated Gradients' steps; 0: modelrepo.DEFAULT_IG_STEPS


@dataclass(frozen=True)
class Prediction:
    """One class with its label and probability."""

    class_index: int
    label: str
    probability: float


@dataclass(frozen=True)
class Explanation:
    """One explained class: its heatmap (float32 array) and the overlay picture (PNG bytes)."""

    target: Prediction
    heatmap: np.ndarray
    overlay_png: bytes
    annotated_png: bytes = b""


@dataclass
class ExplainResult:
    """What the pipeline answers: the model input it ran, predictions, explanations, pictures."""

    model: str
    version: str
    model_input: np.ndarray
    predictions: list[Prediction] = field(default_factory=list)
    explanations: list[Explanation] = field(default_factory=list)
    feature_maps_png: bytes = b""
    target_layer: str | None = None
    warnings: tuple[str, ...] = ()
    inverted: bool = False
    heatmap_scale: str = "per_class"
    method: str = ""
    ig_steps: int = 0  # the steps Integrated Gradients ran (0 for the other methods)


@dataclass
class ModelInput:
    """One model input item (float32 [*input dims]) and the grey picture for overlays."""

    pixels: np.ndarray
    original: np.ndarray
    box: Box | None = None  # where `original` lies in `pixels` (None: it fills them)
    inverted: bool = False  # a dark-on-light picture, inverted to match the model
    warnings: tuple[str, ...] = ()  # what a person should know: blank, not like a digit, tiny


def read_input(query: ExplainQuery, dims: tuple[int, ...], stop: Stop = NEVER) -> ModelInput:
    """The query's image or tensor as one model input item of `dims` (e.g. (1, 28, 28))."""
    if query.tensor is not None:
        shape = query.tensor.shape
        if shape != dims:
            raise InvalidInput(f"tensor.shape: expected {list(dims)}, got {list(shape)}")
        expected = int(np.prod(dims)) * 4
        if len(query.tensor.data) != expected:
            raise InvalidInput(
                f"tensor.data: {len(query.tensor.data)} bytes; shape {list(dims)} of FP32 "
                f"needs {expected}"
            )
        pixels = np.frombuffer(query.tensor.data, dtype="<f4").reshape(dims)
        if not np.all(np.isfinite(pixels)):
            raise InvalidInput("tensor.data: values must be finite pixels in [0, 1]")
        low, high = float(pixels.min()), float(pixels.max())
        if low < 0.0 or high > 1.0:
            raise InvalidInput(
                f"tensor.data: values must be pixels in [0, 1] (255 is 1.0); got {low:g}..{high:g}"
            )
        notes = picture_warnings(pixels[0], None, (0, 0)) if len(dims) == 3 else []
        return ModelInput(
            pixels.astype(np.float32), pixels_to_grey(pixels[0]), None, False, tuple(notes)
        )
    if query.image is not None:
        if len(dims) != 3 or dims[0] != 1:
            raise InvalidInput(
                f"image: this model takes input {list(dims)}, not a single grey picture; "
                "send `tensor` instead"
            )
        polarity = query.options.polarity
        decoded = decode_image(query.image, (dims[1], dims[2]), polarity, stop)
        notes = picture_warnings(decoded.pixels, decoded.box, decoded.size)
        return ModelInput(
            decoded.pixels[np.newaxis],
            decoded.original,
            decoded.box,
            decoded.inverted,
            tuple(notes),
        )
    raise InvalidInput("input: send `image` (PNG or JPEG bytes) or `tensor`")


def _prediction(probabilities: np.ndarray, index: int, labels: tuple[str, ...]) -> Prediction:
    label = labels[index] if index < len(labels) else str(index)
    return Prediction(class_index=index, label=label, probability=float(probabilities[index]))


async def _run(
    model: ServedModel,
    pixels: np.ndarray,
    targets: list[int] | None,
    timeout_s: float | None,
) -> dict[str, np.ndarray]:
    """Run one item (repeated once per target class) through a model; outputs by name."""
    count = max(len(targets or []), 1)
    inputs = {INPUT: np.repeat(pixels[np.newaxis], count, 0)}
    if targets is not None:  # shaped as the graph takes it: [count] or [count, 1]
        target_dims = model.signature.inputs_by_name[TARGET].model_dims
        inputs[TARGET] = np.asarray(targets, dtype=np.int64).reshape(count, *target_dims)
    return await model.infer(inputs, count, timeout_s)


def _check_model(model: ServedModel, explainer: bool) -> tuple[str, ...]:
    """The model's class labels; refuses a model that does not follow the repository contract."""
    sig = model.signature
    input_spec = sig.inputs_by_name.get(INPUT)
    if input_spec is None or input_spec.datatype != "FP32":
        raise InvalidInput(f"model '{model.name}' has no FP32 input named '{INPUT}'")
    if not explainer:
        others = [n for n in sig.inputs_by_name if n != INPUT]
        if others:  # e.g. the explainer `<model>_gradcam` given to classify by mistake
            raise InvalidInput(
                f"model '{model.name}': missing input(s): {', '.join(others)}; classify takes "
                "the classifier (the name without the explainer's suffix)"
            )
    needed = [PROBABILITIES, CAM, modelrepo.EXPLAINED_CLASS] if explainer else [PROBABILITIES]
    missing = [n for n in needed if n not in sig.outputs_by_name]
    if explainer and TARGET not in sig.inputs_by_name:
        missing.append(f"input {TARGET}")
    if missing:
        raise InvalidInput(
            f"model '{model.name}' cannot be explained: it lacks {', '.join(missing)}"
        )
    return sig.outputs_by_name[PROBABILITIES].labels


def _check_counts(model: ServedModel, query: ExplainQuery, top_k: int) -> None:
    """Bound what the client asks for by the model: classes, targets and batch size."""
    sig = model.signature
    classes = int(np.prod(sig.outputs_by_name[PROBABILITIES].model_dims))
    if classes > 0 and top_k > classes:
        raise InvalidInput(f"top_k: the model has {classes} classes, got {top_k}")
    if query.options.predictions_only:
        return
    batch = max(sig.max_batch_size, 1)
    wanted = len(query.target_classes) or top_k
    if wanted > batch:
        what = "target_classes" if query.target_classes else "top_k"
        raise InvalidInput(f"{what}: at most {batch} (the explainer's max batch), got {wanted}")
    value_range = sig.inputs_by_name[TARGET].value_range
    high = value_range[1] if value_range else classes
    bad = [t for t in query.target_classes if not -1 <= t < high]
    if bad:
        raise InvalidInput(
            f"target_classes: each must be -1 (the predicted class) or in [0, {high}); got {bad[0]}"
        )


async def explain(
    repository: ModelRepository[ServedModel],
    query: ExplainQuery,
    timeout_s: float | None = None,
) -> ExplainResult:
    """Answer one explain query."""
    if not query.model:
        raise InvalidInput("model_name: required (e.g. mnist_cnn)")
    if query.top_k > MAX_TOP_K:
        raise InvalidInput(f"top_k: at most {MAX_TOP_K}, got {query.top_k}")
    top_k = max(int(query.top_k), 1)
    steps = int(query.ig_steps) or modelrepo.DEFAULT_IG_STEPS
    if not 1 <= steps <= modelrepo.MAX_IG_STEPS:
        raise InvalidInput(
            f"ig_steps: Integrated Gradients takes 1 to {modelrepo.MAX_IG_STEPS} steps "
            f"(0: the default {modelrepo.DEFAULT_IG_STEPS}), got {steps}"
        )
    options = query.options
    name = query.model
    suffix = modelrepo.EXPLAINER_SUFFIX
    if not options.predictions_only and name.endswith(suffix) and len(name) > len(suffix):
        raise InvalidInput(
            f"model_name: '{name}' is an explainer; name its classifier "
            f"('{name.removesuffix(suffix)}'), whose explainer does the work"
        )
    served = name if options.predictions_only else modelrepo.explainer_name(name)
    _, model = repository.get(served, query.version)
    labels = _check_model(model, explainer=not options.predictions_only)
    _check_counts(model, query, top_k)
    method = "" if options.predictions_only else methods.check(model, query.method, steps)
    shared = options.heatmap_scale == SHARED
    if shared and modelrepo.CAM_RAW not in model.signature.outputs_by_name:
        raise InvalidInput(
            f"heatmap_scale: a shared scale needs the explainer's '{modelrepo.CAM_RAW}' output, "
            f"which '{model.name}' lacks; use the per-class scale"
        )
    if shared and method not in ("", modelrepo.DEFAULT_METHOD):
        raise InvalidInput(
            f"heatmap_scale: the shared scale is drawn from Grad-CAM's raw maps; with method "
            f"'{method}' use the per-class scale"
        )
    stop = Stop(timeout_s)
    dims = model.signature.inputs_by_name[INPUT].model_dims
    item = await _in_thread(stop, read_input, query, dims, stop)
    result = ExplainResult(
        model=name,
        version=model.version,
        model_input=item.pixels,
        warnings=item.warnings,
        inverted=item.inverted,
        heatmap_scale=options.heatmap_scale,
    )
    if options.predictions_only:
        probs = (await _run(model, item.pixels, None, stop.remaining()))[PROBABILITIES][0]
        for index in np.argsort(-probs, kind="stable")[:top_k]:
            result.predictions.append(_prediction(probs, int(index), labels))
        return result

    targets = [int(t) for t in query.target_classes] or [-1]
    first = await _run(model, item.pixels, targets, stop.remaining())
    probs = first[PROBABILITIES][0]
    ranked = [int(i) for i in np.argsort(-probs, kind="stable")[:top_k]]
    for index in ranked:
        result.predictions.append(_prediction(probs, index, labels))
    cams = [first[CAM][i] for i in range(len(targets))]
    raws = list(first[modelrepo.CAM_RAW][: len(targets)]) if shared else []
    explained = [int(c) for c in first[modelrepo.EXPLAINED_CLASS].reshape(-1)]
    if not query.target_classes and len(ranked) > 1:
        # The top class is explained; the runners-up go in one more (batched) request.
        rest = await _run(model, item.pixels, ranked[1:], stop.remaining())
        cams.extend(rest[CAM])
        if shared:
            raws.extend(rest[modelrepo.CAM_RAW])
        explained.extend(ranked[1:])
    if method != modelrepo.DEFAULT_METHOD:
        cams = await _method_cams(model, method, item.pixels, explained, steps, stop)
    activations = first.get(modelrepo.ACTIVATIONS) if options.feature_maps else None
    grid = options.feature_maps
    drawn = shared_scale(cams, raws) if shared else cams
    captions = None
    if options.annotated:
        shown = _method_title(method, steps)
        captions = [_caption(probs, i, labels, shared, item, shown) for i in explained]
    pictures = await _in_thread(stop, _draw, item, drawn, activations, grid, stop, captions)
    for cam, index, overlay, annotated in zip(
        cams, explained, pictures.overlays, pictures.annotated, strict=True
    ):
        result.explanations.append(
            Explanation(
                target=_prediction(probs, index, labels),
                heatmap=np.asarray(cam, dtype=np.float32),
                overlay_png=overlay,
                annotated_png=annotated,
            )
        )
    result.feature_maps_png = pictures.feature_maps
    result.method = method
    result.ig_steps = steps if method == INTEGRATED_GRADIENTS else 0
    layer = model.config.parameters.get(modelrepo.TARGET_LAYER)
    if layer is not None:
        result.target_layer = layer.string_value
    return result


async def _method_cams(
    model: ServedModel,
    method: str,
    pixels: np.ndarray,
    explained: list[int],
    steps: int,
    stop: Stop,
) -> list[np.ndarray]:
    """The chosen method's heatmaps for each explained class: the explainer through the core
    (batched, counted), then the method's own graphs in a worker thread."""
    first = None
    if methods.needs_explainer(method):
        first = await _run(model, pixels, explained, stop.remaining())
    batch = np.repeat(pixels[np.newaxis], len(explained), 0)
    targets = np.asarray(explained, dtype=np.int64)
    graphs = methods.graphs_of(model)
    out = await _in_thread(stop, graphs.explain, method, batch, targets, steps, first)
    return [out[CAM][i] for i in range(len(explained))]


@dataclass
class _Pictures:
    overlays: list[bytes]
    feature_maps: bytes
    annotated: list[bytes]


def _method_title(method: str, steps: int) -> str:
    """How a picture names the method (with Integrated Gradients' steps)."""
    shown = methods.title(method or modelrepo.DEFAULT_METHOD)
    return f"{shown} ({steps} steps)" if method == INTEGRATED_GRADIENTS else shown


def _caption(
    probs: np.ndarray,
    index: int,
    labels: tuple[str, ...],
    shared: bool,
    item: ModelInput,
    shown: str,
) -> Caption:
    """What the annotated overlay of class `index` says under the picture."""
    label = labels[index] if index < len(labels) else str(index)
    scale = (
        "shared by this request's classes (0 to its largest value)"
        if shared
        else ("this class's own min to max")
    )
    notes = [f"note: {w}" for w in item.warnings]
    if item.inverted:
        notes.append("inverted: dark on light, the model reads light strokes on black")
    return Caption(label, float(probs[index]), shown, scale=scale, notes=tuple(notes))


async def _in_thread(stop: Stop, func: Callable[..., T], /, *args: Any) -> T:
    """Run picture work in a worker thread; a cancelled caller tells it to stop early."""
    try:
        return await asyncio.to_thread(func, *args)
    except asyncio.CancelledError:
        stop.cancel()
        raise


def _draw(
    item: ModelInput,
    cams: list[np.ndarray],
    activations: np.ndarray | None,
    grid: bool,
    stop: Stop = NEVER,
    captions: list[Caption] | None = None,
) -> _Pictures:
    overlays, annotated = [], []
    for index, cam in enumerate(cams):
        stop.check("overlay_png")
        rgb = overlay_rgb(item.original, cam, item.box)
        overlays.append(encode_png(rgb))
        if captions is not None:
            annotated.append(annotated_png(rgb, captions[index]))
    stop.check("feature_maps_png")
    maps = feature_grid_png(activations[0]) if grid and activations is not None else b""
    return _Pictures(overlays, maps, annotated or [b""] * len(overlays))
