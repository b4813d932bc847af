"""Worker processes without processes: statistics merging, the run directory, the port."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from pb import grpc_service_pb2 as pb
from service.config import Settings
from service.workers.peers import merge_statistics
from service.workers.rundir import WorkerInfo, publish, published
from service.workers.supervisor import reserve_port


def stats(name: str, version: str, success: int, batches: dict[int, int], last: int = 0):
    s = pb.ModelStatistics(
        name=name,
        version=version,
        last_inference=last,
        inference_count=sum(size * n for size, n in batches.items()),
        execution_count=sum(batches.values()),
    )
    s.inference_stats.success.count = success
    s.inference_stats.success.ns = success * 1000
    s.inference_stats.queue.count = success
    s.inference_stats.queue.ns = success * 10
    for size, n in sorted(batches.items()):
        s.batch_stats.add(batch_size=size).compute_infer.count = n
    return s


def test_merge_sums_per_version_and_batch_size() -> None:
    one = [stats("a", "1", 5, {1: 3, 2: 1}, last=10), stats("b", "1", 1, {1: 1})]
    two = [stats("a", "1", 7, {2: 2, 4: 1}, last=30), stats("a", "2", 2, {1: 2})]
    merged = {(m.name, m.version): m for m in merge_statistics([one, two])}
    assert list(merged) == [("a", "1"), ("b", "1"), ("a", "2")]
    a1 = merged["a", "1"]
    assert a1.inference_stats.success.count == 12 and a1.inference_stats.success.ns == 12000
    assert a1.inference_stats.queue.ns == 120
    assert a1.inference_count == 5 + 8 and a1.execution_count == 4 + 3
    assert a1.last_inference == 30
    assert [(b.batch_size, b.compute_infer.count) for b in a1.batch_stats] == [
        (1, 3), (2, 3), (4, 1),
    ]  # fmt: skip
    assert merged["b", "1"] == one[1]


def test_merge_of_one_group_is_that_group() -> None:
    group = [stats("a", "1", 3, {1: 3})]
    assert merge_statistics([group]) == group
    assert merge_statistics([]) == []


def test_run_directory_round_trip(tmp_path: Path) -> None:
    publish(tmp_path, WorkerInfo(1, 123, 5000, None))
    publish(tmp_path, WorkerInfo(0, 122, 5001, 6001))
    publish(tmp_path, WorkerInfo(1, 124, 5002, 6002))  # a restart replaces its file
    (tmp_path / "worker-2.json").write_text("{half")  # a torn file is skipped
    assert list(published(tmp_path)) == [
        WorkerInfo(0, 122, 5001, 6001),
        WorkerInfo(1, 124, 5002, 6002),
    ]


def test_reserved_port_is_shared_by_reuseport_but_not_by_others() -> None:
    reserved = reserve_port("127.0.0.1", 0)
    port = reserved.getsockname()[1]
    try:
        again = reserve_port("127.0.0.1", port)  # another worker-style socket: allowed
        again.close()
        plain = socket.socket()
        with pytest.raises(OSError):
            plain.bind(("127.0.0.1", port))  # a program without SO_REUSEPORT: refused
        plain.close()
    finally:
        reserved.close()


def test_workers_setting() -> None:
    assert Settings.from_sources([], environ={}).workers == 1
    assert Settings.from_sources(["--workers", "4"], environ={}).workers == 4
    assert Settings.from_sources([], environ={"CNNSERVE_WORKERS": "3"}).workers == 3
    with pytest.raises(ValueError, match="workers must be at least 1"):
        Settings.from_sources(["--workers", "0"], environ={})
