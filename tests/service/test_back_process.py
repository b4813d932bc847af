"""Model instances in processes of their own (service.core.back_process) behind the batcher:
real ONNX Runtime in real child processes, real shared memory."""

from __future__ import annotations

import asyncio
import errno
import mmap
import os
import pickle
import signal
from pathlib import Path

import numpy as np
import onnx
import pytest

from service.core import back_process
from service.core.back_process import BackSpec, InstanceDied
from service.core.batcher import BatchRecord, DynamicBatcher
from service.core.errors import DeadlineExceeded, ModelNotReady, QueueFull
from service.core.ort_options import OrtOptions
from tests.support.onnx_models import (
    POISON,
    classifier_graph,
    images,
    poisoned_graph,
    reference_logits,
)


def model_file(tmp_path: Path, graph: onnx.ModelProto, name: str = "model.onnx") -> Path:
    path = tmp_path / name
    path.write_bytes(graph.SerializeToString())
    return path


def spec(path: Path) -> BackSpec:
    return BackSpec(path, intra_op_threads=1, batched=True, options=OrtOptions())


def children() -> set[int]:
    """The PIDs of this process's instance children (forked by the forkserver, so they are
    its children, not ours: found by their name)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().startswith("backtest"):
                    found.add(int(entry.name))
            except OSError:
                pass
    return found


def regions() -> set[str]:
    return {p.name for p in Path("/dev/shm").iterdir() if p.name.startswith("psm_")}


async def started(path: Path, instances: int = 1, **kwargs: object) -> DynamicBatcher:
    batcher = DynamicBatcher(
        [], max_batch_size=32, processes=[spec(path)] * instances, name="backtest", **kwargs
    )
    await batcher.started()
    return batcher


def test_requests_are_batched_in_the_child_and_answered_in_order(tmp_path: Path) -> None:
    path = model_file(tmp_path, classifier_graph())
    before = regions()

    async def scenario() -> None:
        records: list[BatchRecord] = []
        batcher = await started(path, instances=2, on_batch=records.append)
        assert len(children()) == 2
        sizes = [1, 3, 2, 1, 4, 1] * 10
        batches = [images(n, seed=i) for i, n in enumerate(sizes)]
        results = await asyncio.gather(*(batcher.submit({"input": x}, len(x)) for x in batches))
        for x, result in zip(batches, results, strict=True):
            np.testing.assert_allclose(
                result.outputs["logits"], reference_logits(x), rtol=1e-4, atol=1e-5
            )
            assert result.outputs["probabilities"].shape == (len(x), 10)
        assert sum(r.size for r in records) == sum(sizes)
        assert max(r.requests for r in records) > 1  # requests that arrived together merged
        assert all(r.infer_ns > 0 and r.error is None for r in records)
        await batcher.close()

    asyncio.run(scenario())
    assert not children()
    assert regions() <= before  # every shared region unlinked


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def test_a_spinning_instance_answers_and_sleeps_once_its_window_has_passed(tmp_path: Path) -> None:
    path = model_file(tmp_path, classifier_graph())

    async def scenario() -> None:
        spinning = BackSpec(
            path, intra_op_threads=1, batched=True, options=OrtOptions(), spin_us=100_000
        )
        batcher = DynamicBatcher([], max_batch_size=32, processes=[spinning], name="backtest")
        await batcher.started()
        (child,) = children()
        for n in (1, 3, 2):  # each batch comes while the child is still polling, or after
            x = images(n, seed=n)
            result = await batcher.submit({"input": x}, n)
            np.testing.assert_allclose(result.outputs["logits"], reference_logits(x), rtol=1e-4)
            await asyncio.sleep(0.05 * n)
        await asyncio.sleep(0.3)  # the window (100 ms) is over: the child sleeps in recv
        idle = cpu_seconds(child)
        await asyncio.sleep(0.5)
        assert cpu_seconds(child) - idle < 0.05  # asleep: no time spent
        await batcher.submit({"input": images(1)}, 1)
        await asyncio.sleep(0.3)
        assert cpu_seconds(child) - idle > 0.03  # it polled after that answer
        await batcher.close()

    asyncio.run(scenario())
    assert not children()


def test_a_failing_batch_fails_alone_with_the_child_s_error(tmp_path: Path) -> None:
    path = model_file(tmp_path, poisoned_graph())

    async def scenario() -> None:
        batcher = await started(path)
        bad = images(2)
        bad[0, 0, 0, 0] = POISON
        with pytest.raises(Exception, match=r"(?i)reshape"):  # ONNX Runtime's own message
            await batcher.submit({"input": bad}, 2)
        good = images(3)
        result = await batcher.submit({"input": good}, 3)
        np.testing.assert_allclose(result.outputs["logits"], reference_logits(good), rtol=1e-4)
        await batcher.close()

    asyncio.run(scenario())


def test_a_killed_instance_fails_its_batch_and_is_started_again(tmp_path: Path) -> None:
    path = model_file(tmp_path, classifier_graph())

    async def scenario() -> None:
        batcher = await started(path)
        (child,) = children()
        os.kill(child, signal.SIGSTOP)  # hold it in the middle of the next batch
        running = asyncio.create_task(batcher.submit({"input": images(1)}, 1))
        await asyncio.sleep(0.2)
        os.kill(child, signal.SIGKILL)
        with pytest.raises(InstanceDied, match="signal 9"):
            await running
        assert isinstance(InstanceDied("x"), ModelNotReady)  # UNAVAILABLE: a client may retry
        x = images(2)
        result = await asyncio.wait_for(batcher.submit({"input": x}, 2), 30)  # after the restart
        np.testing.assert_allclose(result.outputs["logits"], reference_logits(x), rtol=1e-4)
        assert children() and child not in children()
        await batcher.close()

    asyncio.run(scenario())
    assert not children()


def test_a_deadline_passes_in_the_queue_while_the_instance_is_busy(tmp_path: Path) -> None:
    path = model_file(tmp_path, classifier_graph())

    async def scenario() -> None:
        batcher = await started(path)
        (child,) = children()
        os.kill(child, signal.SIGSTOP)
        try:
            first = asyncio.create_task(batcher.submit({"input": images(1)}, 1))
            await asyncio.sleep(0.1)
            with pytest.raises(DeadlineExceeded, match="while queued"):
                await batcher.submit({"input": images(1)}, 1, timeout_s=0.2)
            cancelled = asyncio.create_task(batcher.submit({"input": images(1)}, 1))
            await asyncio.sleep(0.05)
            cancelled.cancel()
            with pytest.raises(asyncio.CancelledError):
                await cancelled
            assert batcher.queue_depth == 0  # both taken back from the queue
        finally:
            os.kill(child, signal.SIGCONT)
        assert (await first).outputs["logits"].shape == (1, 10)
        await batcher.close()

    asyncio.run(scenario())


def test_an_instance_that_cannot_open_its_model_fails_the_start(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"not an onnx file")

    async def scenario() -> None:
        batcher = DynamicBatcher([], max_batch_size=4, processes=[spec(path)], name="backtest")
        with pytest.raises(ModelNotReady, match="backtest-0"):
            await batcher.started()
        await batcher.close()

    asyncio.run(scenario())
    assert not children()


def test_a_batch_larger_than_the_region_grows_it(tmp_path: Path) -> None:
    path = model_file(tmp_path, classifier_graph())

    async def scenario() -> None:
        batcher = await started(path)
        small, large = images(1), images(32, seed=5)  # 3 KiB, then 100 KiB (> the first region)
        for x in (small, large, small):
            result = await batcher.submit({"input": x}, len(x))
            np.testing.assert_allclose(result.outputs["logits"], reference_logits(x), rtol=1e-4)
        await batcher.close()

    asyncio.run(scenario())


def test_a_full_dev_shm_fails_the_batch_with_a_clear_status(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = model_file(tmp_path, classifier_graph())

    def no_room(fd: int, offset: int, size: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    async def scenario() -> None:
        batcher = await started(path)
        with monkeypatch.context() as patch:
            patch.setattr(back_process.os, "posix_fallocate", no_room)
            with pytest.raises(QueueFull, match=r"no room in /dev/shm .*--shm-size"):
                await batcher.submit({"input": images(1)}, 1)
        x = images(1)  # room again: served
        result = await batcher.submit({"input": x}, 1)
        np.testing.assert_allclose(result.outputs["logits"], reference_logits(x), rtol=1e-4)
        await batcher.close()

    before = regions()
    asyncio.run(scenario())
    assert regions() <= before


class Unpicklable(Exception):
    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.callback = lambda: None  # a lambda does not pickle


def test_messages_survive_any_cut_and_an_error_that_does_not_pickle() -> None:
    """The child's answers come back whole however the socket cuts the stream; an exception
    that cannot be pickled comes back as its text."""
    memory = mmap.mmap(-1, 4096)
    layout = [("input", "<f4", (2, 3), 0)]
    np.ndarray((2, 3), np.float32, buffer=memory)[:] = [[1, 2, 3], [4, 5, 6]]

    def double(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"y": batch["input"] * 2, "n": batch["input"].sum(axis=1).astype(np.int64)}

    def broken(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise Unpicklable("no way back")

    stream = back_process._run(double, memory, layout) + back_process._run(broken, memory, layout)
    for cut in (1, 7, len(stream) // 2, len(stream)):
        frames = back_process._Frames()
        messages = [m for start in range(0, len(stream), cut)
                    for m in frames.feed(stream[start : start + cut])]  # fmt: skip
        assert [m[0] for m in messages] == [back_process.ANSWER, back_process.ERROR]
        outputs, *_ = back_process._outputs(messages[0], back_process._Memo())
        np.testing.assert_array_equal(outputs["y"], [[2, 4, 6], [8, 10, 12]])
        np.testing.assert_array_equal(outputs["n"], [6, 15])
        error = pickle.loads(messages[1][1 + back_process.TIMES.size :])
        assert isinstance(error, RuntimeError) and "no way back" in str(error)
