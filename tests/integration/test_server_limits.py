"""What the server says at start, and the limit on RPCs running at once (--max-concurrent-rpcs)."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from pb import grpc_service_pb2 as pb
from tests.support.harness import running_server, stub


def test_an_empty_repository_is_warned_about_and_unset_ports_say_off(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="service")
    with running_server(tmp_path, metrics_port=-1):
        pass
    text = caplog.text
    assert "holds no models" in text and str(tmp_path) in text
    serving = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("serving"))
    assert "metrics port off" in serving and "health port off" in serving
    assert "None" not in serving


def _held_stream(channel: grpc.Channel, release: threading.Event) -> Iterator[object]:
    """Open a ModelStreamInfer stream that sends nothing until `release` is set."""

    def requests() -> Iterator[pb.ModelInferRequest]:
        release.wait(60)
        return
        yield  # a generator that ends without a message

    answers: queue.Queue[object] = queue.Queue()
    call = stub(channel).ModelStreamInfer(requests(), timeout=60)
    threading.Thread(target=lambda: answers.put(list(call)), daemon=True).start()
    return iter(answers.get, None)


def test_rpcs_past_max_concurrent_rpcs_get_resource_exhausted_then_the_server_recovers(
    tmp_path: Path,
) -> None:
    release = threading.Event()
    with running_server(tmp_path, max_concurrent_rpcs=2) as server, server.channel() as channel:
        client = stub(channel)
        assert client.ServerLive(pb.ServerLiveRequest(), timeout=10).live
        held = [_held_stream(channel, release) for _ in range(2)]
        refused = 0
        for _ in range(50):  # the streams take their slots once the server has seen them
            try:
                client.ServerLive(pb.ServerLiveRequest(), timeout=10)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
                refused += 1
                break
            threading.Event().wait(0.05)
        print(f"with 2 streams held open: {refused} call refused (limit 2)")
        assert refused == 1
        release.set()
        for answers in held:
            next(answers)  # each stream ended
        for _ in range(50):
            try:
                assert client.ServerLive(pb.ServerLiveRequest(), timeout=10).live
                break
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                threading.Event().wait(0.05)
        else:
            pytest.fail("still refused after the streams ended")
