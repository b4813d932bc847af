"""What the benchmarks share: server launchers, CPU accounting from /proc, load generators
(a closed-loop gRPC client, h2load, perf_analyzer), tables and picture grids."""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench.reference_cli import free_port
from pb import grpc_service_pb2 as pb
from pb import grpc_service_pb2_grpc as pb_grpc
from training.cli import HelpFormatter

ROOT = Path(__file__).resolve().parent.parent
MAX_MESSAGE = 64 * 1024 * 1024


def model_parser(doc: str) -> argparse.ArgumentParser:
    """A bench script's parser: its docstring's first line as the description, and the
    --repository and --model every script that loads a model takes."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0], formatter_class=HelpFormatter)
    parser.add_argument("--repository", type=Path, default=ROOT / "model_repository",
                        help="model repository (default: model_repository)")  # fmt: skip
    parser.add_argument("--model", default="mnist_cnn", help="model (default: mnist_cnn)")
    return parser


def point_options(parser: argparse.ArgumentParser, seconds: float, seconds_help: str) -> None:
    """--concurrency (one connection), --seconds and --out: the options of a script that loads
    each server at one point."""
    parser.add_argument("--concurrency", type=int, default=16,
                        help="requests in flight, one connection (default: 16)")  # fmt: skip
    parser.add_argument("--seconds", type=float, default=seconds,
                        help=f"{seconds_help} (default: {seconds:g})")  # fmt: skip
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results",
                        help="output folder (default: bench/results)")  # fmt: skip


def variation(values: list[float]) -> float:
    """Coefficient of variation: standard deviation over mean (0 where the mean is 0)."""
    mean = statistics.fmean(values)
    return statistics.pstdev(values) / mean if mean else 0.0


@contextmanager
def running_process(
    cmd: list[str], address: str, model: str = "", env: Mapping[str, str] | None = None
) -> Iterator[subprocess.Popen]:
    """Start a gRPC inference server (with `env` over this environment); wait until it (and
    `model`, if given) is ready; yield the process; SIGTERM it afterwards."""
    environ = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=environ)
    try:
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            deadline = time.monotonic() + 120
            while True:
                try:
                    if model:
                        ready = stub.ModelReady(pb.ModelReadyRequest(name=model), timeout=1).ready
                    else:
                        ready = stub.ServerReady(pb.ServerReadyRequest(), timeout=1).ready
                    if ready:
                        break
                except grpc.RpcError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"server did not become ready: {' '.join(cmd)}")
                time.sleep(0.2)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def project_command(repository: Path, port: int, *extra: str) -> list[str]:
    """`python -m service` on `port` with `make serve` defaults (logs at WARNING, metrics on a free
    port, HTTP off unless `extra` names an --http-port)."""
    return [sys.executable, "-m", "service", "--model-repository", str(repository),
            "--grpc-port", str(port), "--metrics-port", str(free_port()), "--http-port", "-1",
            "--log-level", "WARNING", *extra]  # fmt: skip


@contextmanager
def running_server(repository: Path, *extra: str) -> Iterator[str]:
    """Start `python -m service` on free ports; yield its gRPC address; SIGTERM it afterwards."""
    with server_process(repository, *extra) as (address, _, _):
        yield address


@contextmanager
def server_process(repository: Path, *extra: str) -> Iterator[tuple[str, subprocess.Popen, str]]:
    """Like `running_server`, yielding (gRPC address, the process, the metrics URL)."""
    port, metrics = free_port(), free_port()
    address = f"127.0.0.1:{port}"
    cmd = project_command(repository, port, *extra, "--metrics-port", str(metrics))
    with running_process(cmd, address) as proc:
        yield address, proc, f"http://127.0.0.1:{metrics}/metrics"


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


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(path: Path) -> list[str]:
    text = path.read_text()
    return text[text.rindex(")") + 2 :].split()  # after "pid (comm) "


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (Triton's Python-backend stub is a child process)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*/children"):
            with suppress(OSError):
                todo.extend(int(c) for c in task.read_text().split())
    return found


def wakeup_ipis() -> int:
    """Cross-CPU interrupts taken so far by all CPUs that wake a thread on another CPU: rescheduling
    interrupts, and function-call interrupts, which carry the wake-ups Linux queues on a remote
    CPU that shares no cache with the waker (each vCPU here). On a virtual machine each one goes
    through the hypervisor. 0 where /proc/interrupts is unreadable."""
    try:
        lines = Path("/proc/interrupts").read_text().splitlines()
    except OSError:
        return 0
    cpus = len(lines[0].split()) if lines else 0
    total = 0
    for line in lines[1:]:
        name, _, rest = line.partition(":")
        if name.strip() in ("RES", "CAL"):
            total += sum(int(v) for v in rest.split()[:cpus] if v.isdigit())
    return total


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by `pid` and its descendants."""
    total = 0
    for member in process_tree(pid):
        try:
            fields = _stat_fields(Path(f"/proc/{member}/stat"))
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLOCK_TICKS


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds per thread of `pid`, keyed "name/tid"."""
    threads = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            fields = _stat_fields(task / "stat")
        except OSError:
            continue
        threads[f"{name}/{task.name}"] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return threads


class CpuMeter:
    """Server cores used while the block runs: `with CpuMeter(pid) as cpu: ...; cpu.cores`."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.cores = float("nan")
        self.wall = 0.0

    def __enter__(self) -> CpuMeter:
        self.start_wall, self.start_cpu = time.monotonic(), cpu_seconds(self.pid)
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.monotonic() - self.start_wall
        self.cores = (cpu_seconds(self.pid) - self.start_cpu) / self.wall


