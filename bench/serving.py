"""Serving speed: raw ONNX Runtime in-process (the ceiling) beside the server under perf_analyzer.

    .venv/bin/python -m bench.serving --repository model_repository [--model mnist_cnn]

One run measures ONNX Runtime alone at batch 1, 8, 32, 128 and `python -m service` driven by
perf_analyzer (tools venv) at concurrency 1, 4, 16, 64, reading the average executed batch from
ModelStatistics. Prints a table; writes bench/results/serving.json and serving.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort

from bench.loadgen import (
    PERF_ANALYZER,
    perf_analyzer,
    print_table,
    running_server,
)
from bench.reference_cli import latest_model
from pb import grpc_service_pb2 as pb
from pb import grpc_service_pb2_grpc as pb_grpc
from service.core.runtime import session_options
from training.cli import HelpFormatter

ROOT = Path(__file__).resolve().parent.parent

TARGETS = {"p50_ms_at_c1": 1.0, "infer_per_s_at_c16": 3500, "avg_batch_at_c16": 4}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=HelpFormatter
    )
    parser.add_argument(
        "--repository",
        type=Path,
        default=ROOT / "model_repository",
        help="model repository (default: model_repository)",
    )
    parser.add_argument(
        "--model", default="mnist_cnn", help="model to measure (default: mnist_cnn)"
    )
    parser.add_argument(
        "--batches", default="1,8,32,128", help="ONNX Runtime batch sizes (default: 1,8,32,128)"
    )
    parser.add_argument(
        "--concurrency",
        default="1,4,16,64",
        help="perf_analyzer concurrency levels (default: 1,4,16,64)",
    )
    parser.add_argument(
        "--ort-threads",
        type=int,
        default=1,
        help="intra-op threads for raw ONNX Runtime and the server (default: 1)",
    )
    parser.add_argument(
        "--ort-seconds",
        type=float,
        default=2.0,
        help="seconds per raw ONNX Runtime batch size (default: 2)",
    )
    parser.add_argument(
        "--measurement-ms",
        type=int,
        default=3000,
        help="perf_analyzer measurement window in ms (default: 3000)",
    )
    parser.add_argument(
        "--stability",
        type=int,
        default=25,
        help="perf_analyzer stability percentage (default: 25; a shared box is noisy)",
    )
    parser.add_argument(
        "--streaming",
        action="store_true",
        help="also measure ModelStreamInfer (perf_analyzer --streaming)",
    )
    parser.add_argument(
        "--server-args",
        default="",
        help="extra flags for python -m service, e.g. '--batching delay'",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="short run: 0.5 s per batch size, concurrency 1,16, 1 s windows",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "bench" / "results",
        help="output folder (default: bench/results)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.ort_seconds, args.concurrency, args.measurement_ms = 0.5, "1,16", 1000
    return args


def measure_ort(model_file: Path, batches: list[int], threads: int, seconds: float) -> list[dict]:
    """Run the ONNX file in-process: throughput and per-call latency at each batch size."""
    options = session_options(threads)
    session = ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    shape = [d if isinstance(d, int) else 1 for d in session.get_inputs()[0].shape[1:]]
    rows = []
    for batch in batches:
        x = np.random.default_rng(0).random((batch, *shape), dtype=np.float32)
        for _ in range(3):
            session.run(None, {name: x})
        latencies = []
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            start = time.perf_counter()
            session.run(None, {name: x})
            latencies.append(time.perf_counter() - start)
        ms = np.array(latencies) * 1000
        rows.append({
            "batch": batch,
            "calls": len(ms),
            "images_per_s": batch * len(ms) / float(np.sum(ms) / 1000),
            "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)),
        })  # fmt: skip
    return rows


def statistics(address: str, model: str) -> tuple[int, int]:
    """(inference_count, execution_count) of the model's newest version."""
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name=model)).model_stats[-1]
    return stats.inference_count, stats.execution_count


