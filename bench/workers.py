"""Worker processes: one server process against `--workers 2` (or more), under h2load with
several client connections.

    .venv/bin/python -m bench.workers --repository model_repository [--workers 1,2]
        [--loads 1x64,4x16,16x4] [--seconds 5] [--repeats 3]

Every group runs at once (an idle server costs nothing); the measurements go round-robin over
loads x repeats x groups, so slow and busy moments of a shared machine fall on all of them.
h2load (Debian's nghttp2-client) replays one pre-built batch-1 ModelInfer frame; a load `CxS` is
C connections with S streams each. Successes are counted from the response bytes (a gRPC error
is HTTP 200 with no body). Server CPU is read from /proc for the whole process tree; the
per-worker split comes from the merged /metrics. Prints a table; writes bench/results/workers.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench.loadgen import free_port, print_table
from bench.reference_cli import latest_model
from pb import grpc_service_pb2 as pb
from pb import grpc_service_pb2_grpc as pb_grpc
from training.cli import HelpFormatter

ROOT = Path(__file__).resolve().parent.parent

PATH = "/inference.GRPCInferenceService/ModelInfer"
TICKS = os.sysconf("SC_CLK_TCK")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=HelpFormatter
    )
    parser.add_argument(
        "--repository", type=Path, default=ROOT / "model_repository", help="model repository"
    )
    parser.add_argument("--model", default="mnist_cnn", help="model to load")
    parser.add_argument("--workers", default="1,2", help="worker counts to compare")
    parser.add_argument("--loads", default="1x64,4x16,16x4",
                        help="connections x streams per connection")  # fmt: skip
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=1.0, help="h2load warm-up seconds")
    parser.add_argument("--repeats", type=int, default=3, help="rounds over every point")
    parser.add_argument("--server-args", default="", help="extra flags for every server")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results", help="output folder"
    )
    return parser.parse_args(argv)


@dataclass
class Group:
    workers: int
    process: subprocess.Popen[bytes]
    port: int
    metrics_port: int

    def scrape(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            return str(response.read().decode())

    def cpu_seconds(self) -> float:
        """User + system CPU of the server and every process under it."""
        total, stack = 0.0, [self.process.pid]
        while stack:
            pid = stack.pop()
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / TICKS
                for task in Path(f"/proc/{pid}/task").iterdir():
                    stack.extend(int(c) for c in (task / "children").read_text().split())
            except OSError:
                continue
        return total

    def served(self) -> tuple[dict[str, float], float]:
        """ModelInfer requests so far: successes by worker ("0" alone for a single process), and
        failures (not counting cancellations: h2load cancels what is in flight when it stops)."""
        by_worker: dict[str, float] = {}
        failed = 0.0
        pattern = re.compile(r"^cnnserve_requests_total\{([^}]*)\} (\S+)$", re.M)
        for labels, value in pattern.findall(self.scrape()):
            if 'outcome="cancelled"' in labels:
                continue
            if 'outcome="success"' not in labels:
                failed += float(value)
                continue
            worker = re.search(r'worker="(\d+)"', labels)
            key = worker.group(1) if worker else "0"
            by_worker[key] = by_worker.get(key, 0.0) + float(value)
        return by_worker, failed


@contextmanager
def running_group(repository: Path, workers: int, extra: list[str]) -> Iterator[Group]:
    port, metrics_port = free_port(), free_port()
    cmd = [sys.executable, "-m", "service", "--model-repository", str(repository),
           "--host", "127.0.0.1", "--grpc-port", str(port), "--metrics-port", str(metrics_port),
           "--workers", str(workers), "--log-level", "WARNING", *extra]  # fmt: skip
    process = subprocess.Popen(cmd, cwd=ROOT)
    group = Group(workers, process, port, metrics_port)
    try:
        deadline = time.monotonic() + 180
        while not _ready(group):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not become ready: {' '.join(cmd)}")
            time.sleep(0.3)
        yield group
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)


def _ready(group: Group) -> bool:
    try:
        text = group.scrape()
    except OSError:
        return False
    if group.workers == 1:
        return "cnnserve_model_state" in text
    up = re.findall(r"^cnnserve_worker_up\{[^}]*\} (\S+)$", text, re.M)
    return sum(float(v) for v in up) == group.workers


def request_frame(address: str, model: str) -> tuple[bytes, int]:
    """A gRPC frame holding one batch-1 ModelInfer request, and the size of a success's body."""
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        meta = stub.ModelMetadata(pb.ModelMetadataRequest(name=model), timeout=30)
        (tensor,) = meta.inputs
        shape = [1, *(d for d in tensor.shape[1:])]
        image = np.random.default_rng(0).random(shape, dtype=np.float32)
        request = pb.ModelInferRequest(model_name=model)
        request.inputs.add(name=tensor.name, datatype="FP32", shape=shape)
        request.raw_input_contents.append(image.tobytes())
        response = stub.ModelInfer(request, timeout=30)
    body = request.SerializeToString()
    return b"\x00" + len(body).to_bytes(4, "big") + body, 5 + response.ByteSize()


