"""--batch-poller on a real server: gRPC's poller thread runs SCHED_BATCH and the OS shows it
as grpc_poller, while it serves; off, every thread keeps the normal policy."""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import numpy as np
import pytest

from tests.support.faults import server
from tests.support.harness import infer_request, stub

pytestmark = pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="SCHED_BATCH is Linux's")


def policies(pid: int) -> dict[str, set[int]]:
    """The scheduling policies of `pid`'s threads, by the name the OS shows."""
    found: dict[str, set[int]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            found.setdefault(name, set()).add(os.sched_getscheduler(int(task.name)))
        except (FileNotFoundError, ProcessLookupError):  # a thread that just ended
            continue
    return found


def answers(address: str) -> None:
    request = infer_request("mnist_cnn", np.random.default_rng(0).random((1, 1, 28, 28)))
    with grpc.insecure_channel(address) as channel:
        for _ in range(50):
            assert len(stub(channel).ModelInfer(request, timeout=30).raw_output_contents) == 2


def test_the_poller_yields_to_the_event_loop(mnist_repository: Path) -> None:
    with server(mnist_repository) as srv:
        answers(srv.address)
        found = policies(srv.pid)
    assert found["grpc_poller"] == {os.SCHED_BATCH}
    others = set().union(*(p for name, p in found.items() if name != "grpc_poller"))
    assert others == {os.SCHED_OTHER}
    assert "gRPC's poller (thread" in srv.text


def test_no_batch_poller_keeps_the_normal_policy(mnist_repository: Path) -> None:
    with server(mnist_repository, "--no-batch-poller") as srv:
        answers(srv.address)
        found = policies(srv.pid)
    assert "grpc_poller" not in found
    assert set().union(*found.values()) == {os.SCHED_OTHER}
