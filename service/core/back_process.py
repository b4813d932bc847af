"""Model instances in processes of their own (`--instances process`).

In one process every thread shares one GIL. Under load the event loop and gRPC's poller hand it
between themselves thousands of times a second, and a batch thread coming back from ONNX Runtime
is woken, finds it taken, and sleeps again, several times per batch (`bench/PROFILE.md`, items
30-31): the wait grows with how busy the host is, and it is most of this server's spread. An
instance in a child process has a GIL of its own, so nothing in the server waits for the
front's GIL but the front.

The loop forms each batch from the batcher's queue as soon as an instance is free (deadlines,
cancellation and the byte bound stay where they are, in the parent), copies it into a shared
memory region the child maps, and sends the child the batch's layout over a socket; the child
runs ONNX Runtime on views of that memory and sends the outputs back, which the loop reads when
the socket is readable (`add_reader`). A child that dies fails only its running batch
(UNAVAILABLE: retry) and is started again; one that cannot open its session fails the load.

Children are forked from a small server process (multiprocessing's `forkserver`) that has
imported this module, ONNX Runtime and numpy once and has no gRPC threads: starting an
instance costs a fork and a session, not an interpreter.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import mmap
import multiprocessing
import os
import pickle
import socket
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from typing import Any

import numpy as np

from .errors import BatchShapeError, ModelNotReady, QueueFull
from .ort_options import OrtOptions, WarmupSample

log = logging.getLogger(__name__)

MIN_REGION = 1 << 16  # bytes of the first shared region when the batch size is not known
RESTART_DELAY_S = (0.0, 1.0, 5.0, 30.0)  # between restarts of an instance that keeps dying
STOP_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class BackSpec:
    """What a child needs to open its session: the model file and how to open it."""

    path: Path
    intra_op_threads: int
    batched: bool
    options: OrtOptions
    warmup: tuple[WarmupSample, ...] = ()
    cpus: frozenset[int] | None = None  # the back CPUs under --pin-threads
    spin_us: int = 0  # how long an idle child polls for its next batch before it sleeps


# ---- the messages ---------------------------------------------------------------------------
# Each message is its length (4 bytes) and a body whose first byte says what it is. One send and,
# as a rule, one receive per message: on a virtual machine every system call on the loop counts.

LENGTH = struct.Struct("<I")
TIMES = struct.Struct("<qqqI")  # batch start (perf_counter_ns), input ns, infer ns, meta bytes
READY, FAILED, ANSWER, ERROR, JOB, STOP = b"RFAEJS"
CHUNK = 1 << 16  # a larger receive buffer costs a fresh mapping (page faults) per call


def _frame(*parts: bytes | memoryview) -> bytes:
    body = b"".join(parts)
    return LENGTH.pack(len(body)) + body


class _Frames:
    """Whole messages out of a byte stream, however the stream was cut."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, chunk: bytes) -> list[memoryview]:
        if not self._buffer:  # the usual case: whole messages, nothing left over
            view, messages = memoryview(chunk), []
            while len(view) >= LENGTH.size:
                (size,) = LENGTH.unpack_from(view)
                if len(view) < LENGTH.size + size:
                    break
                messages.append(view[LENGTH.size : LENGTH.size + size])
                view = view[LENGTH.size + size :]
            self._buffer += view
            return messages
        self._buffer += chunk
        data, self._buffer = bytes(self._buffer), bytearray()
        return self.feed(data)


class _Memo(dict):
    """A few hundred recent encodings: a model's batches repeat the same few layouts."""

    def remember(self, key: Any, value: Any) -> Any:
        if len(self) > 256:
            self.clear()
        self[key] = value
        return value


