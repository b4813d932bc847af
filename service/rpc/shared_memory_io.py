"""Tensor data in shared-memory regions: the input and output parameters of Triton's extension.

An input whose parameters name `shared_memory_region` (with `shared_memory_byte_size` and an
optional `shared_memory_offset`) has no raw_input_contents entry: its bytes are read from the
region. A requested output with the same parameters is written into the region; its
raw_output_contents entry stays empty, so entries keep the outputs' order (as Triton answers).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from pb import grpc_service_pb2 as pb

from ..core.errors import InvalidInput
from ..core.shared_memory import BYTE_SIZE, OFFSET, REGION, SharedMemoryRegistry


def _location(
    parameters: Mapping[str, pb.InferParameter], what: str
) -> tuple[str, int, int] | None:
    """(region, byte size, offset) from a tensor's parameters, or None when it names no region."""
    if REGION not in parameters:
        if BYTE_SIZE in parameters or OFFSET in parameters:
            raise InvalidInput(f"{what}: {BYTE_SIZE}/{OFFSET} given without {REGION}")
        return None
    region = parameters[REGION]
    if region.WhichOneof("parameter_choice") != "string_param":
        raise InvalidInput(f"{what}: parameter {REGION} must be a string")
    if BYTE_SIZE not in parameters:
        raise InvalidInput(f"{what}: {REGION} needs {BYTE_SIZE}")
    return (
        region.string_param,
        _integer(parameters, BYTE_SIZE, what),
        _integer(parameters, OFFSET, what),
    )


def _integer(parameters: Mapping[str, pb.InferParameter], key: str, what: str) -> int:
    if key not in parameters:
        return 0
    param = parameters[key]
    kind = param.WhichOneof("parameter_choice")
    if kind not in ("int64_param", "uint64_param"):
        raise InvalidInput(f"{what}: parameter {key} must be an integer")
    value = int(getattr(param, kind))
    if value < 0:
        raise InvalidInput(f"{what}: parameter {key} must not be negative")
    return value


def uses_shared_memory(request: pb.ModelInferRequest) -> bool:
    """Whether any input or requested output names a shared-memory region."""
    return any(REGION in t.parameters for t in request.inputs) or any(
        REGION in o.parameters for o in request.outputs
    )


def input_buffers(
    request: pb.ModelInferRequest, registry: SharedMemoryRegistry | None
) -> Sequence[bytes | None]:
    """Each input's raw bytes, in input order: from its region, its raw entry, or None (contents).

    raw_input_contents then holds entries only for the inputs that are not in shared memory.
    """
    if registry is None or not any(REGION in t.parameters for t in request.inputs):
        return request.raw_input_contents
    raw = list(request.raw_input_contents)
    in_regions = 0
    buffers: list[bytes | None] = []
    for tensor in request.inputs:
        what = f"input '{tensor.name}'"
        place = _location(tensor.parameters, what)
        if place is None:
            buffers.append(None)
            continue
        if tensor.HasField("contents"):
            raise InvalidInput(f"{what}: data given both in contents and a shared-memory region")
        in_regions += 1
        region, size, offset = place
        buffers.append(registry.read(region, offset, size, what))
    if raw and len(raw) != len(request.inputs) - in_regions:
        raise InvalidInput(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs) - in_regions} "
            "inputs not in shared memory; send one raw entry per such input, in order"
        )
    entries = iter(raw)
    return [b if b is not None else next(entries, None) for b in buffers]


def place_outputs(
    request: pb.ModelInferRequest,
    response: pb.ModelInferResponse,
    registry: SharedMemoryRegistry | None,
) -> None:
    """Move the outputs the request wants in shared memory from the response into their regions."""
    if registry is None:
        return
    wanted = {o.name: o.parameters for o in request.outputs if REGION in o.parameters}
    if not wanted:
        return
    for index, tensor in enumerate(response.outputs):
        parameters = wanted.get(tensor.name)
        if parameters is None:
            continue
        what = f"output '{tensor.name}'"
        place = _location(parameters, what)
        assert place is not None
        region, size, offset = place
        data = response.raw_output_contents[index]
        if len(data) > size:
            raise InvalidInput(
                f"{what}: {len(data)} bytes do not fit the {size} bytes given by {BYTE_SIZE}"
            )
        registry.write(region, offset, data, what)
        response.raw_output_contents[index] = b""
        tensor.parameters[REGION].string_param = region
        tensor.parameters[BYTE_SIZE].int64_param = len(data)
        if offset:
            tensor.parameters[OFFSET].int64_param = offset


def check_outputs(request: pb.ModelInferRequest) -> None:
    """Refuse malformed output region parameters before the request runs."""
    for out in request.outputs:
        _location(out.parameters, f"output '{out.name}'")
