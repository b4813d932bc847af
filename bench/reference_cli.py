"""What the reference servers (bench/minimal_server.py, bench/kserve_server.py) share: their
command line and a free port. Standard library only: kserve_server.py runs in KServe's own venv."""

from __future__ import annotations

import argparse
import socket
from pathlib import Path


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def reference_parser(description: str) -> argparse.ArgumentParser:
    """--repository, --model and --port, as compare.py starts every reference server."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--repository", type=Path, default=Path("model_repository"),
                        help="model repository (default: model_repository)")  # fmt: skip
    parser.add_argument("--model", default="mnist_cnn", help="model (default: mnist_cnn)")
    parser.add_argument("--port", type=int, default=8001, help="gRPC port (default: 8001)")
    return parser
