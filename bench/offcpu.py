"""Why a server's threads leave the CPU under load: the scheduler's own record, thread by thread.

    .venv/bin/python -m bench.offcpu --repository R [--servers project,minimal,project-one-cpu]

Each server is started, loaded by h2load at one concurrency, and for a couple of seconds in the
middle `perf record` takes every context switch and wake-up on the machine (the
sched:sched_switch and sched:sched_wakeup tracepoints; needs perf, `make benchdeps`, and root or
a low perf_event_paranoid). For each busy thread of the server it prints the share of the window
it ran, how often it went to sleep (per second and per inference), how long it slept, how long
it then waited for a CPU once woken, which CPUs it ran on and who woke it. A thread that sleeps
many times per inference and is woken from another CPU each time pays a cross-CPU wake-up (on a
virtual machine an interrupt through the hypervisor) every time: the GIL convoy of
bench/PROFILE.md item 30 shows up here as a batch thread woken ~8 times per batch. Perf's
own overhead slows the server while it records, so read rates from bench/compare.py, not here.
Writes bench/results/offcpu.json.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import servers
from bench.loadgen import (
    grpc_frame,
    h2load,
    infer_request,
    model_parser,
    point_options,
    print_table,
    process_tree,
    response_frame_size,
)

EVENT = re.compile(r"^\s*(?P<comm>\S.*?)\s+(?P<pid>\d+)\s+\[(?P<cpu>\d+)\]\s+(?P<ts>[\d.]+):"
                   r"\s+sched:(?P<kind>sched_switch|sched_wakeup):\s+(?P<rest>.*)$")  # fmt: skip
BUSY = 0.02  # threads that ran less than this share of the window are left out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = model_parser(__doc__)
    parser.add_argument("--servers", default="project,minimal,project-one-cpu",
                        help="servers, as bench/compare.py names them "
                             "(default: project,minimal,project-one-cpu)")  # fmt: skip
    point_options(parser, 2.0, "seconds recorded, mid-load")
    args = parser.parse_args(argv)
    if args.concurrency < 1 or args.seconds <= 0:
        parser.error("--concurrency and --seconds must be positive")
    return args


@dataclass
class _Thread:
    """One thread's record while it is being followed through the events."""

    ran: float = 0.0
    on_since: float | None = None
    off_since: float | None = None
    voluntary: bool = False
    woken_at: float | None = None
    waker: str = ""
    sleeps: list[float] = field(default_factory=list)  # off CPU, asleep, until woken (s)
    latencies: list[float] = field(default_factory=list)  # woken until on CPU again (s)
    wakers: Counter[str] = field(default_factory=Counter)
    cpus: Counter[int] = field(default_factory=Counter)


def thread_stats(lines: Iterable[str], names: dict[int, str]) -> dict[int, dict[str, Any]]:
    """From `perf script` output of sched_switch and sched_wakeup events: for each thread in
    `names` (tid -> name), its share of the window on CPU, sleeps per second, median sleep,
    wake-up latency (median, 90th percentile), the CPUs it ran on and who woke it (by thread
    name, or the command outside the server, with the CPU the wake-up ran on)."""
    threads = {tid: _Thread() for tid in names}
    first = last = None
    for line in lines:
        match = EVENT.match(line)
        if not match:
            continue
        ts, cpu, rest = float(match["ts"]), int(match["cpu"]), match["rest"]
        first = ts if first is None else first
        last = ts
        if match["kind"] == "sched_wakeup":
            woken = threads.get(int(re.search(r"\bpid=(\d+)", rest)[1]))  # type: ignore[index]
            if woken is not None:
                woken.woken_at = ts
                waker = int(match["pid"])
                woken.waker = f"{names.get(waker, match['comm'])} on CPU {cpu}"
            continue
        prev = int(re.search(r"prev_pid=(\d+)", rest)[1])  # type: ignore[index]
        nxt = int(re.search(r"next_pid=(\d+)", rest)[1])  # type: ignore[index]
        if prev in threads:
            t = threads[prev]
            if t.on_since is not None:
                t.ran += ts - t.on_since
            t.on_since, t.off_since = None, ts
            t.voluntary = re.search(r"prev_state=([SD])", rest) is not None
            t.woken_at = None
        if nxt in threads:
            t = threads[nxt]
            t.on_since = ts
            t.cpus[cpu] += 1
            if t.voluntary and t.off_since is not None and t.woken_at is not None:
                t.sleeps.append(t.woken_at - t.off_since)
                t.latencies.append(ts - t.woken_at)
                t.wakers[t.waker] += 1
            t.voluntary, t.woken_at = False, None
    span = (last - first) if first is not None and last is not None and last > first else 0.0
    result = {}
    for tid, t in threads.items():
        if not span or not t.sleeps:
            continue
        latencies = sorted(t.latencies)
        result[tid] = {
            "name": names[tid], "on_cpu": t.ran / span, "sleeps_per_s": len(t.sleeps) / span,
            "sleep_median_us": statistics.median(t.sleeps) * 1e6,
            "asleep": sum(t.sleeps) / span,
            "wake_latency_median_us": statistics.median(latencies) * 1e6,
            "wake_latency_p90_us": latencies[int(0.9 * (len(latencies) - 1))] * 1e6,
            "cpus": dict(t.cpus), "woken_by": {k: v / span for k, v in t.wakers.most_common(4)},
        }  # fmt: skip
    return result


