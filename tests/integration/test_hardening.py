"""A hostile client against the real server: every size it controls is bounded, control calls
cannot wedge a model, and after each case a good request still succeeds."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from pb import explain_pb2 as ex
from pb import explain_pb2_grpc as ex_grpc
from pb import grpc_service_pb2 as pb
from pb import grpc_service_pb2_grpc as pb_grpc
from tests.support.harness import ServerThread, infer_request, running_server, stub
from tests.support.onnx_models import images, reference_logits, write_test_repository

STREAM_CAP = 4


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    repository = write_test_repository(tmp_path_factory.mktemp("repository"))
    with running_server(
        repository,
        stream_max_in_flight=STREAM_CAP,
        model_control_mode="explicit",  # the cancelled-load test loads over the API
        load_model=("*",),
    ) as thread:
        yield thread


def good_request_succeeds(server: ServerThread) -> None:
    x = images(2, seed=7)
    with server.channel() as channel:
        response = stub(channel).ModelInfer(infer_request("classifier", x, outputs=("logits",)))
    logits = np.frombuffer(response.raw_output_contents[0], np.float32).reshape(2, 10)
    np.testing.assert_allclose(logits, reference_logits(x), atol=1e-5)


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def threads() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no Threads")


def status_of(call, request, timeout: float = 30):  # type: ignore[no-untyped-def]
    """(status code, details, seconds) of a call expected to fail."""
    start = time.perf_counter()
    with pytest.raises(grpc.RpcError) as err:
        call(request, timeout=timeout)
    return err.value.code(), err.value.details(), time.perf_counter() - start


def test_outputs_named_many_times_are_refused_before_any_work(server: ServerThread) -> None:
    request = infer_request("classifier", images(1), outputs=("logits",) * 2)
    with server.channel() as channel:
        code, details, _ = status_of(stub(channel).ModelInfer, request)
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert details == "2 outputs requested; the model has 2: logits, probabilities" or (
            "requested more than once" in details
        )
        flood = infer_request("classifier", images(1), outputs=("probabilities",) * 20_000)
        before = rss_bytes()
        code, details, seconds = status_of(stub(channel).ModelInfer, flood)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "20000 outputs requested" in details
    assert seconds < 2.0 and rss_bytes() - before < 50 * 2**20
    good_request_succeeds(server)


@pytest.mark.parametrize("version", ["²", "1" * 5000, "-1", " 1", "1.0", "99999999999999999999"])
def test_odd_version_strings_are_not_found_with_a_short_message(
    server: ServerThread, version: str
) -> None:
    with server.channel() as channel:
        request = infer_request("classifier", images(1), version=version)
        code, details, _ = status_of(stub(channel).ModelInfer, request)
        assert code == grpc.StatusCode.NOT_FOUND
        assert len(details) < 300 and "has no version" in details
    good_request_succeeds(server)


def test_explain_with_200000_targets_is_refused_at_once(server: ServerThread) -> None:
    x = images(1)[0]
    request = ex.ExplainRequest(
        model_name="classifier", tensor=ex.RawTensor(shape=[1, 28, 28], data=x.tobytes())
    )
    request.target_classes.extend([1] * 200_000)
    before = rss_bytes()
    with server.channel() as channel:
        code, details, seconds = status_of(ex_grpc.ExplainerStub(channel).Explain, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "at most 32 (the explainer's max batch), got 200000" in details
    assert seconds < 2.0 and rss_bytes() - before < 50 * 2**20
    good_request_succeeds(server)


def test_load_failure_reasons_name_files_relative_to_the_repository(server: ServerThread) -> None:
    with server.channel() as channel:
        index = stub(channel).RepositoryIndex(pb.RepositoryIndexRequest())
    broken = [m for m in index.models if m.name == "broken"]
    assert broken and broken[0].reason
    root = str(server.settings.model_repository)
    assert all(root not in m.reason for m in index.models), broken[0].reason


def test_cancelled_loads_leave_the_model_serving_and_leak_nothing(server: ServerThread) -> None:
    with server.channel() as channel:
        client = stub(channel)
        client.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="classifier"))
        time.sleep(0.5)
        before = threads()
        outcomes: list[str] = []
        for _ in range(8):  # the client gives up almost at once, every time
            try:
                client.RepositoryModelLoad(
                    pb.RepositoryModelLoadRequest(model_name="classifier"), timeout=0.001
                )
                outcomes.append("OK")
            except grpc.RpcError as err:
                outcomes.append(err.code().name)
        # A reload can answer within a few milliseconds, and the client's 1 ms deadline does not
        # always fire before that answer lands (measured: up to 8 of 8 calls came back OK, with
        # this commit's server and with the one before): either way is fine, nothing else is.
        assert set(outcomes) <= {"OK", "DEADLINE_EXCEEDED"}, outcomes
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            index = client.RepositoryIndex(pb.RepositoryIndexRequest())
            states = {m.state for m in index.models if m.name == "classifier"}
            if states == {"READY"} and threads() <= before + 2:
                break
            time.sleep(0.2)
        assert states == {"READY"}, index
        assert threads() <= before + 2, f"threads {before} -> {threads()}"
    good_request_succeeds(server)


def test_a_stream_that_is_not_read_stays_bounded_in_the_server(server: ServerThread) -> None:
    """A client writes 20,000 messages and reads nothing until the end: the server holds at
    most the cap of them at once (it stops reading at the cap), and its memory stays flat."""
    model = server.server.repository.get("classifier")[1]  # type: ignore[union-attr]
    in_flight: list[int] = []
    request = infer_request("classifier", images(1, seed=2), outputs=("logits",))

    async def scenario() -> tuple[int, int]:
        async with grpc.aio.insecure_channel(server.address) as channel:
            call = pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer()
            written = 0
            with contextlib.suppress(TimeoutError):  # writes may block: that is backpressure
                while written < 20_000:
                    await asyncio.wait_for(call.write(request), 2.0)
                    written += 1
                    in_flight.append(model.in_flight)
            await call.done_writing()
            answered = 0
            async for answer in call:
                assert not answer.error_message, answer.error_message
                answered += 1
            return written, answered

    before = rss_bytes()
    written, answered = asyncio.run(scenario())
    assert answered == written > 1000
    assert max(in_flight) <= STREAM_CAP
    assert rss_bytes() - before < 100 * 2**20
    good_request_succeeds(server)
