"""What the bench's servers and scripts share without the project's dependencies: the reference
servers' command line, a free port, the newest version of a model. Standard library only:
kserve_server.py runs in KServe's own venv."""

from __future__ import annotations

import argparse
import socket
from pathlib import Path


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def latest_model(repository: Path, name: str) -> Path:
    """The model.onnx of a model's highest version in a repository."""
    versions = sorted(
        (repository / name).glob("[0-9]*/model.onnx"), key=lambda p: int(p.parent.name)
    )
    if not versions:
        raise SystemExit(
            f"no version of {name} in {repository}: export it first (make model / make zoo)"
        )
    return versions[-1]


def reference_parser(description: str) -> argparse.ArgumentParser:
    """--repository, --model and --port, as compare.py starts every reference server."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--repository", type=Path, default=Path("model_repository"),
                        help="model repository (default: model_repository)")  # fmt: skip
    parser.add_argument("--model", default="mnist_cnn", help="model (default: mnist_cnn)")
    parser.add_argument("--port", type=int, default=8001, help="gRPC port (default: 8001)")
    return parser
