"""The supervisor's liveness check: is each serving worker still answering, not merely alive?

A worker can hang without dying (SIGSTOP, a deadlock, a stuck event loop, swapping): its
process is alive and its share of the port keeps taking connections, which then wait forever.
Exit codes do not see that. So a thread of the supervisor asks every serving worker a small RPC
on its private loopback port (the one peers ask for statistics: it goes through the worker's
event loop and gRPC server, as client requests do) every fraction of the timeout; a worker that
has not answered for `--worker-liveness-timeout-s` is reported to the supervisor, which kills it
with SIGKILL and restarts it like a worker that died.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from pb import grpc_service_pb2 as pb

log = logging.getLogger(__name__)

MIN_INTERVAL_S = 0.2


@dataclass
class _Watched:
    pid: int
    port: int
    channel: grpc.Channel
    call: Callable[..., grpc.Future]
    last_answer: float
    pending: grpc.Future | None = None


def _answered(worker: _Watched, future: grpc.Future) -> None:
    if not future.cancelled() and future.exception() is None:
        worker.last_answer = time.monotonic()


class Liveness:
    """Probes each watched worker in a background thread; `silent_for` says how long it has
    not answered. A timeout of 0 turns the check off."""

    def __init__(self, timeout_s: float, method: str) -> None:
        self.timeout_s = timeout_s
        self.interval_s = max(MIN_INTERVAL_S, timeout_s / 5)
        self._method = method
        self._watched: dict[int, _Watched] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return self.timeout_s > 0

    def start(self) -> None:
        """Start the probing thread (nothing when the check is off)."""
        if self.enabled and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="worker-liveness", daemon=True)
            self._thread.start()

    def watch(self, index: int, pid: int, port: int) -> None:
        """Start watching worker `index` (process `pid`, private port `port`) from now."""
        if not self.enabled:
            return
        with self._lock:
            current = self._watched.get(index)
            if current is not None and current.pid == pid:
                return
            if current is not None:
                current.channel.close()
            channel = grpc.insecure_channel(f"127.0.0.1:{port}")
            call = channel.unary_unary(
                self._method,
                request_serializer=pb.ModelStatisticsRequest.SerializeToString,
                response_deserializer=pb.ModelStatisticsResponse.FromString,
            ).future
            self._watched[index] = _Watched(pid, port, channel, call, time.monotonic())

    def forget(self, index: int) -> None:
        """Stop watching worker `index` (it exited, or the group is stopping)."""
        with self._lock:
            watched = self._watched.pop(index, None)
        if watched is not None:
            watched.channel.close()

    def silent_for(self, index: int, pid: int) -> float:
        """Seconds since worker `index` (as process `pid`) last answered; 0 when not watched."""
        with self._lock:
            watched = self._watched.get(index)
            if watched is None or watched.pid != pid:
                return 0.0
            return time.monotonic() - watched.last_answer

    def unresponsive(self, index: int, pid: int) -> bool:
        """Whether the worker has been silent for longer than the timeout."""
        return self.enabled and self.silent_for(index, pid) > self.timeout_s

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            with self._lock:
                watched = list(self._watched.values())
            for worker in watched:
                pending = worker.pending
                if pending is not None and not pending.done():
                    continue  # still waiting for the last one: it counts as silence
                try:
                    worker.pending = worker.call(
                        pb.ModelStatisticsRequest(), timeout=self.timeout_s
                    )
                except ValueError:  # the channel was closed under us (forgotten)
                    continue
                worker.pending.add_done_callback(lambda f, w=worker: _answered(w, f))

    def close(self) -> None:
        """Stop probing and close the channels."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        for index in list(self._watched):
            self.forget(index)
