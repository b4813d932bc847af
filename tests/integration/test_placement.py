"""--pin-threads on a real server: which CPUs its threads may use, and which of them worked,
read from /proc while it serves inference and an explanation."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest

from pb import explain_pb2 as ex
from pb import explain_pb2_grpc as ex_grpc
from tests.support.faults import descendants, server
from tests.support.harness import infer_request, stub

CPUS = sorted(os.sched_getaffinity(0))
pytestmark = pytest.mark.skipif(len(CPUS) < 2, reason="placing threads needs two CPUs")


def threads(pid: int) -> dict[int, tuple[frozenset[int], int]]:
    """Each thread of `pid`: the CPUs it may run on and its CPU ticks so far."""
    found = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text().rsplit(")", 1)[1].split()
            cpus = frozenset(os.sched_getaffinity(int(task.name)))
        except (FileNotFoundError, ProcessLookupError):  # a thread that just ended
            continue
        found[int(task.name)] = (cpus, int(stat[11]) + int(stat[12]))  # utime + stime
    return found


def named(pid: int, name: str) -> frozenset[int]:
    """The CPUs of the thread of `pid` that the OS knows as `name`."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        if (task / "comm").read_text().strip() == name:
            return frozenset(os.sched_getaffinity(int(task.name)))
    raise AssertionError(f"no thread named {name}")


def infer(address: str) -> None:
    """Requests of eight images each, from four clients at once: the batch thread's work."""
    request = infer_request("mnist_cnn", np.random.default_rng(0).random((8, 1, 28, 28)))

    def client(count: int) -> None:
        with grpc.insecure_channel(address) as channel:
            call = stub(channel).ModelInfer
            for _ in range(count):
                call(request, timeout=30)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(client, [100] * 4))


def explain(address: str) -> None:
    """Grad-CAM explanations: work for the loop's worker threads (4-6 ms of CPU each here, so
    enough of them that /proc's 10 ms ticks tell their threads from the poller's)."""
    pixels = np.random.default_rng(1).random((28, 28), dtype=np.float32)
    tensor = ex.RawTensor(shape=[1, 28, 28], data=pixels.astype("<f4").tobytes())
    with grpc.insecure_channel(address) as channel:
        for _ in range(60):
            answer = ex_grpc.ExplainerStub(channel).Explain(
                ex.ExplainRequest(model_name="mnist_cnn", tensor=tensor, top_k=3), timeout=60
            )
            assert len(answer.explanations) == 3


def busiest(before: dict, after: dict, besides: int) -> frozenset[int]:
    """The CPU set whose threads (other than `besides`) worked most between the two readings:
    summed per set, so that the poller's tick cannot outweigh work spread over several threads."""
    work: dict[frozenset[int], int] = {}
    for tid, (cpus, ticks) in after.items():
        if tid != besides:
            work[cpus] = work.get(cpus, 0) + ticks - before.get(tid, (0, 0))[1]
    return max(work, key=work.__getitem__)


def test_the_loop_and_poller_share_the_first_cpu_and_the_work_runs_on_the_others(
    mnist_repository: Path,
) -> None:
    front, back = frozenset(CPUS[:1]), frozenset(CPUS[1:])
    # --latency-threads 0: every request goes through the batch thread, none runs on the loop
    args = ("--pin-threads", "on", "--latency-threads", "0", "--instances", "thread")
    with server(mnist_repository, *args) as srv:
        assert f"threads: event loop and gRPC poller on CPU {CPUS[0]}, model instances" in srv.text
        start = threads(srv.pid)
        infer(srv.address)
        inferred = threads(srv.pid)
        explain(srv.address)
        explained = threads(srv.pid)
        batch_thread = named(srv.pid, "mnist_cnn:1-0")  # model:version-instance
    assert explained[srv.pid][0] == front  # the event loop's thread
    assert batch_thread == back
    assert busiest(start, inferred, srv.pid) == back  # the batch thread, again
    assert busiest(inferred, explained, srv.pid) == back  # a worker thread
    # every thread that worked at all: the loop and the poller in front, the rest behind
    worked = {cpus for tid, (cpus, ticks) in explained.items() if ticks > start.get(tid, (0, 0))[1]}
    assert worked == {front, back}


def test_off_leaves_every_thread_to_the_os(mnist_repository: Path) -> None:
    with server(mnist_repository, "--pin-threads", "off") as srv:
        infer(srv.address)
        placed = threads(srv.pid)
    assert "threads: event loop" not in srv.text
    assert {cpus for cpus, _ in placed.values()} == {frozenset(CPUS)}


def test_instance_processes_run_on_the_back_cpus(mnist_repository: Path) -> None:
    with server(mnist_repository, "--pin-threads", "on", "--latency-threads", "0") as srv:
        front = frozenset(CPUS[:1])
        infer(srv.address)
        (instance,) = [pid for pid, name in descendants(srv.pid).items() if name == "mnist_cnn:1-0"]
        placed = frozenset(os.sched_getaffinity(instance))
        ticks = threads(instance)
    assert placed == frozenset(CPUS[1:])
    assert front not in {cpus for cpus, _ in ticks.values()}  # none of its threads in front
    assert sum(t for _, t in ticks.values()) > 0  # and it did the work
