"""The project's server beside its reference points, in one run: a minimal server of the same
design (bench/minimal_server.py), real NVIDIA Triton 2.51 (bench/triton_server.py) and, when
named, KServe 0.21's Python server (`kserve`: bench/kserve_server.py, `make kserve`).

    .venv/bin/python -m bench.compare --repository model_repository [--repeat 6] [--seconds 6]

Each round starts every server afresh (in a rotating order) and measures them with h2load (the
cheapest client: it replays a pre-built batch-1 ModelInfer frame) at concurrency 1, 16 and 64
over one HTTP/2 connection. The project also gets the ModelStreamInfer lane (h2load replaying
`--stream-messages` requests per stream, as many streams as make the concurrency) and, as
`project-workers2`, `--workers 2` driven over several connections, and `project-http-workers2`,
`--workers 2` driven over its HTTP front (h2load --h1 replaying a batch-1 infer request of the
binary tensor extension, one keep-alive connection per request in flight). For every point:
infer/s, server CPU per inference (the process tree's CPU from /proc over the measured window,
divided by the inferences), latency percentiles (h2load's per-request log), the executed batch
(ModelStatistics), cross-CPU wake-up interrupts per inference (/proc/interrupts), how busy the
host was meanwhile (all cores, from /proc/stat, less the server and the client) and, in the JSON
only, the CPU per inference of each thread of the server's main process, by thread name.

The servers of a round stay up together, and each concurrency level is measured in turns: every
point's `--seconds` are cut into `--slices` slices (1 s by default) taken in rotation across the
servers' points at that level, so that a host CPU slowing down for a few seconds (it does here:
bench/host_noise.py) costs every server alike rather than the one whose turn it was. Many short
rounds; medians with ranges, and each point's spread (highest over lowest round, coefficient of
variation); the ratios between servers are taken within each round, then summarised. Prints
tables; writes bench/results/compare.json and compare.png.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench import servers, triton_server
from bench.http_compare import HEADER, binary_request, check_http
from bench.loadgen import (
    PERF_ANALYZER,
    CpuMeter,
    free_port,
    grpc_frame,
    h2load,
    infer_request,
    model_parser,
    perf_analyzer,
    print_table,
    response_frame_size,
    thread_cpu_seconds,
    variation,
    wakeup_ipis,
)
from bench.servers import KNOWN, MINIMAL, SERVERS, executed
from pb import grpc_service_pb2 as pb
from pb import grpc_service_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent

STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"


@dataclass(frozen=True)
class Lane:
    """How a point is driven: unary or streamed, over how many connections."""

    name: str
    stream: bool = False
    connections: int = 1
    http: bool = False


UNARY = Lane("unary")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = model_parser(__doc__)
    parser.add_argument("--servers", default=",".join(SERVERS),
                        help=f"servers to measure (default: {','.join(SERVERS)}; also "
                        f"{', '.join(v for v in KNOWN if v not in SERVERS)})")  # fmt: skip
    parser.add_argument("--concurrency", default="1,16,64",
                        help="requests in flight, unary, one connection (default: 1,16,64)")  # fmt: skip
    parser.add_argument("--stream-concurrency", default="64",
                        help="requests in flight on the project's ModelStreamInfer lane "
                        "(default: 64; empty: none)")  # fmt: skip
    parser.add_argument("--stream-messages", type=int, default=16,
                        help="requests per stream on that lane (default: 16)")  # fmt: skip
    parser.add_argument("--connections", type=int, default=4,
                        help="client connections for project-workers2 above concurrency 1 "
                        "(default: 4)")  # fmt: skip
    parser.add_argument("--repeat", type=int, default=6,
                        help="rounds over all servers (default: 6)")  # fmt: skip
    parser.add_argument("--seconds", type=float, default=6.0,
                        help="h2load measurement seconds per point (default: 6)")  # fmt: skip
    parser.add_argument("--slices", type=int, default=6,
                        help="turns each point's seconds are cut into, taken in rotation with "
                        "the other servers' points at the same concurrency (default: 6)")  # fmt: skip
    parser.add_argument("--perf-analyzer", action="store_true",
                        help="also perf_analyzer (ModelInfer) at each concurrency; it costs the "
                        "shared cores ~0.3 core")  # fmt: skip
    parser.add_argument("--measurement-ms", type=int, default=2000,
                        help="perf_analyzer measurement window (default: 2000)")  # fmt: skip
    parser.add_argument("--server-args", default="",
                        help="extra flags for python -m service, e.g. '--batching delay'")  # fmt: skip
    parser.add_argument(
        "--before",
        type=Path,
        default=None,
        help="for the project-before server: a checkout of an older commit "
        "(git worktree add DIR REV; generate its pb/ with proto/generate.py)",
    )
    parser.add_argument("--report", type=Path, default=None, metavar="JSON",
                        help="measure nothing: print the rounds and tables of a compare.json "
                        "written before (ratios recomputed)")  # fmt: skip
    parser.add_argument("--quick", action="store_true",
                        help="one round, 2 s per point (checks the harness; not a figure)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results",
                        help="output folder (default: bench/results)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.quick:
        args.repeat, args.seconds, args.measurement_ms, args.slices = 1, 2.0, 1000, 2
    if args.slices < 1 or args.seconds / args.slices < 0.2:
        parser.error("--slices must be at least 1, and each slice at least 0.2 s")
    return args


def lanes(name: str, args: argparse.Namespace) -> list[tuple[Lane, int]]:
    """The (lane, concurrency) points measured on one server."""
    levels = [int(c) for c in args.concurrency.split(",") if c]
    if name == "project-http-workers2":
        return [(Lane("http/1.1", http=True), c) for c in levels]
    if name == "project-workers2":
        spread = Lane(f"unary x{args.connections} conn", connections=args.connections)
        return [(UNARY if c < args.connections else spread, c) for c in levels]
    points = [(UNARY, c) for c in levels]
    if name.startswith("project"):
        stream = Lane("stream", stream=True)
        points += [(stream, int(c)) for c in args.stream_concurrency.split(",") if c]
    return points


@contextmanager
def server(name: str, args: argparse.Namespace) -> Iterator[tuple[str, int, int]]:
    """Start one of SERVERS or VARIANTS with this run's arguments; yield (gRPC address, pid, HTTP
    port: 0 unless the variant is driven over HTTP)."""
    http_port = free_port() if "-http" in name else 0
    extra = f"{args.server_args} --http-port {http_port}" if http_port else args.server_args
    with servers.server(name, args.repository, args.model, extra, args.before) as started:
        yield (*started, http_port)


def stream_response_frame_size(address: str, request: pb.ModelInferRequest) -> int:
    """Bytes of one successful ModelStreamInfer answer frame from this server (checks it)."""
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        answers = list(stub.ModelStreamInfer(iter([request]), timeout=30))
    if len(answers) != 1 or answers[0].error_message:
        raise RuntimeError(f"ModelStreamInfer failed: {answers}")
    return len(grpc_frame(answers[0]))


def host_busy_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole host so far, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    ticks = os.sysconf("SC_CLK_TCK")
    return (sum(fields[:8]) - idle) / ticks, sum(fields[:8]) / ticks


def children_cpu() -> float:
    """CPU seconds of finished child processes (h2load) so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass
