"""The explain API: image in, predictions, Grad-CAM heatmaps and pictures out.

It adds no model code of its own: it decodes the picture, sends ordinary ModelInfer requests to
`<model>` or `<model>_gradcam` (so batching, statistics and metrics apply as to any client), and
draws the results.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np

from pb import explain_pb2 as ex
from pb import grpc_service_pb2 as pb

from .codec import NUMPY_DTYPES
from .errors import InvalidInput
from .imaging import decode_image, feature_grid_png, overlay_png, pixels_png
from .model import ServedModel
from .repository import ModelRepository

EXPLAINER_SUFFIX = "_gradcam"
INPUT, TARGET = "input", "target_class"
MAX_TOP_K = 100
_POLARITY = {ex.POLARITY_AUTO: "auto", ex.POLARITY_AS_IS: "as_is", ex.POLARITY_INVERT: "invert"}


@dataclass
class ModelInput:
    """One model input item (float32 [*input dims]) and the grey picture for overlays."""

    pixels: np.ndarray
    original: np.ndarray


def _served(repository: ModelRepository, name: str, version: str) -> ServedModel:
    _, model = repository.get(name, version)
    assert isinstance(model, ServedModel)
    return model


def read_input(request: ex.ExplainRequest, dims: tuple[int, ...]) -> ModelInput:
    """The request's image or tensor as one model input item of `dims` (e.g. (1, 28, 28))."""
    which = request.WhichOneof("input")
    if which == "tensor":
        shape = tuple(int(d) for d in request.tensor.shape)
        if shape != dims:
            raise InvalidInput(f"tensor.shape: expected {list(dims)}, got {list(shape)}")
        expected = int(np.prod(dims)) * 4
        if len(request.tensor.data) != expected:
            raise InvalidInput(
                f"tensor.data: {len(request.tensor.data)} bytes; shape {list(dims)} of FP32 "
                f"needs {expected}"
            )
        pixels = np.frombuffer(request.tensor.data, dtype="<f4").reshape(dims)
        if not np.all(np.isfinite(pixels)):
            raise InvalidInput("tensor.data: values must be finite pixels in [0, 1]")
        return ModelInput(pixels.astype(np.float32), pixels_png(pixels[0]))
    if which == "image":
        if len(dims) != 3 or dims[0] != 1:
            raise InvalidInput(
                f"image: this model takes input {list(dims)}, not a single grey picture; "
                "send `tensor` instead"
            )
        polarity = _POLARITY.get(request.polarity, "auto")
        decoded = decode_image(request.image, (dims[1], dims[2]), polarity)
        return ModelInput(decoded.pixels[np.newaxis], decoded.original)
    raise InvalidInput("input: send `image` (PNG or JPEG bytes) or `tensor`")


def _infer_request(
    model: ServedModel, pixels: np.ndarray, targets: list[int] | None, outputs: list[str]
) -> pb.ModelInferRequest:
    batch = np.ascontiguousarray(np.repeat(pixels[np.newaxis], max(len(targets or []), 1), 0))
    request = pb.ModelInferRequest(model_name=model.name, model_version=model.version)
    request.inputs.add(name=INPUT, datatype="FP32", shape=batch.shape)
    request.raw_input_contents.append(batch.tobytes())
    if targets is not None:
        request.inputs.add(name=TARGET, datatype="INT64", shape=[len(targets), 1])
        request.raw_input_contents.append(np.asarray(targets, dtype=np.int64).tobytes())
    for name in outputs:
        request.outputs.add(name=name)
    return request


def _outputs(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    return {
        out.name: np.frombuffer(raw, dtype=NUMPY_DTYPES[out.datatype]).reshape(tuple(out.shape))
        for out, raw in zip(response.outputs, response.raw_output_contents, strict=True)
    }


def _prediction(probabilities: np.ndarray, index: int, labels: tuple[str, ...]) -> ex.Prediction:
    label = labels[index] if index < len(labels) else str(index)
    return ex.Prediction(class_index=index, label=label, probability=float(probabilities[index]))


async def explain(repository: ModelRepository, request: ex.ExplainRequest) -> ex.ExplainResponse:
    """Answer one ExplainRequest."""
    if not request.model_name:
        raise InvalidInput("model_name: required (e.g. mnist_cnn)")
    if request.top_k > MAX_TOP_K:
        raise InvalidInput(f"top_k: at most {MAX_TOP_K}, got {request.top_k}")
    top_k = max(int(request.top_k), 1)
    name = request.model_name
    if request.predictions_only:
        model = _served(repository, name, request.model_version)
    else:
        model = _served(repository, name + EXPLAINER_SUFFIX, request.model_version)
    input_spec = model.signature.inputs_by_name.get(INPUT)
    if input_spec is None or input_spec.datatype != "FP32":
        raise InvalidInput(f"model '{model.name}' has no FP32 input named '{INPUT}'")
    item = await asyncio.to_thread(read_input, request, input_spec.model_dims)
    labels = model.signature.outputs_by_name["probabilities"].labels
    response = ex.ExplainResponse(
        model_name=name,
        model_version=model.version,
        model_input=item.pixels.astype("<f4").tobytes(),
        model_input_shape=item.pixels.shape,
    )
    if request.predictions_only:
        out = _outputs(
            await model.infer(_infer_request(model, item.pixels, None, ["probabilities"]))
        )
        probs = out["probabilities"][0]
        for index in np.argsort(-probs, kind="stable")[:top_k]:
            response.predictions.append(_prediction(probs, int(index), labels))
        return response

    wanted = ["cam", "probabilities", "explained_class"]
    if request.feature_maps:
        wanted.append("activations")
    targets = [int(t) for t in request.target_classes] or [-1]
    first = _outputs(await model.infer(_infer_request(model, item.pixels, targets, wanted)))
    probs = first["probabilities"][0]
    ranked = [int(i) for i in np.argsort(-probs, kind="stable")[:top_k]]
    for index in ranked:
        response.predictions.append(_prediction(probs, index, labels))
    cams = [first["cam"][i] for i in range(len(targets))]
    explained = [int(c) for c in first["explained_class"].reshape(-1)]
    if not request.target_classes and len(ranked) > 1:
        # The top class is explained; the runners-up go in one more (batched) request.
        rest = _outputs(await model.infer(_infer_request(model, item.pixels, ranked[1:], ["cam"])))
        cams.extend(rest["cam"])
        explained.extend(ranked[1:])
    pictures = await asyncio.to_thread(
        _draw, item, cams, first.get("activations"), bool(request.feature_maps)
    )
    for cam, index, overlay in zip(cams, explained, pictures.overlays, strict=True):
        response.explanations.append(
            ex.Explanation(
                target=_prediction(probs, index, labels),
                heatmap=np.ascontiguousarray(cam, dtype="<f4").tobytes(),
                heatmap_shape=cam.shape,
                overlay_png=overlay,
            )
        )
    if pictures.feature_maps:
        response.feature_maps_png = pictures.feature_maps
    layer = model.config.parameters.get("target_layer")
    if layer is not None:
        response.target_layer = layer.string_value
    return response


@dataclass
class _Pictures:
    overlays: list[bytes]
    feature_maps: bytes


def _draw(
    item: ModelInput, cams: list[np.ndarray], activations: np.ndarray | None, grid: bool
) -> _Pictures:
    overlays = [overlay_png(item.original, cam) for cam in cams]
    maps = feature_grid_png(activations[0]) if grid and activations is not None else b""
    return _Pictures(overlays, maps)
