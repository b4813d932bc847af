"""One worker process: a whole server on the shared port, plus its private statistics port.

It starts through the same life cycle as a single server (`service/lifecycle.py`), then publishes
itself in the run directory; it drains on SIGTERM (forwarded by the supervisor) or when the
supervisor is gone.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
from prometheus_client import start_http_server

from ..app import InferenceServer
from ..config import Settings
from ..lifecycle import StopSignals, run, serve, tune_interpreter
from ..observability.logs import configure_logging
from .peers import Peers, statistics_handler
from .rundir import WorkerInfo, publish


async def serve_worker(
    settings: Settings, index: int, run_dir: Path, metrics: bool, signals: StopSignals
) -> int:
    """Serve as worker `index` until SIGTERM (or the supervisor is gone), then drain."""
    peers = Peers(run_dir, index)

    async def started(server: InferenceServer) -> Callable[[], Awaitable[None]]:
        """Open the private statistics port and loopback metrics, then publish them."""
        private = grpc.aio.server()
        private.add_generic_rpc_handlers((statistics_handler(server.repository),))
        statistics_port = private.add_insecure_port("127.0.0.1:0")
        await private.start()
        httpd: Any = None
        if metrics:
            httpd, _ = start_http_server(0, addr="127.0.0.1", registry=server.metrics.registry)
        publish(
            run_dir,
            WorkerInfo(index, os.getpid(), statistics_port, httpd.server_port if httpd else None),
        )
        orphan = asyncio.create_task(_watch_parent(os.getppid(), signals))

        async def cleanup() -> None:
            orphan.cancel()
            await private.stop(0)
            await peers.close()
            if httpd is not None:
                httpd.shutdown()
                httpd.server_close()

        return cleanup

    return await serve(
        replace(settings, metrics_port=-1),
        signals,
        peer_statistics=peers.statistics,
        on_started=started,
    )


async def _watch_parent(parent: int, signals: StopSignals) -> None:
    """Drain when the supervisor is gone (killed with SIGKILL, say) instead of serving on."""
    while os.getppid() == parent:
        await asyncio.sleep(1.0)
    signals.stop(f"the supervisor (pid {parent}) is gone")


class _WorkerTag(logging.Filter):
    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.index  # a field of its own in JSON logs
        return True


def worker_main(settings: Settings, index: int, run_dir: Path, metrics: bool) -> None:
    """Entry point of a worker process (spawned by the supervisor)."""
    # Ctrl-C in a terminal reaches the whole process group; the supervisor forwards it once.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    tune_interpreter(settings)
    configure_logging(settings.log_level, settings.log_format)
    handler = logging.getLogger().handlers[0]
    handler.addFilter(_WorkerTag(index))
    if settings.log_format == "text":
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s [worker %(worker)s] %(name)s: %(message)s")
        )
    # SIGTERM only: the supervisor forwards one; a second (to the process group, say) is ignored.
    signals = StopSignals((signal.SIGTERM,))
    code = run(serve_worker(settings, index, run_dir, metrics, signals), settings.uvloop, signals)
    raise SystemExit(code)
