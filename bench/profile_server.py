"""Where a server's CPU goes per request: py-spy stacks and per-thread CPU under h2load.

    .venv/bin/python -m bench.profile_server --repository model_repository [--native]

For each server (the project; the minimal server for comparison) and each concurrency (16, 64):
start it fresh, drive it with h2load (batch-1 ModelInfer over one HTTP/2 connection) and, in the
middle of that load, sample it with `py-spy record --threads --format raw` while reading every
thread's CPU from /proc/<pid>/task/*/stat. Prints per-thread cores and the functions with the
most samples (self and inclusive), each also as CPU microseconds per inference; writes
bench/results/profile.json and the collapsed stacks (flamegraph input) under bench/results/profile/.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.loadgen import (
    grpc_frame,
    h2load,
    infer_request,
    model_parser,
    print_table,
    response_frame_size,
    thread_cpu_seconds,
)
from bench.servers import executed, server

ROOT = Path(__file__).resolve().parent.parent

PY_SPY = Path(sys.executable).parent / "py-spy"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = model_parser(__doc__)
    parser.add_argument("--servers", default="project,minimal",
                        help="servers to profile (default: project,minimal)")  # fmt: skip
    parser.add_argument("--concurrency", default="16,64", help="levels (default: 16,64)")
    parser.add_argument("--seconds", type=float, default=10.0,
                        help="sampling seconds per point (default: 10)")  # fmt: skip
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples/s (default: 200)")
    parser.add_argument("--native", action="store_true",
                        help="include C/C++ frames (gRPC core, uvloop, ONNX Runtime); py-spy then "
                        "pauses the process for each sample, which slows it")  # fmt: skip
    parser.add_argument("--top", type=int, default=25, help="functions to print (default: 25)")
    parser.add_argument("--server-args", default="", help="extra flags for python -m service")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results",
                        help="output folder (default: bench/results)")  # fmt: skip
    return parser.parse_args(argv)


FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def frame_name(frame: str) -> str:
    """`func (path/to/file.py:123)` -> `func (file.py)`: one entry per function, not per line."""
    match = FRAME.match(frame)
    if not match:
        return frame
    file = match.group("file")
    short = "/".join(file.split("/")[-2:]) if "/" in file else file
    return f"{match.group('func')} ({short})"


THREAD = re.compile(r"^thread \((?P<tid>\d+)\)(?::\s*(?P<name>.*))?$")


def aggregate(collapsed: str, thread_cores: dict[str, float], infer_per_s: float) -> dict[str, Any]:
    """CPU microseconds per inference by function, from py-spy's collapsed stacks.

    A sample says where a thread was, not whether it had a core (on a shared machine it often
    waits for one), so each thread's samples share out that thread's CPU measured from /proc:
    a function's cost is the sum over threads of (its samples / the thread's samples) x the
    thread's CPU. Self: the function is the innermost frame; inclusive: anywhere in the stack."""
    cores_by_tid = {key.rsplit("/", 1)[1]: cores for key, cores in thread_cores.items()}
    per_thread: dict[str, list[tuple[list[str], int]]] = {}
    names: dict[str, str] = {}
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        frames = stack.split(";")
        match = THREAD.match(frames[0])
        tid = match.group("tid") if match else "?"
        if match:
            names[tid] = match.group("name") or tid
            frames = frames[1:]
        per_thread.setdefault(tid, []).append(([frame_name(f) for f in frames], int(count_text)))
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    threads: dict[str, dict[str, Any]] = {}
    for tid, stacks in per_thread.items():
        samples = sum(count for _, count in stacks)
        us_per_sample = 1e6 * cores_by_tid.get(tid, 0.0) / infer_per_s / samples
        thread_own: Counter[str] = Counter()
        for frames, count in stacks:
            if frames:
                own[frames[-1]] += count * us_per_sample
                thread_own[frames[-1]] += count * us_per_sample
            for name in set(frames):
                inclusive[name] += count * us_per_sample
        runs_onnx = any(f.startswith("Session.run") for frames, _ in stacks for f in frames)
        threads[f"{names.get(tid, tid)}/{tid}"] = {
            "samples": samples, "us_per_infer": us_per_sample * samples, "onnx": runs_onnx,
            "self": [{"function": f, "us_per_infer": us} for f, us in thread_own.most_common(12)],
        }  # fmt: skip
    return {"samples": sum(t["samples"] for t in threads.values()), "threads": threads,
            "self": own, "inclusive": inclusive}  # fmt: skip


