"""Each front turns its explain request into the same ExplainQuery: method, ig_steps, annotated,
heatmap_scale from the HTTP query string, the HTTP JSON body and the gRPC ExplainRequest."""

from __future__ import annotations

import base64
import json
import re

import pytest

from pb import explain_pb2 as ex
from service.core.errors import InvalidInput
from service.explain.pipeline import ExplainOptions, ExplainQuery
from service.rest.explain import explain_query as http_query
from service.rpc.explain import explain_query as grpc_query

PNG = b"\x89PNG picture bytes"
WANTED = ExplainQuery(
    model="mnist_cnn",
    image=PNG,
    top_k=2,
    options=ExplainOptions(annotated=True, heatmap_scale="shared"),
    method="integrated_gradients",
    ig_steps=8,
)


def test_every_front_reads_the_same_options() -> None:
    string = b"top_k=2&method=integrated_gradients&ig_steps=8&annotated=true&heatmap_scale=shared"
    from_string, _ = http_query("mnist_cnn", "", PNG, "image/png", string)
    document = {
        "image": base64.b64encode(PNG).decode(),
        "top_k": 2,
        "method": "integrated_gradients",
        "ig_steps": 8,
        "annotated": True,
        "heatmap_scale": "shared",
    }
    from_json, _ = http_query(
        "mnist_cnn", "", json.dumps(document).encode(), "application/json", b""
    )
    request = ex.ExplainRequest(
        model_name="mnist_cnn",
        image=PNG,
        top_k=2,
        method="integrated_gradients",
        ig_steps=8,
        annotated=True,
        heatmap_scale=ex.HEATMAP_SCALE_SHARED,
    )
    assert from_string == from_json == grpc_query(request) == WANTED


def test_the_defaults_are_the_grpc_defaults() -> None:
    query, _ = http_query("mnist_cnn", "", PNG, "image/png", b"")
    assert query == grpc_query(ex.ExplainRequest(model_name="mnist_cnn", image=PNG))
    assert (query.method, query.ig_steps, query.options.heatmap_scale) == ("", 0, "per_class")
    assert query.options.annotated is False


@pytest.mark.parametrize(
    ("string", "document", "message"),
    [
        (b"ig_steps=8.5", None, "'ig_steps' must be an integer"),
        (
            b"heatmap_scale=Shared",
            None,
            "'heatmap_scale' must be one of per_class, shared, not 'Shared'",
        ),
        (b"annotated=2", None, "'annotated' must be true or false"),
        (b"", {"method": None}, "'method' must be a string (a method name), not null"),
        (b"", {"method": ["hirescam"]}, "not a JSON array"),
        (b"", {"heatmap_scale": 1}, "not a JSON number"),
        (b"", {"ig_steps": True}, "'ig_steps' must be an integer"),
    ],
)
def test_bad_options_are_named(
    string: bytes, document: dict[str, object] | None, message: str
) -> None:
    body, kind = PNG, "image/png"
    if document is not None:
        body, kind = (
            json.dumps({"image": base64.b64encode(PNG).decode(), **document}).encode(),
            "application/json",
        )
    with pytest.raises(InvalidInput, match=re.escape(message)):
        http_query("mnist_cnn", "", body, kind, string)
