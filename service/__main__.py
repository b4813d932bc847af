"""`python -m service --model-repository DIR`: serve until SIGTERM or Ctrl-C, then drain."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from .grpc_env import prefer_classic_poller

prefer_classic_poller()  # before anything imports grpc

from . import lifecycle  # noqa: E402  (imports grpc)
from .config import Settings  # noqa: E402
from .observability.logs import configure_logging  # noqa: E402


def main(argv: Sequence[str] | None = None) -> int:
    """Parse settings (flags over CNNSERVE_* variables), set up logging, serve."""
    try:
        settings = Settings.from_sources(argv)
    except ValueError as exc:
        print(f"python -m service: error: {exc}", file=sys.stderr)
        return lifecycle.EXIT_START_FAILED
    lifecycle.tune_interpreter(settings)
    configure_logging(settings.log_level, settings.log_format)
    if settings.workers > 1:
        from .workers.supervisor import supervise

        return supervise(settings)
    lifecycle.place_threads(settings)  # this thread runs the loop; gRPC's poller starts from it
    signals = lifecycle.StopSignals()
    return lifecycle.run(lifecycle.serve(settings, signals), settings.uvloop, signals)


if __name__ == "__main__":
    sys.exit(main())