def profile_point(name: str, args: argparse.Namespace, frame: Path, concurrency: int,
                  raw_dir: Path) -> dict[str, Any]:  # fmt: skip
    with server(name, args.repository, args.model, args.server_args) as (address, pid):
        response_bytes = response_frame_size(address, infer_request(args.repository, args.model))
        h2load(address, frame, response_bytes, concurrency, 1.0)  # warm up
        load_seconds = args.seconds + 2
        with tempfile.NamedTemporaryFile("w+", suffix=".txt") as out:
            import threading

            holder: dict[str, Any] = {}
            loader = threading.Thread(target=lambda: holder.update(
                h2load(address, frame, response_bytes, concurrency, load_seconds)))  # fmt: skip
            loader.start()
            time.sleep(1.5)
            before, t0 = thread_cpu_seconds(pid), time.monotonic()
            images0, batches0 = executed(address, args.model)
            compute0 = compute_infer(address, args.model)
            cmd = [str(PY_SPY), "record", "--pid", str(pid), "--threads",
                   "--format", "raw", "--rate", str(args.rate), "--duration", str(int(args.seconds)),
                   "--output", out.name,
                   *(["--native"] if args.native else ["--nonblocking"])]  # fmt: skip
            spy = subprocess.run(cmd, capture_output=True, text=True)
            after, wall = thread_cpu_seconds(pid), time.monotonic() - t0
            images1, batches1 = executed(address, args.model)
            compute1 = compute_infer(address, args.model)
            loader.join()
            collapsed = Path(out.name).read_text()
        if spy.returncode != 0:
            print(spy.stdout[-1000:], spy.stderr[-1000:], file=sys.stderr)
    raw_dir.mkdir(parents=True, exist_ok=True)
    (raw_dir / f"{name}-c{concurrency}.txt").write_text(collapsed)
    threads = {t: (after[t] - before.get(t, 0.0)) / wall for t in after}
    infer_per_s = holder.get("infer_per_s", float("nan"))
    cores = sum(threads.values())
    stacks = aggregate(collapsed, threads, infer_per_s)
    by_tid = {key.rsplit("/", 1)[1]: cores for key, cores in threads.items()}
    total_us = 1e6 * cores / infer_per_s

    def top(counter: Counter[str]) -> list[dict[str, Any]]:
        return [{"function": f, "share": us / total_us, "us_per_infer": us}
                for f, us in counter.most_common(args.top)]  # fmt: skip

    return {
        "server": name,
        "concurrency": concurrency,
        "infer_per_s": infer_per_s,
        "server_cores": cores,
        "avg_batch": (images1 - images0) / max(batches1 - batches0, 1),
        # the ONNX Runtime thread's CPU per image (/proc) beside the wall time the server's
        # statistics give its runs (compute_infer): on a busy host the wall time includes waits
        # for a core
        "onnx_thread_cpu_us_per_image": 1e6
        * sum(
            by_tid.get(key.rsplit("/", 1)[1], 0.0)
            for key, info in stacks["threads"].items()
            if info["onnx"]
        )
        / infer_per_s
        if infer_per_s
        else None,
        "compute_infer_wall_us_per_image": (compute1[0] - compute0[0])
        / 1e3
        / max(compute1[1] - compute0[1], 1)
        if compute1[1]
        else None,
        "cpu_us_per_infer": 1e6 * cores / infer_per_s if infer_per_s else None,
        "thread_cores": dict(sorted(threads.items(), key=lambda kv: -kv[1])),
        "samples": stacks["samples"],
        "thread_samples": stacks["threads"],
        "self": top(stacks["self"]),
        "inclusive": top(stacks["inclusive"]),
        "py_spy_error": spy.stderr[-500:] if spy.returncode else "",
    }


