"""The supervisor of `--workers N`: N servers on one gRPC port, started, watched and stopped.

Each worker is a whole server (its own sessions, batchers and event loop) bound to the shared port
with SO_REUSEPORT, so the kernel spreads client *connections* over the workers; one connection's
streams all land on one worker. The supervisor serves no requests. It

- reserves the port (port 0 becomes a concrete free port every worker then binds),
- starts the workers (multiprocessing, spawn; `worker.py`) and restarts one that dies, with a
  backoff,
- owns the public metrics port (`federation.py` merges the workers' metrics at scrape time),
- forwards SIGTERM / Ctrl-C to every worker (each drains as a single server does: health
  NOT_SERVING, accepted requests finish within the grace period) and exits 0 when all exit 0;
  a repeated stop signal is logged once and ignored.

The workers find each other through a run directory it makes (`rundir.py`); ModelStatistics sums
over them (`peers.py`).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from dataclasses import dataclass, replace
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server

from ..app import CLOSE_MARGIN_S
from ..config import Settings
from .federation import GroupMetrics
from .rundir import WorkerInfo, info_path, read_info
from .worker import worker_main

log = logging.getLogger(__name__)

RESTART_DELAY_S = 0.5  # first restart delay; doubles per quick death, up to RESTART_MAX_S
RESTART_MAX_S = 30.0
STABLE_S = 30.0  # a worker that ran this long before dying restarts after RESTART_DELAY_S again
STOP_MARGIN_S = 10.0  # past grace + close margin, workers still running are killed


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind (without listening) a SO_REUSEPORT socket: it fixes port 0 to a concrete port,
    fails early when another program holds the port, and keeps it while workers restart."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


@dataclass
class Slot:
    """One worker position: the process in it now and its restart history."""

    index: int
    process: BaseProcess | None = None
    started: float = 0.0
    info: WorkerInfo | None = None
    quick_deaths: int = 0
    restarts: int = 0
    restart_at: float | None = None


class Supervisor:
    """Starts, watches, restarts and stops the workers of one group."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.slots = [Slot(i) for i in range(settings.workers)]
        self.run_dir = Path(tempfile.mkdtemp(prefix="cnnserve-workers-"))
        self._context = multiprocessing.get_context("spawn")
        self._signals: list[int] = []
        self._worker_settings = settings

    def _spawn(self, slot: Slot) -> None:
        with contextlib.suppress(FileNotFoundError):
            info_path(self.run_dir, slot.index).unlink()
        process = self._context.Process(
            target=worker_main,
            args=(
                self._worker_settings,
                slot.index,
                self.run_dir,
                self.settings.metrics_port >= 0,
            ),
            name=f"cnnserve-worker-{slot.index}",
        )
        process.start()
        log.info("started worker %d (pid %s)", slot.index, process.pid)
        slot.process, slot.started, slot.info, slot.restart_at = (
            process,
            time.monotonic(),
            None,
            None,
        )

    def _on_signal(self, signum: int, frame: object) -> None:
        self._signals.append(signum)

    def _forward_hangup(self, signum: int, frame: object) -> None:
        """SIGHUP: each worker re-reads the token files."""
        for slot in self.slots:
            if slot.process is not None and slot.process.pid and slot.process.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.process.pid, signal.SIGHUP)

    def run(self) -> int:
        """Serve until a stop signal; return 0 when every worker drained and exited cleanly."""
        settings = self.settings
        try:
            reserved = reserve_port(settings.host, settings.grpc_port)
        except OSError as exc:
            log.error("cannot listen on %s:%d: %s", settings.host, settings.grpc_port, exc)
            return 2
        port = reserved.getsockname()[1]
        self._worker_settings = replace(settings, grpc_port=port)
        httpd: Any = None
        metrics_port: int | None = None
        if settings.metrics_port >= 0:
            registry = CollectorRegistry()
            registry.register(GroupMetrics(self.slots))
            try:
                httpd, _ = start_http_server(
                    settings.metrics_port, addr=settings.effective_metrics_host, registry=registry
                )
            except OSError as exc:
                log.error("cannot serve metrics on port %d: %s", settings.metrics_port, exc)
                reserved.close()
                return 2
            metrics_port = httpd.server_port
        wake_read, wake_write = socket.socketpair()
        wake_read.setblocking(False)
        wake_write.setblocking(False)
        previous_fd = signal.set_wakeup_fd(wake_write.fileno())
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        handlers[signal.SIGHUP] = signal.signal(signal.SIGHUP, self._forward_hangup)
        try:
            return self._supervise(port, metrics_port, wake_read)
        finally:
            for signum, old in handlers.items():
                signal.signal(signum, old)
            signal.set_wakeup_fd(previous_fd)
            wake_read.close()
            wake_write.close()
            if httpd is not None:
                httpd.shutdown()
                httpd.server_close()
            reserved.close()
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def _supervise(self, port: int, metrics_port: int | None, wake: socket.socket) -> int:
        log.info("starting %d workers on port %d", len(self.slots), port)
        for slot in self.slots:
            self._spawn(slot)
        starting = True
        repeat_logged = False
        stop_deadline: float | None = None
        codes: dict[int, int | None] = {}
        while True:
            now = time.monotonic()
            if len(self._signals) > 1 and not repeat_logged:
                repeat_logged = True
                log.warning("another stop signal received while stopping: ignored")
            if self._signals and stop_deadline is None:
                log.info("stop signal received: draining %d workers", len(self.slots))
                stop_deadline = now + self.settings.grace_period_s + CLOSE_MARGIN_S + STOP_MARGIN_S
                self._signal_all(signal.SIGTERM)
            elif stop_deadline is not None and now > stop_deadline:
                log.warning("workers still running past the grace period: killing them")
                self._signal_all(signal.SIGKILL)
                stop_deadline = float("inf")
            for slot in self.slots:
                process = slot.process
                if process is None:
                    due = slot.restart_at is not None and now >= slot.restart_at
                    if due and stop_deadline is None:
                        slot.restarts += 1
                        self._spawn(slot)
                    continue
                if slot.info is None:
                    info = read_info(self.run_dir, slot.index)
                    if info is not None and info.pid == process.pid:
                        slot.info = info
                        if not starting:
                            log.info("worker %d (pid %d) is serving again", slot.index, info.pid)
                if process.is_alive():
                    continue
                process.join()
                code = process.exitcode
                slot.process, slot.info = None, None
                with contextlib.suppress(FileNotFoundError):
                    info_path(self.run_dir, slot.index).unlink()
                if stop_deadline is not None:
                    codes[slot.index] = code
                    continue
                if starting:
                    log.error(
                        "worker %d could not start (exit code %s): stopping", slot.index, code
                    )
                    self._signals.append(signal.SIGTERM)
                    codes[slot.index] = code
                    stop_deadline = now + self.settings.grace_period_s + STOP_MARGIN_S
                    self._signal_all(signal.SIGTERM)
                    continue
                uptime = now - slot.started
                if uptime >= STABLE_S:
                    slot.quick_deaths = 0
                delay = min(RESTART_MAX_S, RESTART_DELAY_S * 2**slot.quick_deaths)
                slot.quick_deaths += 1
                slot.restart_at = now + delay
                log.warning(
                    "worker %d (pid %s) exited with code %s after %.1f s: restarting in %.1f s",
                    slot.index, process.pid, code, uptime, delay,
                )  # fmt: skip
            if starting and stop_deadline is None and all(s.info for s in self.slots):
                starting = False
                log.info(
                    "%d workers serving on gRPC port %d, metrics port %s",
                    len(self.slots), port, metrics_port,
                )  # fmt: skip
            alive = [s.process for s in self.slots if s.process is not None]
            if stop_deadline is not None and not alive:
                break
            pending = starting or any(s.info is None for s in self.slots)
            wait([*(p.sentinel for p in alive), wake], timeout=0.1 if pending else 1.0)
            with contextlib.suppress(BlockingIOError):
                while wake.recv(512):
                    pass
        failed = {i: c for i, c in codes.items() if c != 0}
        if failed:
            log.error("workers exited with errors: %s", failed)
            return max(2 if c == 2 else 1 for c in failed.values())
        log.info("all %d workers stopped", len(self.slots))
        return 0

    def _signal_all(self, signum: int) -> None:
        for slot in self.slots:
            if slot.process is not None and slot.process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.process.pid, signum)


def supervise(settings: Settings) -> int:
    """Run `settings.workers` worker processes on one port until a stop signal."""
    return Supervisor(settings).run()
