"""System shared memory against tensors in the message: perf_analyzer `--shared-memory none`
against `system`, for a small request (mnist_cnn, batch 1: 3 KB) and a large one (batch 64:
200 KB), on one server in one run.

    .venv/bin/python bench/shared_memory.py --repository model_repository
        [--batches 1,64] [--concurrency 1,16] [--repeats 3] [--seconds 3]

The points go round-robin over repeats x batches x concurrency x mode, so busy moments of a
shared machine fall on both modes. Reports the median infer/s and p50 latency per point with
their spread, and the ratio system / none. Writes bench/results/shared_memory.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.loadgen import CUDA_RUNTIME_LIB, PERF_ANALYZER, print_table, running_server  # noqa: E402
from training.cli import HelpFormatter  # noqa: E402

MODES = ("none", "system")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=HelpFormatter
    )
    parser.add_argument(
        "--repository", type=Path, default=ROOT / "model_repository", help="model repository"
    )
    parser.add_argument("--model", default="mnist_cnn", help="model to measure")
    parser.add_argument("--batches", default="1,64", help="batch sizes (perf_analyzer -b)")
    parser.add_argument("--concurrency", default="1,16", help="concurrency levels")
    parser.add_argument("--seconds", type=float, default=3.0, help="measurement interval")
    parser.add_argument("--repeats", type=int, default=3, help="rounds over every point")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results", help="output folder"
    )
    return parser.parse_args(argv)


def perf_analyzer(
    address: str, model: str, batch: int, concurrency: int, mode: str, seconds: float
) -> dict[str, Any]:
    """One perf_analyzer measurement; its CSV line as numbers (or the error)."""
    env = {**os.environ, "LD_LIBRARY_PATH": str(CUDA_RUNTIME_LIB)}
    with tempfile.NamedTemporaryFile(suffix=".csv") as report:
        cmd = [
            str(PERF_ANALYZER), "-m", model, "-i", "grpc", "-u", address, "-b", str(batch),
            "--concurrency-range", f"{concurrency}:{concurrency}",
            "--shared-memory", mode, "--output-shared-memory-size", str(1 << 20),
            "--measurement-interval", str(int(seconds * 1000)),
            "--stability-percentage", "1000", "--max-trials", "6", "-f", report.name,
        ]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        if done.returncode != 0:
            return {"error": (done.stdout + done.stderr)[-500:]}
        with open(report.name) as handle:
            line = next(csv.DictReader(handle))
    return {
        "infer_per_s": float(line["Inferences/Second"]),
        "p50_ms": float(line["p50 latency"]) / 1000,
        "p99_ms": float(line["p99 latency"]) / 1000,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    levels = [int(c) for c in args.concurrency.split(",")]
    samples: dict[tuple[int, int, str], list[dict[str, Any]]] = {}
    started = time.time()
    with running_server(args.repository) as address:
        for _ in range(args.repeats):
            for batch in batches:
                for concurrency in levels:
                    for mode in MODES:
                        row = perf_analyzer(
                            address, args.model, batch, concurrency, mode, args.seconds
                        )
                        if "error" in row:
                            print(f"b={batch} c={concurrency} {mode}: {row['error']}")
                            continue
                        samples.setdefault((batch, concurrency, mode), []).append(row)
    points = []
    for batch in batches:
        for concurrency in levels:
            point: dict[str, Any] = {"batch": batch, "concurrency": concurrency}
            for mode in MODES:
                runs = samples.get((batch, concurrency, mode), [])
                rates = [r["infer_per_s"] for r in runs]
                p50 = [r["p50_ms"] for r in runs]
                point[mode] = {
                    "runs": runs,
                    "infer_per_s": statistics.median(rates) if rates else None,
                    "infer_per_s_range": [min(rates), max(rates)] if rates else None,
                    "p50_ms": statistics.median(p50) if p50 else None,
                }
            none, system = point["none"]["infer_per_s"], point["system"]["infer_per_s"]
            point["throughput_ratio"] = system / none if none and system else None
            if point["none"]["p50_ms"] and point["system"]["p50_ms"]:
                point["p50_ratio"] = point["system"]["p50_ms"] / point["none"]["p50_ms"]
            points.append(point)
    rows = [
        [
            str(p["batch"]),
            str(p["concurrency"]),
            *(
                f"{p[m]['infer_per_s']:.0f} ({p[m]['infer_per_s_range'][0]:.0f}-"
                f"{p[m]['infer_per_s_range'][1]:.0f})"
                if p[m]["infer_per_s"]
                else "-"
                for m in MODES
            ),
            f"{p['throughput_ratio']:.2f}" if p["throughput_ratio"] else "-",
            f"{p.get('p50_ratio', 0):.2f}",
        ]
        for p in points
    ]
    print_table(
        f"{args.model}: infer/s, median (range) of {args.repeats} runs",
        ["batch", "conc", "none", "system", "thr ratio", "p50 ratio"],
        rows,
    )
    result = {
        "what": "perf_analyzer --shared-memory none vs system, one server, round-robin",
        "command": "perf_analyzer -m MODEL -i grpc -b B --concurrency-range C:C "
        "--shared-memory {none,system} --output-shared-memory-size 1048576",
        "model": args.model,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "seconds_per_run": args.seconds,
        "repeats": args.repeats,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "points": points,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "shared_memory.json").write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
