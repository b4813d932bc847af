"""The shared-memory registry: names, keys, every bound, the region limit, unregister in use."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from multiprocessing import shared_memory

import numpy as np
import pytest

from pb import grpc_service_pb2 as pb
from service.core.errors import InvalidInput
from service.core.shared_memory import (
    RegionExists,
    RegionNotFound,
    SharedMemoryRegistry,
    TooManyRegions,
)
from service.rpc.shared_memory_io import input_buffers, output_placements, place_outputs

SIZE = 4096


@pytest.fixture
def block() -> Iterator[shared_memory.SharedMemory]:
    shm = shared_memory.SharedMemory(name=f"cnnserve_test_{uuid.uuid4().hex[:12]}", create=True,
                                     size=SIZE)  # fmt: skip
    try:
        yield shm
    finally:
        shm.close()
        shm.unlink()


@pytest.fixture
def registry() -> Iterator[SharedMemoryRegistry]:
    reg = SharedMemoryRegistry(max_regions=4)
    yield reg
    reg.close()


def test_register_read_write_status_unregister(
    registry: SharedMemoryRegistry, block: shared_memory.SharedMemory
) -> None:
    block.buf[100:104] = b"abcd"
    info = registry.register("r", "/" + block.name, 64, 1024)
    assert (info.key, info.offset, info.byte_size) == ("/" + block.name, 64, 1024)
    assert registry.read("r", 36, 4, "input 'x'") == b"abcd"  # region offset 64 + 36 = 100
    registry.write("r", 0, b"wxyz", "output 'y'")
    assert bytes(block.buf[64:68]) == b"wxyz"
    assert [i.name for i in registry.status()] == ["r"]
    assert registry.status("r")[0].byte_size == 1024
    registry.unregister("r")
    assert registry.status() == []
    with pytest.raises(RegionNotFound):
        registry.status("r")
    with pytest.raises(RegionNotFound):
        registry.unregister("r")


def test_every_bound_is_checked(
    registry: SharedMemoryRegistry, block: shared_memory.SharedMemory
) -> None:
    key = block.name
    with pytest.raises(InvalidInput, match="exceeds object"):
        registry.register("big", key, 0, SIZE + 1)
    with pytest.raises(InvalidInput, match="exceeds object"):
        registry.register("shifted", key, SIZE - 10, 11)
    with pytest.raises(InvalidInput, match="positive"):
        registry.register("empty", key, 0, 0)
    registry.register("r", key, 1000, 100)
    with pytest.raises(InvalidInput, match="exceeds shared-memory region 'r' of 100 bytes"):
        registry.read("r", 0, 101, "input 'x'")
    with pytest.raises(InvalidInput, match="offset 90 \\+ byte size 20 exceeds"):
        registry.read("r", 90, 20, "input 'x'")
    with pytest.raises(InvalidInput, match="exceeds"):
        registry.write("r", 99, b"ab", "output 'y'")
    with pytest.raises(InvalidInput, match="negative"):
        registry.read("r", -1, 4, "input 'x'")
    assert registry.read("r", 96, 4, "input 'x'") == bytes(4)  # the last bytes are fine


def test_object_shrunk_after_register_is_an_error_not_a_crash(
    registry: SharedMemoryRegistry, block: shared_memory.SharedMemory
) -> None:
    registry.register("r", block.name, 0, SIZE)
    fd = os.open(f"/dev/shm/{block.name}", os.O_RDWR)
    try:
        os.ftruncate(fd, 100)
        with pytest.raises(InvalidInput, match="now smaller"):
            registry.read("r", 0, SIZE, "input 'x'")
        assert registry.read("r", 0, 100, "input 'x'") == bytes(100)
    finally:
        os.ftruncate(fd, SIZE)
        os.close(fd)


@pytest.mark.parametrize(
    "key",
    ["../etc/passwd", "/dev/shm/x", "a/b", "", ".", "/..", "x" * 300, "sp ace", "nul\x00"],
)
def test_keys_are_plain_shm_names(registry: SharedMemoryRegistry, key: str) -> None:
    with pytest.raises(InvalidInput, match="POSIX shared-memory name"):
        registry.register("r", key, 0, 8)


def test_names_and_missing_objects(registry: SharedMemoryRegistry) -> None:
    for bad in ("", "with space", "x" * 129, "tab\t"):
        with pytest.raises(InvalidInput, match="region name"):
            registry.register(bad, "/k", 0, 8)
    with pytest.raises(InvalidInput, match="no shared-memory object"):
        registry.register("r", "/cnnserve_no_such_object", 0, 8)


def test_symlinks_are_not_followed(registry: SharedMemoryRegistry) -> None:
    link = f"/dev/shm/cnnserve_link_{uuid.uuid4().hex[:8]}"
    os.symlink("/etc/hostname", link)
    try:
        with pytest.raises(InvalidInput, match="cannot open"):
            registry.register("r", os.path.basename(link), 0, 1)
    finally:
        os.unlink(link)


def test_duplicates_and_the_region_limit(
    registry: SharedMemoryRegistry, block: shared_memory.SharedMemory
) -> None:
    for i in range(4):
        registry.register(f"r{i}", block.name, 0, 8)
    with pytest.raises(RegionExists):
        registry.register("r0", block.name, 0, 8)
    with pytest.raises(TooManyRegions, match="4 shared-memory regions"):
        registry.register("r4", block.name, 0, 8)
    registry.unregister("")  # all
    assert len(registry) == 0
    registry.register("r4", block.name, 0, 8)


def test_unregistered_while_in_use(
    registry: SharedMemoryRegistry, block: shared_memory.SharedMemory
) -> None:
    registry.register("in", block.name, 0, 16)
    data = registry.read("in", 0, 16, "input 'x'")  # a copy: unregistering cannot touch it
    registry.unregister("in")
    assert data == bytes(16)
    with pytest.raises(InvalidInput, match="'in' is not registered"):
        registry.write("in", 0, b"late", "output 'y'")


def test_protocol_inputs_and_outputs(
    registry: SharedMemoryRegistry, block: shared_memory.SharedMemory
) -> None:
    values = np.arange(8, dtype=np.float32)
    block.buf[: values.nbytes] = values.tobytes()
    registry.register("in", block.name, 0, 1024)
    registry.register("out", block.name, 2048, 1024)
    request = pb.ModelInferRequest(model_name="m")
    a = request.inputs.add(name="a", datatype="FP32", shape=[8])
    a.parameters["shared_memory_region"].string_param = "in"
    a.parameters["shared_memory_byte_size"].int64_param = values.nbytes
    request.inputs.add(name="b", datatype="FP32", shape=[2])
    request.raw_input_contents.append(b"\0" * 8)  # only b has a raw entry
    buffers = input_buffers(request, registry)
    assert buffers[0] == values.tobytes() and buffers[1] == b"\0" * 8
    # a missing byte size, a non-string region, a byte size with no region
    del a.parameters["shared_memory_byte_size"]
    with pytest.raises(InvalidInput, match="needs shared_memory_byte_size"):
        input_buffers(request, registry)
    a.parameters["shared_memory_region"].int64_param = 3
    with pytest.raises(InvalidInput, match="must be a string"):
        input_buffers(request, registry)

    out = request.outputs.add(name="y")
    out.parameters["shared_memory_region"].string_param = "out"
    out.parameters["shared_memory_byte_size"].int64_param = 8
    out.parameters["shared_memory_offset"].int64_param = 4
    response = pb.ModelInferResponse()
    response.outputs.add(name="y", datatype="FP32", shape=[2])
    response.raw_output_contents.append(b"12345678")
    place_outputs(response, output_placements(request), registry)
    assert bytes(block.buf[2052:2060]) == b"12345678"
    assert response.raw_output_contents[0] == b""  # entries keep the outputs' order
    response.raw_output_contents[0] = b"123456789"
    with pytest.raises(InvalidInput, match="9 bytes do not fit the 8 bytes"):
        place_outputs(response, output_placements(request), registry)
