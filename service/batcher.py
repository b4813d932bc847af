"""An asyncio dynamic batcher over plain numpy functions; it knows nothing of gRPC.

Requests queue with their own future. Each worker (one per model instance, with its own thread)
takes everything queued, up to `max_batch_size` images, concatenates it, runs its function in its
thread and splits the outputs back, one slice per request. By default an idle worker does not wait
for more requests: under load, batches grow by themselves while the previous one runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from .errors import DeadlineExceeded, ModelNotReady, QueueFull

log = logging.getLogger(__name__)

Arrays = Mapping[str, np.ndarray]
BatchFunction = Callable[[dict[str, np.ndarray]], Arrays]


class BatchShapeError(RuntimeError):
    """The batch function returned outputs whose batch dimension does not match its input."""


@dataclass(frozen=True)
class BatchRecord:
    """What happened to one executed batch: its size, request count and phase durations (ns)."""

    size: int
    requests: int
    input_ns: int
    infer_ns: int
    output_ns: int
    error: BaseException | None = None


@dataclass(frozen=True)
class BatchResult:
    """One request's outputs plus how long it queued and what its batch cost."""

    outputs: dict[str, np.ndarray]
    queue_ns: int
    batch: BatchRecord


class _Pending:
    __slots__ = ("enqueued_ns", "future", "inputs", "size", "timer")

    def __init__(self, inputs: Arrays, size: int, future: asyncio.Future[BatchResult]) -> None:
        self.inputs = inputs
        self.size = size
        self.future = future
        self.enqueued_ns = time.perf_counter_ns()
        self.timer: asyncio.TimerHandle | None = None


