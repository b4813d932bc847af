"""`python -m service` as a real process: SIGTERM during load drains without losing a request."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from pb import grpc_service_pb2 as pb
from tests.conftest import ROOT
from tests.support.harness import infer_request, stub, unary_load
from tests.support.onnx_models import images, write_test_repository

PORT_LINE = re.compile(r"on gRPC port (\d+), metrics port (\d+)")


def start_server(repository: Path, *extra: str) -> tuple[subprocess.Popen[str], int, list[str]]:
    """Start `python -m service` on free ports; return it, its gRPC port and its log lines."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "service",
            "--model-repository",
            str(repository),
            "--host",
            "127.0.0.1",
            "--grpc-port",
            "0",
            "--metrics-port",
            "0",
            *extra,
        ],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert process.stderr is not None
    lines: list[str] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        lines.append(line)
        match = PORT_LINE.search(line)
        if match:
            threading.Thread(
                target=lambda: lines.extend(process.stderr),  # type: ignore[arg-type]
                daemon=True,
            ).start()
            return process, int(match.group(1)), lines
    process.kill()
    raise AssertionError("server did not start:\n" + "".join(lines))


def test_sigterm_during_load_loses_no_accepted_request(tmp_path: Path) -> None:
    repository = write_test_repository(tmp_path, broken=False)
    process, port, log = start_server(repository, "--grace-period-s", "10")
    request = infer_request("classifier", images(1))
    with unary_load(f"127.0.0.1:{port}", request, clients=6) as outcomes:
        time.sleep(1.0)
        before = outcomes["ok"]
        process.send_signal(signal.SIGTERM)
        code = process.wait(30)
    text = "".join(log)
    assert code == 0, text
    assert before > 0, "no request succeeded before SIGTERM"
    # Requests in transit when the server closes its doors fail with UNAVAILABLE or CANCELLED
    # without reaching a handler; every request the server did accept must have been answered
    # and received: the server's success count equals the client's.
    assert set(outcomes) <= {"ok", "UNAVAILABLE", "CANCELLED"}, outcomes
    drained = re.search(r"drained: (\d+) requests succeeded, (\d+) failed", text)
    assert drained, text
    assert (int(drained.group(1)), int(drained.group(2))) == (outcomes["ok"], 0), outcomes
    assert "stopped" in text


def test_bad_repository_exits_with_a_message(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "service", "--model-repository", str(tmp_path / "missing")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 2
    assert "is not a folder" in done.stderr


def test_help_lists_every_setting() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "service", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    for flag in ("--model-repository", "--grpc-port", "--metrics-port", "--intra-op-threads"):
        assert flag in done.stdout
    assert "CNNSERVE_GRPC_PORT" in done.stdout


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_log_format(tmp_path: Path, fmt: str) -> None:
    repository = write_test_repository(tmp_path, broken=False)
    process, port, log = start_server(repository, "--log-format", fmt)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        assert stub(channel).ServerLive(pb.ServerLiveRequest()).live
    process.send_signal(signal.SIGINT)
    assert process.wait(30) == 0
    first = log[0]
    if fmt == "json":
        import json

        assert json.loads(first)["level"] == "INFO"
    else:
        assert " INFO " in first


def test_sigterm_during_a_stream_answers_every_message_it_read(tmp_path: Path) -> None:
    """Streams under load at SIGTERM: accepted messages finish, later ones get an error answer
    saying the server is shutting down, and no message read by the server goes unanswered."""
    repository = write_test_repository(tmp_path, broken=False)
    process, port, log = start_server(repository, "--grace-period-s", "10")
    request = infer_request("classifier", images(1))
    results: list[tuple[int, Counter[str]]] = []
    lock = threading.Lock()
    signalled = threading.Event()

    def streamer() -> None:
        seen_error = threading.Event()
        sent = 0

        def messages() -> Iterator[pb.ModelInferRequest]:
            nonlocal sent
            while not seen_error.is_set() and sent < 20_000:
                sent += 1
                yield request
                if signalled.is_set():
                    time.sleep(0.002)  # after SIGTERM: keep sending until told to stop

        answers: Counter[str] = Counter()
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            for answer in stub(channel).ModelStreamInfer(messages(), timeout=60):
                if answer.error_message:
                    answers[answer.error_message] += 1
                    seen_error.set()
                else:
                    answers["ok"] += 1
        with lock:
            results.append((sent, answers))

    threads = [threading.Thread(target=streamer) for _ in range(3)]
    for thread in threads:
        thread.start()
    time.sleep(1.5)
    signalled.set()
    process.send_signal(signal.SIGTERM)
    code = process.wait(40)
    for thread in threads:
        thread.join(30)
    text = "".join(log)
    assert code == 0, text
    assert len(results) == 3, "a stream ended with an error status"
    ok = sum(answers["ok"] for _, answers in results)
    for sent, answers in results:
        assert set(answers) <= {"ok", "the server is shutting down; this request was not run"}
        assert sum(answers.values()) == sent, "a message sent on the stream went unanswered"
    drained = re.search(r"drained: (\d+) requests succeeded, (\d+) failed", text)
    assert drained, text
    assert int(drained.group(1)) == ok > 0
    assert int(drained.group(2)) == 0


@pytest.mark.parametrize("workers", [1, 2])
def test_second_sigterm_during_the_drain_is_ignored(tmp_path: Path, workers: int) -> None:
    """SIGTERM twice, 75 ms apart, under load: one drain, exit 0, no traceback, nothing lost."""
    repository = write_test_repository(tmp_path, broken=False)
    process, port, log = start_server(
        repository, "--grace-period-s", "10", "--workers", str(workers)
    )
    request = infer_request("classifier", images(1))
    with unary_load(f"127.0.0.1:{port}", request, clients=6) as outcomes:
        time.sleep(1.0)
        before = outcomes["ok"]
        process.send_signal(signal.SIGTERM)
        time.sleep(0.075)
        process.send_signal(signal.SIGTERM)
        code = process.wait(60)
    time.sleep(0.2)  # the reader thread collects the last lines
    text = "".join(log)
    print(f"sent {sum(outcomes.values())}, answered {outcomes['ok']}, refused {dict(outcomes)}")
    assert code == 0, text
    assert "Traceback" not in text, text
    assert before > 0, "no request succeeded before SIGTERM"
    assert set(outcomes) <= {"ok", "UNAVAILABLE", "CANCELLED"}, outcomes
    assert re.search(r"received while stopping: ignored", text), text
    drained = re.findall(r"drained: (\d+) requests succeeded, (\d+) failed", text)
    assert len(drained) == workers, text
    assert sum(int(ok) for ok, _ in drained) == outcomes["ok"], (drained, outcomes)
    assert all(failed == "0" for _, failed in drained), drained


def test_a_server_that_cannot_start_exits_2_without_a_traceback(tmp_path: Path) -> None:
    """A port already taken: a clear message and exit code 2, for one server and for workers."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        repository = write_test_repository(tmp_path, broken=False)
        for workers in ("1", "2"):
            done = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "service",
                    "--model-repository",
                    str(repository),
                    "--host",
                    "127.0.0.1",
                    "--grpc-port",
                    str(port),
                    "--metrics-port",
                    "-1",
                    "--workers",
                    workers,
                ],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=120,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
            assert done.returncode == 2, (workers, done.stderr)
            assert "Traceback" not in done.stderr, done.stderr