def infer_request(repository: Path, model: str) -> pb.ModelInferRequest:
    """A batch-1 FP32 ModelInferRequest for `model`, input described by its config.pbtxt."""
    from google.protobuf import text_format

    from pb import model_config_pb2

    config = text_format.Parse(
        (repository / model / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
    )
    spec = config.input[0]
    shape = [1, *spec.dims]
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    return pb.ModelInferRequest(
        model_name=model,
        inputs=[
            pb.ModelInferRequest.InferInputTensor(name=spec.name, datatype="FP32", shape=shape)
        ],
        raw_input_contents=[x.tobytes()],
    )


def grpc_frame(message: Any) -> bytes:
    """One gRPC length-prefixed message (uncompressed), as it travels in an HTTP/2 DATA frame."""
    body = message.SerializeToString()
    return b"\x00" + len(body).to_bytes(4, "big") + body


def response_frame_size(address: str, request: pb.ModelInferRequest) -> int:
    """Bytes of one successful ModelInfer response frame from this server (checks it succeeds)."""
    with grpc.insecure_channel(address) as channel:
        response = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    return len(grpc_frame(response))


def _seconds(text: str) -> float:
    for unit, scale in (("us", 1e-6), ("ms", 1e-3), ("s", 1.0)):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * scale
    return float(text)


def h2load(
    address: str, frame: Path, response_bytes: int, concurrency: int, seconds: float,
    method: str = "/inference.GRPCInferenceService/ModelInfer", connections: int = 1,
    messages: int = 1, http1_headers: dict[str, str] | None = None, keep_times: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """h2load with `concurrency` requests in flight over `connections` HTTP/2 connections,
    replaying `frame` (`messages` gRPC messages per stream: one for ModelInfer, several on
    ModelStreamInfer, where `concurrency` then counts messages and streams are fewer).

    With `http1_headers`, HTTP/1.1 instead: `frame` is a request body POSTed to `method` (a path)
    with those headers over `concurrency` keep-alive connections, one request in flight on each;
    `response_bytes` is then the answer's body length.

    gRPC errors come back as HTTP 200 with no message, so successes are counted from the response
    DATA bytes (`response_bytes` per answered message), not from HTTP status. Latency
    percentiles come from h2load's per-request log (per stream: with several messages, the time
    until the last answer). (h2load's --warm-up-time is not used: its data byte count includes
    the warm-up; warm the server up with a separate run.) With `keep_times`, the row also holds
    every request's latency (`times_ms`, an array) so that runs can be pooled.
    """
    if http1_headers is None:
        protocol = ["-H", "content-type: application/grpc", "-H", "te: trailers"]
    else:
        connections, messages = concurrency, 1
        protocol = ["--h1", *(a for k, v in http1_headers.items() for a in ("-H", f"{k}: {v}"))]
    streams = max(1, concurrency // (connections * messages))
    with tempfile.NamedTemporaryFile("w+", suffix=".log") as log:
        cmd = ["h2load", "-c", str(connections), "-t", "1", "-m", str(streams),
               "-D", f"{int(seconds * 1000)}ms", "--log-file", log.name, *protocol,
               "-d", str(frame), f"http://{address}{method}"]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
        times = [int(line.split("\t")[2]) for line in Path(log.name).read_text().splitlines()
                 if line.count("\t") >= 2 and not line.split("\t")[1].startswith("-")]  # fmt: skip
    out = done.stdout
    finished = re.search(r"finished in ([\d.]+\w+), ([\d.]+) req/s", out)
    requests = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done", out)
    data = re.search(r"\((\d+)\) data", out)
    latency = re.search(r"time for request:\s+(\S+)\s+(\S+)\s+(\S+)", out)
    if not (finished and requests and data and latency):
        return {"concurrency": concurrency, "error": (out + done.stderr)[-500:]}
    wall = _seconds(finished.group(1))
    completed = int(requests.group(3)) * messages
    successes = min(int(data.group(1)) // response_bytes, completed)
    ok = re.search(r"status codes: (\d+) 2xx", out)
    if http1_headers is not None and ok:  # HTTP/1.1 error answers have bodies of their own
        successes = min(successes, int(ok.group(1)))
    row: dict[str, Any] = {
        "concurrency": concurrency,
        "connections": connections,
        "messages_per_stream": messages,
        "infer_per_s": successes / wall,
        "seconds": wall,
        "requests": completed,
        "failed": completed - successes,
        "mean_ms": _seconds(latency.group(3)) * 1000,
        "max_ms": _seconds(latency.group(2)) * 1000,
    }
    latencies = np.array(times, dtype=np.float64) / 1000
    if times:
        p50, p90, p99 = np.percentile(latencies, [50, 90, 99])
        row.update(p50_ms=float(p50), p90_ms=float(p90), p99_ms=float(p99))
    if keep_times:
        row["times_ms"] = latencies
    return row


TOOLS = ROOT / ".venv-tools"
PERF_ANALYZER = TOOLS / "bin" / "perf_analyzer"
CUDA_RUNTIME_LIB = TOOLS / "lib/python3.11/site-packages/nvidia/cuda_runtime/lib"


def perf_analyzer(
    address: str, model: str, concurrency: int, measurement_ms: int = 3000,
    stability: int = 25, streaming: bool = False, protocol: str = "grpc",
) -> dict[str, Any]:  # fmt: skip
    """One perf_analyzer run (tools venv) at one concurrency (`protocol` grpc or http, `address`
    that front's host:port); its CSV line as numbers."""
    env = {**os.environ, "LD_LIBRARY_PATH": str(CUDA_RUNTIME_LIB)}
    with tempfile.NamedTemporaryFile(suffix=".csv") as report:
        cmd = [
            str(PERF_ANALYZER), "-m", model, "-i", protocol, "-u", address,
            "--concurrency-range", f"{concurrency}:{concurrency}",
            "--measurement-interval", str(measurement_ms),
            "--stability-percentage", str(stability), "--max-trials", "6",
            "-f", report.name, *(["--streaming"] if streaming else []),
        ]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        unstable = done.returncode != 0 and "stable measurement" in done.stdout + done.stderr
        if unstable:  # a shared box is noisy: accept any measurement rather than none
            cmd[cmd.index("--stability-percentage") + 1] = "1000"
            done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        if done.returncode != 0:
            return {"concurrency": concurrency, "error": (done.stdout + done.stderr)[-500:]}
        with open(report.name) as handle:
            line = next(csv.DictReader(handle))
    row = {
        "concurrency": concurrency,
        "infer_per_s": float(line["Inferences/Second"]),
        "p50_ms": float(line["p50 latency"]) / 1000,
        "p90_ms": float(line["p90 latency"]) / 1000,
        "p99_ms": float(line["p99 latency"]) / 1000,
        "unstable": unstable,
    }
    if "Server Queue" in line:  # only from servers that answer ModelStatistics
        row["server_queue_ms"] = float(line["Server Queue"]) / 1000
        row["server_compute_ms"] = sum(float(line[k]) for k in (
            "Server Compute Input", "Server Compute Infer", "Server Compute Output")) / 1000  # fmt: skip
    return row


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
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(header)]
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
