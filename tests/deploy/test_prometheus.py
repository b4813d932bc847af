"""A real Prometheus with the shipped scrape config and rules, scraping a real server under load.

The shipped prometheus.yml is used as it is, but for three things a test must change: the target
(the server's free metrics port), the scrape and evaluation intervals (1 s, not 15 s), and the
rule file paths (absolute). Then: the target is up, the recording rules produce series, and every
PromQL expression of the rules and the dashboard evaluates without error through the HTTP API,
the main ones with data.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import yaml

from bench.loadgen import free_port
from tests.deploy.tools import DEPLOY, binary
from tests.support.harness import ServerThread, infer_request, running_server, stub

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

PROMETHEUS = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "cnnserve-dashboard.json"
MODEL = "mnist_cnn"
# Recording rules that light load must fill (compute p99 and the error ratio too: every
# outcome series starts at zero, so the ratio is 0, not missing).
MUST_HAVE_DATA = (
    "cnnserve:requests:rate1m",
    "cnnserve:inferences:rate1m",
    "cnnserve:request_errors:ratio_rate5m",
    "cnnserve:request_duration_seconds:p50_rate5m",
    "cnnserve:request_duration_seconds:p99_rate5m",
    "cnnserve:queue_duration_seconds:p99_rate5m",
    "cnnserve:compute_duration_seconds:p99_rate5m",
    "cnnserve:batch_size:mean_rate5m",
    "cnnserve:queue_depth:max",
    "cnnserve:inflight_requests:sum",
)
DASHBOARD_MAIN = (
    "Throughput",
    "Request latency (p50, p90, p99)",
    "Executed batch size",
    "Queue depth and requests in flight",
    "Model state",
    "Execution provider",
    "Targets up",
)


class Load:
    """A few clients sending small batches (and a bad request now and then) until stopped."""

    def __init__(self, address: str, clients: int = 2, limit_s: float = 300) -> None:
        self.address = address
        self.stop = threading.Event()
        self.sent = 0
        self.deadline = time.monotonic() + limit_s
        self.threads = [
            threading.Thread(target=self.run, args=(i,), daemon=True) for i in range(clients)
        ]

    def run(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        with grpc.insecure_channel(self.address) as channel:
            client = stub(channel)
            while not self.stop.is_set() and time.monotonic() < self.deadline:
                images = rng.random((int(rng.integers(1, 5)), 1, 28, 28), dtype=np.float32)
                request = infer_request(MODEL, images)
                if self.sent % 25 == 0:
                    request.inputs[0].datatype = "FP64"  # refused: INVALID_ARGUMENT
                with contextlib.suppress(grpc.RpcError):
                    client.ModelInfer(request, timeout=10)
                self.sent += 1
                time.sleep(0.01)

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)


def get(url: str, params: dict[str, str] | None = None) -> Any:
    if params:
        url += "?" + urllib.parse.urlencode(params)
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def server(request: pytest.FixtureRequest) -> Iterator[ServerThread]:
    """The server on CNNSERVE_TEST_REPOSITORY, else on the session's trained repository."""
    given = os.environ.get("CNNSERVE_TEST_REPOSITORY")
    repository = Path(given) if given else request.getfixturevalue("mnist_repository")
    with running_server(repository) as thread:
        yield thread


@pytest.fixture(scope="module")
def prometheus(server: ServerThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    executable = binary("prometheus", "apt-get install prometheus (make sysdeps)")
    workdir = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(PROMETHEUS / f) for f in config["rule_files"]]
    (job,) = config["scrape_configs"]
    assert server.server is not None
    job["static_configs"] = [{"targets": [f"127.0.0.1:{server.server.metrics_port}"]}]
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = (workdir / "prometheus.log").open("w")
    process = subprocess.Popen(
        [
            executable,
            f"--config.file={workdir / 'prometheus.yml'}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                get(f"{url}/api/v1/status/buildinfo")
                break
            except OSError:
                assert process.poll() is None, (workdir / "prometheus.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "prometheus did not start"
                time.sleep(0.5)
        with Load(server.address):
            # Enough scrapes for 1m rates, and every recording rule evaluated on them.
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                if all(query(url, name) for name in MUST_HAVE_DATA):
                    break
                time.sleep(2)
            yield url
    finally:
        process.terminate()
        process.wait(30)
        log.close()


def query(url: str, expr: str) -> list[Any]:
    """Evaluate `expr` now; a PromQL error fails the test."""
    answer = get(f"{url}/api/v1/query", {"query": expr})
    assert answer["status"] == "success", (expr, answer)
    return list(answer["data"]["result"])


def rule_exprs() -> dict[str, str]:
    exprs = {}
    for name in ("recording.yml", "alerts.yml"):
        for group in yaml.safe_load((PROMETHEUS / "rules" / name).read_text())["groups"]:
            for rule in group["rules"]:
                exprs[rule.get("record") or rule["alert"]] = rule["expr"]
    return exprs


def dashboard_exprs() -> dict[str, str]:
    """Each panel target's PromQL with Grafana's variables filled as 'All' would."""
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = {}
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            exprs[f"{panel['title']} {target['refId']}"] = fill(target["expr"])
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":  # label_values(SELECTOR, label): evaluate the selector
            inner = variable["definition"].removeprefix("label_values(").rsplit(",", 1)[0]
            exprs[f"variable {variable['name']}"] = fill(inner)
    return exprs


def fill(expr: str) -> str:
    return expr.replace("$__rate_interval", "1m").replace("$job", ".*").replace("$model", ".*")


def test_target_is_up(prometheus: str) -> None:
    targets = get(f"{prometheus}/api/v1/targets")["data"]["activeTargets"]
    assert [t["health"] for t in targets] == ["up"], targets
    assert targets[0]["labels"]["job"] == "cnnserve"


def test_rules_are_loaded_and_healthy(prometheus: str) -> None:
    groups = get(f"{prometheus}/api/v1/rules")["data"]["groups"]
    rules = {r["name"]: r for g in groups for r in g["rules"]}
    assert set(rules) == set(rule_exprs())
    unhealthy = {name: r.get("lastError") for name, r in rules.items() if r["health"] != "ok"}
    assert not unhealthy


def test_recording_rules_produce_series(prometheus: str) -> None:
    empty = [name for name in MUST_HAVE_DATA if not query(prometheus, name)]
    assert not empty, f"no series for {empty}"
    (series,) = [
        s
        for s in query(prometheus, 'cnnserve:requests:rate1m{outcome="success"}')
        if s["metric"]["model"] == MODEL
    ]
    assert float(series["value"][1]) > 0
    (mean,) = [
        s
        for s in query(prometheus, "cnnserve:batch_size:mean_rate5m")
        if s["metric"]["model"] == MODEL
    ]
    assert 1 <= float(mean["value"][1]) <= 128


def test_every_rule_expression_evaluates(prometheus: str) -> None:
    for expr in rule_exprs().values():
        query(prometheus, expr)  # asserts no error
    # No alert fires on a healthy server under light load.
    firing = [
        a for a in get(f"{prometheus}/api/v1/alerts")["data"]["alerts"] if a["state"] == "firing"
    ]
    assert not firing, firing


def test_every_dashboard_expression_evaluates(prometheus: str) -> None:
    results = {name: query(prometheus, expr) for name, expr in dashboard_exprs().items()}
    main = [name for name in results if name.rsplit(" ", 1)[0] in DASHBOARD_MAIN]
    assert len(main) >= len(DASHBOARD_MAIN)
    empty = [name for name in main if not results[name]]
    assert not empty, f"main dashboard queries without data: {empty}"
    assert results["variable model"], "the model variable lists no model"
