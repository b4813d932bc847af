"""Explain over HTTP: a picture (the raw body, or base64 in JSON) in; JSON or the overlay PNG out.

`POST /v2/models/{m}[/versions/{v}]/explain` with the PNG or JPEG bytes as the body takes its
options from the query string (`top_k`, `target_class` repeated, `feature_maps`, `polarity`,
`predictions_only`, `method`, `ig_steps`, `annotated`, `heatmap_scale`, `timeout`); with
`Content-Type: application/json` the body is `{"image": base64}` or `{"tensor": {"shape": [...],
"data": base64 FP32}}` with the same options as fields (`timeout` also as `parameters.timeout`,
where infer takes it). `timeout` is in microseconds, as infer's: past it the call answers 503 like
an expired infer, and the picture work and the explainer stop. The answer is JSON (predictions,
the method, warnings, heatmaps as shape + flat values, overlays, annotated overlays and feature
maps as base64 PNG), or, with `Accept: image/png`, the first overlay itself (annotated when
`annotated` was asked). The same pipeline, limits and methods as the gRPC explain API.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any
from urllib.parse import parse_qsl

from ..core.errors import InvalidInput, shorten
from ..explain.pipeline import (
    PER_CLASS,
    SHARED,
    ExplainOptions,
    ExplainQuery,
    ExplainResult,
    Explanation,
    RawTensor,
)
from .codec import TIMEOUT, parse_json

POLARITIES = ("auto", "as_is", "invert")  # as the gRPC explain API
SCALES = (PER_CLASS, SHARED)
_TRUE, _FALSE = ("1", "true", "yes"), ("0", "false", "no", "")


def _flag(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
        return value.lower() in _TRUE
    raise InvalidInput(f"'{name}' must be true or false")


def _integer(value: Any, name: str) -> int:
    if isinstance(value, bool):
        raise InvalidInput(f"'{name}' must be an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.lstrip("-").isdigit() and len(value) < 20:
        return int(value)
    raise InvalidInput(f"'{name}' must be an integer")


def _kind(value: Any) -> str:
    """How an unexpected value reads in an error message: a string shortened, else its type."""
    if isinstance(value, str):
        return f"'{shorten(value)}'"
    if value is None:
        return "null"
    names = {bool: "boolean", int: "number", float: "number", list: "array", dict: "object"}
    return f"a JSON {names.get(type(value), type(value).__name__)}"


def _choice(value: Any, name: str, allowed: tuple[str, ...]) -> str:
    """A string option that takes one of a few words."""
    if not isinstance(value, str) or value not in allowed:
        raise InvalidInput(f"'{name}' must be one of {', '.join(allowed)}, not {_kind(value)}")
    return value


def _text(value: Any, name: str) -> str:
    """A free string option (checked further by the pipeline)."""
    if not isinstance(value, str):
        raise InvalidInput(f"'{name}' must be a string (a method name), not {_kind(value)}")
    return value


def _base64(value: Any, name: str) -> bytes:
    if not isinstance(value, str):
        raise InvalidInput(f"'{name}' must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(f"'{name}' is not valid base64") from None


def _timeout_s(value: Any) -> float:
    """A client's `timeout` in microseconds (as infer's parameter) as seconds."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            value = None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise InvalidInput(f"'{TIMEOUT}' must be a positive number of microseconds")
    return min(float(value) / 1e6, 1e9)


