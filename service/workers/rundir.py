"""The run directory: how the workers of a group find each other.

The supervisor makes the directory; once ready, worker i writes `worker-i.json` (pid, a private
loopback gRPC port for statistics, a loopback metrics port), atomically.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class WorkerInfo:
    """What a ready worker publishes in the run directory."""

    index: int
    pid: int
    statistics_port: int
    metrics_port: int | None


def info_path(run_dir: Path, index: int) -> Path:
    return run_dir / f"worker-{index}.json"


def publish(run_dir: Path, info: WorkerInfo) -> None:
    """Write a worker's info atomically (readers never see half a file)."""
    path = info_path(run_dir, info.index)
    tmp = path.with_suffix(f".{info.pid}.tmp")
    tmp.write_text(json.dumps(info.__dict__))
    tmp.replace(path)


def read_info(run_dir: Path, index: int) -> WorkerInfo | None:
    """Worker `index`'s published info, or None while it has none."""
    try:
        return WorkerInfo(**json.loads(info_path(run_dir, index).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def published(run_dir: Path) -> Iterator[WorkerInfo]:
    """Every worker info in the run directory."""
    for path in sorted(run_dir.glob("worker-*.json")):
        info = read_info(run_dir, int(path.stem.split("-")[1]))
        if info is not None:
            yield info
