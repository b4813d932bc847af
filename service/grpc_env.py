"""The gRPC core settings the server takes from the environment, set before grpc is imported.

gRPC reads GRPC_EXPERIMENTS once, when it is first imported. Its EventEngine listener moves every
connection's reads and writes onto threads of its own: one more thread hop per RPC on top of
grpc.aio's poller thread. The classic poller does that I/O in the poller thread itself (measured
on 2 cores: p50 with one request in flight 0.87x, CPU per inference at 16 in flight 0.97x;
docs/performance.md). Nothing here imports grpc.
"""

from __future__ import annotations

import os

CLASSIC_POLLER = "-event_engine_listener,-event_engine_for_all_other_endpoints"


def prefer_classic_poller() -> None:
    """Ask gRPC for the classic poller, unless the user set GRPC_EXPERIMENTS (theirs wins).

    Only effective before grpc's first import; worker processes inherit the variable."""
    os.environ.setdefault("GRPC_EXPERIMENTS", CLASSIC_POLLER)
