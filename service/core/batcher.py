"""An asyncio dynamic batcher over plain numpy functions; it knows nothing of gRPC.

Requests queue with their own future. Each model instance has its own thread, which takes
everything queued, up to `max_batch_size` images, concatenates it, runs its function and splits
the outputs back, one slice per request; the loop answers them. The thread takes its next batch
itself as soon as it is free, without waiting for the loop to answer the last one, so under load
the function runs back to back and batches grow by themselves while the previous one runs. By
default a free thread does not wait for more requests (`wait_for_preferred`: a batch smaller
than the smallest preferred size waits up to `max_queue_delay_s` for more).

Instances in processes of their own (`back_process`, `--instances process`) take
their batches from the same queue, but through the loop: when one is free, the loop hands it
everything queued (at the end of the turn in which a request arrived, or at once when the
instance answers), and answers the requests when the outputs come back.

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
import functools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from queue import Empty
from typing import NamedTuple

import numpy as np

from .back_process import Answer, BackSpec, ProcessInstance
from .errors import BatchShapeError, DeadlineExceeded, ModelNotReady, QueueFull
from .placement import enter_back, name_os_thread

log = logging.getLogger(__name__)

# A request arriving sooner than this after a batch finished had been waiting: no fast path.
IDLE_GAP_NS = 100_000
# The fast path needs this share of recent arrivals (a moving average of weight CALM_WEIGHT) to
# have found the model idle: at concurrency 1 all do, from about 4 in flight most do not.
CALM_LEVEL = 0.9
CALM_WEIGHT = 0.05

Arrays = Mapping[str, np.ndarray]
BatchFunction = Callable[[dict[str, np.ndarray]], Arrays]


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


class _Feed:
    """The requests waiting for a batch, shared by the loop and the instance threads.

    The loop appends; a thread that finishes a batch takes the next one itself, at once, from
    whatever has queued while it ran: no trip through the event loop between two batches, so
    under load ONNX Runtime runs back to back while the loop answers the batch just done. All
    of it under one lock, held for a few list operations at a time.
    """

    def __init__(self, max_batch_size: int, hold_below: int, delay_s: float) -> None:
        self.lock = threading.Lock()
        self.queue: deque[_Pending] = deque()
        self.queued_bytes = 0
        self.queued_size = 0  # images waiting
        self.max_batch_size = max_batch_size
        self.hold_below = hold_below  # delay mode: a smaller batch waits up to delay_s
        self.delay_s = delay_s
        self._sleeping = 0  # threads waiting for a wake-up token
        self._tokens: queue.SimpleQueue[bool | None] = queue.SimpleQueue()

    def put(self, item: _Pending) -> None:
        """Queue one request (on the loop); wake a sleeping thread if there is one."""
        with self.lock:
            self.queue.append(item)
            self.queued_bytes += item.nbytes
            self.queued_size += item.size
            wake = self._sleeping > 0
            if wake:
                self._sleeping -= 1
        if wake:
            self._tokens.put(True)

    def remove(self, item: _Pending) -> bool:
        """Take a request back before a thread has taken it; False once it has."""
        with self.lock:
            try:
                self.queue.remove(item)
            except ValueError:
                return False
            self.queued_bytes -= item.nbytes
            self.queued_size -= item.size
            return True

    def stop(self, threads: int) -> None:
        """Tell `threads` threads to end once they are done with what they run."""
        for _ in range(threads):
            self._tokens.put(None)

    def take(self) -> tuple[list[_Pending], int] | float | None:
        """(The loop, for process instances) The next batch if there is one, without waiting:
        its requests and how many cancelled ones were dropped; else the seconds a held batch
        still waits (delay mode), or None when nothing is queued."""
        with self.lock:
            return self._take()

    def _take(self) -> tuple[list[_Pending], int] | float | None:
        queue = self.queue
        if not queue:
            return None
        if self.hold_below:
            left = self.delay_s - (time.perf_counter_ns() - queue[0].enqueued_ns) / 1e9
            if self.queued_size < self.hold_below and left > 0:
                return left
        items: list[_Pending] = []
        dropped = total = 0
        while queue and total + queue[0].size <= self.max_batch_size:
            item = queue.popleft()
            self.queued_bytes -= item.nbytes
            self.queued_size -= item.size
            if item.future is None or item.future.done():  # cancelled, not yet removed
                dropped += 1
                continue
            items.append(item)
            total += item.size
        return items, dropped

    def next_batch(self) -> tuple[list[_Pending], int] | None:
        """(Thread side) Block until there is a batch to run: its requests, and how many
        cancelled ones were dropped on the way; None when told to stop."""
        while True:
            with self.lock:
                taken = self._take()
                if isinstance(taken, tuple):
                    return taken
                wait = taken
                self._sleeping += 1
            try:
                token = self._tokens.get(timeout=wait)
            except Empty:  # a held batch's delay is over: unregister, unless a token is coming
                with self.lock:
                    claimed = self._sleeping == 0
                    if not claimed:
                        self._sleeping -= 1
                token = self._tokens.get() if claimed else True
            if token is None:
                return None


class _InstanceThread:
    """One model instance's thread: it takes each batch from the feed as soon as it is free and
    posts the outcome to the loop with `call_soon_threadsafe`."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        fn: BatchFunction,
        feed: _Feed,
        deliver: Callable[[list[_Pending], int, Outcome], None],
        name: str,
    ) -> None:
        self._loop = loop
        self._fn = fn
        self._feed = feed
        self._deliver = deliver
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        enter_back()  # off the event loop's CPU, under --pin-threads
        name_os_thread(self._thread.name)
        next_batch, reply, deliver = (
            self._feed.next_batch,
            self._loop.call_soon_threadsafe,
            self._deliver,
        )
        while (batch := next_batch()) is not None:
            items, dropped = batch
            outcome = _execute(self._fn, items) if items else ([], _EMPTY)
            try:
                reply(deliver, items, dropped, outcome)
            except RuntimeError:  # the loop is closed: nobody waits any more
                return
            del batch, items, outcome  # hold no batch while waiting for the next


