"""Hostile connections against a real server process, with a normal client measured throughout.

- 5,000 TCP connections that never send the HTTP/2 preface: gRPC closes each one at the
  handshake timeout (`--handshake-timeout-s`, gRPC's `grpc.server_handshake_timeout_ms`).
- 1,000 connections that open a ModelInfer stream and never send its body (slowloris): the
  streams hold no model slot; the connections go at `--max-connection-age-s` plus the grace.
- an HTTP/2 rapid-reset flood (HEADERS then RST_STREAM, CVE-2023-44487).
- a connection with no RPC in progress is closed at `--max-connection-idle-s`.

In each case the normal client keeps its answers within 10x its p99 measured just before (with a
floor: see P99_FLOOR_S), and the server's RSS and descriptors stay within stated bounds and come
back once the connections are gone.
"""

from __future__ import annotations

import contextlib
import json
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.hostile import H2Client
from tests.support.faults import (
    ROOT,
    ServerProcess,
    percentile,
    probe_latencies,
    server,
    wait_for,
)
from tests.support.harness import infer_request
from tests.support.onnx_models import classifier_config, classifier_graph, images, write_model

IDLE_CONNECTIONS = 5000
SLOW_CONNECTIONS = 1000
HANDSHAKE_S = 3.0
# gRPC's idle limit also counts a connection that never sent its preface: it must come after the
# handshake timeout for that to be what closes them (with 2 s they went at 2.4-2.6 s, at 10 s 3.4).
IDLE_S = 4.0
AGE_S = 5.0
GRACE_S = 1.0
FLOOD_S = 6.0
SETTLE_S = 0.5
PROBES = 200
# 10x a p99 of ~3 ms is 30 ms, the size of one scheduler hiccup on a shared 2-core machine:
# the bound is 10x the baseline p99 or this floor, whichever is larger. The flood's client and
# the server share the two cores, so the p99 under attack reached 60-100 ms here with the stream
# cap; without it, 1.0-2.2 s. The floor sits between the two.
P99_FLOOR_S = 0.4
RSS_PER_CONNECTION = 64 * 1024  # bytes the server may hold per hostile connection, at most
RSS_FLOOR = 32 * 2**20  # ... or this much in all (allocator arenas, a few batches' buffers)
FD_SLACK = 64  # descriptors beyond one a connection (epoll, pipes, a worker thread's)


