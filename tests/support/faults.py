"""Helpers for the fault tests: a server in its own process, client load that counts every
request it sends, and the server's resources read from /proc.

The server runs as `python -m service` in a process of its own so that its memory, threads and
descriptors can be read apart from the clients', and the clients' threads do not share its GIL.
"""

from __future__ import annotations

import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from pb import grpc_service_pb2 as pb
from pb import grpc_service_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent.parent
PORT_LINE = re.compile(r"on gRPC port (\d+), metrics port (\S+)")


@dataclass
class ServerProcess:
    """`python -m service` started on a free port; its log lines are collected as they come."""

    process: subprocess.Popen[str]
    port: int
    log: list[str]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def text(self) -> str:
        return "".join(self.log)

    @property
    def pid(self) -> int:
        return self.process.pid

    def status(self) -> dict[str, int]:
        """RSS (bytes), threads and open descriptors of the server process, from /proc."""
        return process_status(self.pid)

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM, wait, and return the exit code (SIGKILL if it does not stop in time)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(10)


def start_server(
    repository: Path,
    *extra: str,
    env: dict[str, str] | None = None,
    ready_line: re.Pattern[str] = PORT_LINE,
) -> ServerProcess:
    """Start `python -m service` on free ports (metrics off unless `extra` asks); wait for it."""
    process = subprocess.Popen(
        [
            sys.executable, "-m", "service", "--model-repository", str(repository),
            "--host", "127.0.0.1", "--grpc-port", "0", "--metrics-port", "-1", "--http-port", "-1", "--no-uvloop",
            *extra,
        ],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
    )  # fmt: skip
    match, lines = wait_for_line(process, ready_line, "server")
    port = int(match.group(1) if ready_line is PORT_LINE else match.group(2))
    return ServerProcess(process, port, lines)


def wait_for_line(
    process: subprocess.Popen[str], ready_line: re.Pattern[str], what: str, timeout: float = 90
) -> tuple[re.Match[str], list[str]]:
    """Read the process's stderr until `ready_line` matches (then keep collecting it in a
    thread); returns the match and the lines, which keep growing. Kills it on a timeout."""
    assert process.stderr is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        lines.append(line)
        match = ready_line.search(line)
        if match:
            threading.Thread(
                target=lambda: lines.extend(process.stderr),  # type: ignore[arg-type]
                daemon=True,
            ).start()
            return match, lines
    process.kill()
    raise AssertionError(f"{what} did not start:\n" + "".join(lines))


@contextmanager
def server(
    repository: Path, *extra: str, env: dict[str, str] | None = None
) -> Iterator[ServerProcess]:
    """A `start_server` for the length of a with-block."""
    running = start_server(repository, *extra, env=env)
    try:
        yield running
    finally:
        running.stop()


def process_status(pid: int) -> dict[str, int]:
    """A process's RSS (bytes), threads and open file descriptors, from /proc."""
    status: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as lines:
        for line in lines:
            key, _, value = line.partition(":")
            if key == "VmRSS":
                status["rss"] = int(value.split()[0]) * 1024
            elif key == "Threads":
                status["threads"] = int(value.split()[0])
    status["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return status


def descendants(pid: int) -> dict[int, str]:
    """Every process below `pid` (its model instance processes, their forkserver), by PID, with
    the name the OS shows for it."""
    parents: dict[int, int] = {}
    names: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # a process that just ended
            continue
        name, _, rest = stat.partition(" (")[2].rpartition(") ")
        parents[int(entry.name)] = int(rest.split()[1])
        names[int(entry.name)] = name
    found: dict[int, str] = {}
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier}
        found.update({child: names[child] for child in frontier})
    return found


def channel(address: str) -> grpc.Channel:
    """A channel with a connection of its own (gRPC otherwise shares one per target)."""
    return grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])


@dataclass
class Outcome:
    """One request: when it was sent (monotonic), how long it took, and its status name."""

    sent: float
    seconds: float
    code: str
    details: str = ""