class Target:
    """One started server of a round: how to drive each of its points for a slice of time."""

    name: str
    address: str
    pid: int
    points: list[tuple[Lane, int]]
    drive: Callable[[Lane, int, float], dict[str, Any]]


def start(name: str, args: argparse.Namespace, frames: dict[str, Path], stack: ExitStack) -> Target:
    """Start one server (stopped when `stack` closes), check its answers and warm it up."""
    address, pid, http_port = stack.enter_context(server(name, args))
    request = infer_request(args.repository, args.model)
    unary_bytes = response_frame_size(address, request)
    points = lanes(name, args)
    stream_bytes = (
        stream_response_frame_size(address, request) if any(p.stream for p, _ in points) else 0
    )
    h2load(address, frames["unary"], unary_bytes, 16, 1.0)  # warm the server up
    over_http = None
    if http_port:
        path = f"/v2/models/{args.model}/infer"
        body, header_length = binary_request(args.repository, args.model)  # as in main
        http_bytes = check_http(f"http://127.0.0.1:{http_port}{path}", body, header_length)
        http1 = {HEADER: str(header_length), "content-type": "application/octet-stream"}
        over_http = functools.partial(h2load, f"127.0.0.1:{http_port}", frames["http"],
                                      http_bytes, method=path, http1_headers=http1)  # fmt: skip
        over_http(16, 1.0)  # warm the HTTP front up

    def drive(lane: Lane, concurrency: int, seconds: float) -> dict[str, Any]:
        if lane.http:
            assert over_http is not None, "an HTTP lane on a server started without HTTP"
            return over_http(concurrency, seconds, keep_times=True)
        if lane.stream:
            return h2load(address, frames["stream"], stream_bytes, concurrency, seconds,
                          method=STREAM, messages=args.stream_messages, keep_times=True)  # fmt: skip
        connections = lane.connections if concurrency >= lane.connections else 1
        return h2load(address, frames["unary"], unary_bytes, concurrency, seconds,
                      connections=connections, keep_times=True)  # fmt: skip

    return Target(name, address, pid, points, drive)