def h2load(port: int, frame: Path, connections: int, streams: int, args: argparse.Namespace,
           answer_bytes: int) -> dict[str, Any]:  # fmt: skip
    """One h2load run: requests done in the measured period (warm-up excluded) per second, and
    the successes counted from every response body received (warm-up included)."""
    cmd = ["h2load", "-D", f"{round(args.seconds * 1000)}ms",
           "--warm-up-time", f"{round(args.warmup * 1000)}ms",
           "-c", str(connections), "-m", str(streams),
           "-H", "content-type: application/grpc", "-H", "te: trailers",
           "-d", str(frame), f"http://127.0.0.1:{port}{PATH}"]  # fmt: skip
    done_run = subprocess.run(cmd, capture_output=True, text=True, timeout=args.seconds * 4 + 60)
    out = done_run.stdout + done_run.stderr
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, \d+ succeeded, (\d+) failed, "
                     r"(\d+) errored", out)  # fmt: skip
    data = re.search(r"traffic: .* \((\d+)\) data", out)
    if not done or not data:
        raise RuntimeError(f"unexpected h2load output:\n{out}")
    return {
        "done": int(done.group(1)),
        "http_errors": int(done.group(2)) + int(done.group(3)),
        "answers_with_body": int(data.group(1)) // answer_bytes,
        "infer_per_s": int(done.group(1)) / args.seconds,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("h2load") is None:
        print("h2load is missing: apt-get install nghttp2-client", file=sys.stderr)
        return 2
    latest_model(args.repository, args.model)
    worker_counts = [int(w) for w in args.workers.split(",")]
    loads = [tuple(int(n) for n in load.split("x")) for load in args.loads.split(",")]
    runs: list[dict[str, Any]] = []
    with ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        print(f"starting servers with {', '.join(map(str, worker_counts))} workers ...", flush=True)
        groups = [
            stack.enter_context(running_group(args.repository, n, args.server_args.split()))
            for n in worker_counts
        ]
        frame_bytes, answer_bytes = request_frame(f"127.0.0.1:{groups[0].port}", args.model)
        frame = Path(tmp) / "request.grpc"
        frame.write_bytes(frame_bytes)
        load_before = os.getloadavg()
        for repeat in range(args.repeats):
            for connections, streams in loads:
                for group in groups:
                    (served, failed), cpu = group.served(), group.cpu_seconds()
                    start = time.time()
                    run = h2load(group.port, frame, connections, streams, args, answer_bytes)
                    wall = time.time() - start
                    cores = (group.cpu_seconds() - cpu) / wall
                    after, failed_after = group.served()
                    split = {w: after[w] - served.get(w, 0.0) for w in sorted(after)}
                    # A gRPC error is an HTTP 200 without a body: every answer received must have
                    # one (the server may count a few more, sent as h2load stopped).
                    unreceived = round(sum(split.values())) - run["answers_with_body"]
                    run["errors"] = int(failed_after - failed) + run["http_errors"]
                    run["errors"] += max(0, -unreceived, unreceived - connections * streams)
                    runs.append({"workers": group.workers, "connections": connections,
                                 "streams": streams, "repeat": repeat, **run,
                                 "server_cores": cores, "by_worker": split})  # fmt: skip
                    print(f"  {group.workers} worker(s) {connections}x{streams}: "
                          f"{run['infer_per_s']:.0f}/s, {cores:.2f} cores, errors {run['errors']}, "
                          f"split {[int(v) for v in split.values()]}", flush=True)  # fmt: skip
    rows, summary = [], []
    for connections, streams in loads:
        base = None
        for n in worker_counts:
            mine = [r for r in runs if (r["workers"], r["connections"], r["streams"])
                    == (n, connections, streams)]  # fmt: skip
            rates = [r["infer_per_s"] for r in mine]
            median = statistics.median(rates)
            base = base or median
            cores = statistics.median(r["server_cores"] for r in mine)
            shares = [max(r["by_worker"].values()) / max(1.0, sum(r["by_worker"].values()))
                      for r in mine]  # fmt: skip
            summary.append({"workers": n, "connections": connections, "streams": streams,
                            "infer_per_s_median": median, "infer_per_s_min": min(rates),
                            "infer_per_s_max": max(rates), "server_cores_median": cores,
                            "busiest_worker_share_median": statistics.median(shares),
                            "vs_first": median / base})  # fmt: skip
            rows.append([f"{connections}x{streams}", str(n), f"{median:.0f}",
                         f"{min(rates):.0f}-{max(rates):.0f}", f"{median / base:.2f}x",
                         f"{cores:.2f}", f"{statistics.median(shares):.0%}",
                         str(sum(r["errors"] for r in mine))])  # fmt: skip
    print_table(
        f"{args.model}, batch-1 ModelInfer under h2load, {args.repeats} runs of {args.seconds:.0f} s "
        f"each ({os.cpu_count()} CPUs, client and server sharing them)",
        ["conns x streams", "workers", "infer/s", "range", "vs 1st", "server cores",
         "busiest worker", "errors"],
        rows,
    )  # fmt: skip
    result = {
        "model": args.model,
        "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "load_average_before": load_before, "load_average_after": os.getloadavg()},
        "seconds": args.seconds, "warmup": args.warmup, "repeats": args.repeats,
        "summary": summary, "runs": runs,
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "workers.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nload average before {load_before}, after {os.getloadavg()}; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