def explain_query(
    model: str, version: str, body: bytes, content_type: str, query_string: bytes
) -> tuple[ExplainQuery, float | None]:
    """The pipeline's query from an HTTP explain request, and the client's timeout in seconds."""
    fields: dict[str, Any] = {}
    targets: list[Any] = []
    for key, value in parse_qsl(query_string.decode("latin-1"), keep_blank_values=True):
        if key == "target_class":
            targets.append(value)
        else:
            fields[key] = value
    image: bytes | None = body
    tensor = None
    if content_type.split(";")[0].strip().lower() == "application/json":
        document = parse_json(body)
        if not isinstance(document, dict):
            raise InvalidInput("the explain request must be a JSON object")
        fields.update(document)
        parameters = document.get("parameters", {})
        if not isinstance(parameters, dict):
            raise InvalidInput("'parameters' must be a JSON object")
        if TIMEOUT in parameters:
            fields[TIMEOUT] = parameters[TIMEOUT]
        if "target_classes" in document:
            if not isinstance(document["target_classes"], list):
                raise InvalidInput("'target_classes' must be a JSON array of integers")
            targets = document["target_classes"]
        image = _base64(document["image"], "image") if "image" in document else None
        if "tensor" in document:
            spec = document["tensor"]
            if not isinstance(spec, dict) or not isinstance(spec.get("shape"), list):
                raise InvalidInput('\'tensor\' must be {"shape": [...], "data": base64}')
            if len(spec["shape"]) > 8:
                raise InvalidInput(f"'tensor.shape' has {len(spec['shape'])} dims")
            shape = tuple(_integer(d, "tensor.shape") for d in spec["shape"])
            tensor = RawTensor(shape, _base64(spec.get("data"), "tensor.data"))
    polarity = str(fields.get("polarity", "auto"))
    if polarity not in POLARITIES:
        raise InvalidInput(
            f"'polarity' must be one of {', '.join(POLARITIES)}, not '{shorten(polarity)}'"
        )
    scale = _choice(fields.get("heatmap_scale", PER_CLASS), "heatmap_scale", SCALES)
    if len(targets) > 1000:
        raise InvalidInput(f"{len(targets)} target classes; at most 1000")
    timeout_s = _timeout_s(fields[TIMEOUT]) if TIMEOUT in fields else None
    query = ExplainQuery(
        model=model,
        version=version,
        image=image if image else None,
        tensor=tensor,
        target_classes=tuple(_integer(t, "target_class") for t in targets),
        top_k=_integer(fields.get("top_k", 0), "top_k"),
        options=ExplainOptions(
            predictions_only=_flag(fields.get("predictions_only", False), "predictions_only"),
            feature_maps=_flag(fields.get("feature_maps", False), "feature_maps"),
            polarity=polarity,
            annotated=_flag(fields.get("annotated", False), "annotated"),
            heatmap_scale=scale,
        ),
        method=_text(fields.get("method", ""), "method"),
        ig_steps=_integer(fields.get("ig_steps", 0), "ig_steps"),
    )
    return query, timeout_s


def explain_json(result: ExplainResult) -> dict[str, Any]:
    """The JSON answer: predictions, explanations (heatmap and base64 overlay), feature maps."""

    def prediction(p: Any) -> dict[str, Any]:
        return {"class_index": p.class_index, "label": p.label, "probability": p.probability}

    def explanation(e: Explanation) -> dict[str, Any]:
        one = {
            "target": prediction(e.target),
            "heatmap": {"shape": list(e.heatmap.shape), "data": e.heatmap.ravel().tolist()},
            "overlay_png": base64.b64encode(e.overlay_png).decode(),
        }
        if e.annotated_png:
            one["annotated_png"] = base64.b64encode(e.annotated_png).decode()
        return one

    answer: dict[str, Any] = {
        "model_name": result.model,
        "model_version": result.version,
        "predictions": [prediction(p) for p in result.predictions],
        "explanations": [explanation(e) for e in result.explanations],
        "warnings": list(result.warnings),
        "inverted": result.inverted,
        "heatmap_scale": result.heatmap_scale,
    }
    if result.method:
        answer["method"] = result.method
    if result.ig_steps:
        answer["ig_steps"] = result.ig_steps
    if result.feature_maps_png:
        answer["feature_maps_png"] = base64.b64encode(result.feature_maps_png).decode()
    if result.target_layer is not None:
        answer["target_layer"] = result.target_layer
    return answer