class DynamicBatcher:
    """Merge concurrent requests into batches for one or more instances of a batch function."""

    def __init__(
        self,
        functions: Sequence[BatchFunction],
        *,
        max_batch_size: int,
        max_queue_size: int = 0,
        max_queue_delay_s: float = 0.0,
        preferred_batch_sizes: Sequence[int] = (),
        wait_for_preferred: bool = False,
        on_batch: Callable[[BatchRecord], None] | None = None,
        name: str = "model",
    ) -> None:
        if not functions:
            raise ValueError("at least one batch function is needed")
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self.max_batch_size = max_batch_size
        self.max_queue_size = max_queue_size  # 0: unbounded
        self._functions = list(functions)
        self._delay_s = max_queue_delay_s
        fitting = [p for p in preferred_batch_sizes if 0 < p <= max_batch_size]
        self._hold_below = min(fitting) if (wait_for_preferred and fitting) else 0
        self._on_batch = on_batch
        self._name = name
        self._queue: deque[_Pending] = deque()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._busy = 0
        self._closed = False
        self._executors = [
            ThreadPoolExecutor(1, thread_name_prefix=f"{name}-{i}") for i in range(len(functions))
        ]
        self._workers = [
            asyncio.get_running_loop().create_task(self._work(fn, ex), name=f"{name}-batcher-{i}")
            for i, (fn, ex) in enumerate(zip(self._functions, self._executors, strict=True))
        ]

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a batch (not counting those running)."""
        return len(self._queue)

    @property
    def busy(self) -> int:
        """Batches running now."""
        return self._busy

    async def submit(
        self, inputs: Arrays, size: int, timeout_s: float | None = None
    ) -> BatchResult:
        """Queue one request of `size` images (leading dim of every input) and await its outputs."""
        if self._closed:
            raise ModelNotReady(f"model '{self._name}' is not accepting requests")
        if self.max_queue_size and len(self._queue) >= self.max_queue_size:
            raise QueueFull(
                f"model '{self._name}': queue is full ({self.max_queue_size} requests waiting)"
            )
        if size > self.max_batch_size:
            raise ValueError(f"request of {size} exceeds max_batch_size {self.max_batch_size}")
        if timeout_s is not None and timeout_s <= 0:
            raise DeadlineExceeded("deadline exceeded before the request was queued")
        loop = asyncio.get_running_loop()
        item = _Pending(inputs, size, loop.create_future())
        if timeout_s is not None:
            item.timer = loop.call_later(timeout_s, self._expire, item)
        self._queue.append(item)
        self._idle.clear()
        self._wake.set()
        try:
            return await item.future
        except asyncio.CancelledError:
            self._discard(item)
            raise

    def _discard(self, item: _Pending) -> None:
        if item.timer is not None:
            item.timer.cancel()
        with contextlib.suppress(ValueError):
            self._queue.remove(item)
            self._check_idle()

    def _expire(self, item: _Pending) -> None:
        if item.future.done():
            return
        try:
            self._queue.remove(item)
        except ValueError:
            return  # already running: it will finish
        item.future.set_exception(DeadlineExceeded("deadline exceeded while queued"))
        self._check_idle()

    def _check_idle(self) -> None:
        if not self._queue and not self._busy:
            self._idle.set()

    def _take(self) -> list[_Pending]:
        items: list[_Pending] = []
        total = 0
        queue = self._queue
        while queue and total + queue[0].size <= self.max_batch_size:
            item = queue.popleft()
            if item.future.done():
                continue
            if item.timer is not None:
                item.timer.cancel()
            items.append(item)
            total += item.size
        return items

    async def _hold(self) -> None:
        """In delay mode, let a small batch wait for more, up to max_queue_delay from its oldest."""
        while self._queue:
            queued = sum(item.size for item in self._queue)
            if queued >= self._hold_below:
                return
            left = self._delay_s - (time.perf_counter_ns() - self._queue[0].enqueued_ns) / 1e9
            if left <= 0:
                return
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), left)

    async def _work(self, fn: BatchFunction, executor: ThreadPoolExecutor) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                self._wake.clear()
                await self._wake.wait()
            if self._hold_below and self._delay_s > 0:
                await self._hold()
            items = self._take()
            if not items:
                self._check_idle()
                continue
            self._busy += 1
            start_ns = time.perf_counter_ns()
            try:
                outcome = await loop.run_in_executor(executor, _execute, fn, items)
            except BaseException as exc:  # a cancelled worker still answers its requests
                outcome = ([], BatchRecord(sum(i.size for i in items), len(items), 0, 0, 0, exc))
                if isinstance(exc, asyncio.CancelledError):
                    self._finish(items, start_ns, outcome)
                    raise
            self._finish(items, start_ns, outcome)

    def _finish(
        self,
        items: list[_Pending],
        start_ns: int,
        outcome: tuple[list[dict[str, np.ndarray]], BatchRecord],
    ) -> None:
        self._busy -= 1
        results, record = outcome
        if record.error is not None:
            if not isinstance(record.error, asyncio.CancelledError):
                log.warning("batch of %d on %s failed: %r", record.size, self._name, record.error)
            for item in items:
                if not item.future.done():
                    item.future.set_exception(record.error)
        else:
            for item, outputs in zip(items, results, strict=True):
                if not item.future.done():
                    item.future.set_result(
                        BatchResult(outputs, start_ns - item.enqueued_ns, record)
                    )
        if self._on_batch is not None:
            try:
                self._on_batch(record)
            except Exception:
                log.exception("batch observer failed")
        self._check_idle()
        if self._queue:
            self._wake.set()

    async def drain(self) -> None:
        """Stop accepting requests and wait until everything queued or running has finished."""
        self._closed = True
        await self._idle.wait()

    async def close(self) -> None:
        """Drain, then stop the workers and their threads."""
        await self.drain()
        for task in self._workers:
            task.cancel()
        for task in self._workers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for executor in self._executors:
            executor.shutdown(wait=False)


def _execute(
    fn: BatchFunction, items: list[_Pending]
) -> tuple[list[dict[str, np.ndarray]], BatchRecord]:
    """Concatenate, run and split one batch (in the instance's thread); never raises."""
    size = sum(item.size for item in items)
    t0 = time.perf_counter_ns()
    t1 = t2 = t0
    try:
        if len(items) == 1:
            batch = dict(items[0].inputs)
        else:
            batch = {
                name: np.concatenate([item.inputs[name] for item in items])
                for name in items[0].inputs
            }
        t1 = time.perf_counter_ns()
        outputs = fn(batch)
        t2 = time.perf_counter_ns()
        for name, array in outputs.items():
            if array.ndim == 0 or array.shape[0] != size:
                raise BatchShapeError(
                    f"output '{name}' has shape {list(array.shape)}; expected batch {size} first"
                )
        results: list[dict[str, np.ndarray]] = []
        offset = 0
        for item in items:
            end = offset + item.size
            results.append({name: array[offset:end] for name, array in outputs.items()})
            offset = end
        t3 = time.perf_counter_ns()
        return results, BatchRecord(size, len(items), t1 - t0, t2 - t1, t3 - t2)
    except Exception as exc:
        now = time.perf_counter_ns()
        return [], BatchRecord(size, len(items), t1 - t0, max(now - t1, 0), 0, exc)