def _outputs(message: memoryview, metas: _Memo) -> tuple[dict[str, np.ndarray], int, int, int]:
    """An ANSWER's outputs (views of the message) and its timings."""
    start, input_ns, infer_ns, meta_size = TIMES.unpack_from(message, 1)
    offset = 1 + TIMES.size + meta_size
    key = bytes(message[1 + TIMES.size : offset])
    meta = metas.get(key) or metas.remember(
        key, [(n, np.dtype(d), s, math.prod(s)) for n, d, s in pickle.loads(key)]
    )
    outputs = {}
    for name, dtype, shape, count in meta:
        array = np.frombuffer(message, dtype, count, offset)
        outputs[name] = array.reshape(shape)
        offset += array.nbytes
    return outputs, start, input_ns, infer_ns


# ---- the child ------------------------------------------------------------------------------


def _serve(sock: socket.socket, spec: BackSpec, name: str) -> None:
    """(In the child) open the session, then run each batch the parent announces, until told to
    stop or the parent goes away."""
    from .placement import name_os_thread
    from .runtime import OnnxSession

    if spec.cpus:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, spec.cpus)
    name_os_thread(name)
    try:
        session = OnnxSession(
            spec.path,
            intra_op_threads=spec.intra_op_threads,
            device="cpu",
            batched=spec.batched,
            config_options=spec.options,
        )
        for sample in spec.warmup:
            for _ in range(sample.count):
                session.run(sample.inputs)
    except Exception as exc:  # the parent fails the load with this message
        sock.sendall(_frame(bytes([FAILED]), f"{type(exc).__name__}: {exc}".encode()))
        return
    sock.sendall(_frame(bytes([READY]), session.provider.encode()))
    region: tuple[str, mmap.mmap] | None = None
    frames = _Frames()
    spin_ns = spec.spin_us * 1000
    while True:
        try:
            chunk = _receive(sock, spin_ns)
        except OSError:
            return
        if not chunk:  # the server has gone
            return
        for message in frames.feed(chunk):
            if message[0] == STOP:
                return
            region_name, layout = pickle.loads(message[1:])
            if region is None or region[0] != region_name:
                if region is not None:
                    region[1].close()
                with open(f"/dev/shm/{region_name}", "r+b") as file:
                    region = (region_name, mmap.mmap(file.fileno(), 0))
            sock.sendall(_run(session.run, region[1], layout))


def _receive(sock: socket.socket, spin_ns: int) -> bytes:
    """The next bytes from the parent. With `spin_ns`, ask without waiting until that much time
    has passed first: a CPU that sleeps (halts) must be woken through the hypervisor when the next
    batch comes, which on a busy host takes longer and longer."""
    if spin_ns:
        deadline = time.perf_counter_ns() + spin_ns
        while time.perf_counter_ns() < deadline:
            try:
                return sock.recv(CHUNK, socket.MSG_DONTWAIT)
            except BlockingIOError:
                os.sched_yield()  # a thread waiting for this CPU (a client's, say) goes first
    return sock.recv(CHUNK)


def _run(run: Callable[[dict[str, np.ndarray]], Any], memory: mmap.mmap, layout: list) -> bytes:
    """One batch on views of the shared region; the answer's message (it never raises)."""
    t0 = time.perf_counter_ns()  # CLOCK_MONOTONIC: the parent's clock too
    t1 = t0
    try:
        batch = {
            name: np.ndarray(shape, np.dtype(dtype), buffer=memory, offset=offset)
            for name, dtype, shape, offset in layout
        }
        size = layout[0][2][0]
        t1 = time.perf_counter_ns()
        outputs = run(batch)
        t2 = time.perf_counter_ns()
        del batch  # no view may outlive the region
        arrays = {key: np.ascontiguousarray(array) for key, array in outputs.items()}
        BatchShapeError.check(arrays, size)
        for key, array in arrays.items():
            if array.dtype.hasobject:
                raise TypeError(f"output '{key}' is {array.dtype}, which cannot be sent back")
        meta = pickle.dumps([(key, a.dtype.str, a.shape) for key, a in arrays.items()])
        times = TIMES.pack(t0, t1 - t0, t2 - t1, len(meta))
        return _frame(bytes([ANSWER]), times, meta, *(a.data for a in arrays.values()))
    except Exception as exc:
        times = TIMES.pack(t0, t1 - t0, time.perf_counter_ns() - t1, 0)
        try:
            error = pickle.dumps(exc)
        except Exception:  # an exception that does not pickle: its text does
            error = pickle.dumps(RuntimeError(repr(exc)))
        return _frame(bytes([ERROR]), times, error)


