"""A real server's gRPC poller thread shows as grpc_poller where the OS lists threads, and its
model instances as model:version-instance (processes of their own with --instances process,
the default where the instances get CPUs of their own; threads with --instances thread)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.faults import descendants, server

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="Linux's /proc")


def thread_names(pid: int) -> set[str]:
    return {(task / "comm").read_text().strip() for task in Path(f"/proc/{pid}/task").iterdir()}


def test_the_poller_thread_and_the_instance_process_are_named(mnist_repository: Path) -> None:
    with server(mnist_repository, "--instances", "process") as srv:
        names = thread_names(srv.pid)
        below = descendants(srv.pid)
    assert "grpc_poller" in names
    assert "mnist_cnn:1-0" in below.values()


def test_instance_threads_are_named(mnist_repository: Path) -> None:
    with server(mnist_repository, "--instances", "thread") as srv:
        names = thread_names(srv.pid)
        below = descendants(srv.pid)
    assert {"grpc_poller", "mnist_cnn:1-0"} <= names
    assert "mnist_cnn:1-0" not in below.values()