@pytest.fixture(scope="module", autouse=True)
def enough_descriptors() -> Iterator[None]:
    """The clients (here) and the server (a child: it inherits the limit) need ~5,100 each."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = IDLE_CONNECTIONS + 1024
    if hard != resource.RLIM_INFINITY and hard < want:
        pytest.fail(f"RLIMIT_NOFILE hard limit {hard} < {want}: raise it (ulimit -Hn)")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[ServerProcess]:
    write_model(tmp_path, classifier_config("classifier"), classifier_graph())
    with server(
        tmp_path,
        "--handshake-timeout-s", str(HANDSHAKE_S),
        "--max-connection-idle-s", str(IDLE_S),
        "--max-connection-age-s", str(AGE_S),
        "--max-connection-age-grace-s", str(GRACE_S),
        "--max-streams-per-connection", "100",  # the cap that stops a rapid-reset flood
    ) as running:  # fmt: skip
        yield running


REQUEST = infer_request("classifier", images(1))


def p99(srv: ServerProcess) -> float:
    return percentile(probe_latencies(srv.address, REQUEST, PROBES), 99)


def baseline(srv: ServerProcess) -> tuple[float, dict[str, int]]:
    p99(srv)  # warm up
    return min(p99(srv) for _ in range(2)), srv.status()


def check_client(name: str, base_p99: float, under_attack: float) -> None:
    bound = max(10 * base_p99, P99_FLOOR_S)
    print(
        f"  {name}: normal client p99 {under_attack * 1e3:.1f} ms under attack, "
        f"{base_p99 * 1e3:.1f} ms before (bound {bound * 1e3:.0f} ms)"
    )
    assert under_attack <= bound


def check_bounds(name: str, base: dict[str, int], peak: dict[str, int], hostile: int) -> None:
    rss = peak["rss"] - base["rss"]
    print(
        f"  {name}: server RSS {base['rss'] / 2**20:.0f} -> {peak['rss'] / 2**20:.0f} MiB "
        f"(+{rss / hostile / 1024:.1f} KiB a connection), fds {base['fds']} -> {peak['fds']}, "
        f"threads {base['threads']} -> {peak['threads']}"
    )
    assert rss <= max(hostile * RSS_PER_CONNECTION, RSS_FLOOR)
    assert peak["fds"] <= base["fds"] + hostile + FD_SLACK


class Attacker:
    """`python -m bench.hostile MODE`: the attack runs in a process of its own."""

    def __init__(self, mode: str, address: str, amount: float) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.hostile", mode, address, str(amount)],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        assert line.strip() == "ready", line
        self.last: dict[str, Any] = {}

    def report(self) -> dict[str, Any]:
        """The attacker's latest report (blocks for the next one, 0.25 s at most)."""
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if line:
            self.last = json.loads(line)
        return self.last

    def stop(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            with contextlib.suppress(BrokenPipeError):
                self.process.stdin.close()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()


def held_connections(srv: ServerProcess, mode: str, count: int, limit_s: float, what: str) -> None:
    """Open `count` hostile connections, measure the normal client and the server while they
    are held, then wait for the server to close them all (at `limit_s`, not before)."""
    base_p99, base = baseline(srv)
    attacker = Attacker(mode, srv.address, count)
    try:
        time.sleep(SETTLE_S)  # the server accepts the burst of connections first
        peak = srv.status()
        under = p99(srv)
        peak = {k: max(v, srv.status()[k]) for k, v in peak.items()}
        early = attacker.report()
        print(f"\n  {count} {what} open (the server closed {early['closed']} so far)")
        check_client(mode, base_p99, under)
        check_bounds(mode, base, peak, count)
        assert early["t"] < limit_s * 0.9 and early["closed"] == 0, early
        deadline = time.monotonic() + limit_s * 1.2 + 20
        while attacker.report().get("closed", 0) < count:
            assert time.monotonic() < deadline, attacker.last
        last = attacker.last
        print(
            f"  all {count} closed by the server {last['t']:.1f} s after opening "
            f"({last['goaways']} after a GOAWAY; limit {limit_s:g} s)"
        )
        assert last["t"] >= limit_s * 0.8
        wait_for(lambda: srv.status()["fds"] <= base["fds"] + FD_SLACK, 10, "descriptors back")
        after = srv.status()
        print(f"  after: fds {after['fds']}, RSS {after['rss'] / 2**20:.0f} MiB")
    finally:
        attacker.stop()
    assert p99(srv) <= max(10 * base_p99, P99_FLOOR_S)


def test_idle_connections_without_preface_are_closed_at_the_handshake_timeout(
    srv: ServerProcess,
) -> None:
    held_connections(
        srv, "idle", IDLE_CONNECTIONS, HANDSHAKE_S, "TCP connections without an HTTP/2 preface"
    )


def test_slowloris_streams_are_dropped_at_the_connection_age(srv: ServerProcess) -> None:
    held_connections(
        srv, "slowloris", SLOW_CONNECTIONS, AGE_S, "connections holding a stream with no body"
    )


def test_rapid_reset_flood(srv: ServerProcess) -> None:
    base_p99, base = baseline(srv)
    attacker = Attacker("reset", srv.address, FLOOD_S)
    try:
        time.sleep(1.0)
        peak = srv.status()
        under = p99(srv)
        peak = {k: max(v, srv.status()[k]) for k, v in peak.items()}
        again = p99(srv)
        done = attacker.report()
    finally:
        attacker.stop()
    print(
        f"\n  rapid reset: {done['streams']} streams opened and reset in {done['seconds']:.1f} s "
        f"over {done['connections']} connection(s); server GOAWAYs: {done['goaways'][:3]}"
    )
    check_client("rapid reset", base_p99, max(under, again))
    check_bounds("rapid reset", base, peak, max(done["connections"], 1))
    assert done["streams"] > 1000  # the flood did run


def test_an_idle_connection_is_closed_at_the_idle_limit(srv: ServerProcess) -> None:
    client = H2Client.open(srv.address)
    opened = time.monotonic()
    try:
        gone = wait_for(lambda: (client.pump(), client.closed)[1], IDLE_S * 1.2 + 10, "close")
    finally:
        client.close()
    print(f"\n  an idle HTTP/2 connection: GOAWAY {client.goaway} after {gone:.1f} s")
    assert client.goaway is not None and client.goaway_at is not None
    assert IDLE_S * 0.8 <= time.monotonic() - opened < AGE_S