# ---- the parent -----------------------------------------------------------------------------

_context: Any = None


def _start_method() -> Any:
    """The forkserver context, its server preloaded with this module (once per process)."""
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload([__name__, "service.core.runtime"])
    return _context


class InstanceDied(ModelNotReady):
    """The instance's process ended while running this batch; it is being started again."""


Answer = tuple[dict[str, np.ndarray] | None, BaseException | None, int, int, int]


class ProcessInstance:
    """One model instance in a child process, driven from the event loop.

    `run` hands it a batch (only while `idle`); `on_answer(answer)` is called on the loop with
    the outputs (or the error) and the child's timings, `on_idle()` when it has started (or
    started again) and can take a batch.
    """

    def __init__(
        self,
        spec: BackSpec,
        name: str,
        on_answer: Callable[[Answer], None],
        on_idle: Callable[[], None],
    ) -> None:
        self.spec = spec
        self.name = name
        self._on_answer = on_answer
        self._on_idle = on_idle
        self._loop = asyncio.get_running_loop()
        self.idle = False
        self.running = False
        self.provider = ""
        self._region: SharedMemory | None = None
        self._sock: socket.socket | None = None
        self._frames = _Frames()
        self._metas, self._jobs = _Memo(), _Memo()
        self._process: Any = None
        self._ready: asyncio.Future[None] = self._loop.create_future()
        self._closing = False
        self._deaths = 0
        self._start()

    def _start(self) -> None:
        context = _start_method()
        parent, child = socket.socketpair()
        self._process = context.Process(
            target=_serve, args=(child, self.spec, self.name), name=self.name, daemon=True
        )
        self._process.start()
        child.close()
        self._sock, self._frames = parent, _Frames()
        self._loop.add_reader(parent.fileno(), self._readable)

    async def ready(self) -> None:
        """Wait until the child has opened and warmed its session (ModelNotReady if it could
        not)."""
        await asyncio.shield(self._ready)

    def run(self, inputs: Sequence[Mapping[str, np.ndarray]], sizes: Sequence[int]) -> None:
        """Copy the requests' inputs one after another into the shared region and start the
        batch. Raises ValueError (nothing started) when they do not line up into one batch."""
        assert self.idle and self._sock is not None
        first = inputs[0]
        total = sum(sizes)
        layout = []
        offset = 0
        for key, array in first.items():
            tail, dtype = array.shape[1:], array.dtype
            for other in inputs:
                if other[key].shape[1:] != tail or other[key].dtype != dtype:
                    raise ValueError(
                        f"input '{key}': the batch's requests differ in shape or datatype "
                        f"({list(other[key].shape[1:])} {other[key].dtype} against "
                        f"{list(tail)} {dtype})"
                    )
            if dtype.hasobject:
                raise ValueError(f"input '{key}': {dtype} cannot go through shared memory")
            layout.append((key, dtype.str, (total, *tail), offset))
            offset += -(-dtype.itemsize * total * math.prod(tail) // 64) * 64
        region = self._region_for(offset)
        for name, code, shape, start in layout:
            target = np.ndarray(shape, np.dtype(code), buffer=region.buf, offset=start)
            row = 0
            for request, size in zip(inputs, sizes, strict=True):
                target[row : row + size] = request[name]
                row += size
            del target
        job_key = (region.name, *layout)
        job = self._jobs.get(job_key) or self._jobs.remember(
            job_key, _frame(bytes([JOB]), pickle.dumps((region.name, layout)))
        )
        self._sock.sendall(job)
        self.idle, self.running = False, True

    def _region_for(self, nbytes: int) -> SharedMemory:
        """The shared region, grown (to a power of two) when this batch needs more."""
        if self._region is None or self._region.size < nbytes:
            size = max(MIN_REGION, 1 << (nbytes - 1).bit_length())
            region = SharedMemory(create=True, size=size)
            try:  # reserve the pages now: a full /dev/shm would otherwise be SIGBUS on writing
                os.posix_fallocate(region._fd, 0, size)  # type: ignore[attr-defined]
            except OSError as exc:
                region.close()
                region.unlink()
                raise QueueFull(
                    f"{self.name}: no room in /dev/shm for a batch of {nbytes:,} bytes ({exc}); "
                    "give the server more shared memory (docker run --shm-size, or a "
                    "memory-backed volume at /dev/shm)"
                ) from None
            if self._region is not None:  # the child maps the new one with the next batch
                self._region.close()
                self._region.unlink()
            self._region = region
        return self._region

    def _readable(self) -> None:
        sock = self._sock
        assert sock is not None
        try:  # the socket is readable: this returns at once
            chunk = sock.recv(CHUNK)
        except OSError:
            chunk = b""
        if not chunk:
            self._died()
            return
        for message in self._frames.feed(chunk):
            kind = message[0]
            if kind in (ANSWER, ERROR):
                self.running = False
                self.idle = True
                self._deaths = 0
                if kind == ANSWER:
                    outputs, start, input_ns, infer_ns = _outputs(message, self._metas)
                    self._on_answer((outputs, None, start, input_ns, infer_ns))
                else:
                    start, input_ns, infer_ns, _ = TIMES.unpack_from(message, 1)
                    try:
                        error = pickle.loads(message[1 + TIMES.size :])
                    except Exception as exc:  # an exception class that will not rebuild here
                        error = RuntimeError(f"the batch failed; its error did not unpickle: {exc}")
                    self._on_answer((None, error, start, input_ns, infer_ns))
            elif kind == READY:
                self.provider = bytes(message[1:]).decode()
                self._ready.set_result(None)
                self.idle = True
                self._on_idle()
            else:  # FAILED: it could not open its session
                text = bytes(message[1:]).decode(errors="replace")
                self._ready.set_exception(ModelNotReady(f"{self.name}: {text}"))
                self._stop_reading()
                return

    def _stop_reading(self) -> None:
        if self._sock is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None

    def _died(self) -> None:
        self._stop_reading()
        self._process.join(0.1)
        code = self._process.exitcode
        how = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        if not self._ready.done():
            self._ready.set_exception(ModelNotReady(f"{self.name}: the process ended ({how})"))
            return
        if self._closing:
            return
        log.error("%s: model instance process ended (%s); starting it again", self.name, how)
        self.idle = False
        if self.running:
            self.running = False
            error = InstanceDied(
                f"the model instance running this batch ended ({how}); it is being restarted"
            )
            self._on_answer((None, error, time.perf_counter_ns(), 0, 0))
        self._restart_later()

    def _restart_later(self) -> None:
        """Start it again: at once the first time, later each time it dies before answering."""
        delay = RESTART_DELAY_S[min(self._deaths, len(RESTART_DELAY_S) - 1)]
        self._deaths += 1
        if not self._closing:
            self._loop.call_later(delay, self._restart)

    def _restart(self) -> None:
        if self._closing:
            return
        self._ready = self._loop.create_future()
        self._ready.add_done_callback(self._restarted)
        self._start()

    def _restarted(self, ready: asyncio.Future[None]) -> None:
        if ready.exception() is not None:  # it could not open its session this time
            log.error("%s: %s", self.name, ready.exception())
            self._restart_later()

    async def close(self) -> None:
        """Stop the child (after its running batch, which the batcher has drained) and free
        the shared region."""
        self._closing = True
        self.idle = False
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.sendall(_frame(bytes([STOP])))
            self._stop_reading()
        process = self._process
        await asyncio.to_thread(process.join, STOP_TIMEOUT_S)
        if process.is_alive():
            process.kill()
            await asyncio.to_thread(process.join)
        if self._region is not None:
            self._region.close()
            self._region.unlink()
            self._region = None