def one_slice(target: Target, lane: Lane, concurrency: int, seconds: float,
              model: str) -> dict[str, Any]:  # fmt: skip
    """One h2load slice of a point, with what the server, the client and the host spent on it."""
    before = executed(target.address, model)
    busy0, client0, ipis0 = host_busy_seconds(), children_cpu(), wakeup_ipis()
    threads0 = thread_cpu_seconds(target.pid)
    with CpuMeter(target.pid) as cpu:
        row = target.drive(lane, concurrency, seconds)
    threads1 = thread_cpu_seconds(target.pid)
    busy1, client1, ipis1 = host_busy_seconds(), children_cpu(), wakeup_ipis()
    threads: dict[str, float] = {}  # by thread name (the tid dropped): CPU seconds in the slice
    for key, spent in threads1.items():
        name = key.rsplit("/", 1)[0]
        threads[name] = threads.get(name, 0.0) + spent - threads0.get(key, 0.0)
    images, batches = (a - b for a, b in zip(executed(target.address, model), before, strict=True))
    row.update(server_cpu=cpu.cores * cpu.wall, wall=cpu.wall, images=images, batches=batches,
               host_cpu=(busy1[0] - busy0[0]) / max(busy1[1] - busy0[1], 1e-9) * cpu.wall
               * (os.cpu_count() or 1), client_cpu=client1 - client0,
               ipis=ipis1 - ipis0, threads=threads)  # fmt: skip
    return row


def combine(slices: list[dict[str, Any]]) -> dict[str, Any]:
    """One point's row from its slices: rates over their summed time, percentiles over all
    their requests."""
    if any("error" in s for s in slices):
        return next(s for s in slices if "error" in s)
    wall = sum(s["wall"] for s in slices)
    measured = sum(s["seconds"] for s in slices)  # h2load's own clock, as for the rate
    successes = sum(s["infer_per_s"] * s["seconds"] for s in slices)
    requests = sum(s["requests"] for s in slices)
    infer_per_s = successes / measured
    server_cores = sum(s["server_cpu"] for s in slices) / wall
    host_cores = sum(s["host_cpu"] for s in slices) / wall
    client_cores = sum(s["client_cpu"] for s in slices) / wall
    images, batches = sum(s["images"] for s in slices), sum(s["batches"] for s in slices)
    ipis = sum(s["ipis"] for s in slices)
    threads: dict[str, float] = {}
    for part in slices:
        for name, spent in part["threads"].items():
            threads[name] = threads.get(name, 0.0) + spent
    # the server's main process thread by thread (JSON only): which side's cost moves
    per_thread = {name: 1000 * spent / successes for name, spent in sorted(threads.items())
                  if spent > 0 and successes}  # fmt: skip
    row = {key: slices[0][key] for key in ("concurrency", "connections", "messages_per_stream")}
    row.update(
        infer_per_s=infer_per_s, requests=requests, slices=len(slices),
        failed=sum(s["failed"] for s in slices),
        mean_ms=sum(s["mean_ms"] * s["requests"] for s in slices) / max(requests, 1),
        max_ms=max(s["max_ms"] for s in slices), server_cores=server_cores,
        cpu_ms_per_infer=1000 * server_cores / infer_per_s if infer_per_s else float("nan"),
        avg_batch=images / batches if batches else float("nan"),
        ipis_per_infer=ipis / successes if successes else float("nan"),
        thread_ms_per_infer=per_thread,
        client_cores=client_cores, host_cores=host_cores,
        other_cores=max(host_cores - server_cores - client_cores, 0.0),
        load_average=os.getloadavg()[0],
    )  # fmt: skip
    times = np.concatenate([s["times_ms"] for s in slices])
    if times.size:
        p50, p90, p99 = np.percentile(times, [50, 90, 99])
        row.update(p50_ms=float(p50), p90_ms=float(p90), p99_ms=float(p99))
    return row


