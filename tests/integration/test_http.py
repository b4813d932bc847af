"""The HTTP front (KServe v2 REST) on a real server: tritonclient.http, perf_analyzer -i http,
tokens, metrics, and hostile requests that must get a 4xx with an `error` and leave it serving.

tritonclient and perf_analyzer run as subprocesses from the tools venv, as for gRPC.
"""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.support.harness import ServerThread, running_server
from tests.support.onnx_models import reference_logits, write_test_repository
from tests.support.tools_venv.paths import (
    PERF_ANALYZER,
    SCRIPTS,
    perf_analyzer_env,
    require_tools_python,
)

MODEL = "classifier"
INFER = f"/v2/models/{MODEL}/infer"


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_test_repository(tmp_path_factory.mktemp("http_repository"), broken=False)


@pytest.fixture(scope="module")
def server(repository: Path) -> Iterator[ServerThread]:
    with running_server(repository, http_port=0, max_message_bytes=1024 * 1024) as thread:
        yield thread


def request(
    server: ServerThread,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    assert server.server is not None and server.server.http is not None
    connection = http.client.HTTPConnection("127.0.0.1", server.server.http.port, timeout=30)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def tools(*args: str) -> dict:
    python = require_tools_python()
    done = subprocess.run(
        [str(python), str(SCRIPTS / "triton_http_checks.py"), *args],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_tritonclient_http_end_to_end(server: ServerThread, tmp_path: Path) -> None:
    url = server.http_url.removeprefix("http://")
    summary = tools(url, MODEL, str(tmp_path))
    assert summary["live"] and summary["ready"] and summary["model_ready"]
    assert summary["version_ready"] and not summary["unknown_ready"]
    assert {"classification", "binary_tensor_data", "statistics"} <= set(
        summary["server"]["extensions"]
    )
    inputs = {t["name"]: t for t in summary["metadata"]["inputs"]}
    assert inputs["input"] == {"name": "input", "datatype": "FP32", "shape": [-1, 1, 28, 28]}
    assert summary["metadata_v1"] == MODEL
    assert summary["max_batch_size"] == 32
    assert summary["provider"] == {"string_value": "CPUExecutionProvider"}
    assert summary["binary_id"] == "parity-binary" and summary["json_id"] == "parity-json"
    assert summary["default_outputs"] == ["logits", "probabilities"]
    assert summary["timeout_ok"]

    # parity: binary and JSON answers equal the model computed in numpy
    images = np.load(tmp_path / "inputs.npy")
    logits = reference_logits(images)
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities = exp / exp.sum(axis=1, keepdims=True)
    for tag in ("binary", "json"):
        np.testing.assert_allclose(np.load(tmp_path / f"{tag}_logits.npy"), logits, atol=1e-4)
        np.testing.assert_allclose(
            np.load(tmp_path / f"{tag}_probabilities.npy"), probabilities, atol=1e-5
        )
    best = probabilities.argmax(axis=1)
    for tag in ("binary", "json"):
        for row, classes in enumerate(summary[f"top3_{tag}"]):
            value, index, label = classes[0].split(":")
            assert int(index) == best[row] and label == f"digit_{best[row]}"
            assert abs(float(value) - probabilities[row, best[row]]) < 1e-5
            assert len(classes) == 3

    errors = summary["errors"]
    assert errors["bad_datatype"][0] == "400" and "FP64" in errors["bad_datatype"][1]
    assert errors["unknown_model"][0] == "404"
    assert errors["unknown_version"][0] == "404"
    assert errors["load_disabled"][0] == "400" and "disabled" in errors["load_disabled"][1]

    stats = summary["statistics"]
    assert stats["success"] >= 6 and stats["fail"] >= 1
    assert stats["inference_count"] >= 24 and 4 in stats["batch_sizes"]
    assert summary["all_statistics"] == 3
    assert summary["index"] == {
        "classifier": "READY",
        "classifier_gradcam": "READY",
        "fragile": "READY",
    }


def test_repository_load_and_unload_over_http(repository: Path) -> None:
    with running_server(
        repository, http_port=0, model_control_mode="explicit", load_model=(MODEL,)
    ) as server:
        summary = tools(server.http_url.removeprefix("http://"), MODEL, "--control")
    assert summary["ready_before"] and not summary["ready_unloaded"] and summary["ready_loaded"]
    assert summary["index_unloaded"][MODEL] == ["UNAVAILABLE", "unloaded"]
    assert summary["index_unloaded"]["fragile"] == ["UNAVAILABLE", "not loaded"]
    assert summary["load_unknown"][0] == "404"


def test_perf_analyzer_over_http(server: ServerThread) -> None:
    require_tools_python()
    if not PERF_ANALYZER.exists():
        pytest.skip(f"{PERF_ANALYZER} is missing (make tools installs it)")
    done = subprocess.run(
        [
            str(PERF_ANALYZER), "-m", MODEL, "-i", "http",
            "-u", server.http_url.removeprefix("http://"),
            "--concurrency-range", "1:8:7", "--measurement-interval", "300",
            "--stability-percentage", "100", "--max-trials", "10",
        ],
        capture_output=True, text=True, timeout=300, env=perf_analyzer_env(),
    )  # fmt: skip
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert "Concurrency: 8, throughput:" in done.stdout


def binary_body(header: dict, data: bytes) -> tuple[bytes, dict[str, str]]:
    text = json.dumps(header).encode()
    return text + data, {"Inference-Header-Content-Length": str(len(text))}


IMAGE = np.zeros((1, 1, 28, 28), np.float32).tobytes()
ONE_IMAGE = {"name": "input", "datatype": "FP32", "shape": [1, 1, 28, 28]}


def hostile_requests() -> list[tuple[str, str, str, bytes, dict[str, str], int]]:
    """(id, method, path, body, headers, expected status)."""
    cases: list[tuple[str, str, str, bytes, dict[str, str], int]] = [
        ("malformed-json", "POST", INFER, b'{"inputs": [', {}, 400),
        ("not-utf8", "POST", INFER, b"\xff\xfe{}", {}, 400),
        ("json-array", "POST", INFER, b"[1, 2]", {}, 400),
        ("deep-nesting", "POST", INFER, b"[" * 100_000 + b"]" * 100_000, {}, 400),
        (
            "terashape",
            "POST",
            INFER,
            json.dumps(
                {"inputs": [{**ONE_IMAGE, "shape": [10**12, 1, 28, 28], "data": [1.0]}]}
            ).encode(),
            {},
            400,
        ),
        (
            "data-not-matching-shape",
            "POST",
            INFER,
            json.dumps({"inputs": [{**ONE_IMAGE, "data": [0.5] * 783}]}).encode(),
            {},
            400,
        ),
        (
            "data-strings",
            "POST",
            INFER,
            json.dumps({"inputs": [{**ONE_IMAGE, "data": ["x"] * 784}]}).encode(),
            {},
            400,
        ),
        (
            "shape-of-strings",
            "POST",
            INFER,
            json.dumps({"inputs": [{**ONE_IMAGE, "shape": ["1", 1, 28, 28]}]}).encode(),
            {},
            400,
        ),
        (
            "huge-header-length",
            "POST",
            INFER,
            b"{}",
            {"Inference-Header-Content-Length": str(2**62)},
            400,
        ),
        (
            "negative-header-length",
            "POST",
            INFER,
            b"{}",
            {"Inference-Header-Content-Length": "-5"},
            400,
        ),
        (
            "binary-size-mismatch",
            "POST",
            INFER,
            *binary_body(
                {"inputs": [{**ONE_IMAGE, "parameters": {"binary_data_size": 3136}}]}, IMAGE[:-4]
            ),
            400,
        ),
        (
            "binary-size-huge",
            "POST",
            INFER,
            *binary_body(
                {"inputs": [{**ONE_IMAGE, "parameters": {"binary_data_size": 10**15}}]}, IMAGE
            ),
            400,
        ),
        (
            "binary-extra-bytes",
            "POST",
            INFER,
            *binary_body(
                {"inputs": [{**ONE_IMAGE, "parameters": {"binary_data_size": 3136}}]}, IMAGE + b"x"
            ),
            400,
        ),
        (
            "classification-zero",
            "POST",
            INFER,
            json.dumps(
                {
                    "inputs": [{**ONE_IMAGE, "data": [0.0] * 784}],
                    "outputs": [{"name": "logits", "parameters": {"classification": 0}}],
                }
            ).encode(),
            {},
            400,
        ),
        ("body-too-large", "POST", INFER, b" " * (1024 * 1024 + 1), {}, 413),
        ("gzip", "POST", INFER, b"{}", {"Content-Encoding": "gzip"}, 415),
        ("unknown-model", "POST", "/v2/models/nope/infer", b"{}", {}, 404),
        ("unknown-version", "GET", f"/v2/models/{MODEL}/versions/9", b"", {}, 404),
        ("bad-version", "GET", f"/v2/models/{MODEL}/versions/x%00y/config", b"", {}, 404),
        ("unknown-path", "GET", "/v3/anything", b"", {}, 404),
        ("wrong-method-infer", "GET", INFER, b"", {}, 405),
        ("wrong-method-health", "POST", "/v2/health/live", b"", {}, 405),
        ("wrong-method-index", "GET", "/v2/repository/index", b"", {}, 405),
        ("index-not-object", "POST", "/v2/repository/index", b"[]", {}, 400),
        ("load-disabled", "POST", f"/v2/repository/models/{MODEL}/load", b"", {}, 400),
    ]
    return cases


@pytest.mark.parametrize(
    ("method", "path", "body", "headers", "status"),
    [case[1:] for case in hostile_requests()],
    ids=[case[0] for case in hostile_requests()],
)
def test_hostile_requests_get_an_error_and_the_server_lives(
    server: ServerThread, method: str, path: str, body: bytes, headers: dict, status: int
) -> None:
    got, answer_headers, answer = request(server, method, path, body, headers)
    assert got == status, answer[:300]
    assert json.loads(answer)["error"]
    if status == 405:
        assert answer_headers.get("allow")
    assert request(server, "GET", "/v2/health/live")[0] == 200
    ok = json.dumps({"inputs": [{**ONE_IMAGE, "data": [0.0] * 784}]}).encode()
    assert request(server, "POST", INFER, ok)[0] == 200


def test_json_data_may_be_nested_and_binary_outputs_follow_the_header(server: ServerThread) -> None:
    images = np.random.default_rng(4).random((2, 1, 28, 28), dtype=np.float32)
    body = json.dumps(
        {
            "id": "n",
            "inputs": [{**ONE_IMAGE, "shape": [2, 1, 28, 28], "data": images.tolist()}],
            "outputs": [{"name": "logits", "parameters": {"binary_data": True}}],
        }
    ).encode()
    status, headers, answer = request(server, "POST", INFER, body)
    assert status == 200
    length = int(headers["inference-header-content-length"])
    header = json.loads(answer[:length])
    assert header["id"] == "n" and header["outputs"][0]["parameters"]["binary_data_size"] == 80
    logits = np.frombuffer(answer[length:], np.float32).reshape(2, 10)
    np.testing.assert_allclose(logits, reference_logits(images), atol=1e-4)


def test_tokens_guard_the_http_api(repository: Path, tmp_path: Path) -> None:
    inference, admin = "inference-token-0123456789", "admin-token-0123456789abc"
    (tmp_path / "inference").write_text(inference + "\n")
    (tmp_path / "admin").write_text(admin + "\n")
    with running_server(
        repository,
        http_port=0,
        auth_token_file=tmp_path / "inference",
        admin_token_file=tmp_path / "admin",
    ) as server:
        assert request(server, "GET", "/v2/health/ready")[0] == 200  # probes need no token
        status, headers, body = request(server, "GET", f"/v2/models/{MODEL}")
        assert status == 401 and headers.get("www-authenticate") == "Bearer"
        assert "bearer token" in json.loads(body)["error"]
        bearer = {"Authorization": f"Bearer {inference}"}
        assert (
            request(server, "GET", "/v2/models/x", headers={"Authorization": "Bearer no"})[0] == 401
        )
        assert request(server, "GET", f"/v2/models/{MODEL}", headers=bearer)[0] == 200
        assert request(server, "POST", "/v2/repository/index", b"", bearer)[0] == 403
        admin_bearer = {"Authorization": f"Bearer {admin}"}
        assert request(server, "POST", "/v2/repository/index", b"", admin_bearer)[0] == 200
        scrape = server.scrape()
    assert 'cnnserve_http_responses_total{code="401",route="model_metadata"} 2.0' in scrape
    refused = [
        line
        for line in scrape.splitlines()
        if line.startswith("cnnserve_rejected_requests_total{")
        and 'reason="unauthenticated"' in line
        and 'call="HTTP model_metadata"' in line
    ]
    assert refused and float(refused[0].split()[-1]) == 2


def test_stop_drains_http_requests_in_flight(repository: Path) -> None:
    """A stop during HTTP load: every request the server accepted is answered; none gets a 5xx."""
    import threading
    import time

    from tests.support.harness import ServerThread, test_settings

    thread = ServerThread(test_settings(repository, http_port=0)).start()
    assert thread.server is not None and thread.server.http is not None
    port = thread.server.http.port
    body = json.dumps({"inputs": [{**ONE_IMAGE, "data": [0.0] * 784}]}).encode()
    outcomes: list[str] = []
    stopping = threading.Event()

    def client() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        while not stopping.is_set():
            try:
                connection.request("POST", INFER, body=body)
                response = connection.getresponse()
                response.read()
                outcomes.append(str(response.status))
            except (http.client.HTTPException, OSError) as exc:
                outcomes.append(type(exc).__name__)
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                time.sleep(0.05)
        connection.close()

    clients = [threading.Thread(target=client) for _ in range(4)]
    for c in clients:
        c.start()
    time.sleep(1.0)
    model = thread.server.repository.get(MODEL)[1]
    thread.stop(grace=5.0)
    stopping.set()
    for c in clients:
        c.join(30)
    ok = outcomes.count("200")
    assert ok > 0
    assert not [o for o in outcomes if o.startswith("5")], outcomes
    assert model.stats.success.count == ok  # accepted means answered and received


def _closed_within(sock: socket.socket, seconds: float) -> float | None:
    """Seconds until the server closes `sock` (reads until EOF), None if it stays open."""
    sock.settimeout(0.2)
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        try:
            if sock.recv(65536) == b"":
                return time.monotonic() - started
        except TimeoutError:
            continue
        except ConnectionResetError:
            return time.monotonic() - started
    return None


def test_http_connections_are_given_up_after_their_limits(repository: Path) -> None:
    """The gRPC port's connection limits hold on the HTTP port: idle keep-alive connections,
    connections that never finish their request headers (slowloris), and connections older
    than the maximum age (a busy one after its answer in progress)."""
    limits = {
        "max_connection_idle_s": 1.0,
        "handshake_timeout_s": 1.0,
        "max_connection_age_s": 3.0,
        "max_connection_age_grace_s": 1.0,
    }
    with running_server(repository, http_port=0, **limits) as thread:
        assert thread.server is not None and thread.server.http is not None
        port = thread.server.http.port
        get = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"

        idle = socket.create_connection(("127.0.0.1", port))
        idle.sendall(get)
        assert idle.recv(65536).startswith(b"HTTP/1.1 200")
        closed = _closed_within(idle, 4.0)  # keep-alive idle: 1 s
        assert closed is not None and closed < 3.0, closed

        slow = socket.create_connection(("127.0.0.1", port))
        slow.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n")  # headers never end
        closed = _closed_within(slow, 4.0)  # no complete request within 1 s
        assert closed is not None and 0.8 < closed < 3.0, closed

        # A connection that keeps asking is answered until it is 3 s old, then closed after
        # an answer (Connection: close or EOF), never in the middle of one.
        busy = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        started, answered, closed_at = time.monotonic(), 0, None
        while time.monotonic() - started < 8:
            try:
                busy.request("GET", "/v2/health/ready")
                response = busy.getresponse()
                assert response.status == 200
                response.read()
                answered += 1
                if response.getheader("connection", "").lower() == "close":
                    closed_at = time.monotonic() - started
                    break
            except (ConnectionError, http.client.RemoteDisconnected):
                closed_at = time.monotonic() - started
                break
            time.sleep(0.2)
        busy.close()
        assert closed_at is not None and 2.5 < closed_at < 6.0, (closed_at, answered)
        assert answered >= 10
        # The server still answers new connections.
        status, _, _ = request(thread, "GET", "/v2/health/ready")
        assert status == 200
