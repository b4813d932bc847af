"""--pin-threads: which placement each mode gives on which CPUs (the placing itself is checked on
a real server in tests/integration/test_placement.py)."""

from __future__ import annotations

import os
import threading

import pytest

from service.config import Settings
from service.core import placement
from service.core.placement import Placement, plan


@pytest.mark.parametrize(
    ("mode", "cpus", "workers", "intra", "expected"),
    [
        ("auto", [0, 1], 1, 1, Placement(0, frozenset({1}))),
        ("auto", [2, 5, 3], 1, 1, Placement(2, frozenset({3, 5}))),  # a cpuset: its first CPU
        ("auto", [0, 1, 2, 3], 1, 1, Placement(0, frozenset({1, 2, 3}))),
        ("auto", list(range(8)), 1, 1, None),  # a large host may be shared: left to the OS
        ("on", list(range(8)), 1, 1, Placement(0, frozenset(range(1, 8)))),
        ("auto", [0, 1], 1, 2, None),  # ONNX Runtime's own threads want several CPUs each
        ("on", [0, 1], 1, 2, Placement(0, frozenset({1}))),
        ("auto", [0, 1], 2, 1, None),  # workers would all pick the same CPUs
        ("on", [0, 1], 2, 1, None),
        ("on", [4], 1, 1, None),  # one CPU: nothing to place
        ("off", [0, 1], 1, 1, None),
    ],
)
def test_plan(
    mode: str, cpus: list[int], workers: int, intra: int, expected: Placement | None
) -> None:
    assert plan(mode, workers=workers, intra_op_threads=intra, cpus=cpus) == expected


def test_an_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="pin_threads"):
        plan("always", workers=1, intra_op_threads=1, cpus=[0, 1])
    with pytest.raises(ValueError, match="auto, on, off"):
        Settings.from_sources(["--model-repository", "."], {"CNNSERVE_PIN_THREADS": "always"})


def test_the_default_is_auto_and_describes_itself() -> None:
    assert Settings.from_sources(["--model-repository", "."], {}).pin_threads == "auto"
    text = Placement(0, frozenset({2, 1})).describe()
    assert text == (
        "event loop and gRPC poller on CPU 0, model instances and worker threads on CPU 1,2"
    )


def test_without_a_placement_threads_stay_where_they_are() -> None:
    """In a process that never pinned (this test process), a batch thread's `enter_back` and the
    loop's executor leave every thread as it was."""
    before = os.sched_getaffinity(0)
    seen: list[set[int]] = []

    def thread() -> None:
        placement.enter_back()
        seen.append(os.sched_getaffinity(0))

    worker = threading.Thread(target=thread)
    worker.start()
    worker.join()
    assert seen == [before] and os.sched_getaffinity(0) == before
    assert placement.worker_pool() is None


def test_a_refused_pin_leaves_the_threads_to_the_os(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A sandbox without sched_setaffinity (or a CPU gone): the server starts unpinned, and a
    batch thread that cannot move keeps running where it is, instead of dying with its batches."""

    def refuse(pid: int, cpus: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "sched_setaffinity", refuse)
    assert placement.pin_front(Placement(0, frozenset({1}))) is False
    assert placement.worker_pool() is None  # nothing in force
    monkeypatch.setattr(placement, "_back", frozenset({1}))
    placement.enter_back()  # no exception
    messages = [r.getMessage() for r in caplog.records]
    assert any("threads left to the OS: cannot pin to CPU 0" in m for m in messages)
    assert any("stays on the event loop's CPU" in m for m in messages)


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="thread names live in /proc")
def test_the_grpc_poller_is_named_for_the_os() -> None:
    """A thread named as grpc.aio names its poller shows as grpc_poller in /proc; others keep
    their names."""
    done = threading.Event()
    poller = threading.Thread(target=done.wait, name="Thread-7 (_poll_wrapper)")
    other = threading.Thread(target=done.wait, name="Thread-8 (serve)")
    poller.start()
    other.start()
    try:
        named = placement.name_grpc_poller()  # also a real poller, if a test here started one
        assert poller.native_id in named and other.native_id not in named
        with open("/proc/self/comm") as process:
            inherited = process.read().strip()  # what an unnamed thread shows: the process's name
        for thread, expected in ((poller, "grpc_poller"), (other, inherited)):
            with open(f"/proc/self/task/{thread.native_id}/comm") as name:
                assert name.read().strip() == expected
    finally:
        done.set()
        poller.join()
        other.join()
