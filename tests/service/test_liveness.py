"""Unit tests of the supervisor's liveness check and the connection-limit settings."""

from __future__ import annotations

import time
from concurrent import futures

import grpc
import pytest

from pb import grpc_service_pb2 as pb
from service.config import Settings
from service.workers.liveness import Liveness
from service.workers.peers import STATISTICS_METHOD


def statistics_server() -> tuple[grpc.Server, int]:
    """A real gRPC server answering the workers' private statistics RPC with nothing."""
    service, method = STATISTICS_METHOD.strip("/").split("/")
    handler = grpc.method_handlers_generic_handler(
        service,
        {
            method: grpc.unary_unary_rpc_method_handler(
                lambda request, context: pb.ModelStatisticsResponse(),
                request_deserializer=pb.ModelStatisticsRequest.FromString,
                response_serializer=pb.ModelStatisticsResponse.SerializeToString,
            )
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(2))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def test_a_worker_that_answers_stays_live_and_one_that_stops_is_reported() -> None:
    server, port = statistics_server()
    liveness = Liveness(1.0, STATISTICS_METHOD)
    liveness.start()
    try:
        liveness.watch(0, 1234, port)
        time.sleep(2.0)
        assert not liveness.unresponsive(0, 1234)
        assert liveness.silent_for(0, 1234) < 1.0
        assert liveness.silent_for(0, 999) == 0.0  # another process in the slot: not watched
        server.stop(0)
        deadline = time.monotonic() + 10
        while not liveness.unresponsive(0, 1234):
            assert time.monotonic() < deadline, liveness.silent_for(0, 1234)
            time.sleep(0.1)
        liveness.forget(0)
        assert not liveness.unresponsive(0, 1234)
    finally:
        liveness.close()
        server.stop(0)


def test_a_timeout_of_zero_turns_the_check_off() -> None:
    liveness = Liveness(0.0, STATISTICS_METHOD)
    liveness.start()
    liveness.watch(0, 1234, 1)  # nothing listens on port 1: would go silent if watched
    time.sleep(0.3)
    assert not liveness.enabled and not liveness.unresponsive(0, 1234)
    liveness.close()


def test_connection_limits_become_grpc_server_options() -> None:
    options = dict(
        Settings(
            max_connection_idle_s=2.5,
            max_connection_age_s=0,
            max_connection_age_grace_s=1,
            handshake_timeout_s=3,
            max_streams_per_connection=50,
        ).connection_options()
    )
    assert options == {
        "grpc.max_connection_idle_ms": 2500,
        "grpc.max_connection_age_grace_ms": 1000,
        "grpc.server_handshake_timeout_ms": 3000,
        "grpc.max_concurrent_streams": 50,
    }  # an age of 0: no limit, the option left out
    assert "grpc.max_concurrent_streams" not in dict(
        Settings(max_streams_per_connection=0).connection_options()
    )
    with pytest.raises(ValueError, match="max_connection_idle_s"):
        Settings(max_connection_idle_s=-1)


def test_connection_limits_from_flags_and_environment() -> None:
    settings = Settings.from_sources(
        ["--max-connection-age-s", "60"],
        {"CNNSERVE_MAX_CONNECTION_IDLE_S": "7", "CNNSERVE_WORKER_LIVENESS_TIMEOUT_S": "4"},
    )
    assert (settings.max_connection_age_s, settings.max_connection_idle_s) == (60.0, 7.0)
    assert settings.worker_liveness_timeout_s == 4.0