def measure_round(names: list[str], args: argparse.Namespace,
                  frames: dict[str, Path]) -> list[dict[str, Any]]:  # fmt: skip
    """One round: every server started afresh (in `names`' order) and kept up while each
    concurrency level is measured in `--slices` slices per point that take turns across the
    servers, so that a slow second of the host falls on all of them alike."""
    rows: list[dict[str, Any]] = []
    with ExitStack() as stack:
        targets = [start(name, args, frames, stack) for name in names]
        for level in sorted({c for t in targets for _, c in t.points}):
            points = [(t, lane) for t in targets for lane, c in t.points if c == level]
            taken: dict[int, list[dict[str, Any]]] = {i: [] for i in range(len(points))}
            for turn in range(args.slices):
                shift = turn % len(points)  # rotate: no point always first after a switch
                for i in [*range(shift, len(points)), *range(shift)]:
                    target, lane = points[i]
                    taken[i].append(one_slice(target, lane, level, args.seconds / args.slices,
                                              args.model))  # fmt: skip
            for i, (target, lane) in enumerate(points):
                rows.append({**combine(taken[i]), "server": target.name, "lane": lane.name})
        if args.perf_analyzer:
            for target in targets:
                for concurrency in [int(c) for c in args.concurrency.split(",") if c]:
                    with CpuMeter(target.pid) as cpu:
                        row = perf_analyzer(target.address, args.model, concurrency,
                                            args.measurement_ms)  # fmt: skip
                    rows.append({**row, "server": target.name, "lane": "perf_analyzer",
                                 "server_cores": cpu.cores})  # fmt: skip
    return rows


def _spread(values: list[float]) -> dict[str, float]:
    """Median, range and coefficient of variation (standard deviation over mean) of values."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "cv": variation(values)}  # fmt: skip


def _relative_spread(entry: dict[str, Any], metric: str = "infer_per_s") -> str:
    """How far a metric moved from round to round: highest over lowest, and its CV."""
    value = entry.get(metric)
    if not value or not value["min"]:
        return ""
    return f"{value['max'] / value['min']:.2f}x cv {value.get('cv', 0.0):.3f}"


METRICS = ("infer_per_s", "cpu_ms_per_infer", "p50_ms", "p99_ms", "avg_batch", "ipis_per_infer",
           "server_cores", "other_cores")  # fmt: skip


def summarise(rounds: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One entry per (server, lane, concurrency): median, min and max of each metric."""
    table: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for measured in rounds:
        for row in measured:
            table.setdefault((row["server"], row["lane"], row["concurrency"]), []).append(row)
    summary = []
    for (name, lane, concurrency), rows in table.items():
        good = [r for r in rows if "error" not in r]
        entry: dict[str, Any] = {"server": name, "lane": lane, "concurrency": concurrency,
                                 "runs": len(rows), "errors": len(rows) - len(good),
                                 "failed": sum(r.get("failed", 0) for r in good)}  # fmt: skip
        for metric in METRICS:
            values = [r[metric] for r in good if r.get(metric) == r.get(metric) and metric in r]
            if values:
                entry[metric] = _spread(values)
        summary.append(entry)
    return summary