_EMPTY = BatchRecord(0, 0, 0, 0, 0)


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
        processes: Sequence[BackSpec] = (),
    ) -> None:
        """`functions` run in instance threads; `processes` describe instances that run in
        processes of their own (`back_process`), to which the loop hands each batch."""
        if not functions and not processes:
            raise ValueError("at least one batch function or instance process is needed")
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self.max_batch_size = max_batch_size
        self.max_queue_size = max_queue_size  # 0: unbounded
        self.max_queue_bytes = max_queue_bytes  # 0: unbounded
        fitting = [p for p in preferred_batch_sizes if 0 < p <= max_batch_size]
        hold_below = min(fitting) if (wait_for_preferred and fitting) else 0
        self._feed = _Feed(
            max_batch_size, hold_below if max_queue_delay_s > 0 else 0, max_queue_delay_s
        )
        self._on_batch = on_batch
        self._idle_function = idle_function
        self._idle_max_size = idle_max_size  # larger requests would hold up the event loop
        self._arriving = 0  # requests looking at the idle fast path in this turn of the loop
        self._last_done_ns = 0
        self._calm = 1.0
        self._name = name
        self._pending = 0  # requests queued or running, until answered (on the loop)
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False
        self._loop = asyncio.get_running_loop()
        self._threads = [
            _InstanceThread(self._loop, fn, self._feed, self._delivered, f"{name}-{i}")
            for i, fn in enumerate(functions)
        ]
        self._procs = [
            ProcessInstance(
                spec,
                f"{name}-{i}",
                functools.partial(self._answered, i),
                self._schedule_dispatch,
            )
            for i, spec in enumerate(processes, start=len(functions))
        ]
        self._running: dict[int, tuple[list[_Pending], int, int]] = {}
        self._dispatch_handle: asyncio.Handle | None = None
        self._held_handle: asyncio.TimerHandle | None = None

    async def started(self) -> None:
        """Wait until every instance process has opened its session; ModelNotReady (with the
        child's reason) when one could not."""
        await asyncio.gather(*(proc.ready() for proc in self._procs))

    @property
    def instance_providers(self) -> list[str]:
        """The execution provider of each instance process (empty with threads only)."""
        return [proc.provider for proc in self._procs]

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a batch (not counting those running)."""
        return len(self._feed.queue)

    async def submit(
        self, inputs: Arrays, size: int, timeout_s: float | None = None
    ) -> BatchResult:
        """Queue one request of `size` images (leading dim of every input) and await its outputs."""
        if self._closed:
            raise ModelNotReady(f"model '{self._name}' is not accepting requests")
        feed = self._feed
        if self.max_queue_size and len(feed.queue) >= self.max_queue_size:
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
            and feed.queued_bytes + nbytes > self.max_queue_bytes
            and feed.queue
        ):
            raise QueueFull(
                f"model '{self._name}': queue is full ({feed.queued_bytes:,} bytes waiting, "
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
        future: asyncio.Future[BatchResult] = self._loop.create_future()
        item = _Pending(inputs, size, future, nbytes)
        if timeout_s is not None:
            item.timer = self._loop.call_later(timeout_s, self._expire, item)
        self._pending += 1
        self._idle.clear()
        feed.put(item)
        if self._procs:
            self._schedule_dispatch()
        try:
            return await future
        except asyncio.CancelledError:
            self._discard(item)
            raise

    def _is_idle(self) -> bool:
        return not self._pending and not self._arriving

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
        if self._arriving or self._pending:
            return None  # not alone after all: queue for a batch like everyone else
        self._pending += 1
        item = _Pending(inputs, size, None)
        try:
            results, record = _execute(fn, [item])
        finally:
            self._pending -= 1
        self._observe(record)
        self._check_idle()
        if record.error is not None:
            raise record.error
        return BatchResult(results[0], 0, record)

    def _discard(self, item: _Pending) -> None:
        if item.timer is not None:
            item.timer.cancel()
        if self._feed.remove(item):
            self._pending -= 1
            self._check_idle()

    def _expire(self, item: _Pending) -> None:
        assert item.future is not None
        if item.future.done() or not self._feed.remove(item):
            return  # answered, or already running: it will finish
        self._pending -= 1
        item.future.set_exception(DeadlineExceeded("deadline exceeded while queued"))
        self._check_idle()

    def _check_idle(self) -> None:
        if self._is_idle():
            self._idle.set()

    def _schedule_dispatch(self) -> None:
        """(On the loop) A request arrived for a free instance process: hand out batches at the
        end of this turn of the loop, so that requests arriving together share one."""
        if self._dispatch_handle is None:
            self._dispatch_handle = self._loop.call_soon(self._dispatch)

    def _dispatch(self) -> None:
        """(On the loop) Give each free instance process the next batch from the queue."""
        if self._dispatch_handle is not None:
            self._dispatch_handle.cancel()
            self._dispatch_handle = None
        if self._held_handle is not None:
            self._held_handle.cancel()
            self._held_handle = None
        for index, proc in enumerate(self._procs, start=len(self._threads)):
            while proc.idle:
                taken = self._feed.take()
                if taken is None:
                    return
                if isinstance(taken, float):  # delay mode: the batch waits for more
                    self._held_handle = self._loop.call_later(taken, self._dispatch)
                    return
                items, dropped = taken
                if not items:
                    self._delivered([], dropped, ([], _EMPTY))
                    continue
                sizes = [item.size for item in items]
                try:
                    proc.run([item.inputs for item in items], sizes)
                except Exception as exc:  # requests that do not line up into one batch
                    record = BatchRecord(sum(sizes), len(items), 0, 0, 0, exc)
                    self._delivered(items, dropped, ([], record))
                    continue
                self._running[index] = (items, dropped, sum(sizes))

    def _answered(self, index: int, answer: Answer) -> None:
        """(On the loop) An instance process finished a batch: start its next one at once,
        then split the outputs and answer the requests."""
        items, dropped, size = self._running.pop(index)
        self._dispatch()
        outputs, error, start_ns, input_ns, infer_ns = answer
        t0 = time.perf_counter_ns()
        results = _split(outputs, items) if outputs is not None else []
        output_ns = time.perf_counter_ns() - t0
        record = BatchRecord(size, len(items), input_ns, infer_ns, output_ns, error, start_ns)
        self._delivered(items, dropped, (results, record))

    def _delivered(self, items: list[_Pending], dropped: int, outcome: Outcome) -> None:
        """(On the loop) Answer the requests of one batch."""
        self._pending -= len(items) + dropped
        results, record = outcome
        error = record.error
        for index, item in enumerate(items):
            if item.timer is not None:
                item.timer.cancel()
            future = item.future
            if future is None or future.done():  # a cancelled waiter has gone
                continue
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(
                    BatchResult(results[index], record.start_ns - item.enqueued_ns, record)
                )
        if items:
            self._observe(record)
        self._check_idle()

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
        """Drain, then stop the instance threads and processes (each once its batch, if any,
        is done)."""
        await self.drain()
        self._feed.stop(len(self._threads))
        for handle in (self._dispatch_handle, self._held_handle):
            if handle is not None:
                handle.cancel()
        await asyncio.gather(*(proc.close() for proc in self._procs))
        self._procs = []
        # Drop the functions (and the sessions they hold) now, not whenever a cycle is collected.
        self._threads, self._idle_function = [], None


def _stack(arrays: list[np.ndarray]) -> np.ndarray:
    """The requests' arrays one after another along the batch axis, as `np.concatenate` makes
    them, but copied without letting go of the GIL.

    numpy lets the GIL go to copy each array of more than a few hundred elements (an MNIST image
    is 784), and the busy event loop takes it at once: the batch thread then waits for it back,
    up to the switch interval, once per request in the batch. `bytes.join` copies them all in
    one go under the GIL, and faster; the batch is read-only, which ONNX Runtime does not mind.
    Arrays that do not line up (another dtype or trailing shape, objects, a foreign byte order,
    a strided view) go to `np.concatenate`, which also raises its own error for those that must.
    """
    first = arrays[0]
    dtype, tail = first.dtype, first.shape[1:]
    if (
        dtype.hasobject
        or not dtype.isnative
        or first.ndim == 0
        or 0 in tail
        or not all(
            a.dtype == dtype and a.shape[1:] == tail and a.flags.c_contiguous for a in arrays
        )
    ):
        return np.concatenate(arrays)
    joined = b"".join(arrays)  # type: ignore[arg-type]  # arrays are buffers; the stubs omit it
    return np.frombuffer(joined, dtype).reshape(-1, *tail)


def _split(outputs: Arrays, items: list[_Pending]) -> list[dict[str, np.ndarray]]:
    """Each request's rows of every output, in the batch's order."""
    results = []
    offset = 0
    for item in items:
        end = offset + item.size
        results.append({name: array[offset:end] for name, array in outputs.items()})
        offset = end
    return results


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
                name: _stack([item.inputs[name] for item in items]) for name in items[0].inputs
            }
        t1 = time.perf_counter_ns()
        outputs = fn(batch)
        t2 = time.perf_counter_ns()
        BatchShapeError.check(outputs, size)
        results = _split(outputs, items)
        t3 = time.perf_counter_ns()
        return results, BatchRecord(size, len(items), t1 - t0, t2 - t1, t3 - t2, start_ns=t0)
    except Exception as exc:
        now = time.perf_counter_ns()
        return [], BatchRecord(size, len(items), t1 - t0, max(now - t1, 0), 0, exc)
