"""What the benchmarks share: a closed-loop gRPC load generator, a server launcher, tables and
picture grids."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from pb import grpc_service_pb2 as pb
from pb import grpc_service_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
MAX_MESSAGE = 64 * 1024 * 1024


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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def running_server(repository: Path, *extra: str) -> Iterator[str]:
    """Start `python -m service` on free ports; yield its gRPC address; SIGTERM it afterwards."""
    with server_process(repository, *extra) as (address, _, _):
        yield address


@contextmanager
def server_process(
    repository: Path, *extra: str
) -> Iterator[tuple[str, subprocess.Popen[bytes], str]]:
    """Like `running_server`, yielding (gRPC address, the process, the metrics URL)."""
    port, metrics = free_port(), free_port()
    cmd = [sys.executable, "-m", "service", "--model-repository", str(repository),
           "--grpc-port", str(port), "--metrics-port", str(metrics), "--log-level", "WARNING", *extra]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    address = f"127.0.0.1:{port}"
    try:
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            deadline = time.monotonic() + 120
            while True:
                try:
                    if stub.ServerReady(pb.ServerReadyRequest(), timeout=1).ready:
                        break
                except grpc.RpcError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"server did not become ready: {' '.join(cmd)}")
                time.sleep(0.2)
        yield address, proc, f"http://127.0.0.1:{metrics}/metrics"
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def process_status(pid: int) -> dict[str, int]:
    """A process's RSS and peak RSS (bytes), threads and open file descriptors, from /proc."""
    fields = {"VmRSS": "rss", "VmHWM": "peak_rss", "Threads": "threads"}
    status: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as lines:
        for line in lines:
            key, _, value = line.partition(":")
            if key in fields:
                number = int(value.split()[0])
                status[fields[key]] = number * 1024 if key.startswith("Vm") else number
    status["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return status


@dataclass
class LoadResult:
    concurrency: int
    requests: int
    seconds: float
    latencies_ms: np.ndarray
    errors: int

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds

    def percentile(self, q: float) -> float:
        return (
            float(np.percentile(self.latencies_ms, q)) if len(self.latencies_ms) else float("nan")
        )


async def closed_loop(
    address: str,
    make_request: Callable[[int], pb.ModelInferRequest],
    concurrency: int,
    seconds: float,
    warmup: float = 1.0,
) -> LoadResult:
    """`concurrency` workers each send one request at a time for `seconds` (after a warm-up)."""
    options = [
        ("grpc.max_send_message_length", MAX_MESSAGE),
        ("grpc.max_receive_message_length", MAX_MESSAGE),
    ]
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        latencies: list[float] = []
        errors = 0
        loop = asyncio.get_running_loop()
        start_measure = loop.time() + warmup
        stop = start_measure + seconds

        async def worker(index: int) -> None:
            nonlocal errors
            n = index
            while True:
                sent = loop.time()
                if sent >= stop:
                    return
                try:
                    await stub.ModelInfer(make_request(n))
                except grpc.aio.AioRpcError:
                    errors += 1
                done = loop.time()
                if sent >= start_measure and done <= stop:
                    latencies.append((done - sent) * 1000)
                n += concurrency

        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        return LoadResult(concurrency, len(latencies), seconds, np.array(latencies), errors)


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print(f"\n{title}")
    print("  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)))
    for row in rows:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))


def save_grid(fig: Any, title: str, out: Path, dpi: int = 110) -> None:
    """Finish a grid of pictures (no axes, a title) and write it as a PNG."""
    import matplotlib.pyplot as plt

    for ax in fig.axes:
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
