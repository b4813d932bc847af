"""The HTTP front beside real Triton 2.51's HTTP front and beside this server's own gRPC lane.

    .venv/bin/python -m bench.http_compare --repository /tmp/h2-repo [--rounds 4] [--seconds 5]

Starts real NVIDIA Triton (bench/triton_server.py, KServe v2 REST on with `--allow-http true`)
and this server (HTTP and gRPC on one process) once, then, in alternating rounds, drives three
lanes at the same concurrency (16 by default): Triton's HTTP front and ours with `wrk` replaying
one batch-1 infer request of the binary tensor extension (JSON header plus 3136 raw bytes, all
outputs asked as binary; 16 keep-alive connections, one request in flight on each), and our gRPC
front with h2load replaying a pre-built ModelInfer frame (16 streams on one HTTP/2 connection).
For each lane: infer/s and server CPU per inference (the process tree's user + system CPU from
/proc over the window, divided by the successful inferences). Ratios are taken within each round
and summarised as median [min-max]. Then `perf_analyzer -i http` measures both HTTP fronts once
briefly. Prints a table; writes bench/results/http_compare.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from bench import triton_server
from bench.loadgen import (
    PERF_ANALYZER,
    CpuMeter,
    free_port,
    grpc_frame,
    h2load,
    infer_request,
    perf_analyzer,
    print_table,
    project_command,
    response_frame_size,
    running_process,
)
from training.cli import HelpFormatter

HEADER = "Inference-Header-Content-Length"
LANES = ("triton-http", "project-http", "project-grpc")
WORKERS_LANE = "project-http-workers"


def binary_request(repository: Path, model: str) -> tuple[bytes, int]:
    """One batch-1 infer request of the binary tensor extension: (body, JSON header length)."""
    grpc_request = infer_request(repository, model)
    tensor = grpc_request.inputs[0]
    raw = grpc_request.raw_input_contents[0]
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": tensor.name,
                    "datatype": "FP32",
                    "shape": list(tensor.shape),
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "parameters": {"binary_data_output": True},
        },
        separators=(",", ":"),
    ).encode()
    return header + raw, len(header)


def check_http(url: str, body: bytes, header_length: int) -> int:
    """Send the request once; it must succeed with binary outputs. Returns the answer's bytes."""
    request = urllib.request.Request(
        url, body, {HEADER: str(header_length), "Content-Type": "application/octet-stream"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200 and response.headers[HEADER], response.headers
        return len(response.read())


def wrk(url: str, script: Path, concurrency: int, seconds: float) -> dict[str, Any]:
    """wrk with `concurrency` connections (one request in flight on each) for `seconds`."""
    cmd = [
        "wrk",
        "-t1",
        f"-c{concurrency}",
        f"-d{max(1, round(seconds))}s",
        "--latency",
        "-s",
        str(script),
        url,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    requests = int(re.search(r"(\d+) requests in ([\d.]+)(\w+)", out).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: .*", out)
    p50 = re.search(r"50%\s+([\d.]+)(us|ms|s)\b", out)
    failed = int(bad.group(1)) if bad else 0
    row = {
        "requests": requests,
        "failed": failed,
        "socket_errors": errors.group(0) if errors else "",
    }
    if p50:
        scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}[p50.group(2)]
        row["p50_ms"] = float(p50.group(1)) * scale
    return row


@contextmanager
def project(repository: Path, model: str, *extra: str) -> Iterator[tuple[str, int, int]]:
    """This server (HTTP and gRPC in one process); yields (gRPC address, HTTP port, pid)."""
    port, http_port = free_port(), free_port()
    cmd = project_command(repository, port, "--http-port", str(http_port), *extra)
    with running_process(cmd, f"127.0.0.1:{port}", model) as proc:
        yield f"127.0.0.1:{port}", http_port, proc.pid


@contextmanager
def triton(repository: Path, model: str) -> Iterator[tuple[int, int]]:
    """Real Triton with its HTTP front on; yields (HTTP port, pid)."""
    http_port = free_port()
    with triton_server.running_triton(repository, model, http_port=http_port) as (_, proc):
        deadline = time.monotonic() + 60
        while True:  # the HTTP front may open after gRPC answers
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{http_port}/v2/health/ready", timeout=5
                ):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        yield http_port, proc.pid


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=HelpFormatter
    )
    parser.add_argument("--repository", type=Path, required=True, help="a model repository")
    parser.add_argument("--model", default="mnist_cnn", help="the model to drive")
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds")
    parser.add_argument("--seconds", type=float, default=5.0, help="window per lane and round")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    parser.add_argument(
        "--workers", type=int, default=0,
        help="also a lane of this server's HTTP front with --workers N (0: no such lane)",
    )  # fmt: skip
    parser.add_argument(
        "--perf-analyzer-ms", type=int, default=2000,
        help="perf_analyzer -i http's measurement interval (0: skip it)",
    )  # fmt: skip
    parser.add_argument(
        "--out", type=Path, default=Path("bench/results/http_compare.json"), help="JSON results"
    )
    args = parser.parse_args(argv)
    if not triton_server.available():
        raise SystemExit(f"{triton_server.TRITON_HOME} is missing: run `make triton`")
    body, header_length = binary_request(args.repository, args.model)
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        (tmp / "body.bin").write_bytes(body)
        script = tmp / "post.lua"
        script.write_text(
            'wrk.method = "POST"\n'
            f'local f = io.open("{tmp / "body.bin"}", "rb")\n'
            "wrk.body = f:read('*a')\nf:close()\n"
            f'wrk.headers["{HEADER}"] = "{header_length}"\n'
            'wrk.headers["Content-Type"] = "application/octet-stream"\n'
        )
        triton_http, triton_pid = stack.enter_context(triton(args.repository, args.model))
        address, our_http, our_pid = stack.enter_context(project(args.repository, args.model))
        lanes: tuple[str, ...] = LANES
        if args.workers:
            lanes = (*LANES, WORKERS_LANE)
            _, workers_http, workers_pid = stack.enter_context(
                project(args.repository, args.model, "--workers", str(args.workers))
            )
        frame = tmp / "infer.frame"
        grpc_request = infer_request(args.repository, args.model)
        frame.write_bytes(grpc_frame(grpc_request))
        response_bytes = response_frame_size(address, grpc_request)
        urls = {
            "triton-http": f"http://127.0.0.1:{triton_http}/v2/models/{args.model}/infer",
            "project-http": f"http://127.0.0.1:{our_http}/v2/models/{args.model}/infer",
        }
        if args.workers:
            urls[WORKERS_LANE] = f"http://127.0.0.1:{workers_http}/v2/models/{args.model}/infer"
        answer_bytes = {lane: check_http(url, body, header_length) for lane, url in urls.items()}
        pids = {"triton-http": triton_pid, "project-http": our_pid, "project-grpc": our_pid}
        if args.workers:
            pids[WORKERS_LANE] = workers_pid

        def run(lane: str, seconds: float) -> dict[str, Any]:
            with CpuMeter(pids[lane]) as cpu:
                if lane == "project-grpc":
                    got = h2load(address, frame, response_bytes, args.concurrency, seconds)
                else:
                    got = wrk(urls[lane], script, args.concurrency, seconds)
            if "error" in got:
                raise SystemExit(f"{lane}: {got['error']}")
            ok = got["requests"] - got["failed"]
            return {
                "lane": lane,
                "infer_per_s": ok / cpu.wall,
                "cpu_us_per_infer": 1e6 * cpu.cores * cpu.wall / max(ok, 1),
                "server_cores": cpu.cores,
                "failed": got["failed"],
                "p50_ms": got.get("p50_ms"),
            }

        for lane in lanes:  # warm up every lane
            run(lane, 1.0)
        rows: list[dict[str, Any]] = []
        for round_ in range(args.rounds):
            order = lanes if round_ % 2 == 0 else tuple(reversed(lanes))
            for lane in order:
                row = run(lane, args.seconds) | {"round": round_ + 1}
                rows.append(row)
                print(
                    f"round {row['round']} {lane:13s} {row['infer_per_s']:7.0f} infer/s  "
                    f"{row['cpu_us_per_infer']:5.0f} us CPU/infer  {row['server_cores']:.2f} "
                    f"cores  failed {row['failed']}",
                    flush=True,
                )
        pa: dict[str, Any] = {}
        if args.perf_analyzer_ms and PERF_ANALYZER.exists():
            for lane, port, pid in (("triton-http", triton_http, triton_pid),
                                    ("project-http", our_http, our_pid)):  # fmt: skip
                with CpuMeter(pid) as cpu:
                    pa[lane] = perf_analyzer(
                        f"127.0.0.1:{port}", args.model, args.concurrency,
                        measurement_ms=args.perf_analyzer_ms, protocol="http",
                    )  # fmt: skip
                pa[lane]["server_cores"] = cpu.cores
    summary = {}
    for lane in lanes:
        mine = [r for r in rows if r["lane"] == lane]
        summary[lane] = {
            "infer_per_s": _spread([r["infer_per_s"] for r in mine]),
            "cpu_us_per_infer": _spread([r["cpu_us_per_infer"] for r in mine]),
            "failed": sum(r["failed"] for r in mine),
        }
    by_round = {(r["round"], r["lane"]): r for r in rows}
    rounds = range(1, args.rounds + 1)
    ratios = {
        "http_vs_triton_http_throughput": _spread([
            by_round[(n, "project-http")]["infer_per_s"] / by_round[(n, "triton-http")]["infer_per_s"]
            for n in rounds
        ]),
        "http_vs_grpc_cpu_per_infer": _spread([
            by_round[(n, "project-http")]["cpu_us_per_infer"]
            / by_round[(n, "project-grpc")]["cpu_us_per_infer"]
            for n in rounds
        ]),
        "http_vs_triton_http_cpu_per_infer": _spread([
            by_round[(n, "project-http")]["cpu_us_per_infer"]
            / by_round[(n, "triton-http")]["cpu_us_per_infer"]
            for n in rounds
        ]),
    }  # fmt: skip
    table = [
        [
            lane,
            "{median:.0f} [{min:.0f}-{max:.0f}]".format(**summary[lane]["infer_per_s"]),
            "{median:.0f} [{min:.0f}-{max:.0f}]".format(**summary[lane]["cpu_us_per_infer"]),
            str(summary[lane]["failed"]),
        ]
        for lane in lanes
    ]
    if args.workers:
        ratios["http_workers_vs_triton_http_throughput"] = _spread([
            by_round[(n, WORKERS_LANE)]["infer_per_s"] / by_round[(n, "triton-http")]["infer_per_s"]
            for n in rounds
        ])  # fmt: skip
    print_table(
        f"concurrency {args.concurrency}, {args.rounds} rounds of {args.seconds:g} s: median [min-max]",
        ["lane", "infer/s", "server CPU us/infer", "failed"],
        table,
    )
    for name, spread in ratios.items():
        print(f"  {name}: {spread['median']:.2f} [{spread['min']:.2f}-{spread['max']:.2f}]")
    for lane, got in pa.items():
        print(f"  perf_analyzer -i http {lane}: {got}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "config": {
                    "model": args.model,
                    "concurrency": args.concurrency,
                    "rounds": args.rounds,
                    "seconds": args.seconds,
                    "request_bytes": len(body),
                    "answer_bytes": answer_bytes,
                    "cores": os.cpu_count(),
                    "platform": platform.platform(),
                },
                "rows": rows,
                "summary": summary,
                "ratios": ratios,
                "perf_analyzer_http": pa,
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
