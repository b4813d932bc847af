"""All 20 RPCs of Triton's service with the real clients: tritonclient and perf_analyzer.

tritonclient walks every public method of its InferenceServerClient (each works or gets the
documented refusal, printed as a table); perf_analyzer runs with `--shared-memory system` and with
request tracing; a trace comes back from the JSON file and from an OTLP/HTTP receiver.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import grpc
import numpy as np
import pytest

from pb import grpc_service_pb2 as pb
from tests.support.harness import ServerThread, infer_request, running_server, stub
from tests.support.onnx_models import write_test_repository
from tests.support.tools_venv.paths import (
    PERF_ANALYZER,
    SCRIPTS,
    perf_analyzer_env,
    require_tools_python,
)

MODEL = "classifier"  # the test repository's stand-in for mnist_cnn (same tensors)
COMPUTE = ("COMPUTE_START", "COMPUTE_INPUT_END", "COMPUTE_OUTPUT_START", "COMPUTE_END")
TIMESTAMPS = ("GRPC_WAITREAD_END", "REQUEST_START", "QUEUE_START", *COMPUTE, "REQUEST_END")
CUDA_METHODS = (
    "get_cuda_shared_memory_status",
    "register_cuda_shared_memory",
    "unregister_cuda_shared_memory",
)


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_test_repository(tmp_path_factory.mktemp("repository"), broken=False)


@pytest.fixture(scope="module")
def server(repository: Path) -> Iterator[ServerThread]:
    with running_server(repository, model_control_mode="explicit", load_model=("*",)) as thread:
        yield thread


def _table(rows: list[dict[str, object]]) -> str:
    lines = [f"{'method':34} result       detail", "-" * 90]
    for r in rows:
        detail = str(r["detail"]).replace("\n", " ")
        lines.append(f"{r['method']:34} {r['result']:12} {detail[:60]}")
    return "\n".join(lines)


def test_tritonclient_walks_every_method(server: ServerThread, tmp_path: Path) -> None:
    python = require_tools_python()
    done = subprocess.run(
        [str(python), str(SCRIPTS / "triton_walk.py"), server.address, MODEL, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    rows = report["rows"]
    print("\n" + _table(rows))
    results = {r["method"]: r for r in rows}
    assert sorted(results) == report["methods"], "every public method is walked"
    for method, r in results.items():
        if method in CUDA_METHODS:
            assert r["result"] == "UNAVAILABLE", r
            assert "runs its models on the CPU" in r["detail"]
        else:
            assert r["result"] == "OK", r
    assert {"system_shared_memory", "trace", "logging"} <= set(report["extensions"])
    assert report["async_ok"] and report["stream_ok"]

    # shared memory: the output read from its region equals the in-message answer
    assert report["shm_matches"]
    assert set(report["shm_status"]["regions"]) == {"walk_in", "walk_out"}
    assert (
        "do not fit" in report["shm_small_output"]
        and "INVALID_ARGUMENT" in (report["shm_small_output"])
    )
    assert not report["shm_after"].get("regions")

    # traces: the file holds both requests with every timestamp, in order
    entries = report["trace_file"]
    heads = [e for e in entries if "model_name" in e]
    assert {h["request_id"] for h in heads} >= {"t1", "t2"}
    assert all(h["model_name"] == MODEL and h["model_version"] == 1 for h in heads)
    for head in heads:
        stamps = next(
            e["timestamps"] for e in entries if e["id"] == head["id"] and "timestamps" in e
        )
        names = [s["name"] for s in stamps]
        assert set(TIMESTAMPS) <= set(names), names
        assert [s["ns"] for s in stamps] == sorted(s["ns"] for s in stamps)
        by_name = {s["name"]: s["ns"] for s in stamps}
        assert by_name["REQUEST_START"] <= by_name["QUEUE_START"] <= by_name["COMPUTE_START"]
        assert by_name["COMPUTE_END"] <= by_name["REQUEST_END"]
    assert report["model_trace"]["trace_rate"]["value"] == ["2"]
    assert report["trace_settings"]["trace_rate"]["value"] == ["1"]  # global unchanged

    # logs: changed at run time and read back
    assert set(report["log_settings"]["settings"]) == {
        "log_file",
        "log_info",
        "log_warning",
        "log_error",
        "log_verbose_level",
        "log_format",
    }
    assert report["log_after"]["log_info"]["bool_param"] is True
    assert report["log_after"]["log_verbose_level"]["uint32_param"] == 1
    assert report["log_after"]["log_format"]["string_param"] == "json"
    assert report["log_restored"] == report["log_settings"]["settings"]


def _perf_analyzer(server: ServerThread, *extra: str) -> str:
    if not PERF_ANALYZER.exists():
        pytest.skip(f"{PERF_ANALYZER} is missing (make tools installs it)")
    done = subprocess.run(
        [
            str(PERF_ANALYZER),
            "-m",
            MODEL,
            "-i",
            "grpc",
            "-u",
            server.address,
            "--measurement-interval",
            "300",
            "--stability-percentage",
            "100",
            "--max-trials",
            "10",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=perf_analyzer_env(),
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return done.stdout


def test_perf_analyzer_with_system_shared_memory(server: ServerThread) -> None:
    require_tools_python()
    assert server.server is not None
    regions = server.server.extensions.shared_memory
    reads, writes = regions.reads, regions.writes
    out = _perf_analyzer(server, "--shared-memory", "system", "--concurrency-range", "1:16:15")
    assert "Concurrency: 1, throughput:" in out and "Concurrency: 16, throughput:" in out
    assert regions.reads - reads > 100 and regions.writes - writes > 100  # through the regions
    with server.channel() as channel:  # perf_analyzer unregisters its regions at exit
        status = stub(channel).SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest())
    assert not status.regions


def test_perf_analyzer_trace_file(server: ServerThread, tmp_path: Path) -> None:
    require_tools_python()
    trace_file = tmp_path / "perf_trace.json"
    with server.channel() as channel:  # perf_analyzer 2.51 sets level, rate, count, not the file
        request = pb.TraceSettingRequest()
        request.settings["trace_file"].value.append(str(trace_file))
        stub(channel).TraceSetting(request)
    _perf_analyzer(
        server,
        "--concurrency-range",
        "4",
        "--trace-level",
        "TIMESTAMPS",
        "--trace-rate",
        "10",
        "--log-frequency",
        "0",
    )
    with server.channel() as channel:  # turning tracing off writes the file
        request = pb.TraceSettingRequest()
        request.settings["trace_level"].value.append("OFF")
        stub(channel).TraceSetting(request)
    entries = json.loads(trace_file.read_text())
    stamps = [e["timestamps"] for e in entries if "timestamps" in e]
    assert len(stamps) >= 2
    assert all(set(TIMESTAMPS) <= {s["name"] for s in t} for t in stamps)


class _OtlpReceiver(BaseHTTPRequestHandler):
    """An OTLP/HTTP (protobuf) trace receiver keeping every request body it gets."""

    bodies: ClassVar[list[bytes]] = []

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length", 0))
        self.bodies.append(self.rfile.read(length))
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_opentelemetry_spans_reach_an_otlp_receiver(repository: Path) -> None:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    _OtlpReceiver.bodies = []
    receiver = ThreadingHTTPServer(("127.0.0.1", 0), _OtlpReceiver)
    thread = threading.Thread(target=receiver.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{receiver.server_port}/v1/traces"
    try:
        with running_server(repository, trace_otlp_url=url) as server:
            with server.channel() as channel:
                client = stub(channel)
                request = pb.TraceSettingRequest()
                for name, value in (
                    ("trace_mode", "opentelemetry"),
                    ("trace_level", "TIMESTAMPS"),
                    ("trace_rate", "1"),
                ):
                    request.settings[name].value.append(value)
                client.TraceSetting(request)
                images = np.zeros((2, 1, 28, 28), np.float32)
                client.ModelInfer(infer_request(MODEL, images))
                off = pb.TraceSettingRequest()
                off.settings["trace_level"].value.append("OFF")
                client.TraceSetting(off)  # a settings change flushes the spans
            deadline = time.monotonic() + 10
            while not _OtlpReceiver.bodies and time.monotonic() < deadline:
                time.sleep(0.05)
    finally:
        receiver.shutdown()
        receiver.server_close()
    spans = []
    for body in _OtlpReceiver.bodies:
        export = ExportTraceServiceRequest.FromString(body)
        for resource in export.resource_spans:
            for scope in resource.scope_spans:
                spans.extend(scope.spans)
    by_name = {s.name: s for s in spans}
    assert {"InferRequest", MODEL, "compute"} <= set(by_name), list(by_name)
    compute, model, root = by_name["compute"], by_name[MODEL], by_name["InferRequest"]
    assert compute.parent_span_id == model.span_id and model.parent_span_id == root.span_id
    assert {e.name for e in compute.events} >= set(COMPUTE)
    assert root.start_time_unix_nano <= model.start_time_unix_nano <= compute.start_time_unix_nano
    attributes = {a.key: a.value.string_value for a in model.attributes}
    assert attributes["triton.model_name"] == MODEL


def test_cuda_shared_memory_says_why_and_tokens_guard_the_admin_calls(
    repository: Path, tmp_path: Path
) -> None:
    (tmp_path / "infer").write_text("inference-token-0123456789\n")
    (tmp_path / "admin").write_text("admin-token-0123456789abc\n")
    with (
        running_server(
            repository, auth_token_file=tmp_path / "infer", admin_token_file=tmp_path / "admin"
        ) as server,
        server.channel() as channel,
    ):
        client = stub(channel)
        infer = (("authorization", "Bearer inference-token-0123456789"),)
        admin = (("authorization", "Bearer admin-token-0123456789abc"),)
        with pytest.raises(grpc.RpcError) as info:
            client.CudaSharedMemoryRegister(
                pb.CudaSharedMemoryRegisterRequest(name="g"), metadata=admin
            )
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "runs its models on the CPU" in (info.value.details() or "")
        with pytest.raises(grpc.RpcError) as info:
            client.SystemSharedMemoryRegister(
                pb.SystemSharedMemoryRegisterRequest(name="x", key="../../etc/passwd", byte_size=8),
                metadata=admin,
            )
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        for call, request in (
            (client.SystemSharedMemoryStatus, pb.SystemSharedMemoryStatusRequest()),
            (client.TraceSetting, pb.TraceSettingRequest()),
            (client.LogSettings, pb.LogSettingsRequest()),
        ):
            with pytest.raises(grpc.RpcError) as info:
                call(request, metadata=infer)
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
            call(request, metadata=admin)