@dataclass
class Traffic:
    """Counts of the requests that load clients sent and what came back."""

    outcomes: list[Outcome] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, outcome: Outcome) -> None:
        with self.lock:
            self.outcomes.append(outcome)

    def since(self, start: float, end: float = float("inf")) -> list[Outcome]:
        with self.lock:
            return [o for o in self.outcomes if start <= o.sent < end]

    @property
    def sent(self) -> int:
        return len(self.outcomes)

    @property
    def answered(self) -> int:
        return sum(o.code == "OK" for o in self.outcomes)

    def failures(self) -> Counter[str]:
        with self.lock:
            return Counter(o.code for o in self.outcomes if o.code != "OK")

    def first_failures(self, count: int = 5) -> list[str]:
        with self.lock:
            return [f"{o.code}: {o.details}" for o in self.outcomes if o.code != "OK"][:count]

    def summary(self, label: str = "load") -> str:
        """One line: sent, answered, failed by status, and the latencies of the answered."""
        failed = self.failures()
        ok = [o.seconds for o in self.outcomes if o.code == "OK"]
        lat = ""
        if ok:
            lat = f", p50 {percentile(ok, 50) * 1e3:.1f} ms p99 {percentile(ok, 99) * 1e3:.1f} ms"
        return (
            f"{label}: sent {self.sent}, answered {self.answered}, lost {self.sent - self.answered}"
            + (f" ({dict(failed)})" if failed else "")
            + lat
        )


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


@contextmanager
def load(
    address: str,
    request: pb.ModelInferRequest,
    clients: int = 4,
    in_flight: int = 2,
    pause_s: float = 0.0,
    timeout_s: float = 10.0,
    keep_going: Callable[[], bool] = lambda: True,
    wait_for_ready: bool = False,
) -> Iterator[Traffic]:
    """`clients` threads, each on a connection of its own with `in_flight` requests at a time,
    send `request` until the block ends; every request's outcome goes into the Traffic.

    `wait_for_ready`: a call made while the channel reconnects waits for it instead of failing
    at once with UNAVAILABLE (gRPC's default, fail fast)."""
    traffic = Traffic()
    stop = threading.Event()

    def client() -> None:
        with channel(address) as ch:
            infer = pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer
            while not stop.is_set() and keep_going():
                started = [
                    (
                        time.monotonic(),
                        infer.future(request, timeout=timeout_s, wait_for_ready=wait_for_ready),
                    )
                    for _ in range(in_flight)
                ]
                for sent, future in started:
                    try:
                        future.result()
                        traffic.add(Outcome(sent, time.monotonic() - sent, "OK"))
                    except grpc.RpcError as exc:
                        traffic.add(
                            Outcome(sent, time.monotonic() - sent, exc.code().name, exc.details())
                        )
                if pause_s:
                    stop.wait(pause_s)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    try:
        yield traffic
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout_s + 5)


def probe_latencies(address: str, request: pb.ModelInferRequest, count: int) -> list[float]:
    """Send `count` requests one after another on a fresh connection; their latencies (s)."""
    seconds: list[float] = []
    with channel(address) as ch:
        infer = pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer
        infer(request, timeout=10)  # connect and warm
        for _ in range(count):
            start = time.perf_counter()
            infer(request, timeout=10)
            seconds.append(time.perf_counter() - start)
    return seconds


def median(values: list[float]) -> float:
    return statistics.median(values)


def repository_index(address: str, name: str = "") -> list[pb.RepositoryIndexResponse.ModelIndex]:
    """The server's RepositoryIndex rows (of one model when `name` is given)."""
    with channel(address) as ch:
        rows = pb_grpc.GRPCInferenceServiceStub(ch).RepositoryIndex(
            pb.RepositoryIndexRequest(), timeout=10
        )
    return [r for r in rows.models if not name or r.name == name]


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll `check` until it is true; return the seconds it took (AssertionError on timeout)."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)
    return time.monotonic() - start
