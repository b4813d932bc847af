"""Where a server's round-to-round spread comes from: each server started afresh in every pass and
loaded at one concurrency in short windows that alternate, within the same process, between
placements of its threads.

    .venv/bin/python -m bench.spread --repository R [--servers project,minimal] [--passes 8]

Placements (`--placements`, in a rotating order within each pass):
- `own`: where the server puts its threads (the project pins them under `--pin-threads auto`; the
  minimal server leaves them to the OS);
- `one-cpu`: every thread of the process on the first CPU, so the server gets one CPU's speed;
- `polling`: its own placement while this script holds a 0 us request on /dev/cpu_dma_latency, so
  idle CPUs poll instead of halting and a wake-up does not wait for the hypervisor (root only).

A window costs the same host moment to every placement of a pass, so the placements' medians and
spreads (highest over lowest window, coefficient of variation) can be read against each other;
`bench/host_noise.py` shows how the host's CPUs themselves move. Prints a table; writes
bench/results/spread.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench import servers
from bench.loadgen import (
    CpuMeter,
    grpc_frame,
    h2load,
    infer_request,
    model_parser,
    point_options,
    print_table,
    response_frame_size,
    variation,
)

PLACEMENTS = ("own", "one-cpu", "polling")
CPU_LATENCY = Path("/dev/cpu_dma_latency")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = model_parser(__doc__)
    parser.add_argument("--servers", default="project,minimal",
                        help=f"servers (default: project,minimal; known: {', '.join(servers.KNOWN)})")  # fmt: skip
    parser.add_argument("--placements", default="own,one-cpu",
                        help=f"placements to alternate (default: own,one-cpu; known: {', '.join(PLACEMENTS)})")  # fmt: skip
    parser.add_argument("--passes", type=int, default=8,
                        help="fresh starts of each server (default: 8)")  # fmt: skip
    parser.add_argument("--windows", type=int, default=2,
                        help="windows per placement in each pass (default: 2)")  # fmt: skip
    point_options(parser, 3.0, "h2load seconds per window")
    args = parser.parse_args(argv)
    args.server_list = [s for s in args.servers.split(",") if s]
    args.placement_list = [p for p in args.placements.split(",") if p]
    unknown = [s for s in args.server_list if s not in servers.KNOWN]
    unknown += [p for p in args.placement_list if p not in PLACEMENTS]
    if unknown:
        parser.error(f"unknown server(s) or placement(s): {', '.join(unknown)}")
    return args


def thread_cpus(pid: int) -> dict[int, set[int]]:
    """Each thread of `pid` and the CPUs it may run on."""
    found = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found[int(task.name)] = os.sched_getaffinity(int(task.name))
        except OSError:  # a thread that just ended
            continue
    return found


def place(cpus: dict[int, set[int]]) -> None:
    for tid, allowed in cpus.items():
        try:
            os.sched_setaffinity(tid, allowed)
        except OSError:
            continue


@contextmanager
def placed(pid: int, own: dict[int, set[int]], placement: str) -> Iterator[None]:
    """Run the block with the server's threads (and the host's idle CPUs) as `placement` says."""
    if placement == "one-cpu":
        first = min(os.sched_getaffinity(0))
        place({tid: {first} for tid in thread_cpus(pid)})
        try:
            yield
        finally:
            place(own)
        return
    if placement == "polling":
        fd = os.open(CPU_LATENCY, os.O_WRONLY)  # the request holds while the file is open
        try:
            os.write(fd, struct.pack("i", 0))
            yield
        finally:
            os.close(fd)
        return
    yield


def summarise(windows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (server, placement): median infer/s, range, highest over lowest, cv, median cores."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for window in windows:
        groups.setdefault((window["server"], window["placement"]), []).append(window)
    summary = []
    for (name, placement), rows in groups.items():
        rates = [r["infer_per_s"] for r in rows]
        summary.append({
            "server": name, "placement": placement, "windows": len(rows),
            "median": statistics.median(rates), "lowest": min(rates), "highest": max(rates),
            "spread": max(rates) / min(rates) if min(rates) else float("inf"),
            "cv": variation(rates),
            "cores": statistics.median(r["cores"] for r in rows),
        })  # fmt: skip
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if "polling" in args.placement_list and not os.access(CPU_LATENCY, os.W_OK):
        print(f"{CPU_LATENCY} is not writable here (root only): no `polling`", file=sys.stderr)
        return 2
    windows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        frame = Path(tmp) / "infer.grpc"
        request = infer_request(args.repository, args.model)
        frame.write_bytes(grpc_frame(request))
        for index in range(args.passes):
            turn = index % len(args.placement_list)  # rotate which placement goes first
            order = args.placement_list[turn:] + args.placement_list[:turn]
            for name in args.server_list:
                with servers.server(name, args.repository, args.model) as (address, pid):
                    size = response_frame_size(address, request)
                    h2load(address, frame, size, args.concurrency, 1.0)  # warm up
                    own = thread_cpus(pid)
                    line = []
                    for placement in order * args.windows:
                        with placed(pid, own, placement), CpuMeter(pid) as cpu:
                            row = h2load(address, frame, size, args.concurrency, args.seconds)
                        rate = row.get("infer_per_s", 0.0)
                        windows.append({"pass": index + 1, "server": name,
                                        "placement": placement, "infer_per_s": rate,
                                        "cores": cpu.cores, "failed": row.get("failed", 0)})  # fmt: skip
                        line.append(f"{placement} {rate:,.0f}/s {cpu.cores:.2f} cores")
                print(f"pass {index + 1}/{args.passes}: {name}: " + ", ".join(line), flush=True)
    summary = summarise(windows)
    print_table(
        f"{args.model}, batch 1, {args.concurrency} in flight; {args.passes} fresh starts x "
        f"{args.windows} windows of {args.seconds:g} s per placement",
        ["server", "placement", "infer/s median (range)", "highest/lowest", "cv", "cores"],
        [
            [s["server"], s["placement"],
             f"{s['median']:,.0f} ({s['lowest']:,.0f}-{s['highest']:,.0f})",
             f"{s['spread']:.2f}x", f"{s['cv']:.3f}", f"{s['cores']:.2f}"]
            for s in summary
        ],
    )  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "spread.json"
    document = {"command": " ".join(sys.argv), "load_average_after": os.getloadavg(),
                "settings": {k: str(v) for k, v in vars(args).items()},
                "windows": windows, "summary": summary}  # fmt: skip
    path.write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
