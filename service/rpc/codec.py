"""The one place where protocol tensors become numpy arrays and back.

Inputs arrive as `raw_input_contents` (little-endian, row-major bytes) or typed `contents`; the
protocol-neutral checks (datatype, shape, size, names, values) live in `core.tensors`, which the
HTTP front shares; this module only reads and writes the protobuf fields.
Outputs leave as `raw_output_contents`, which is what tritonclient's `as_numpy()` reads.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pb import grpc_service_pb2 as pb

from ..core.errors import InvalidInput, shorten
from ..core.shared_memory import SharedMemoryRegistry
from ..core.signature import DecodedRequest, RequestedOutput, Signature
from ..core.tensors import (
    CLASSIFICATION,
    InputTensor,
    OutputRequest,
    decode_inputs,
    prepare_outputs,
    select_outputs,
)
from .shared_memory_io import input_buffers

# Which typed `contents` field carries each datatype (narrow integers travel widened).
CONTENTS_FIELDS: dict[str, str] = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def decode_request(
    request: pb.ModelInferRequest, sig: Signature, shm: SharedMemoryRegistry | None = None
) -> DecodedRequest:
    """Validate a ModelInferRequest against the model signature and turn it into arrays."""
    fast = _decode_plain(request, sig)  # the common request; never one with shared memory
    if fast is not None:
        return fast
    tensors = request.inputs
    raw = input_buffers(request, shm)  # inputs in shared-memory regions are read from there
    if raw and len(raw) != len(tensors):
        raise InvalidInput(
            f"raw_input_contents has {len(raw)} entries but inputs has {len(tensors)}; "
            "send one raw entry per input, in the same order"
        )
    plain: list[InputTensor] = []
    for index, tensor in enumerate(tensors):
        shape = tuple(tensor.shape)
        data = raw[index] if raw else None
        if data is not None:
            if tensor.HasField("contents"):
                raise InvalidInput(
                    f"input '{shorten(tensor.name)}': data given both in contents and "
                    "raw_input_contents"
                )
            plain.append(
                InputTensor(
                    tensor.name,
                    tensor.datatype,
                    shape,
                    raw=data,
                    where=f"raw_input_contents[{index}]",
                )
            )
            continue
        field_name = CONTENTS_FIELDS.get(tensor.datatype)
        if field_name is None:
            plain.append(
                InputTensor(
                    tensor.name,
                    tensor.datatype,
                    shape,
                    missing=f"{tensor.datatype} has no typed contents field; send it in "
                    "raw_input_contents",
                )
            )
            continue
        values = getattr(tensor.contents, field_name)
        plain.append(
            InputTensor(
                tensor.name, tensor.datatype, shape, values=values, where=f"contents.{field_name}"
            )
        )
    arrays, batch = decode_inputs(plain, sig)
    return DecodedRequest(arrays, batch, requested_outputs(request, sig))


@dataclass(frozen=True)
class _Plain:
    """What the common request of a signature looks like, to check it in a few comparisons."""

    name: str
    datatype: str
    dims: tuple[int, ...]
    item_bytes: int
    dtype: np.dtype[Any]
    max_batch_size: int
    outputs: tuple[RequestedOutput, ...]


_PLAIN: dict[int, tuple[Signature, _Plain | None]] = {}


def _plain_form(sig: Signature) -> _Plain | None:
    """The signature's plain form (cached): one batched input of fixed dims, no reshape and no
    value range; None when the model has no such form."""
    cached = _PLAIN.get(id(sig))
    if cached is not None and cached[0] is sig:
        return cached[1]
    plain = None
    if sig.batching and len(sig.inputs) == 1:
        spec = sig.inputs[0]
        if (
            spec.value_range is None
            and spec.model_dims == spec.dims
            and min(spec.dims, default=1) > 0
        ):
            item_bytes = math.prod(spec.dims) * spec.dtype.itemsize
            outputs = tuple(RequestedOutput(out) for out in sig.outputs)
            plain = _Plain(
                spec.name,
                spec.datatype,
                spec.dims,
                item_bytes,
                spec.dtype,
                sig.max_batch_size,
                outputs,
            )
    if len(_PLAIN) >= 256:  # signatures of unloaded versions: drop them all now and then
        _PLAIN.clear()
    _PLAIN[id(sig)] = (sig, plain)
    return plain


def _decode_plain(request: pb.ModelInferRequest, sig: Signature) -> DecodedRequest | None:
    """The common request (one raw input of the model's item shape, every output wanted),
    decoded without the general checks; None for anything else, which the general path checks
    and, when wrong, explains. Gives what the general path would give."""
    plain = _plain_form(sig)
    if plain is None or request.outputs:
        return None
    tensors, raw = request.inputs, request.raw_input_contents
    if len(tensors) != 1 or len(raw) != 1:
        return None
    tensor, data = tensors[0], raw[0]
    shape = tuple(tensor.shape)
    if (
        len(shape) != len(plain.dims) + 1
        or tensor.name != plain.name
        or tensor.datatype != plain.datatype
        or shape[1:] != plain.dims
        or not 1 <= shape[0] <= plain.max_batch_size
        or len(data) != shape[0] * plain.item_bytes
        or tensor.HasField("contents")
        or tensor.parameters  # e.g. a shared-memory region: the general path reads it
    ):
        return None
    array = np.frombuffer(data, dtype=plain.dtype).reshape(shape)
    return DecodedRequest({plain.name: array}, shape[0], list(plain.outputs))


def requested_outputs(request: pb.ModelInferRequest, sig: Signature) -> list[RequestedOutput]:
    """The outputs a request asks for (all, when it names none), checked against the model."""
    named: list[OutputRequest] = []
    for out in request.outputs:
        classes = 0
        if CLASSIFICATION in out.parameters:
            param = out.parameters[CLASSIFICATION]
            kind = param.WhichOneof("parameter_choice")
            classes = (
                param.int64_param
                if kind == "int64_param"
                else (param.uint64_param if kind == "uint64_param" else 0)
            )
            if classes < 1:
                raise InvalidInput(
                    f"output '{shorten(out.name)}': parameter 'classification' must be an "
                    "integer >= 1"
                )
        named.append(OutputRequest(out.name, classes))
    return select_outputs(named, sig)


def encode_response(
    request: pb.ModelInferRequest,
    version: str,
    outputs: Mapping[str, np.ndarray],
    wanted: Sequence[RequestedOutput],
    batching: bool,
) -> pb.ModelInferResponse:
    """Build the ModelInferResponse with the wanted outputs in raw_output_contents."""
    response = pb.ModelInferResponse(
        model_name=request.model_name, model_version=version, id=request.id
    )
    for out in prepare_outputs(outputs, wanted, batching):
        response.outputs.add(name=out.name, datatype=out.datatype, shape=out.shape)
        if out.strings is not None:
            data = encode_bytes_tensor(out.strings)
        else:
            assert out.array is not None
            data = out.array.tobytes()
        response.raw_output_contents.append(data)
    return response


def encode_bytes_tensor(items: Sequence[str | bytes]) -> bytes:
    """A raw BYTES tensor: each element preceded by its 4-byte little-endian length."""
    parts: list[bytes] = []
    for item in items:
        encoded = item.encode() if isinstance(item, str) else item
        parts.append(struct.pack("<I", len(encoded)) + encoded)
    return b"".join(parts)


def decode_bytes_tensor(data: bytes) -> list[bytes]:
    """Split a raw BYTES tensor (4-byte little-endian length before each element)."""
    items: list[bytes] = []
    offset = 0
    while offset < len(data):
        (length,) = struct.unpack_from("<I", data, offset)
        offset += 4
        items.append(data[offset : offset + length])
        offset += length
    return items
