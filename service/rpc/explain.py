"""The Explain RPC's messages: an `ExplainRequest` into the pipeline's query, its result back out.

Every `explain_pb2` message is built here; the pipeline (`explain/pipeline.py`) sees dataclasses.
"""

from __future__ import annotations

import numpy as np

import modelrepo
from pb import explain_pb2 as ex
from pb import grpc_service_pb2 as pb

from ..explain.pipeline import (
    PER_CLASS,
    SHARED,
    ExplainOptions,
    ExplainQuery,
    ExplainResult,
    Prediction,
    RawTensor,
)

_POLARITY = {ex.POLARITY_AUTO: "auto", ex.POLARITY_AS_IS: "as_is", ex.POLARITY_INVERT: "invert"}
_SCALES = {ex.HEATMAP_SCALE_PER_CLASS: PER_CLASS, ex.HEATMAP_SCALE_SHARED: SHARED}
_SCALE_ENUMS = {name: value for value, name in _SCALES.items()}


def explain_query(request: ex.ExplainRequest) -> ExplainQuery:
    """The pipeline's query for one ExplainRequest (no validation: the pipeline does it)."""
    which = request.WhichOneof("input")
    tensor = None
    if which == "tensor":
        tensor = RawTensor(tuple(int(d) for d in request.tensor.shape), request.tensor.data)
    return ExplainQuery(
        model=request.model_name,
        version=request.model_version,
        image=request.image if which == "image" else None,
        tensor=tensor,
        target_classes=tuple(int(t) for t in request.target_classes),
        top_k=int(request.top_k),
        options=ExplainOptions(
            predictions_only=request.predictions_only,
            feature_maps=request.feature_maps,
            polarity=_POLARITY.get(request.polarity, "auto"),
            annotated=request.annotated,
            heatmap_scale=_SCALES.get(request.heatmap_scale, PER_CLASS),
        ),
        method=request.method,
        ig_steps=int(request.ig_steps),
    )


def _prediction(prediction: Prediction) -> ex.Prediction:
    return ex.Prediction(
        class_index=prediction.class_index,
        label=prediction.label,
        probability=prediction.probability,
    )


def explain_response(result: ExplainResult) -> ex.ExplainResponse:
    """The ExplainResponse for a pipeline result (tensors as little-endian FP32 bytes)."""
    response = ex.ExplainResponse(
        model_name=result.model,
        model_version=result.version,
        model_input=result.model_input.astype("<f4").tobytes(),
        model_input_shape=result.model_input.shape,
        predictions=[_prediction(p) for p in result.predictions],
        warnings=result.warnings,
        inverted=result.inverted,
        heatmap_scale=_SCALE_ENUMS[result.heatmap_scale],
        method=result.method,
        ig_steps=result.ig_steps,
    )
    for explanation in result.explanations:
        heatmap = explanation.heatmap
        response.explanations.append(
            ex.Explanation(
                target=_prediction(explanation.target),
                heatmap=np.ascontiguousarray(heatmap, dtype="<f4").tobytes(),
                heatmap_shape=heatmap.shape,
                overlay_png=explanation.overlay_png,
                annotated_png=explanation.annotated_png,
            )
        )
    if result.feature_maps_png:
        response.feature_maps_png = result.feature_maps_png
    if result.target_layer is not None:
        response.target_layer = result.target_layer
    return response


def method_parameters(request: pb.ModelInferRequest) -> dict[str, object]:
    """The explanation-method parameters of a ModelInferRequest (`method`, `ig_steps`), decoded."""
    decoded: dict[str, object] = {}
    for name in (modelrepo.METHOD, modelrepo.IG_STEPS):
        if name in request.parameters:
            parameter = request.parameters[name]
            which = parameter.WhichOneof("parameter_choice")
            decoded[name] = getattr(parameter, which) if which else None
    return decoded
