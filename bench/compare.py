"""The project's server beside its reference points, in one run: a minimal server of the same
design (bench/minimal_server.py) and real NVIDIA Triton 2.51 (bench/triton_server.py).

    .venv/bin/python -m bench.compare --repository model_repository [--repeat 3] [--quick]

Each server serves the same ONNX file; each is measured at concurrency 1, 16, 64 with h2load
(one HTTP/2 connection replaying a pre-built batch-1 ModelInfer frame; the cheapest client) and
with perf_analyzer (ModelInfer; on the project also ModelStreamInfer at 16 and 64). Server CPU
(cores, the process and its children, from /proc) is read around every h2load and perf_analyzer
run. Repeats interleave the servers so that drift on a shared machine hits them alike. Prints a
table (median and min-max over repeats); writes bench/results/compare.json and compare.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc

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
from pb import grpc_service_pb2 as pb
from pb import grpc_service_pb2_grpc as pb_grpc
from training.cli import HelpFormatter

ROOT = Path(__file__).resolve().parent.parent

SERVERS = ("minimal", "triton", "project")
# Extra project configurations one can add to --servers, e.g. to test a hypothesis in the same run.
VARIANTS = {
    "project-nofastpath": ["--latency-threads", "0"],
    "project-fastpath1": ["--latency-threads", "1"],
    "project-before": [],  # needs --before: a checkout of an older commit (git worktree add)
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=HelpFormatter
    )
    parser.add_argument("--repository", type=Path, default=ROOT / "model_repository",
                        help="model repository (default: model_repository)")  # fmt: skip
    parser.add_argument("--model", default="mnist_cnn", help="model (default: mnist_cnn)")
    parser.add_argument("--servers", default=",".join(SERVERS),
                        help=f"servers to measure (default: {','.join(SERVERS)}; also "
                        f"{', '.join(VARIANTS)})")  # fmt: skip
    parser.add_argument("--concurrency", default="1,16,64",
                        help="streams in flight (default: 1,16,64)")  # fmt: skip
    parser.add_argument("--stream-concurrency", default="16,64",
                        help="perf_analyzer --streaming levels on the project (default: 16,64)")  # fmt: skip
    parser.add_argument(
        "--repeat", type=int, default=3, help="rounds over all servers (default: 3)"
    )
    parser.add_argument("--seconds", type=float, default=5.0,
                        help="h2load measurement seconds per point (default: 5)")  # fmt: skip
    parser.add_argument("--measurement-ms", type=int, default=2000,
                        help="perf_analyzer measurement window (default: 2000)")  # fmt: skip
    parser.add_argument("--no-perf-analyzer", action="store_true", help="h2load only")
    parser.add_argument("--server-args", default="",
                        help="extra flags for python -m service, e.g. '--batching delay'")  # fmt: skip
    parser.add_argument(
        "--before",
        type=Path,
        default=None,
        help="for the project-before server: a checkout of an older commit "
        "(git worktree add DIR REV; generate its pb/ with proto/generate.py)",
    )
    parser.add_argument("--quick", action="store_true",
                        help="one round, 2 s per h2load point, 1 s perf_analyzer windows")  # fmt: skip
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results",
                        help="output folder (default: bench/results)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.quick:
        args.repeat, args.seconds, args.measurement_ms = 1, 2.0, 1000
    return args


@contextmanager
def server(name: str, args: argparse.Namespace) -> Iterator[tuple[str, int]]:
    """Start one of SERVERS; yield (address, pid)."""
    if name == "triton":
        with triton_server.running_triton(args.repository, args.model) as (address, proc):
            yield address, proc.pid
        return
    port = free_port()
    address = f"127.0.0.1:{port}"
    if name == "minimal":
        cmd = [sys.executable, str(ROOT / "bench" / "minimal_server.py"), "--repository",
               str(args.repository), "--model", args.model, "--port", str(port)]  # fmt: skip
    else:
        extra = [*VARIANTS.get(name, []), *args.server_args.split()]
        cmd = project_command(args.repository, port, *extra)
        if name == "project-before":  # the same command, run from an older checkout's code
            start = f"import sys; sys.path.insert(0, {str(args.before)!r}); "
            start += "from service.__main__ import main; sys.exit(main())"
            cmd[1:3] = ["-c", start]
    with running_process(cmd, address, args.model) as proc:
        yield address, proc.pid


def executed(address: str, model: str) -> tuple[int, int]:
    """(images, batches) executed so far, from ModelStatistics (all three servers answer it)."""
    with grpc.insecure_channel(address) as channel:
        stats = pb_grpc.GRPCInferenceServiceStub(channel).ModelStatistics(
            pb.ModelStatisticsRequest(name=model), timeout=10).model_stats  # fmt: skip
    return sum(s.inference_count for s in stats), sum(s.execution_count for s in stats)


def measure(name: str, args: argparse.Namespace, frame: Path) -> dict[str, list[dict]]:
    """Every point for one server, started fresh."""
    levels = [int(c) for c in args.concurrency.split(",")]
    rows: dict[str, list[dict]] = {"h2load": [], "perf_analyzer": []}
    with server(name, args) as (address, pid):
        request = infer_request(args.repository, args.model)
        response_bytes = response_frame_size(address, request)
        h2load(address, frame, response_bytes, 16, 1.0)  # warm the server up
        for concurrency in levels:
            before = executed(address, args.model)
            with CpuMeter(pid) as cpu:
                row = h2load(address, frame, response_bytes, concurrency, args.seconds)
            images, batches = (
                a - b for a, b in zip(executed(address, args.model), before, strict=True)
            )
            row["avg_batch"] = images / batches if batches else float("nan")
            rows["h2load"].append({**row, "server_cores": cpu.cores})
        if not args.no_perf_analyzer:
            for concurrency in levels:
                with CpuMeter(pid) as cpu:
                    row = perf_analyzer(address, args.model, concurrency, args.measurement_ms)
                rows["perf_analyzer"].append({**row, "server_cores": cpu.cores})
            if name == "project":
                rows["perf_analyzer_streaming"] = []
                for concurrency in [int(c) for c in args.stream_concurrency.split(",") if c]:
                    with CpuMeter(pid) as cpu:
                        row = perf_analyzer(address, args.model, concurrency, args.measurement_ms,
                                            streaming=True)  # fmt: skip
                    rows["perf_analyzer_streaming"].append({**row, "server_cores": cpu.cores})
    return rows


def summarise(rounds: list[dict[str, dict[str, list[dict]]]]) -> list[dict[str, Any]]:
    """One row per (server, client, concurrency): median and range of throughput and CPU."""
    table: dict[tuple[str, str, int], list[dict]] = {}
    for measured in rounds:
        for name, clients in measured.items():
            for client, rows in clients.items():
                for row in rows:
                    table.setdefault((name, client, row["concurrency"]), []).append(row)
    summary = []
    for (name, client, concurrency), rows in table.items():
        good = [r for r in rows if "error" not in r]
        entry: dict[str, Any] = {"server": name, "client": client, "concurrency": concurrency,
                                 "runs": len(rows), "errors": len(rows) - len(good)}  # fmt: skip
        if good:
            rates = [r["infer_per_s"] for r in good]
            cores = [r["server_cores"] for r in good]
            entry.update(
                infer_per_s=statistics.median(rates), infer_per_s_min=min(rates),
                infer_per_s_max=max(rates), server_cores=statistics.median(cores),
                server_cores_min=min(cores), server_cores_max=max(cores),
                cpu_ms_per_infer=statistics.median(
                    1000 * r["server_cores"] / r["infer_per_s"] for r in good if r["infer_per_s"]),
                latency_ms=statistics.median(r.get("p50_ms", r.get("mean_ms", 0)) for r in good),
                failed=sum(r.get("failed", 0) for r in good),
                avg_batch=statistics.median(r.get("avg_batch", float("nan")) for r in good),
            )  # fmt: skip
        summary.append(entry)
    return summary


def print_summary(summary: list[dict[str, Any]]) -> None:
    rows = []
    for e in summary:
        if "infer_per_s" not in e:
            rows.append(
                [e["server"], e["client"], str(e["concurrency"]), "error", "", "", "", "", ""]
            )
            continue
        rows.append([
            e["server"], e["client"].replace("perf_analyzer", "perf_an."), str(e["concurrency"]),
            f"{e['infer_per_s']:,.0f}", f"{e['infer_per_s_min']:,.0f}-{e['infer_per_s_max']:,.0f}",
            f"{e['server_cores']:.2f}", f"{e['cpu_ms_per_infer']:.3f}", f"{e['latency_ms']:.2f}",
            "" if e["avg_batch"] != e["avg_batch"] else f"{e['avg_batch']:.1f}",
            str(e["failed"] + e["errors"]),
        ])  # fmt: skip
    print_table(
        "batch-1 mnist_cnn, one HTTP/2 connection (h2load latency: mean; perf_analyzer: p50)",
        [
            "server",
            "client",
            "conc",
            "infer/s",
            "range",
            "cores",
            "CPU ms/infer",
            "lat ms",
            "batch",
            "fail",
        ],
        rows,
    )
    by_key = {(e["server"], e["client"], e["concurrency"]): e for e in summary}
    print("\nproject / minimal, project / triton (median infer/s, h2load):")
    for concurrency in sorted({e["concurrency"] for e in summary}):
        project = by_key.get(("project", "h2load", concurrency), {}).get("infer_per_s")
        parts = []
        for other in ("minimal", "triton"):
            ref = by_key.get((other, "h2load", concurrency), {}).get("infer_per_s")
            if project and ref:
                parts.append(f"{project / ref:.2f}x {other}")
        if parts:
            print(f"  c={concurrency}: {', '.join(parts)}")


ORDER = (*SERVERS, *VARIANTS)


def plot(summary: list[dict[str, Any]], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = sorted({(e["server"], e["client"]) for e in summary if "infer_per_s" in e},
                    key=lambda s: (ORDER.index(s[0]), s[1]))  # fmt: skip
    levels = sorted({e["concurrency"] for e in summary})
    by_key = {(e["server"], e["client"], e["concurrency"]): e for e in summary}
    colours = {"minimal": "tab:blue", "triton": "tab:green", "project": "tab:orange",
               "project-nofastpath": "tab:red", "project-fastpath1": "tab:purple",
               "project-before": "tab:gray"}  # fmt: skip
    hatches = {"h2load": "", "perf_analyzer": "//", "perf_analyzer_streaming": "xx"}
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    width = 0.8 / max(len(series), 1)
    for i, (name, client) in enumerate(series):
        xs, ys, lo, hi, cpu = [], [], [], [], []
        for j, level in enumerate(levels):
            e = by_key.get((name, client, level))
            if e and "infer_per_s" in e:
                xs.append(j + (i - (len(series) - 1) / 2) * width)
                ys.append(e["infer_per_s"])
                lo.append(e["infer_per_s"] - e["infer_per_s_min"])
                hi.append(e["infer_per_s_max"] - e["infer_per_s"])
                cpu.append(e["cpu_ms_per_infer"])
        label = f"{name}, {client.replace('_', ' ')}"
        style = {"color": colours[name], "hatch": hatches.get(client, ""), "edgecolor": "black",
                 "linewidth": 0.4, "label": label}  # fmt: skip
        left.bar(xs, ys, width, yerr=[lo, hi], capsize=2, **style)
        right.bar(xs, cpu, width, **style)
    for ax in (left, right):
        ax.set_xticks(range(len(levels)), [f"c={c}" for c in levels])
        ax.grid(True, axis="y", alpha=0.3)
    left.set_ylabel("infer/s (median, bars: min-max over repeats)")
    right.set_ylabel("server CPU ms per inference (median)")
    left.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = [s for s in args.servers.split(",") if s]
    if "triton" in names and not triton_server.available():
        print("Triton is not installed (make triton): skipping it", file=sys.stderr)
        names.remove("triton")
    if not args.no_perf_analyzer and not PERF_ANALYZER.exists():
        print(f"{PERF_ANALYZER} is missing (make tools): h2load only", file=sys.stderr)
        args.no_perf_analyzer = True
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "model": args.model,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "load_average_before": os.getloadavg()},
        "settings": {k: str(v) for k, v in vars(args).items()},
        "rounds": [],
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        frame = Path(tmp) / "infer.grpc"
        frame.write_bytes(grpc_frame(infer_request(args.repository, args.model)))
        for round_index in range(args.repeat):
            measured = {}
            # rotate the order so that no server always runs first (or last) in a round
            order = names[round_index % len(names) :] + names[: round_index % len(names)]
            for name in order:
                print(f"round {round_index + 1}/{args.repeat}: {name} ...", flush=True)
                started = time.monotonic()
                measured[name] = measure(name, args, frame)
                print(f"  {time.monotonic() - started:.0f} s", flush=True)
            result["rounds"].append(measured)
    result["machine"]["load_average_after"] = os.getloadavg()
    result["summary"] = summarise(result["rounds"])
    print_summary(result["summary"])
    load = result["machine"]["load_average_before"], result["machine"]["load_average_after"]
    print(f"\nload average before {load[0]}, after {load[1]}")
    json_path, png_path = args.out / "compare.json", args.out / "compare.png"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    title = (f"{args.model}, batch-1 ModelInfer over one HTTP/2 connection, {args.repeat} round(s), "
             f"{os.cpu_count()} shared cores")  # fmt: skip
    plot(result["summary"], title, png_path)
    print(f"wrote {json_path} and {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
