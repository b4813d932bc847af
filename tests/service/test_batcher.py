"""Unit tests for service.batcher.DynamicBatcher (no gRPC, no ONNX)."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import pytest

from service.core import batcher as batcher_module
from service.core.batcher import BatchRecord, DynamicBatcher
from service.core.errors import DeadlineExceeded, ModelNotReady, QueueFull


def double(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"y": inputs["x"] * 2, "sum": inputs["x"].sum(axis=1)}


class Gate:
    """A batch function that blocks until released, recording batch sizes."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.release = threading.Event()
        self.entered = threading.Event()

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.sizes.append(len(inputs["x"]))
        self.entered.set()
        self.release.wait(10)
        return {"y": inputs["x"] * 2}


async def wait_for(condition: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError
        await asyncio.sleep(0.002)


def rows(start: int, count: int) -> dict[str, np.ndarray]:
    return {"x": np.arange(start, start + count * 2, dtype=np.float32).reshape(count, 2)}


def test_requests_are_merged_and_split_back_in_order() -> None:
    async def scenario() -> None:
        gate = Gate()
        records: list[BatchRecord] = []
        batcher = DynamicBatcher([gate], max_batch_size=16, on_batch=records.append)
        first = asyncio.create_task(batcher.submit(rows(0, 1), 1))
        await asyncio.to_thread(gate.entered.wait, 5)  # the first runs alone, the rest queue
        sizes = [1, 3, 2, 4]
        tasks = [
            asyncio.create_task(batcher.submit(rows(100 * i, n), n)) for i, n in enumerate(sizes)
        ]
        await wait_for(lambda: batcher.queue_depth == len(sizes))
        gate.release.set()
        await first
        results = await asyncio.gather(*tasks)
        for i, (n, result) in enumerate(zip(sizes, results, strict=True)):
            np.testing.assert_array_equal(result.outputs["y"], rows(100 * i, n)["x"] * 2)
        assert gate.sizes == [1, sum(sizes)]
        assert [r.size for r in records] == [1, 10] and records[1].requests == 4
        await batcher.close()

    asyncio.run(scenario())


def test_batches_never_exceed_max_batch_size() -> None:
    async def scenario() -> None:
        gate = Gate()
        batcher = DynamicBatcher([gate], max_batch_size=4)
        first = asyncio.create_task(batcher.submit(rows(0, 1), 1))
        await asyncio.to_thread(gate.entered.wait, 5)
        tasks = [asyncio.create_task(batcher.submit(rows(i, 3), 3)) for i in range(3)]
        await wait_for(lambda: batcher.queue_depth == 3)
        gate.release.set()
        await asyncio.gather(first, *tasks)
        assert gate.sizes == [1, 3, 3, 3]
        await batcher.close()

    asyncio.run(scenario())


def test_full_queue_is_refused_at_once() -> None:
    async def scenario() -> None:
        gate = Gate()
        batcher = DynamicBatcher([gate], max_batch_size=1, max_queue_size=2)
        running = asyncio.create_task(batcher.submit(rows(0, 1), 1))
        await asyncio.to_thread(gate.entered.wait, 5)
        queued = [asyncio.create_task(batcher.submit(rows(i, 1), 1)) for i in range(2)]
        await wait_for(lambda: batcher.queue_depth == 2)
        with pytest.raises(QueueFull, match="queue is full"):
            await batcher.submit(rows(9, 1), 1)
        gate.release.set()
        await asyncio.gather(running, *queued)
        await batcher.close()

    asyncio.run(scenario())


def test_cancelled_request_frees_its_slot_and_never_runs() -> None:
    async def scenario() -> None:
        gate = Gate()
        batcher = DynamicBatcher([gate], max_batch_size=8, max_queue_size=1)
        running = asyncio.create_task(batcher.submit(rows(0, 1), 1))
        await asyncio.to_thread(gate.entered.wait, 5)
        doomed = asyncio.create_task(batcher.submit(rows(50, 5), 5))
        await wait_for(lambda: batcher.queue_depth == 1)
        doomed.cancel()
        await wait_for(lambda: batcher.queue_depth == 0)
        survivor = asyncio.create_task(batcher.submit(rows(7, 2), 2))  # the slot is free again
        gate.release.set()
        await running
        result = await survivor
        np.testing.assert_array_equal(result.outputs["y"], rows(7, 2)["x"] * 2)
        assert gate.sizes == [1, 2]  # the cancelled 5 never ran
        await batcher.close()

    asyncio.run(scenario())


def test_deadline_expires_in_the_queue_and_frees_its_slot() -> None:
    async def scenario() -> None:
        gate = Gate()
        batcher = DynamicBatcher([gate], max_batch_size=8, max_queue_size=1)
        running = asyncio.create_task(batcher.submit(rows(0, 1), 1))
        await asyncio.to_thread(gate.entered.wait, 5)
        with pytest.raises(DeadlineExceeded):
            await batcher.submit(rows(1, 1), 1, timeout_s=0.05)
        assert batcher.queue_depth == 0
        with pytest.raises(DeadlineExceeded):
            await batcher.submit(rows(1, 1), 1, timeout_s=0)
        gate.release.set()
        await running
        assert gate.sizes == [1]
        await batcher.close()

    asyncio.run(scenario())


def test_failed_batch_fails_only_its_own_requests() -> None:
    calls: list[int] = []

    def picky(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        calls.append(len(inputs["x"]))
        if (inputs["x"] < 0).any():
            raise RuntimeError("negative input")
        return {"y": inputs["x"] * 2}

    async def scenario() -> None:
        gate = Gate()
        batcher = DynamicBatcher([picky], max_batch_size=2)
        bad = [batcher.submit({"x": -np.ones((1, 2), np.float32)}, 1) for _ in range(2)]
        good = [batcher.submit(rows(i, 1), 1) for i in range(2)]
        results = await asyncio.gather(*bad, *good, return_exceptions=True)
        assert all(isinstance(r, RuntimeError) and "negative" in str(r) for r in results[:2])
        assert not any(isinstance(r, BaseException) for r in results[2:])
        # and the batcher keeps serving
        ok = await batcher.submit(rows(3, 1), 1)
        np.testing.assert_array_equal(ok.outputs["y"], rows(3, 1)["x"] * 2)
        await batcher.close()
        del gate

    asyncio.run(scenario())


def test_wrong_output_batch_is_an_error_for_the_batch() -> None:
    async def scenario() -> None:
        batcher = DynamicBatcher([lambda inputs: {"y": np.zeros((1, 2))}], max_batch_size=4)
        with pytest.raises(RuntimeError, match="expected batch 3"):
            await batcher.submit(rows(0, 3), 3)
        await batcher.close()

    asyncio.run(scenario())


def test_outputs_without_waiting_when_idle() -> None:
    async def scenario() -> None:
        batcher = DynamicBatcher([double], max_batch_size=32, max_queue_delay_s=0.5)
        start = time.perf_counter()
        result = await batcher.submit(rows(0, 1), 1)
        assert time.perf_counter() - start < 0.25  # eager: the delay is not waited out
        assert result.outputs["sum"].shape == (1,)
        await batcher.close()

    asyncio.run(scenario())


def test_delay_mode_waits_for_a_preferred_batch() -> None:
    async def scenario() -> None:
        sizes: list[int] = []

        def record(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            sizes.append(len(inputs["x"]))
            return {"y": inputs["x"]}

        batcher = DynamicBatcher(
            [record],
            max_batch_size=8,
            max_queue_delay_s=0.2,
            preferred_batch_sizes=(4,),
            wait_for_preferred=True,
        )
        tasks = []
        for i in range(4):
            tasks.append(asyncio.create_task(batcher.submit(rows(i, 1), 1)))
            await asyncio.sleep(0.01)
        await asyncio.gather(*tasks)
        assert sizes == [4]
        start = time.perf_counter()
        await batcher.submit(rows(0, 1), 1)  # alone: waits the delay out, then runs
        assert 0.15 < time.perf_counter() - start < 2
        await batcher.close()

    asyncio.run(scenario())


def test_several_instances_run_in_parallel() -> None:
    async def scenario() -> None:
        barrier = threading.Barrier(2, timeout=5)

        def meet(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            barrier.wait()  # only passes when both instances run at once
            return {"y": inputs["x"]}

        batcher = DynamicBatcher([meet, meet], max_batch_size=1)
        await asyncio.gather(batcher.submit(rows(0, 1), 1), batcher.submit(rows(1, 1), 1))
        await batcher.close()

    asyncio.run(scenario())


def test_drain_finishes_queued_work_then_refuses() -> None:
    async def scenario() -> None:
        gate = Gate()
        batcher = DynamicBatcher([gate], max_batch_size=1)
        tasks = [asyncio.create_task(batcher.submit(rows(i, 1), 1)) for i in range(3)]
        await asyncio.to_thread(gate.entered.wait, 5)
        closing = asyncio.create_task(batcher.close())
        await asyncio.sleep(0.01)
        with pytest.raises(ModelNotReady):
            await batcher.submit(rows(0, 1), 1)
        gate.release.set()
        await asyncio.gather(*tasks)
        await closing
        assert gate.sizes == [1, 1, 1]

    asyncio.run(scenario())


class Recorder:
    """A batch function that notes the thread and batch size of every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls.append((threading.current_thread().name, len(inputs["x"])))
        return {"y": inputs["x"] * 2}


def test_a_lone_request_runs_at_once_on_the_loop_thread() -> None:
    async def scenario() -> None:
        queued, idle = Recorder(), Recorder()
        records: list[BatchRecord] = []
        batcher = DynamicBatcher(
            [queued], max_batch_size=8, idle_function=idle, idle_max_size=2, on_batch=records.append
        )
        for start in range(3):  # one after another, with a pause: the model is idle each time
            await asyncio.sleep(0.002)
            result = await batcher.submit(rows(start, 2), 2)
            np.testing.assert_array_equal(result.outputs["y"], rows(start, 2)["x"] * 2)
            assert result.queue_ns == 0
        assert idle.calls == [(threading.current_thread().name, 2)] * 3
        assert queued.calls == []
        assert [r.size for r in records] == [2, 2, 2]  # statistics still see every batch
        # Larger than the fast path's share of the event loop: it goes to the batcher's thread.
        await asyncio.sleep(0.002)
        result = await batcher.submit(rows(0, 3), 3)
        np.testing.assert_array_equal(result.outputs["y"], rows(0, 3)["x"] * 2)
        assert len(idle.calls) == 3 and [n for _, n in queued.calls] == [3]
        assert queued.calls[0][0] != threading.current_thread().name
        await batcher.close()

    asyncio.run(scenario())


def test_requests_arriving_together_skip_the_fast_path_and_batch() -> None:
    async def scenario() -> None:
        queued, idle = Recorder(), Recorder()
        batcher = DynamicBatcher([queued], max_batch_size=8, idle_function=idle)
        results = await asyncio.gather(*(batcher.submit(rows(10 * i, 1), 1) for i in range(4)))
        for i, result in enumerate(results):
            np.testing.assert_array_equal(result.outputs["y"], rows(10 * i, 1)["x"] * 2)
        assert idle.calls == []
        assert sum(n for _, n in queued.calls) == 4 and len(queued.calls) < 4
        await batcher.close()

    asyncio.run(scenario())


def test_a_request_right_after_a_batch_takes_the_queue(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(batcher_module, "IDLE_GAP_NS", 10**9)  # "right after", even on a slow box

    async def scenario() -> None:
        queued, idle = Recorder(), Recorder()
        batcher = DynamicBatcher([queued], max_batch_size=8, idle_function=idle)
        await batcher.submit(rows(0, 1), 1)
        await batcher.submit(rows(1, 1), 1)  # it was waiting while the first one ran
        assert [n for _, n in idle.calls] == [1] and [n for _, n in queued.calls] == [1]
        await batcher.close()

    asyncio.run(scenario())


def test_fast_path_stays_off_under_load_and_comes_back_when_calm() -> None:
    async def scenario() -> None:
        queued, idle = Recorder(), Recorder()
        batcher = DynamicBatcher([queued], max_batch_size=8, idle_function=idle)
        for burst in range(4):  # requests arriving together: the model is busy, not calm
            await asyncio.gather(*(batcher.submit(rows(burst, 1), 1) for _ in range(8)))
        await asyncio.sleep(0.002)
        await batcher.submit(rows(0, 1), 1)
        assert idle.calls == []  # idle right now, but too recently busy
        for _ in range(100):  # a long calm stretch of lone requests
            await asyncio.sleep(0.0005)
            await batcher.submit(rows(0, 1), 1)
        assert idle.calls, "the fast path never came back"
        await batcher.close()

    asyncio.run(scenario())


def test_fast_path_failure_fails_only_that_request() -> None:
    def broken(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise RuntimeError("no")

    async def scenario() -> None:
        batcher = DynamicBatcher([double], max_batch_size=8, idle_function=broken)
        with pytest.raises(RuntimeError, match="no"):
            await batcher.submit(rows(0, 1), 1)
        assert batcher._pending == 0  # the failed fast run released its slot
        await asyncio.wait_for(batcher.drain(), 1)  # nothing left behind

    asyncio.run(scenario())


def test_queue_is_bounded_in_bytes_as_well_as_requests() -> None:
    async def scenario() -> None:
        gate = threading.Event()

        def slow(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            gate.wait(5)
            return {"y": inputs["x"]}

        item = rows(0, 1)["x"].nbytes
        batcher = DynamicBatcher([slow], max_batch_size=1, max_queue_bytes=2 * item)
        running = asyncio.ensure_future(batcher.submit(rows(0, 1), 1))
        await asyncio.sleep(0.05)  # the first request is running: the queue is empty
        queued = [asyncio.ensure_future(batcher.submit(rows(i, 1), 1)) for i in (1, 2)]
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFull, match="bytes waiting"):
            await batcher.submit(rows(3, 1), 1)
        gate.set()
        for future in [running, *queued]:
            await future
        await batcher.submit(rows(4, 1), 1)  # room again once the queue has drained
        await batcher.close()

    asyncio.run(scenario())


def test_a_free_thread_takes_the_next_batch_without_the_loop() -> None:
    """While the loop is busy (here: blocked), a thread that finishes a batch starts the next
    one from what queued meanwhile; only the answers wait for the loop."""

    async def scenario() -> None:
        gate = Gate()
        batcher = DynamicBatcher([gate], max_batch_size=16)
        first = asyncio.create_task(batcher.submit(rows(0, 1), 1))
        await asyncio.to_thread(gate.entered.wait, 5)
        queued = [asyncio.create_task(batcher.submit(rows(10 * i, 1), 1)) for i in range(1, 4)]
        await wait_for(lambda: batcher.queue_depth == 3)
        gate.entered.clear()
        gate.release.set()
        # The loop does nothing until the second batch has started in the thread.
        assert gate.entered.wait(5), "the second batch waited for the event loop"
        assert gate.sizes == [1, 3]
        results = await asyncio.gather(first, *queued)
        assert [r.outputs["y"][0, 0] for r in results] == [0, 20, 40, 60]
        assert [r.batch.size for r in results] == [1, 3, 3, 3]
        await batcher.close()

    asyncio.run(scenario())


def test_close_ends_the_instance_threads() -> None:
    async def scenario() -> None:
        before = threading.active_count()
        batcher = DynamicBatcher([double, double], max_batch_size=4, name="ending")
        assert threading.active_count() == before + 2
        await batcher.submit(rows(0, 2), 2)
        await batcher.close()
        await wait_for(lambda: threading.active_count() == before)
        with pytest.raises(ModelNotReady):
            await batcher.submit(rows(0, 1), 1)

    asyncio.run(scenario())


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="thread names live in /proc")
def test_instance_threads_carry_their_model_version_and_number_where_the_os_shows_them() -> None:
    """`top -H` shows a batch thread as model:version-instance; a long model name is cut, not
    the version and instance (Linux keeps 15 bytes)."""

    def names() -> set[str]:
        ids = [t.native_id for t in threading.enumerate() if t.name.startswith("a_long_model")]
        return {Path(f"/proc/self/task/{i}/comm").read_text().strip() for i in ids}

    async def scenario() -> None:
        batcher = DynamicBatcher([double, double], max_batch_size=4, name="a_long_model_name:12")
        await wait_for(lambda: names() == {"a_long_mod:12-0", "a_long_mod:12-1"})
        await batcher.close()

    asyncio.run(scenario())


@pytest.mark.parametrize(
    "arrays",
    [
        [
            np.arange(i * 784, (i + 1) * 784, dtype=np.float32).reshape(1, 1, 28, 28)
            for i in range(7)
        ],
        [np.ones((2, 3), np.int64), np.zeros((1, 3), np.int64), np.full((4, 3), 7, np.int64)],
        [np.array([[True, False]]), np.array([[False, True]])],
        [np.ones((1, 4), ">f4"), np.zeros((2, 4), ">f4")],  # big-endian, as a client may send
        [np.arange(12, dtype=np.float32).reshape(3, 4)[:, ::2], np.ones((1, 2), np.float32)],
        [np.array([[b"a"]], dtype=object), np.array([[b"bc"]], dtype=object)],
        [np.ones((1, 0), np.float32), np.ones((2, 0), np.float32)],
        [np.ones((1, 2), np.float32), np.ones((1, 2), np.float64)],
    ],
    ids=["images", "int64", "bool", "big-endian", "strided", "objects", "empty", "mixed-dtype"],
)
def test_stacking_a_batch_matches_numpy_concatenate(arrays: list[np.ndarray]) -> None:
    stacked = batcher_module._stack(arrays)
    expected = np.concatenate(arrays)
    assert stacked.dtype == expected.dtype and stacked.shape == expected.shape
    np.testing.assert_array_equal(stacked, expected)


def test_stacking_refuses_what_concatenate_refuses() -> None:
    with pytest.raises(ValueError):
        batcher_module._stack([np.ones((1, 2), np.float32), np.ones((1, 3), np.float32)])


def test_stacking_a_batch_keeps_the_gil() -> None:
    """The batch thread copies the requests into one batch without letting the loop in: a thread
    waiting for the GIL gets no turn while `_stack` runs, though it does while np.concatenate
    copies the same arrays (which shows the check can fail)."""
    arrays = [np.full((1, 20_000), i, np.float32) for i in range(200)]

    def turns_taken_during(stack: Callable[[list[np.ndarray]], np.ndarray]) -> int:
        wake, turns = threading.Event(), []
        waiter = threading.Thread(target=lambda: (wake.wait(5), turns.append(1)))
        waiter.start()
        time.sleep(0.01)  # the waiter now sleeps in wake.wait, without the GIL
        wake.set()
        for _ in range(20):
            stack(arrays)
        taken = len(turns)  # read before anything here lets go of the GIL
        waiter.join()
        return taken

    interval = sys.getswitchinterval()
    sys.setswitchinterval(30)  # no forced switch: the waiter runs only if the GIL is let go
    try:
        assert turns_taken_during(np.concatenate) == 1
        assert turns_taken_during(batcher_module._stack) == 0
    finally:
        sys.setswitchinterval(interval)
