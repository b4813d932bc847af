"""`python -m service --model-repository DIR`: serve until SIGTERM or Ctrl-C, then drain."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Callable, Sequence

from .app import create_server
from .config import Settings
from .core.errors import ModelLoadError
from .observability.logs import configure_logging

log = logging.getLogger("service")


async def serve(settings: Settings) -> int:
    """Run the server until a stop signal, drain within the grace period, return the exit code."""
    try:
        server = await create_server(settings)
    except (ModelLoadError, OSError) as exc:
        log.error("cannot start: %s", exc)
        return 2
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, server.reload_tokens)
    await stop.wait()
    log.info("stop signal received")
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.remove_signal_handler(sig)
    await server.stop()
    return 0


def _loop_factory(use_uvloop: bool) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if not use_uvloop:
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def main(argv: Sequence[str] | None = None) -> int:
    """Parse settings (flags over CNNSERVE_* variables), set up logging, serve."""
    try:
        settings = Settings.from_sources(argv)
    except ValueError as exc:
        print(f"python -m service: error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    if settings.workers > 1:
        from .workers.supervisor import supervise

        return supervise(settings)
    with asyncio.Runner(loop_factory=_loop_factory(settings.uvloop)) as runner:
        return runner.run(serve(settings))


if __name__ == "__main__":
    sys.exit(main())