def measure_server(address: str, args: argparse.Namespace, streaming: bool) -> list[dict]:
    """perf_analyzer at each concurrency, with the executed batch size from ModelStatistics."""
    rows = []
    for concurrency in [int(c) for c in args.concurrency.split(",")]:
        before = statistics(address, args.model)
        row = perf_analyzer(address, args.model, concurrency, args.measurement_ms, args.stability,
                            streaming=streaming)  # fmt: skip
        if "error" in row:
            print(row["error"], file=sys.stderr)
        after = statistics(address, args.model)
        images, batches = after[0] - before[0], after[1] - before[1]
        rows.append({**row, "avg_executed_batch": images / batches if batches else 0.0})
    return rows


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ort_rows = result["onnxruntime"]
    ax.plot([r["images_per_s"] for r in ort_rows], [r["p50_ms"] for r in ort_rows], "s--",
            label=f"ONNX Runtime in-process ({result['ort_threads']} thread), per call")  # fmt: skip
    for r in ort_rows:
        ax.annotate(f"b={r['batch']}", (r["images_per_s"], r["p50_ms"]), fontsize=8)
    for key, label in (("server", "server, ModelInfer"), ("server_streaming", "server, stream")):
        rows = [r for r in result.get(key, []) if "error" not in r]
        if not rows:
            continue
        ax.plot([r["infer_per_s"] for r in rows], [r["p50_ms"] for r in rows], "o-",
                label=f"{label} (perf_analyzer p50)")  # fmt: skip
        for r in rows:
            ax.annotate(f"c={r['concurrency']}", (r["infer_per_s"], r["p50_ms"]), fontsize=8)
    ax.axhline(TARGETS["p50_ms_at_c1"], color="grey", ls=":", lw=1)
    ax.axvline(TARGETS["infer_per_s_at_c16"], color="grey", ls=":", lw=1)
    ax.annotate("targets: p50 < 1 ms at c=1, 3,500/s at c=16", (TARGETS["infer_per_s_at_c16"], 1.0),
                fontsize=7, color="grey", xytext=(4, 4), textcoords="offset points")  # fmt: skip
    ax.set_xlabel("throughput (images/s)")
    ax.set_ylabel("p50 latency (ms)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(f"{result['model']}: throughput vs latency ({os.cpu_count()} cores, shared)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not PERF_ANALYZER.exists():
        print(f"{PERF_ANALYZER} is missing: run `make tools`", file=sys.stderr)
        return 2
    model_file = latest_model(args.repository, args.model)
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "model": args.model,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "load_average_before": os.getloadavg()},
        "onnxruntime_version": ort.__version__,
        "ort_threads": args.ort_threads,
        "targets": TARGETS,
    }  # fmt: skip
    batches = [int(b) for b in args.batches.split(",")]
    print(f"ONNX Runtime in-process, {args.ort_threads} intra-op thread(s) ...", flush=True)
    result["onnxruntime"] = measure_ort(model_file, batches, args.ort_threads, args.ort_seconds)
    server_flags = ["--intra-op-threads", str(args.ort_threads), *args.server_args.split()]
    with running_server(args.repository, *server_flags) as address:
        print(f"server at {address} under perf_analyzer ...", flush=True)
        result["server"] = measure_server(address, args, streaming=False)
        if args.streaming:
            result["server_streaming"] = measure_server(address, args, streaming=True)
    result["machine"]["load_average_after"] = os.getloadavg()

    print_table(
        f"ONNX Runtime in-process ({args.model}, {args.ort_threads} thread)",
        ["batch", "images/s", "p50 ms/call", "p99 ms/call"],
        [[str(r["batch"]), f"{r['images_per_s']:.0f}", f"{r['p50_ms']:.3f}", f"{r['p99_ms']:.3f}"]
         for r in result["onnxruntime"]],
    )  # fmt: skip
    for key in ("server", "server_streaming"):
        if key not in result:
            continue
        print_table(
            f"cnnserve under perf_analyzer ({'ModelStreamInfer' if 'stream' in key else 'ModelInfer'})",
            ["concurrency", "infer/s", "p50 ms", "p90 ms", "p99 ms", "queue ms", "compute ms", "avg batch"],
            [[str(r["concurrency"]), f"{r['infer_per_s']:.0f}", f"{r['p50_ms']:.2f}",
              f"{r['p90_ms']:.2f}", f"{r['p99_ms']:.2f}", f"{r['server_queue_ms']:.2f}",
              f"{r['server_compute_ms']:.2f}", f"{r['avg_executed_batch']:.1f}"]
             if "error" not in r else [str(r["concurrency"]), "error", "", "", "", "", "", ""]
             for r in result[key]],
        )  # fmt: skip
    print(f"\nload average before {result['machine']['load_average_before']}, "
          f"after {result['machine']['load_average_after']}")  # fmt: skip
    json_path = args.out / "serving.json"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    png_path = args.out / "serving.png"
    plot(result, png_path)
    print(f"wrote {json_path} and {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
