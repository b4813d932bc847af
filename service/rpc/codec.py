"""The one place where protocol tensors become numpy arrays and back.

Inputs arrive as `raw_input_contents` (little-endian, row-major bytes) or typed `contents`; every
datatype, shape, size, name and value check happens here, with a message naming the field.
Outputs leave as `raw_output_contents`, which is what tritonclient's `as_numpy()` reads.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence

import numpy as np

from pb import grpc_service_pb2 as pb

from ..core.errors import InvalidInput, shorten
from ..core.shared_memory import SharedMemoryRegistry
from ..core.signature import (
    DecodedRequest,
    RequestedOutput,
    Signature,
    TensorSpec,
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

CLASSIFICATION = "classification"


def decode_request(
    request: pb.ModelInferRequest, sig: Signature, shm: SharedMemoryRegistry | None = None
) -> DecodedRequest:
    """Validate a ModelInferRequest against the model signature and turn it into arrays."""
    tensors = request.inputs
    raw = input_buffers(request, shm)  # inputs in shared-memory regions are read from there
    if raw and len(raw) != len(tensors):
        raise InvalidInput(
            f"raw_input_contents has {len(raw)} entries but inputs has {len(tensors)}; "
            "send one raw entry per input, in the same order"
        )
    names = [t.name for t in tensors]
    if len(names) != len(sig.inputs) or set(names) != sig.inputs_by_name.keys():
        _explain_input_names(names, sig)
    batch = -1
    arrays: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(tensors):
        spec = sig.inputs_by_name[tensor.name]
        if tensor.datatype != spec.datatype:
            raise InvalidInput(
                f"input '{spec.name}': datatype {tensor.datatype or '(empty)'} does not match "
                f"the model's {spec.datatype}"
            )
        shape = tuple(tensor.shape)
        if sig.batching:
            if not shape or not spec.accepts(shape[1:]):
                raise InvalidInput(
                    f"input '{spec.name}': shape {list(shape)} does not match the model's "
                    f"{[-1, *spec.dims]}"
                )
            n = shape[0]
            if n < 1:
                raise InvalidInput(f"input '{spec.name}': batch size {n} must be at least 1")
            if n > sig.max_batch_size:
                raise InvalidInput(
                    f"input '{spec.name}': batch size {n} exceeds the model's max_batch_size "
                    f"{sig.max_batch_size}"
                )
            if batch != -1 and n != batch:
                raise InvalidInput(
                    f"input '{spec.name}': batch size {n} differs from the other inputs' {batch}"
                )
            batch = n
        elif not spec.accepts(shape):
            raise InvalidInput(
                f"input '{spec.name}': shape {list(shape)} does not match the model's "
                f"{list(spec.dims)}"
            )
        if any(d < 0 for d in shape):
            raise InvalidInput(f"input '{spec.name}': shape {list(shape)} has a negative dim")
        count = math.prod(shape)
        if raw and raw[index] is not None:
            if tensor.HasField("contents"):
                raise InvalidInput(
                    f"input '{spec.name}': data given both in contents and raw_input_contents"
                )
            data = raw[index]
            assert data is not None
            expected = count * spec.dtype.itemsize
            if len(data) != expected:
                raise InvalidInput(
                    f"input '{spec.name}': raw_input_contents[{index}] holds {len(data)} bytes "
                    f"but shape {list(shape)} of {spec.datatype} needs {expected}"
                )
            array = np.frombuffer(data, dtype=spec.dtype)
        else:
            array = _from_contents(tensor, spec, count)
        if spec.value_range is not None and count:
            low, high = spec.value_range
            if array.min() < low or array.max() >= high:
                raise InvalidInput(
                    f"input '{spec.name}': values must lie in [{low}, {high - 1}]; "
                    f"got {array.min()}..{array.max()}"
                )
        # Inside the server every array is batch-first; a model without a batch dim gets 1.
        item = shape[1:] if sig.batching else shape
        target = (max(batch, 1), *_resolve(spec.model_dims, item))
        if not _fills(count, target):
            raise InvalidInput(
                f"input '{spec.name}': shape {list(shape)} holds {count} values, which the "
                f"model's reshape to {list(spec.model_dims)} cannot take"
            )
        arrays[spec.name] = array.reshape(target)
    return DecodedRequest(arrays, max(batch, 1), requested_outputs(request, sig))


def _explain_input_names(names: list[str], sig: Signature) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise InvalidInput(f"input '{shorten(name)}' is given more than once")
        seen.add(name)
        if name not in sig.inputs_by_name:
            raise InvalidInput(
                f"unknown input '{shorten(name)}'; the model's inputs are: "
                f"{', '.join(sig.inputs_by_name)}"
            )
    missing = [n for n in sig.inputs_by_name if n not in seen]
    raise InvalidInput(f"missing input(s): {', '.join(missing)}")


def _resolve(model_dims: tuple[int, ...], wire_item: Sequence[int]) -> tuple[int, ...]:
    """Model dims with variable (-1) entries filled in from the wire shape."""
    if -1 not in model_dims:
        return model_dims
    if len(model_dims) == len(wire_item):
        return tuple(w if d == -1 else d for d, w in zip(model_dims, wire_item, strict=True))
    return model_dims  # reshape with a variable dim: numpy infers the one -1


def _fills(count: int, shape: tuple[int, ...]) -> bool:
    """Whether `count` values fill `shape` exactly, one -1 taking the rest (as numpy reshapes)."""
    known = math.prod(d for d in shape if d != -1)
    variable = shape.count(-1)
    if variable == 0:
        return count == known
    return variable == 1 and known > 0 and count % known == 0


def _from_contents(
    tensor: pb.ModelInferRequest.InferInputTensor, spec: TensorSpec, count: int
) -> np.ndarray:
    field_name = CONTENTS_FIELDS.get(spec.datatype)
    if field_name is None:
        raise InvalidInput(
            f"input '{spec.name}': {spec.datatype} has no typed contents field; "
            "send it in raw_input_contents"
        )
    values = getattr(tensor.contents, field_name)
    if len(values) != count:
        raise InvalidInput(
            f"input '{spec.name}': contents.{field_name} holds {len(values)} values but shape "
            f"{list(tensor.shape)} needs {count}"
        )
    array = np.asarray(values)
    if spec.dtype.kind in "iu" and count:
        info = np.iinfo(spec.dtype)
        if array.min() < info.min or array.max() > info.max:
            raise InvalidInput(
                f"input '{spec.name}': contents.{field_name} has values outside {spec.datatype}"
            )
    return array.astype(spec.dtype, copy=False)


def requested_outputs(request: pb.ModelInferRequest, sig: Signature) -> list[RequestedOutput]:
    """The outputs a request asks for (all, when it names none), checked against the model."""
    if not request.outputs:
        return [RequestedOutput(spec) for spec in sig.outputs]
    if len(request.outputs) > len(sig.outputs):
        raise InvalidInput(
            f"{len(request.outputs)} outputs requested; the model has {len(sig.outputs)}: "
            f"{', '.join(sig.outputs_by_name)}"
        )
    wanted: list[RequestedOutput] = []
    seen: set[str] = set()
    for out in request.outputs:
        spec = sig.outputs_by_name.get(out.name)
        if spec is None:
            raise InvalidInput(
                f"unknown output '{shorten(out.name)}' requested; the model's outputs are: "
                f"{', '.join(sig.outputs_by_name)}"
            )
        if out.name in seen:
            raise InvalidInput(f"output '{out.name}' is requested more than once")
        seen.add(out.name)
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
                    f"output '{out.name}': parameter 'classification' must be an integer >= 1"
                )
            if len(spec.model_dims) != 1:
                raise InvalidInput(
                    f"output '{out.name}': classification needs a vector output per item"
                )
        wanted.append(RequestedOutput(spec, classes))
    return wanted


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
    for want in wanted:
        spec = want.spec
        array = outputs[spec.name]
        if want.classes:
            data, shape = _classify(array, want.classes, spec.labels, batching)
            response.outputs.add(name=spec.name, datatype="BYTES", shape=shape)
        else:
            shape = _wire_shape(spec, array.shape, batching)
            response.outputs.add(name=spec.name, datatype=spec.datatype, shape=shape)
            data = array.tobytes()
        response.raw_output_contents.append(data)
    return response


def _wire_shape(spec: TensorSpec, shape: tuple[int, ...], batching: bool) -> tuple[int, ...]:
    """The protocol shape of a batch-first output (no leading dim for a model without one)."""
    lead = shape[:1] if batching else ()
    if spec.dims == spec.model_dims:
        return lead + shape[1:]
    if -1 not in spec.dims:
        return lead + spec.dims
    known = int(np.prod([d for d in spec.dims if d != -1], dtype=np.int64))
    items = int(np.prod(shape[1:], dtype=np.int64))
    return lead + tuple(items // max(known, 1) if d == -1 else d for d in spec.dims)


def _classify(
    array: np.ndarray, k: int, labels: Sequence[str], batching: bool
) -> tuple[bytes, tuple[int, ...]]:
    """Top-k as Triton's classification extension: BYTES "value:index[:label]" per class."""
    rows = array.reshape(array.shape[0], -1)
    k = min(k, rows.shape[-1])
    top = np.argsort(-rows, axis=1, kind="stable")[:, :k]
    parts: list[bytes] = []
    for row, indices in zip(rows, top, strict=True):
        for i in indices:
            text = f"{float(row[i]):f}:{int(i)}"
            if int(i) < len(labels):
                text += f":{labels[int(i)]}"
            encoded = text.encode()
            parts.append(struct.pack("<I", len(encoded)) + encoded)
    shape = (rows.shape[0], k) if batching else (k,)
    return b"".join(parts), shape


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