def compute_infer(address: str, model: str) -> tuple[int, int]:
    """(compute_infer ns, images) summed over the batch sizes of ModelStatistics (0 where a
    server keeps no per-batch statistics)."""
    import grpc

    from pb import grpc_service_pb2 as pb
    from pb import grpc_service_pb2_grpc as pb_grpc

    with grpc.insecure_channel(address) as channel:
        stats = pb_grpc.GRPCInferenceServiceStub(channel).ModelStatistics(
            pb.ModelStatisticsRequest(name=model), timeout=10).model_stats  # fmt: skip
    ns = sum(b.compute_infer.ns for s in stats for b in s.batch_stats)
    images = sum(b.compute_infer.count * b.batch_size for s in stats for b in s.batch_stats)
    return ns, images


def report(point: dict[str, Any], top: int) -> None:
    print(f"\n== {point['server']} at c={point['concurrency']}: {point['infer_per_s']:,.0f} infer/s, "
          f"{point['server_cores']:.2f} cores, {point['cpu_us_per_infer'] or 0:.0f} us CPU/infer, "
          f"{point['samples']} samples, executed batch {point['avg_batch']:.1f}")  # fmt: skip
    if point.get("onnx_thread_cpu_us_per_image"):
        wall = point.get("compute_infer_wall_us_per_image")
        print(f"ONNX Runtime thread: {point['onnx_thread_cpu_us_per_image']:.0f} us CPU per image"
              + (f"; its runs' wall time (statistics): {wall:.0f} us per image" if wall else ""))  # fmt: skip
    busy = [(t, c) for t, c in point["thread_cores"].items() if c >= 0.005]
    print("threads (cores): " + ", ".join(f"{t} {c:.2f}" for t, c in busy))
    for thread, info in sorted(
        point["thread_samples"].items(), key=lambda kv: -kv[1]["us_per_infer"]
    ):
        if info["us_per_infer"] < 0.05 * (point["cpu_us_per_infer"] or 1):
            continue
        print(f"  {thread}: {info['us_per_infer']:.0f} us/infer; self: " + ", ".join(
            f"{r['function']} {r['us_per_infer']:.0f}" for r in info["self"][:6]))  # fmt: skip
    for kind in ("self", "inclusive"):
        if not point[kind]:
            continue
        print_table(
            f"{kind} samples",
            ["share", "us/infer", "function"],
            [[f"{r['share']:.1%}", f"{r['us_per_infer']:.1f}", r["function"][:110]]
             for r in point[kind][:top]],
        )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not PY_SPY.exists():
        print(f"{PY_SPY} is missing (pip install py-spy)", file=sys.stderr)
        return 2
    points = []
    with tempfile.TemporaryDirectory() as tmp:
        frame = Path(tmp) / "infer.grpc"
        frame.write_bytes(grpc_frame(infer_request(args.repository, args.model)))
        for name in [s for s in args.servers.split(",") if s]:
            for concurrency in [int(c) for c in args.concurrency.split(",")]:
                print(f"profiling {name} at c={concurrency} ...", flush=True)
                point = profile_point(name, args, frame, concurrency, args.out / "profile")
                report(point, args.top)
                points.append(point)
    path = args.out / "profile.json"
    path.write_text(json.dumps({"native": args.native, "rate": args.rate, "points": points},
                               indent=2) + "\n")  # fmt: skip
    print(f"\nwrote {path} and collapsed stacks under {args.out / 'profile'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