# (series, reference) pairs whose per-round ratios are the goals: (server, lane, concurrency).
def comparisons(summary: list[dict[str, Any]]) -> list[tuple[tuple[str, str, int], ...]]:
    have = {(e["server"], e["lane"], e["concurrency"]) for e in summary}
    pairs: list[tuple[tuple[str, str, int], ...]] = []
    for name, lane, concurrency in sorted(have):
        if name in MINIMAL and name != "minimal":  # a variant of the reference, against it
            pairs += [((name, lane, concurrency), (ref, lane, concurrency))
                      for ref in ("minimal", "triton") if (ref, lane, concurrency) in have]  # fmt: skip
        if not name.startswith("project"):
            continue
        for ref in (*MINIMAL, "triton", "kserve"):
            if lane == "unary" and (ref, "unary", concurrency) in have:
                pairs.append(((name, lane, concurrency), (ref, "unary", concurrency)))
        if name == "project":  # against each one-process variant measured beside it
            variants = sorted({n for n, _, _ in have if n.startswith("project-")} - set(SERVERS))
            pairs += [((name, lane, concurrency), (v, lane, concurrency)) for v in variants
                      if (v, lane, concurrency) in have]  # fmt: skip
        if lane != "unary" and ("triton", "unary", concurrency) in have:
            pairs.append(((name, lane, concurrency), ("triton", "unary", concurrency)))
    return pairs


def ratios(rounds: list[list[dict[str, Any]]], summary: list[dict[str, Any]]) -> list[dict]:
    """For each comparison: the ratio of each metric within each round, summarised."""
    result = []
    for series, reference in comparisons(summary):
        per_metric: dict[str, list[float]] = {}
        pairs: list[tuple[float, float]] = []  # (series, reference) infer/s, round by round
        for measured in rounds:
            by_key = {(r["server"], r["lane"], r["concurrency"]): r for r in measured}
            a, b = by_key.get(series), by_key.get(reference)
            if not a or not b or "error" in a or "error" in b:
                continue
            for metric in ("infer_per_s", "cpu_ms_per_infer", "p50_ms"):
                if a.get(metric) and b.get(metric):
                    per_metric.setdefault(metric, []).append(a[metric] / b[metric])
            if a.get("infer_per_s") and b.get("infer_per_s"):
                pairs.append((a["infer_per_s"], b["infer_per_s"]))
        result.append({"series": list(series), "reference": list(reference),
                       **{m: _spread(v) for m, v in per_metric.items()},
                       "elasticity": elasticity(pairs),
                       "spread_ratio": spread_ratio(pairs)})  # fmt: skip
    return result


def spread_ratio(
    pairs: list[tuple[float, float]], resamples: int = 2000, level: float = 0.90
) -> dict[str, float] | None:
    """The series' spread over the rounds (coefficient of variation of infer/s) over its
    reference's, with a paired bootstrap interval: rounds drawn with replacement, both series
    from the same draws (they shared each round's host). An interval that straddles 1.0 means
    the run cannot tell the two spreads apart. None with fewer than 4 rounds or a reference
    that did not move. Seeded: the same run gives the same interval."""
    if len(pairs) < 4:
        return None
    values = np.array(pairs)
    if np.ptp(values[:, 1]) == 0:
        return None
    draws = values[np.random.default_rng(0).integers(0, len(values), (resamples, len(values)))]
    cvs = draws.std(axis=1) / draws.mean(axis=1)  # (resamples, 2): series, reference
    moved = cvs[:, 1] > 0
    ratio = cvs[moved, 0] / cvs[moved, 1]
    low, high = np.quantile(ratio, [(1 - level) / 2, (1 + level) / 2])
    return {"ratio": float(variation(list(values[:, 0])) / variation(list(values[:, 1]))),
            "low": float(low), "high": float(high), "level": level}  # fmt: skip


def elasticity(pairs: list[tuple[float, float]]) -> float:
    """How far a series' throughput moves when its reference's moves, round to round: the slope
    of log(series) on log(reference). Measured in turns, both see the same host, so 1.0 means it
    slows down in proportion, 2.0 twice as much; NaN with fewer than 3 rounds or a reference that
    did not move."""
    if len(pairs) < 3:
        return float("nan")
    ours, theirs = np.log(np.array(pairs)).T
    if np.ptp(theirs) == 0:
        return float("nan")
    return float(np.polyfit(theirs, ours, 1)[0])


def _fmt_spread_ratio(value: dict[str, float] | None) -> str:
    return f"{value['ratio']:.2f} ({value['low']:.2f}-{value['high']:.2f})" if value else ""


