"""Hostile connections at bench length: many idle sockets, slowloris streams, a rapid-reset flood.

    .venv/bin/python -m bench.faults --repository model_repository [--idle 20000] [--slow 5000]
        [--flood-s 60] [--flood-clients 2]

Starts `python -m service` with short connection limits (so the bench sees them act), measures a
normal client's p99 (sequential ModelInfer on one connection) before and during each attack, the
server's RSS, threads and descriptors from /proc, and how long the server took to close the
hostile connections. The attacks run in processes of their own (`bench/hostile.py`). The
integration tests (tests/integration/test_faults_connections.py) are the short versions. Prints
a table; writes bench/results/faults.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench.loadgen import print_table, process_status, server_process
from pb import grpc_service_pb2 as pb
from pb import grpc_service_pb2_grpc as pb_grpc
from training.cli import HelpFormatter

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter
    )
    parser.add_argument(
        "--repository", type=Path, default=Path("model_repository"), help="model repository"
    )
    parser.add_argument("--model", default="mnist_cnn", help="model the normal client calls")
    parser.add_argument("--idle", type=int, default=20000, help="idle connections (no preface)")
    parser.add_argument("--slow", type=int, default=5000, help="slowloris connections")
    parser.add_argument("--flood-s", type=float, default=60.0, help="rapid-reset seconds")
    parser.add_argument("--flood-clients", type=int, default=2, help="rapid-reset processes")
    parser.add_argument(
        "--handshake-timeout-s", type=float, default=10.0, help="the server's handshake timeout"
    )
    parser.add_argument(
        "--max-connection-age-s", type=float, default=20.0, help="the server's connection age"
    )
    parser.add_argument("--probes", type=int, default=500, help="normal requests per p99")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results" / "faults.json", help="JSON results"
    )
    return parser.parse_args(argv)


def p99(address: str, request: pb.ModelInferRequest, count: int) -> float:
    with grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
        infer = pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer
        infer(request, timeout=30)
        seconds = []
        for _ in range(count):
            start = time.perf_counter()
            infer(request, timeout=30)
            seconds.append(time.perf_counter() - start)
    return float(np.percentile(seconds, 99))


def attack(mode: str, address: str, amount: float) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.hostile", mode, address, str(amount)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if line.strip() != "ready":
        process.kill()
        raise RuntimeError(f"{mode}: the attacker did not start: {line!r}")
    return process


def held(
    mode: str, address: str, count: int, pid: int, request: pb.ModelInferRequest, args: Any
) -> dict[str, Any]:
    """Hold `count` hostile connections; measure; wait for the server to close them all."""
    before = process_status(pid)
    base = p99(address, request, args.probes)
    process = attack(mode, address, count)
    assert process.stdout is not None and process.stdin is not None
    time.sleep(1.0)
    under = p99(address, request, args.probes)
    peak = process_status(pid)
    last: dict[str, Any] = {}
    deadline = time.monotonic() + 600
    while last.get("closed", 0) < count and time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        last = json.loads(line)
        status = process_status(pid)
        peak = {k: max(v, status[k]) for k, v in peak.items()}
    process.stdin.close()
    process.wait(60)
    time.sleep(1.0)
    return {
        "attack": mode,
        "connections": count,
        "p99_before_ms": base * 1e3,
        "p99_under_ms": under * 1e3,
        "rss_before_mib": before["rss"] / 2**20,
        "rss_peak_mib": peak["rss"] / 2**20,
        "rss_after_mib": process_status(pid)["rss"] / 2**20,
        "fds_peak": peak["fds"],
        "threads_peak": peak["threads"],
        "closed": last.get("closed", 0),
        "all_closed_after_s": last.get("t"),
    }


def flood(address: str, pid: int, request: pb.ModelInferRequest, args: Any) -> dict[str, Any]:
    """Rapid reset from `--flood-clients` processes for `--flood-s`."""
    before = process_status(pid)
    base = p99(address, request, args.probes)
    floods = [attack("reset", address, args.flood_s) for _ in range(args.flood_clients)]
    time.sleep(min(2.0, args.flood_s / 4))
    under = p99(address, request, args.probes)
    peak = process_status(pid)
    results = []
    for process in floods:
        assert process.stdout is not None
        results.append(json.loads(process.stdout.readline()))
        process.wait(60)
    return {
        "attack": "reset",
        "connections": sum(r["connections"] for r in results),
        "streams": sum(r["streams"] for r in results),
        "p99_before_ms": base * 1e3,
        "p99_under_ms": under * 1e3,
        "rss_before_mib": before["rss"] / 2**20,
        "rss_peak_mib": peak["rss"] / 2**20,
        "rss_after_mib": process_status(pid)["rss"] / 2**20,
        "fds_peak": peak["fds"],
        "threads_peak": peak["threads"],
        "goaways": [g for r in results for g in r["goaways"]][:5],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(args.idle, args.slow) + 1024
    if hard != resource.RLIM_INFINITY and hard < want:
        raise SystemExit(f"RLIMIT_NOFILE hard limit {hard} < {want}: lower --idle / --slow")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))  # the server inherits it
    images = np.random.default_rng(0).random((1, 1, 28, 28), dtype=np.float32)
    request = pb.ModelInferRequest(model_name=args.model)
    request.inputs.add(name="input", datatype="FP32", shape=images.shape)
    request.raw_input_contents.append(images.tobytes())
    flags = (
        "--handshake-timeout-s", str(args.handshake_timeout_s),
        "--max-connection-age-s", str(args.max_connection_age_s),
        "--max-connection-age-grace-s", "2",
    )  # fmt: skip
    with server_process(args.repository, *flags) as (address, proc, _):
        rows = [
            held("idle", address, args.idle, proc.pid, request, args),
            held("slowloris", address, args.slow, proc.pid, request, args),
            flood(address, proc.pid, request, args),
        ]
    print_table(
        "hostile connections (normal client: sequential ModelInfer on one connection)",
        ["attack", "conns", "p99 before", "p99 under", "RSS before/peak/after", "fds", "closed"],
        [
            [
                r["attack"],
                f"{r['connections']:,}",
                f"{r['p99_before_ms']:.1f} ms",
                f"{r['p99_under_ms']:.1f} ms",
                f"{r['rss_before_mib']:.0f}/{r['rss_peak_mib']:.0f}/{r['rss_after_mib']:.0f} MiB",
                str(r["fds_peak"]),
                f"after {r['all_closed_after_s']} s"
                if "closed" in r
                else f"{r['streams']:,} resets",
            ]
            for r in rows
        ],
    )
    result = {
        "command": " ".join(["python -m bench.faults", *(argv or sys.argv[1:])]),
        "host": platform.node(),
        "limits": {
            "handshake_timeout_s": args.handshake_timeout_s,
            "max_connection_age_s": args.max_connection_age_s,
        },
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
