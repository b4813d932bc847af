"""An asyncio dynamic batcher over plain numpy functions; it knows nothing of gRPC.

Requests queue with their own future. Each worker (one per model instance, with its own thread)
takes everything queued, up to `max_batch_size` images, concatenates it, runs its function in its
thread and splits the outputs back, one slice per request. By default an idle worker does not wait
for more requests: under load, batches grow by themselves while the previous one runs.

Optionally, a request that finds the batcher idle (nothing queued, nothing running, no other
request arriving in the same turn of the event loop, and the last batch not just finished) runs
at once on the loop's own thread with `idle_function`: no queue, no thread hand-off. On a lightly
loaded server that is most requests, and the two thread wake-ups it saves are a large share of a
small model's latency. Under load the loop must stay free to keep batches filling, so the fast
path is taken only while the model is calm: a moving average of the arrivals that found it idle
(and not right after a batch finished, when a request was most likely waiting for the loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import numpy as np

from .errors import DeadlineExceeded, ModelNotReady, QueueFull

log = logging.getLogger(__name__)

# A request arriving sooner than this after a batch finished had been waiting: no fast path.
IDLE_GAP_NS = 100_000
# The fast path needs this share of recent arrivals (a moving average of weight CALM_WEIGHT) to
# have found the model idle: at concurrency 1 all do, from about 4 in flight most do not.
CALM_LEVEL = 0.9
CALM_WEIGHT = 0.05

Arrays = Mapping[str, np.ndarray]
BatchFunction = Callable[[dict[str, np.ndarray]], Arrays]


class BatchShapeError(RuntimeError):
    """The batch function returned outputs whose batch dimension does not match its input."""


class BatchRecord(NamedTuple):
    """What happened to one executed batch: its size, request count and phase durations (ns)."""

    size: int
    requests: int
    input_ns: int
    infer_ns: int
    output_ns: int
    error: BaseException | None = None
    start_ns: int = 0  # when the batch began (perf_counter_ns), for request traces


class BatchResult(NamedTuple):
    """One request's outputs plus how long it queued and what its batch cost.

    (Named tuples: made once per request on the event loop, where a frozen dataclass costs
    several times as much.)"""

    outputs: dict[str, np.ndarray]
    queue_ns: int
    batch: BatchRecord


class _Pending:
    __slots__ = ("enqueued_ns", "future", "inputs", "nbytes", "size", "timer")

    def __init__(
        self,
        inputs: Arrays,
        size: int,
        future: asyncio.Future[BatchResult] | None,
        nbytes: int = 0,
    ) -> None:
        self.inputs = inputs
        self.size = size
        self.nbytes = nbytes
        self.future = future
        self.enqueued_ns = time.perf_counter_ns()
        self.timer: asyncio.TimerHandle | None = None


Outcome = tuple[list[dict[str, np.ndarray]], BatchRecord]
_Job = tuple["asyncio.Future[Outcome]", BatchFunction, list[_Pending]]


class _InstanceThread:
    """One model instance's thread: batches go in through a SimpleQueue and their outcome comes
    back with `call_soon_threadsafe`. What `run_in_executor` does, without a concurrent Future,
    its locks and callbacks per batch: about a third of the CPU per hand-off."""

    def __init__(self, loop: asyncio.AbstractEventLoop, name: str) -> None:
        self._loop = loop
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def run(self, fn: BatchFunction, items: list[_Pending]) -> asyncio.Future[Outcome]:
        """Run one batch in the thread; the future resolves on the loop with its outcome."""
        future: asyncio.Future[Outcome] = self._loop.create_future()
        self._jobs.put((future, fn, items))
        return future

    def close(self) -> None:
        """Let the thread end once the batch it runs (if any) is done."""
        self._jobs.put(None)

    def _serve(self) -> None:
        get, reply = self._jobs.get, self._loop.call_soon_threadsafe
        while (job := get()) is not None:
            future, fn, items = job
            outcome = _execute(fn, items)
            try:
                reply(_deliver, future, outcome)
            except RuntimeError:  # the loop is closed: nobody waits any more
                return
            del job, future, items, outcome  # hold no batch while waiting for the next


def _deliver(future: asyncio.Future[Outcome], outcome: Outcome) -> None:
    if not future.done():  # a cancelled waiter has gone
        future.set_result(outcome)


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
        idle_function: BatchFunction | None = None,
        idle_max_size: int = 1,
        max_queue_bytes: int = 0,
        name: str = "model",
    ) -> None:
        if not functions:
            raise ValueError("at least one batch function is needed")
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self.max_batch_size = max_batch_size
        self.max_queue_size = max_queue_size  # 0: unbounded
        self.max_queue_bytes = max_queue_bytes  # 0: unbounded
        self._queued_bytes = 0
        self._functions = list(functions)
        self._delay_s = max_queue_delay_s
        fitting = [p for p in preferred_batch_sizes if 0 < p <= max_batch_size]
        self._hold_below = min(fitting) if (wait_for_preferred and fitting) else 0
        self._on_batch = on_batch
        self._idle_function = idle_function
        self._idle_max_size = idle_max_size  # larger requests would hold up the event loop
        self._arriving = 0  # requests looking at the idle fast path in this turn of the loop
        self._last_done_ns = 0
        self._calm = 1.0
        self._name = name
        self._queue: deque[_Pending] = deque()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._busy = 0
        self._closed = False
        loop = asyncio.get_running_loop()
        self._threads = [_InstanceThread(loop, f"{name}-{i}") for i in range(len(functions))]
        self._workers = [
            loop.create_task(self._work(fn, thread), name=f"{name}-batcher-{i}")
            for i, (fn, thread) in enumerate(zip(self._functions, self._threads, strict=True))
        ]

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a batch (not counting those running)."""
        return len(self._queue)

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
        nbytes = sum([a.nbytes for a in inputs.values()])
        if (
            self.max_queue_bytes
            and self._queued_bytes + nbytes > self.max_queue_bytes
            and self._queue
        ):
            raise QueueFull(
                f"model '{self._name}': queue is full ({self._queued_bytes:,} bytes waiting, "
                f"limit {self.max_queue_bytes:,})"
            )
        if self._idle_function is not None and size <= self._idle_max_size:
            alone = self._is_idle() and time.perf_counter_ns() - self._last_done_ns > IDLE_GAP_NS
            if alone and self._calm >= CALM_LEVEL:
                result = await self._run_if_alone(self._idle_function, inputs, size)
                if result is not None:
                    self._calm += CALM_WEIGHT * (1.0 - self._calm)
                    return result
                alone = False
            self._calm += CALM_WEIGHT * (float(alone) - self._calm)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[BatchResult] = loop.create_future()
        item = _Pending(inputs, size, future, nbytes)
        self._queued_bytes += nbytes
        if timeout_s is not None:
            item.timer = loop.call_later(timeout_s, self._expire, item)
        self._queue.append(item)
        self._idle.clear()
        self._wake.set()
        try:
            return await future
        except asyncio.CancelledError:
            self._discard(item)
            raise

    def _is_idle(self) -> bool:
        return not self._queue and not self._busy and not self._arriving

    async def _run_if_alone(
        self, fn: BatchFunction, inputs: Arrays, size: int
    ) -> BatchResult | None:
        """Run now on this thread if no other request shows up in this turn of the loop."""
        self._arriving += 1
        self._idle.clear()
        try:
            await asyncio.sleep(0)  # requests that arrived together all see each other here
        except asyncio.CancelledError:
            self._arriving -= 1
            self._check_idle()
            raise
        self._arriving -= 1
        if self._arriving or self._queue or self._busy:
            return None  # not alone after all: queue for a batch like everyone else
        self._busy += 1
        item = _Pending(inputs, size, None)
        try:
            results, record = _execute(fn, [item])
        finally:
            self._busy -= 1
        self._observe(record)
        self._check_idle()
        if self._queue:
            self._wake.set()
        if record.error is not None:
            raise record.error
        return BatchResult(results[0], 0, record)

    def _discard(self, item: _Pending) -> None:
        if item.timer is not None:
            item.timer.cancel()
        with contextlib.suppress(ValueError):
            self._queue.remove(item)
            self._queued_bytes -= item.nbytes
            self._check_idle()

    def _expire(self, item: _Pending) -> None:
        assert item.future is not None
        if item.future.done():
            return
        try:
            self._queue.remove(item)
        except ValueError:
            return  # already running: it will finish
        self._queued_bytes -= item.nbytes
        item.future.set_exception(DeadlineExceeded("deadline exceeded while queued"))
        self._check_idle()

    def _check_idle(self) -> None:
        if self._is_idle():
            self._idle.set()

    def _take(self) -> list[_Pending]:
        items: list[_Pending] = []
        total = 0
        queue = self._queue
        while queue and total + queue[0].size <= self.max_batch_size:
            item = queue.popleft()
            self._queued_bytes -= item.nbytes
            if item.future is None or item.future.done():
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

    async def _work(self, fn: BatchFunction, thread: _InstanceThread) -> None:
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
                outcome = await thread.run(fn, items)
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
        outcome: Outcome,
    ) -> None:
        self._busy -= 1
        results, record = outcome
        if record.error is not None:
            for item in items:
                if item.future is not None and not item.future.done():
                    item.future.set_exception(record.error)
        else:
            for item, outputs in zip(items, results, strict=True):
                if item.future is not None and not item.future.done():
                    item.future.set_result(
                        BatchResult(outputs, start_ns - item.enqueued_ns, record)
                    )
        self._observe(record)
        self._check_idle()
        if self._queue:
            self._wake.set()

    def _observe(self, record: BatchRecord) -> None:
        self._last_done_ns = time.perf_counter_ns()
        if record.error is not None and not isinstance(record.error, asyncio.CancelledError):
            log.warning("batch of %d on %s failed: %r", record.size, self._name, record.error)
        if self._on_batch is not None:
            try:
                self._on_batch(record)
            except Exception:
                log.exception("batch observer failed")

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
        for thread in self._threads:
            thread.close()
        # Drop the functions (and the sessions they hold) now, not whenever a cycle is collected.
        self._functions, self._idle_function = [], None


def _execute(fn: BatchFunction, items: list[_Pending]) -> Outcome:
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
        return results, BatchRecord(size, len(items), t1 - t0, t2 - t1, t3 - t2, start_ns=t0)
    except Exception as exc:
        now = time.perf_counter_ns()
        return [], BatchRecord(size, len(items), t1 - t0, max(now - t1, 0), 0, exc)