def thread_names(pid: int) -> dict[int, str]:
    """The threads of the server and its child processes (tid -> OS name), each process's main
    thread marked."""
    names = {}
    for member in process_tree(pid):
        for task in Path(f"/proc/{member}/task").glob("*"):
            try:
                name = (task / "comm").read_text().strip()
            except OSError:  # ended meanwhile
                continue
            tid = int(task.name)
            names[tid] = (
                f"{name} (main)" if tid == pid else f"{name} (child)" if tid == member else name
            )
    return names


def record(name: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Start one server, load it, record the scheduler mid-load; its threads' figures."""
    request = infer_request(args.repository, args.model)
    frame = tmp / "infer.grpc"
    frame.write_bytes(grpc_frame(request))
    data = tmp / f"{name}.perf"
    with servers.server(name, args.repository, args.model) as (address, pid):
        size = response_frame_size(address, request)
        h2load(address, frame, size, 16, 1.0)  # warm up
        load: dict[str, Any] = {}
        seconds = args.seconds + 3.0
        driver = threading.Thread(target=lambda: load.update(
            h2load(address, frame, size, args.concurrency, seconds)))  # fmt: skip
        driver.start()
        time.sleep(1.5)
        names = thread_names(pid)
        subprocess.run(["perf", "record", "-q", "-a", "-e", "sched:sched_switch",
                        "-e", "sched:sched_wakeup", "-o", str(data), "sleep", str(args.seconds)],
                       check=True, stderr=subprocess.DEVNULL)  # fmt: skip
        driver.join()
    script = subprocess.run(["perf", "script", "-i", str(data)], check=True,
                            capture_output=True, text=True).stdout  # fmt: skip
    stats = thread_stats(script.splitlines(), names)
    rate = load.get("infer_per_s") or 0.0
    busy = [s for s in stats.values() if s["on_cpu"] >= BUSY]
    for s in busy:
        s["sleeps_per_infer"] = s["sleeps_per_s"] / rate if rate else float("nan")
    return {"server": name, "infer_per_s": rate, "threads": busy}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("perf") is None:
        print("perf is missing: make benchdeps (apt: linux-perf)", file=sys.stderr)
        return 2
    names = [s for s in args.servers.split(",") if s]
    unknown = [s for s in names if s not in servers.KNOWN]
    if unknown:
        print(f"unknown server(s) {', '.join(unknown)}", file=sys.stderr)
        return 2
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            results.append(record(name, args, Path(tmp)))
    rows = []
    for r in results:
        for s in sorted(r["threads"], key=lambda s: -s["on_cpu"]):
            wakers = ", ".join(f"{k} {v:,.0f}/s" for k, v in list(s["woken_by"].items())[:2])
            rows.append([
                r["server"], f"{r['infer_per_s']:,.0f}", s["name"], f"{s['on_cpu']:.2f}",
                f"{s['sleeps_per_s']:,.0f}", f"{s['sleeps_per_infer']:.2f}",
                f"{s['sleep_median_us']:.0f}", f"{s['asleep']:.2f}",
                f"{s['wake_latency_median_us']:.0f} / {s['wake_latency_p90_us']:.0f}",
                ",".join(str(c) for c in sorted(s["cpus"])), wakers,
            ])  # fmt: skip
    print_table(
        f"c={args.concurrency}, {args.seconds:g} s recorded mid-load (perf slows the server: "
        "rates here are not the server's); on CPU and asleep = share of the window; wake-up "
        "latency = woken until running, us",
        ["server", "infer/s", "thread", "on CPU", "sleeps/s", "per infer", "sleep us", "asleep",
         "wake latency p50/p90", "CPUs", "woken by"],
        rows,
    )  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "offcpu.json"
    path.write_text(json.dumps({"command": " ".join(sys.argv), "concurrency": args.concurrency,
                                "seconds": args.seconds, "servers": results}, indent=2) + "\n")  # fmt: skip
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
