"""A real server's gRPC poller thread shows as grpc_poller where the OS lists threads, beside the
batch threads' model:version-instance."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.faults import server

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="Linux's /proc")


def test_the_poller_thread_is_named(mnist_repository: Path) -> None:
    with server(mnist_repository) as srv:
        names = {
            (task / "comm").read_text().strip() for task in Path(f"/proc/{srv.pid}/task").iterdir()
        }
    assert {"grpc_poller", "mnist_cnn:1-0"} <= names
