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
    region = parameters.get(REGION)
    size = parameters.get(BYTE_SIZE)
    offset = parameters.get(OFFSET)
    if region is None:
        if size is not None or offset is not None:
            raise InvalidInput(f"{what}: {BYTE_SIZE}/{OFFSET} given without {REGION}")
        return None
    if region.WhichOneof("parameter_choice") != "string_param":
        raise InvalidInput(f"{what}: parameter {REGION} must be a string")
    if size is None:
        raise InvalidInput(f"{what}: {REGION} needs {BYTE_SIZE}")
    return (
        region.string_param,
        _integer(size, BYTE_SIZE, what),
        0 if offset is None else _integer(offset, OFFSET, what),
    )


def _integer(param: pb.InferParameter, key: str, what: str) -> int:
    kind = param.WhichOneof("parameter_choice")
    if kind == "int64_param":
        value = param.int64_param
    elif kind == "uint64_param":
        value = param.uint64_param
    else:
        raise InvalidInput(f"{what}: parameter {key} must be an integer")
    if value < 0:
        raise InvalidInput(f"{what}: parameter {key} must not be negative")
    return int(value)


def input_buffers(
    request: pb.ModelInferRequest, registry: SharedMemoryRegistry | None
) -> Sequence[bytes | None]:
    """Each input's raw bytes, in input order: from its region, its raw entry, or None (contents).

    raw_input_contents then holds entries only for the inputs that are not in shared memory.
    """
    if registry is None or not any(t.parameters and REGION in t.parameters for t in request.inputs):
        return request.raw_input_contents
    raw = list(request.raw_input_contents)
    in_regions = 0
    buffers: list[bytes | None] = []
    for tensor in request.inputs:
        what = f"input '{tensor.name}'"
        place = _location(tensor.parameters, what) if tensor.parameters else None
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


Placements = dict[str, tuple[str, int, int]]  # output name -> (region, byte size, offset)


def output_placements(request: pb.ModelInferRequest) -> Placements:
    """The outputs wanted in shared memory, parsed (and refused when malformed) before the run."""
    placements: Placements = {}
    for out in request.outputs:
        if out.parameters:
            place = _location(out.parameters, f"output '{out.name}'")
            if place is not None:
                placements[out.name] = place
    return placements


def place_outputs(
    response: pb.ModelInferResponse,
    placements: Placements,
    registry: SharedMemoryRegistry | None,
) -> None:
    """Move the outputs wanted in shared memory from the response into their regions."""
    if not placements or registry is None:
        return
    for index, tensor in enumerate(response.outputs):
        place = placements.get(tensor.name)
        if place is None:
            continue
        region, size, offset = place
        what = f"output '{tensor.name}'"
        data = response.raw_output_contents[index]
        if len(data) > size:
            raise InvalidInput(
                f"{what}: {len(data)} bytes do not fit the {size} bytes given by {BYTE_SIZE}"
            )
        registry.write(region, offset, data, what)
        response.raw_output_contents[index] = b""
