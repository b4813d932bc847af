"""The one life cycle a single server and a worker process both go through.

Stop signals are watched from before start-up (a stop during loading drains once started); the
first SIGTERM / SIGINT starts the drain, later ones are logged once and ignored (the handlers stay
installed, so no default action kills the process mid-drain); SIGHUP re-reads the token files.
Exit codes: `EXIT_OK` after a drain, `EXIT_START_FAILED` when the server could not start.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

from .app import InferenceServer, create_server
from .config import Settings
from .core import placement
from .core.errors import ModelLoadError
from .rpc.servicers import PeerStatistics

log = logging.getLogger("service")

EXIT_OK = 0
EXIT_START_FAILED = 2  # the settings, the repository or a port made starting impossible
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

# Runs once the server is up; returns what to undo at the end (after the drain).
OnStarted = Callable[[InferenceServer], Awaitable[Callable[[], Awaitable[None]]]]


M_ARENA_MAX = -8  # glibc's mallopt parameter number


# A young-generation collection every this many new container objects (Python's default: 700,
# which a request's futures, messages and dicts reach every 25 requests or so).
GC_YOUNG_THRESHOLD = 20_000


def tune_interpreter(settings: Settings) -> None:
    """Process-wide settings, applied before any thread starts: malloc arenas, GIL switch time,
    how often the cyclic garbage collector runs."""
    limit_malloc_arenas(settings.malloc_arena_max)
    sys.setswitchinterval(settings.gil_switch_s)
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


def place_threads(settings: Settings) -> None:
    """Pin the calling thread (the event loop's, before gRPC's poller starts) to the front CPU
    under `--pin-threads`; the computing threads go to the others as they start."""
    chosen = placement.plan(
        settings.pin_threads,
        workers=settings.workers,
        intra_op_threads=settings.intra_op_threads,
    )
    if chosen is None:
        log.debug("threads: placed by the OS (--pin-threads %s)", settings.pin_threads)
    elif placement.pin_front(chosen):
        log.info("threads: %s (--pin-threads %s)", chosen.describe(), settings.pin_threads)


def limit_malloc_arenas(count: int) -> bool:
    """At most `count` glibc malloc arenas from now on (call before threads start); False when
    not applied: 0, MALLOC_ARENA_MAX already set, or no glibc."""
    if count <= 0 or "MALLOC_ARENA_MAX" in os.environ or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_ARENA_MAX, count))


def loop_factory(use_uvloop: bool) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop when asked for and installed, else asyncio's default."""
    if not use_uvloop:
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


class StopSignals:
    """The stop signals of one process: the first one sets `stopping`, repeats are ignored."""

    def __init__(self, signals: Sequence[int] = STOP_SIGNALS) -> None:
        self.signals = tuple(signals)
        self.stopping = asyncio.Event()
        self.server: InferenceServer | None = None
        self._repeats = 0

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        """Handle the stop signals and SIGHUP on `loop` until the process ends."""
        for signum in self.signals:
            loop.add_signal_handler(signum, self.received, signum)
        loop.add_signal_handler(signal.SIGHUP, self._hangup)

    def received(self, signum: int) -> None:
        """A stop signal: drain on the first, log the first repeat, ignore the rest."""
        name = signal.Signals(signum).name
        if not self.stopping.is_set():
            log.info("stop signal received (%s)", name)
            self.stopping.set()
            return
        self._repeats += 1
        if self._repeats == 1:
            log.warning("%s received while stopping: ignored, the drain goes on", name)

    def stop(self, reason: str) -> None:
        """Stop without a signal (the worker's supervisor is gone, say)."""
        if not self.stopping.is_set():
            log.warning("%s: stopping", reason)
            self.stopping.set()

    def _hangup(self) -> None:
        if self.server is not None:
            self.server.reload_tokens()


async def serve(
    settings: Settings,
    signals: StopSignals,
    peer_statistics: PeerStatistics | None = None,
    on_started: OnStarted | None = None,
) -> int:
    """Start a server, serve until `signals` says stop, drain; return the exit code."""
    loop = asyncio.get_running_loop()
    signals.install(loop)
    if (pool := placement.worker_pool()) is not None:
        loop.set_default_executor(pool)  # loading and explanations compute on the back CPUs
    try:
        server = await create_server(settings, peer_statistics=peer_statistics)
    except (ModelLoadError, OSError) as exc:
        log.error("cannot start: %s", exc)
        return EXIT_START_FAILED
    signals.server = server
    # What start-up made (modules, descriptors, the first models) lives as long as the process:
    # out of the collector's way, so that a full collection does not walk it again and again.
    gc.freeze()
    cleanup = await on_started(server) if on_started is not None else None
    await signals.stopping.wait()
    await server.stop()
    if cleanup is not None:
        await cleanup()
    return EXIT_OK


def run(main: Coroutine[Any, Any, int], use_uvloop: bool, signals: StopSignals) -> int:
    """Run `main` on a fresh event loop and return its exit code, without a shutdown traceback."""
    runner = asyncio.Runner(loop_factory=loop_factory(use_uvloop))
    try:
        return runner.run(main)
    finally:
        # Closing the loop puts the default action back on the stop signals: a late repeat would
        # then kill a process that drained. From here on they are ignored; a signal racing the
        # close must not surface as a traceback either.
        try:
            runner.close()
        except OSError as exc:
            log.debug("closing the event loop: %s", exc)
        for signum in signals.signals:
            signal.signal(signum, signal.SIG_IGN)