def _fmt(entry: dict[str, Any], metric: str, spec: str) -> str:
    value = entry.get(metric)
    if not value:
        return ""
    return f"{value['median']:{spec}} ({value['min']:{spec}}-{value['max']:{spec}})"


def print_summary(summary: list[dict[str, Any]], ratio_rows: list[dict[str, Any]]) -> None:
    order = {name: i for i, name in enumerate(KNOWN)}
    rows = []
    for e in sorted(summary, key=lambda e: (e["concurrency"], e["lane"] != "unary",
                                            order.get(e["server"], 99), e["lane"])):  # fmt: skip
        rows.append([
            str(e["concurrency"]), e["server"], e["lane"], _fmt(e, "cpu_ms_per_infer", ".3f"),
            _fmt(e, "infer_per_s", ",.0f"), _relative_spread(e), _fmt(e, "p50_ms", ".2f"),
            _fmt(e, "avg_batch", ".1f"), _fmt(e, "ipis_per_infer", ".2f"),
            _fmt(e, "other_cores", ".1f"),
            str(e["failed"] + e["errors"]),
        ])  # fmt: skip
    print_table(
        "batch-1 mnist_cnn; median (min-max) over rounds; CPU = the server's, per inference; "
        "spread = infer/s highest over lowest round, and its coefficient of variation; "
        "IPIs = cross-CPU wake-up interrupts on the host per inference (server and client); "
        "others = host cores busy with neither server nor client",
        ["conc", "server", "lane", "CPU ms/infer", "infer/s", "spread", "p50 ms", "batch",
         "IPIs", "others", "fail"],
        rows,
    )  # fmt: skip
    rows = []
    for r in ratio_rows:
        s, ref = r["series"], r["reference"]
        rows.append([
            str(s[2]), f"{s[0]} {s[1]}", f"{ref[0]} {ref[1]}",
            *(f"{r[m]['median']:.2f} ({r[m]['min']:.2f}-{r[m]['max']:.2f})" if m in r else ""
              for m in ("cpu_ms_per_infer", "infer_per_s", "p50_ms")),
            f"{r['elasticity']:.2f}" if r.get("elasticity") == r.get("elasticity") else "",
            _fmt_spread_ratio(r.get("spread_ratio")),
        ])  # fmt: skip
    print_table(
        "ratios within each round, median (min-max); elasticity = how much the series' infer/s "
        "moves per unit its reference's moves over the rounds (log-log slope); spread = its cv "
        "of infer/s over the reference's (90% paired bootstrap interval over the rounds)",
        ["conc", "series", "vs", "CPU/infer", "infer/s", "p50", "elasticity", "spread"],
        rows,
    )


ORDER = KNOWN


def plot(summary: list[dict[str, Any]], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = sorted({(e["server"], e["lane"]) for e in summary if "infer_per_s" in e},
                    key=lambda s: (ORDER.index(s[0]) if s[0] in ORDER else 99, s[1]))  # fmt: skip
    levels = sorted({e["concurrency"] for e in summary})
    by_key = {(e["server"], e["lane"], e["concurrency"]): e for e in summary}
    colours = {"minimal": "tab:blue", "triton": "tab:green", "project": "tab:orange",
               "project-workers2": "tab:red", "project-http-workers2": "tab:brown",
               "minimal-poller": "tab:cyan", "project-eventengine": "tab:purple",
               "project-before": "tab:gray", "kserve": "tab:pink"}  # fmt: skip
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    width = 0.8 / max(len(series), 1)
    for i, (name, lane) in enumerate(series):
        for ax, metric in ((left, "infer_per_s"), (right, "cpu_ms_per_infer")):
            xs, ys, lo, hi = [], [], [], []
            for j, level in enumerate(levels):
                e = by_key.get((name, lane, level))
                if e and metric in e:
                    xs.append(j + (i - (len(series) - 1) / 2) * width)
                    ys.append(e[metric]["median"])
                    lo.append(e[metric]["median"] - e[metric]["min"])
                    hi.append(e[metric]["max"] - e[metric]["median"])
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, color=colours.get(name, "black"),
                   hatch="" if lane == "unary" else "//", edgecolor="black", linewidth=0.4,
                   label=f"{name}, {lane}")  # fmt: skip
    for ax in (left, right):
        ax.set_xticks(range(len(levels)), [f"c={c}" for c in levels])
        ax.grid(True, axis="y", alpha=0.3)
    left.set_ylabel("infer/s (median, bars: min-max over rounds)")
    right.set_ylabel("server CPU ms per inference (median, min-max)")
    left.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def round_lines(measured: list[dict[str, Any]]) -> str:
    """A round's figures, a line per server: each point's infer/s and CPU per inference."""
    by_server: dict[str, list[str]] = {}
    for r in measured:
        by_server.setdefault(r["server"], []).append(
            f"{r['lane']}@{r['concurrency']} {r.get('infer_per_s', 0):,.0f}/s "
            f"{r.get('cpu_ms_per_infer', float('nan')):.3f} ms"
        )
    return "\n".join(f"  {name}: {', '.join(points)}" for name, points in by_server.items())


