"""KServe v2 REST infer bodies: JSON tensors and the binary tensor data extension, both ways.

A request body is a JSON header, optionally followed by raw tensor bytes: the header's length is
`Inference-Header-Content-Length`, and each input with `parameters.binary_data_size` takes that
many bytes of the rest, in input order. Every length is checked against the body before any slice
or array is made; the tensor checks themselves are the core's (`core.tensors`), shared with gRPC.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..core.errors import InvalidInput, shorten
from ..core.signature import DecodedRequest, RequestedOutput, Signature
from ..core.tensors import (
    CLASSIFICATION,
    InputTensor,
    OutputRequest,
    decode_inputs,
    prepare_outputs,
    select_outputs,
)

HEADER_LENGTH = "inference-header-content-length"
BINARY_DATA_SIZE = "binary_data_size"
BINARY_DATA = "binary_data"
BINARY_DATA_OUTPUT = "binary_data_output"
TIMEOUT = "timeout"  # request parameter, microseconds (Triton's)
MAX_DIMS = 64  # a shape longer than this is refused before it is looked at


@dataclass
class HttpInferRequest:
    """A decoded infer request: arrays for the core, and how the client wants the answer."""

    decoded: DecodedRequest
    id: str = ""
    binary_outputs: dict[str, bool] = field(default_factory=dict)
    timeout_s: float | None = None


def parse_json(data: bytes | memoryview, what: str = "request body") -> Any:
    """JSON text to Python objects; InvalidInput (not a 500) when it is not valid JSON."""
    try:
        return json.loads(bytes(data))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise InvalidInput(f"{what} is not valid JSON: {shorten(str(exc))}") from None


def split_body(body: bytes, header_length: str | None) -> tuple[Any, memoryview]:
    """The JSON header (parsed) and the binary tail of an infer body."""
    view = memoryview(body)
    if header_length is None:
        return parse_json(view), view[len(view) :]
    try:
        length = int(header_length)
    except ValueError:
        raise InvalidInput(
            f"Inference-Header-Content-Length '{shorten(header_length)}' is not an integer"
        ) from None
    if not 0 < length <= len(body):
        raise InvalidInput(
            f"Inference-Header-Content-Length {shorten(str(length))} does not fit a body of "
            f"{len(body)} bytes"
        )
    return parse_json(view[:length], "inference header"), view[length:]


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidInput(f"{what} must be a JSON object")
    return value


def _list(value: Any, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise InvalidInput(f"{what} must be a JSON array")
    return value


def _string(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise InvalidInput(f"{what} must be a string")
    return value


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"{what} must be an integer")
    return value


def _flag(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidInput(f"{what} must be true or false")
    return value


def flatten(data: Any) -> list[Any]:
    """Nested JSON arrays flattened in row-major order (a scalar is a list of one)."""
    if not isinstance(data, list):
        return [data]
    if all(not isinstance(item, list) for item in data):
        return data
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:  # no recursion: the depth is the client's
        item = next(stack[-1], _END)
        if item is _END:
            stack.pop()
        elif isinstance(item, list):
            stack.append(iter(item))
        else:
            flat.append(item)
    return flat


_END = object()


def decode_infer(header: Any, binary: memoryview, sig: Signature) -> HttpInferRequest:
    """Validate a v2 infer request (header + binary tail) against the signature."""
    header = _object(header, "the inference request")
    params = _object(header.get("parameters", {}), "parameters")
    request_id = header.get("id", "")
    request_id = _string(request_id, "id")
    timeout_s = None
    if TIMEOUT in params:
        micros = params[TIMEOUT]
        if isinstance(micros, bool) or not isinstance(micros, int | float) or not micros > 0:
            raise InvalidInput("parameter 'timeout' must be a positive number of microseconds")
        timeout_s = min(float(micros) / 1e6, 1e9)
    default_binary = _flag(
        params.get(BINARY_DATA_OUTPUT, False), f"parameter '{BINARY_DATA_OUTPUT}'"
    )
    inputs = _list(header.get("inputs"), "inputs")
    tensors: list[InputTensor] = []
    offset = 0
    for index, item in enumerate(inputs):
        item = _object(item, f"inputs[{index}]")
        name = _string(item.get("name"), f"inputs[{index}].name")
        label = f"input '{shorten(name)}'"
        datatype = _string(item.get("datatype"), f"{label}: datatype")
        shape = _list(item.get("shape"), f"{label}: shape")
        if len(shape) > MAX_DIMS:
            raise InvalidInput(f"{label}: shape has {len(shape)} dims")
        dims = tuple(_int(d, f"{label}: every shape entry") for d in shape)
        tensor_params = _object(item.get("parameters", {}), f"{label}: parameters")
        if BINARY_DATA_SIZE in tensor_params:
            size = _int(tensor_params[BINARY_DATA_SIZE], f"{label}: binary_data_size")
            if "data" in item:
                raise InvalidInput(f"{label}: data given both in JSON and as binary data")
            if size < 0 or size > len(binary) - offset:
                raise InvalidInput(
                    f"{label}: binary_data_size {shorten(str(size))} exceeds the "
                    f"{len(binary) - offset} bytes of binary data left in the body"
                )
            raw = binary[offset : offset + size]
            offset += size
            tensors.append(
                InputTensor(name, datatype, dims, raw=raw, where=f"binary data ({size} bytes)")
            )
            continue
        if "data" not in item:
            tensors.append(
                InputTensor(
                    name, datatype, dims, missing="no data: give 'data' or binary_data_size"
                )
            )
            continue
        values = flatten(item["data"])  # as many leaves as the parsed body holds, no more
        tensors.append(InputTensor(name, datatype, dims, values=values, where="data"))
    if offset != len(binary):
        raise InvalidInput(
            f"the body holds {len(binary)} bytes of binary data but the inputs' binary_data_size "
            f"add up to {offset}"
        )
    arrays, batch = decode_inputs(tensors, sig)
    wanted, binary_outputs = _outputs(header, sig, default_binary)
    return HttpInferRequest(
        DecodedRequest(arrays, batch, wanted), request_id, binary_outputs, timeout_s
    )


def _outputs(
    header: dict[str, Any], sig: Signature, default_binary: bool
) -> tuple[list[RequestedOutput], dict[str, bool]]:
    outputs = _list(header.get("outputs", []), "outputs")
    named: list[OutputRequest] = []
    binary: dict[str, bool] = {}
    for index, item in enumerate(outputs):
        item = _object(item, f"outputs[{index}]")
        name = _string(item.get("name"), f"outputs[{index}].name")
        params = _object(item.get("parameters", {}), f"output '{shorten(name)}': parameters")
        classes = 0
        if CLASSIFICATION in params:
            classes = _int(params[CLASSIFICATION], f"output '{shorten(name)}': classification")
            if classes < 1:
                raise InvalidInput(
                    f"output '{shorten(name)}': parameter 'classification' must be an integer >= 1"
                )
        if BINARY_DATA in params:
            binary[name] = _flag(params[BINARY_DATA], f"output '{shorten(name)}': binary_data")
        named.append(OutputRequest(name, classes))
    wanted = select_outputs(named, sig)
    return wanted, {w.spec.name: binary.get(w.spec.name, default_binary) for w in wanted}


def encode_infer(
    model: str,
    version: str,
    request: HttpInferRequest,
    outputs: Mapping[str, np.ndarray],
    batching: bool,
) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when binary outputs follow it."""
    described: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for out in prepare_outputs(outputs, request.decoded.outputs, batching):
        entry: dict[str, Any] = {
            "name": out.name,
            "datatype": out.datatype,
            "shape": list(out.shape),
        }
        if request.binary_outputs.get(out.name, False):
            if out.strings is not None:
                data = _bytes_tensor(out.strings)
            else:
                assert out.array is not None
                data = out.array.tobytes()
            entry["parameters"] = {BINARY_DATA_SIZE: len(data)}
            chunks.append(data)
        elif out.strings is not None:
            entry["data"] = out.strings
        else:
            assert out.array is not None
            entry["data"] = out.array.ravel().tolist()
        described.append(entry)
    answer: dict[str, Any] = {"model_name": model, "model_version": version}
    if request.id:
        answer["id"] = request.id
    answer["outputs"] = described
    head = json.dumps(answer, separators=(",", ":")).encode()
    if not chunks:
        return head, None
    return b"".join([head, *chunks]), len(head)


def _bytes_tensor(items: Sequence[str]) -> bytes:
    """BYTES elements, each after its 4-byte little-endian length (the binary extension)."""
    parts: list[bytes] = []
    for item in items:
        encoded = item.encode()
        parts.append(len(encoded).to_bytes(4, "little") + encoded)
    return b"".join(parts)
