"""`python -m service --workers 2` as real processes on real ports: connections spread over the
workers, statistics and metrics add up across them, a killed worker comes back, SIGTERM drains."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from pb import grpc_service_pb2 as pb
from tests.conftest import ROOT
from tests.support.faults import wait_for_line
from tests.support.harness import infer_request, stub, unary_load
from tests.support.onnx_models import images, write_test_repository

GROUP_LINE = re.compile(r"(\d+) workers serving on gRPC port (\d+), metrics port (\d+)")
STARTED = re.compile(r"started worker (\d+) \(pid (\d+)\)")
AGAIN = re.compile(r"worker (\d+) \(pid (\d+)\) is serving again")
CONNECTIONS = 16  # a connection lands on one worker; with 16, both see some (1 - 2**-15)


@dataclass
class Group:
    process: subprocess.Popen[str]
    port: int
    metrics_port: int
    log: list[str]

    @property
    def text(self) -> str:
        return "".join(self.log)

    def pids(self) -> dict[int, int]:
        """Worker index -> pid of its latest process, from the supervisor's log."""
        pids: dict[int, int] = {}
        for match in STARTED.finditer(self.text):
            pids[int(match.group(1))] = int(match.group(2))
        return pids

    def scrape(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            return str(response.read().decode())


def start_group(repository: Path, *extra: str, workers: int = 2) -> Group:
    process = subprocess.Popen(
        [
            sys.executable, "-m", "service", "--model-repository", str(repository),
            "--host", "127.0.0.1", "--grpc-port", "0", "--metrics-port", "0", "--http-port", "0",
            "--workers", str(workers), "--no-uvloop", *extra,
        ],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    match, lines = wait_for_line(process, GROUP_LINE, "workers")
    return Group(process, int(match.group(2)), int(match.group(3)), lines)


@pytest.fixture
def group(tmp_path: Path) -> Iterator[Group]:
    repository = write_test_repository(tmp_path, broken=False)
    group = start_group(repository)
    yield group
    if group.process.poll() is None:
        group.process.send_signal(signal.SIGTERM)
        try:
            group.process.wait(30)
        except subprocess.TimeoutExpired:
            group.process.kill()


def channel(port: int) -> grpc.Channel:
    """A channel with a connection of its own (gRPC otherwise shares one per target)."""
    return grpc.insecure_channel(
        f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]
    )


def send_over_connections(port: int, per_connection: int, images_each: int = 1) -> int:
    """Send `per_connection` ModelInfer requests on each of CONNECTIONS new connections."""
    request = infer_request("classifier", images(images_each))
    sent = 0
    for _ in range(CONNECTIONS):
        with channel(port) as ch:
            infer = stub(ch).ModelInfer
            futures = [infer.future(request, timeout=30) for _ in range(per_connection)]
            for future in futures:
                assert future.result().model_name == "classifier"
                sent += 1
    return sent


def per_worker(text: str, family: str, **labels: str) -> dict[str, float]:
    """Sum of a family's samples matching `labels`, by worker."""
    totals: Counter[str] = Counter()
    for metric in text_string_to_metric_families(text):
        if metric.name != family:
            continue
        for sample in metric.samples:
            if sample.name.endswith("_created"):
                continue
            if all(sample.labels.get(k) == v for k, v in labels.items()):
                totals[sample.labels["worker"]] += sample.value
    return dict(totals)


def group_statistics(port: int) -> pb.ModelStatistics:
    with channel(port) as ch:
        response = stub(ch).ModelStatistics(
            pb.ModelStatisticsRequest(name="classifier", version="1"), timeout=10
        )
    (stats,) = response.model_stats
    return stats


def test_connections_spread_and_statistics_and_metrics_add_up(group: Group) -> None:
    sent = send_over_connections(group.port, per_connection=5, images_each=2)
    assert sent == CONNECTIONS * 5
    # Whichever worker answers ModelStatistics, it reports the whole group.
    for _ in range(6):
        stats = group_statistics(group.port)
        assert stats.inference_stats.success.count == sent
        assert stats.inference_count == 2 * sent
        assert stats.inference_stats.fail.count == 0
        batched = sum(b.batch_size * b.compute_infer.count for b in stats.batch_stats)
        assert batched == stats.inference_count
    text = group.scrape()
    served = per_worker(text, "cnnserve_requests", model="classifier", outcome="success")
    assert set(served) == {"0", "1"} and all(n > 0 for n in served.values()), served
    assert sum(served.values()) == sent
    assert per_worker(text, "cnnserve_worker_up") == {"0": 1.0, "1": 1.0}
    assert set(per_worker(text, "process_cpu_seconds")) == {"0", "1"}
    promtool = shutil.which("promtool")
    if promtool:
        check = subprocess.run(
            [promtool, "check", "metrics"], input=text, capture_output=True, text=True
        )
        assert check.returncode == 0, check.stdout + check.stderr


def test_health_on_every_worker(group: Group) -> None:
    for _ in range(8):
        with channel(group.port) as ch:
            answer = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
            assert stub(ch).ServerReady(pb.ServerReadyRequest()).ready


def test_killed_worker_is_restarted_and_the_group_keeps_answering(group: Group) -> None:
    victim = group.pids()[0]
    os.kill(victim, signal.SIGKILL)
    # Reaped by the supervisor: its listening socket is closed (a zombie's threads may not be).
    while Path(f"/proc/{victim}").exists():
        time.sleep(0.01)
    # While worker 0 is down, new connections go to worker 1 only, and are answered.
    assert send_over_connections(group.port, per_connection=1) == CONNECTIONS
    deadline = time.monotonic() + 60
    while not AGAIN.search(group.text):
        assert time.monotonic() < deadline, group.text
        assert group.process.poll() is None, group.text
        time.sleep(0.1)
    assert f"worker 0 (pid {victim}) exited with code -9" in group.text
    assert group.pids()[0] != victim
    sent = send_over_connections(group.port, per_connection=3)
    text = group.scrape()
    assert per_worker(text, "cnnserve_worker_restarts") == {"0": 1.0, "1": 0.0}
    served = per_worker(text, "cnnserve_requests", model="classifier", outcome="success")
    assert served["0"] > 0, "the restarted worker got no connection"
    # Worker 0's counts died with it; worker 1 kept all of its own.
    assert served["0"] + served["1"] == group_statistics(group.port).inference_stats.success.count
    assert served["0"] + served["1"] >= sent


def test_sigterm_drains_every_worker_and_exits_zero(group: Group) -> None:
    request = infer_request("classifier", images(1))
    with unary_load(f"127.0.0.1:{group.port}", request, clients=8) as outcomes:
        time.sleep(1.5)
        group.process.send_signal(signal.SIGTERM)
        code = group.process.wait(40)
    text = group.text
    assert code == 0, text
    assert set(outcomes) <= {"ok", "UNAVAILABLE", "CANCELLED"}, outcomes
    drained = re.findall(r"\[worker (\d)\] service.app: drained: (\d+) requests succeeded, "
                         r"(\d+) failed", text)  # fmt: skip
    assert sorted(w for w, _, _ in drained) == ["0", "1"], text
    # Every request a worker accepted was answered and received.
    assert sum(int(ok) for _, ok, _ in drained) == outcomes["ok"] > 0, outcomes
    assert all(failed == "0" for _, _, failed in drained)
    assert "all 2 workers stopped" in text


def test_ctrl_c_reaches_each_worker_once(group: Group) -> None:
    """SIGINT to the whole process group (a terminal's Ctrl-C): workers ignore it, the
    supervisor forwards one SIGTERM, and the group drains and exits 0."""
    group.process.send_signal(signal.SIGINT)
    for pid in group.pids().values():
        os.kill(pid, signal.SIGINT)  # what a terminal does to every process of the group
    assert group.process.wait(40) == 0, group.text
    assert group.text.count("drained:") == 2


def test_a_worker_that_cannot_start_stops_the_group(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "service", "--model-repository", str(tmp_path / "missing"),
         "--host", "127.0.0.1", "--grpc-port", "0", "--metrics-port", "0", "--http-port", "0",
         "--workers", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=90,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "is not a folder" in done.stderr
    assert "could not start" in done.stderr


HTTP_LINE = re.compile(r"workers share HTTP port (\d+)")


def test_workers_share_the_http_port_and_its_statistics_add_up(group: Group) -> None:
    """Every worker listens on the one HTTP port: new connections spread over them, and
    /v2/models/{m}/stats on any of them sums the group, as gRPC ModelStatistics does."""
    match = HTTP_LINE.search(group.text)
    assert match, group.text
    url = f"http://127.0.0.1:{int(match.group(1))}/v2/models/classifier/infer"
    infer = json.dumps(
        {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 28, 28],
                     "data": [0.0] * 784}]}
    ).encode()  # fmt: skip
    for _ in range(40):  # urllib opens a connection per request
        with urllib.request.urlopen(urllib.request.Request(url, infer), timeout=10) as response:
            assert response.status == 200
    workers = set()
    for family in text_string_to_metric_families(group.scrape()):
        for sample in family.samples:
            labels = sample.labels
            if (
                sample.name == "cnnserve_http_responses_total"
                and sample.value > 0
                and (labels.get("route"), labels.get("code")) == ("infer", "200")
            ):
                workers.add(labels.get("worker"))
    assert len(workers) == 2, workers
    stats_url = f"http://127.0.0.1:{int(match.group(1))}/v2/models/classifier/stats"
    for _ in range(6):  # a connection each: both workers answer some of these
        with urllib.request.urlopen(stats_url, timeout=10) as response:
            (stats,) = json.loads(response.read())["model_stats"]
        assert (stats["name"], stats["version"]) == ("classifier", "1")
        assert stats["inference_stats"]["success"]["count"] == 40
        assert stats["inference_count"] == 40
        assert stats["inference_stats"]["fail"]["count"] == 0
        batched = sum(b["batch_size"] * b["compute_infer"]["count"] for b in stats["batch_stats"])
        assert batched == 40
        grpc_stats = group_statistics(group.port)
        assert stats["inference_stats"]["success"]["ns"] == grpc_stats.inference_stats.success.ns