def report(result: dict[str, Any]) -> None:
    """Print a run: its command, each round, the tables."""
    print(f"command: {result.get('command', '?')}")
    for index, measured in enumerate(result["rounds"], 1):
        print(f"round {index}/{len(result['rounds'])}")
        print(round_lines(measured))
    print_summary(result["summary"], ratios(result["rounds"], result["summary"]))
    load = result["machine"]["load_average_before"], result["machine"]["load_average_after"]
    print(f"\nload average before {load[0]}, after {load[1]}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report:
        report(json.loads(args.report.read_text()))
        return 0
    names = [s for s in args.servers.split(",") if s]
    unknown = [s for s in names if s not in KNOWN]
    if unknown:  # a misspelt name must not quietly measure the project under another label
        print(f"unknown server(s) {', '.join(unknown)}; known: {', '.join(ORDER)}", file=sys.stderr)
        return 2
    if "triton" in names and not triton_server.available():
        print("Triton is not installed (make triton): skipping it", file=sys.stderr)
        names.remove("triton")
    if "kserve" in names and not servers.KSERVE_PYTHON.exists():
        print("KServe is not installed (make kserve): skipping it", file=sys.stderr)
        names.remove("kserve")
    if args.perf_analyzer and not PERF_ANALYZER.exists():
        print(f"{PERF_ANALYZER} is missing (make tools): h2load only", file=sys.stderr)
        args.perf_analyzer = False
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "model": args.model,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "load_average_before": os.getloadavg()},
        "settings": {k: str(v) for k, v in vars(args).items()},
        "command": " ".join(sys.argv),
        "rounds": [],
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        request = infer_request(args.repository, args.model)
        frames = {"unary": Path(tmp) / "infer.grpc", "stream": Path(tmp) / "stream.grpc"}
        frames["unary"].write_bytes(grpc_frame(request))
        frames["stream"].write_bytes(grpc_frame(request) * args.stream_messages)
        frames["http"] = Path(tmp) / "infer.http"
        frames["http"].write_bytes(binary_request(args.repository, args.model)[0])
        for round_index in range(args.repeat):
            # rotate the order so that no server always starts first (or last) in a round
            order = names[round_index % len(names) :] + names[: round_index % len(names)]
            started = time.monotonic()
            measured = measure_round(order, args, frames)
            result["rounds"].append(measured)
            print(f"round {round_index + 1}/{args.repeat} ({time.monotonic() - started:.0f} s)")
            print(round_lines(measured), flush=True)
    result["machine"]["load_average_after"] = os.getloadavg()
    result["summary"] = summarise(result["rounds"])
    result["ratios"] = ratios(result["rounds"], result["summary"])
    print_summary(result["summary"], result["ratios"])
    load = result["machine"]["load_average_before"], result["machine"]["load_average_after"]
    print(f"\nload average before {load[0]}, after {load[1]}")
    json_path, png_path = args.out / "compare.json", args.out / "compare.png"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    title = (f"{args.model}, batch-1 requests, {args.repeat} round(s) x {args.seconds:g} s, "
             f"{os.cpu_count()} shared cores")  # fmt: skip
    plot(result["summary"], title, png_path)
    print(f"wrote {json_path} and {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
