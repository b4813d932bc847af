"""Frames that are not valid protobuf: INVALID_ARGUMENT, a counter, and a bounded log."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from pb import explain_pb2 as ex
from pb import grpc_service_pb2 as pb
from tests.support.harness import ServerThread, infer_request, running_server, stub
from tests.support.onnx_models import images, reference_logits, write_test_repository

GARBAGE = (
    b"\x07",  # wire type 7 does not exist
    b"\x0a\xff\xff\xff\xff\x0f",  # a length far past the end of the frame
    b"\x0a\x05ab",  # truncated
    b"\xff\xff\xff\xff\xff",  # an unterminated varint
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    repository = write_test_repository(tmp_path_factory.mktemp("repository"), broken=False)
    with running_server(repository) as thread:
        yield thread


def rejected(server: ServerThread, reason: str) -> float:
    match = re.search(
        rf'^cnnserve_rejected_requests_total{{reason="{reason}"}} (\S+)$', server.scrape(), re.M
    )
    assert match, "the rejected-requests counter is missing"
    return float(match.group(1))


def methods() -> list[tuple[str, str]]:
    services = [
        pb.DESCRIPTOR.services_by_name["GRPCInferenceService"],
        ex.DESCRIPTOR.services_by_name["Explainer"],
    ]
    return [
        (f"/{s.full_name}/{m.name}", m.input_type.full_name)
        for s in services
        for m in s.methods
        if not m.client_streaming
    ]


@pytest.mark.parametrize(("path", "message_type"), methods(), ids=lambda v: v.rsplit("/", 1)[-1])
def test_garbage_on_each_rpc_is_invalid_argument(
    server: ServerThread, path: str, message_type: str
) -> None:
    with server.channel() as channel:
        call = channel.unary_unary(path)  # no serializers: the frame goes as raw bytes
        for frame in GARBAGE:
            with pytest.raises(grpc.RpcError) as err:
                call(frame, timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert err.value.details() == f"the request is not a valid {message_type} message"


def test_a_thousand_garbage_frames_are_counted_and_barely_logged(
    server: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    before = rejected(server, "malformed")
    caplog.set_level(logging.INFO)  # the server logs at INFO by default
    with server.channel() as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        futures = [call.future(GARBAGE[i % len(GARBAGE)], timeout=30) for i in range(1000)]
        codes = [f.exception().code() for f in futures]  # type: ignore[union-attr]
        assert set(codes) == {grpc.StatusCode.INVALID_ARGUMENT}
        lines = sum(len(r.getMessage().splitlines()) + bool(r.exc_info) for r in caplog.records)
        assert lines <= 20, f"{lines} log lines for 1,000 bad frames"
        assert rejected(server, "malformed") - before == 1000
        x = images(1)
        response = stub(channel).ModelInfer(infer_request("classifier", x, outputs=("logits",)))
    logits = np.frombuffer(response.raw_output_contents[0], np.float32)
    np.testing.assert_allclose(logits, reference_logits(x)[0], atol=1e-5)


def test_a_bad_message_on_a_stream_gets_an_answer_and_the_stream_goes_on(
    server: ServerThread,
) -> None:
    x = images(3, seed=5)
    good = [infer_request("classifier", x[i : i + 1], outputs=("logits",)) for i in range(3)]
    for i, request in enumerate(good):
        request.id = f"good-{i}"
    frames = [
        good[0].SerializeToString(),
        GARBAGE[1],
        good[1].SerializeToString(),
        GARBAGE[0],
        good[2].SerializeToString(),
    ]
    with server.channel() as channel:
        stream = channel.stream_stream(
            "/inference.GRPCInferenceService/ModelStreamInfer",
            response_deserializer=pb.ModelStreamInferResponse.FromString,
        )
        answers = list(stream(iter(frames), timeout=30))
    errors = [a.error_message for a in answers if a.error_message]
    assert errors == ["the request is not a valid inference.ModelInferRequest message"] * 2
    by_id = {a.infer_response.id: a.infer_response for a in answers if not a.error_message}
    assert sorted(by_id) == ["good-0", "good-1", "good-2"]
    for i in range(3):
        logits = np.frombuffer(by_id[f"good-{i}"].raw_output_contents[0], np.float32)
        np.testing.assert_allclose(logits, reference_logits(x[i : i + 1])[0], atol=1e-5)


def test_client_triggered_errors_are_rate_limited_in_the_log(
    server: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)  # the server logs at INFO by default
    with server.channel() as channel:
        client = stub(channel)
        for i in range(300):
            request = infer_request("classifier", images(1), version="9" * (i % 7 + 1))
            with pytest.raises(grpc.RpcError) as err:
                client.ModelInfer(request)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
    refused = [r for r in caplog.records if "NOT_FOUND" in r.getMessage()]
    # Some are logged (the first burst of the interval), most are not.
    assert 1 <= len(refused) <= 20, f"{len(refused)} log records for 300 bad versions"
