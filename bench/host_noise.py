"""How steady this machine's CPUs are: one process pinned to each CPU repeats a fixed piece of
Python work and counts how much it gets done in each short window.

    .venv/bin/python -m bench.host_noise [--seconds 30] [--window-ms 250]

On a virtual machine that shares its host, the speed a CPU delivers can swing from one window to
the next with what the host's other guests do, while the guest sees neither steal time nor a
busy CPU. A throughput figure is only as steady as the CPUs under it, so run this before trusting
a comparison (bench/compare.py): it prints, per CPU, the work per window relative to its median
(lowest, highest, coefficient of variation), and how far the CPUs' windows move together
(correlation 1: the whole host slows at once; 0: each CPU on its own). Writes
bench/results/host_noise.json and host_noise.png (each CPU's speed over time).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench.loadgen import print_table, variation
from training.cli import HelpFormatter

ROOT = Path(__file__).resolve().parent.parent
UNIT = 1000  # loop iterations per unit of work: short enough to check the clock often


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=HelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=30.0,
                        help="how long to measure (default: 30)")  # fmt: skip
    parser.add_argument("--window-ms", type=float, default=250.0,
                        help="length of one window (default: 250)")  # fmt: skip
    parser.add_argument("--cpus", default="",
                        help="CPUs to probe, e.g. 0,1 (default: every CPU this process may use)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results",
                        help="output folder (default: bench/results)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.window_ms <= 0:
        parser.error("--seconds and --window-ms must be positive")
    return args


def probe(cpu: int, start: float, seconds: float, window_s: float) -> list[int]:
    """(In a child process pinned to `cpu`) units of work done in each window, from `start`
    (a shared clock reading, so every CPU's windows line up) for `seconds`."""
    os.sched_setaffinity(0, {cpu})
    while time.monotonic() < start:
        pass
    counts: list[int] = []
    for index in range(int(seconds / window_s)):
        stop = start + (index + 1) * window_s
        done = 0
        while time.monotonic() < stop:
            for _ in range(UNIT):
                pass
            done += 1
        counts.append(done)
    return counts


def correlation(a: list[float], b: list[float]) -> float:
    """Pearson's r; 0 where either series does not move."""
    try:
        return statistics.correlation(a, b)
    except statistics.StatisticsError:
        return 0.0


def summarise(counts: dict[int, list[int]]) -> dict[str, Any]:
    """Per CPU: each window's work over that CPU's median, and its spread; the CPUs' pairwise
    correlations."""
    relative = {cpu: [c / (statistics.median(v) or 1) for c in v] for cpu, v in counts.items() if v}
    per_cpu = {
        cpu: {
            "median_units": statistics.median(counts[cpu]),
            "lowest": min(r),
            "highest": max(r),
            "cv": variation(r),
        }
        for cpu, r in relative.items()
    }
    cpus = sorted(relative)
    pairs = {
        f"{a}-{b}": correlation(relative[a], relative[b])
        for i, a in enumerate(cpus)
        for b in cpus[i + 1 :]
    }
    return {"relative": relative, "per_cpu": per_cpu, "correlation": pairs}


def plot(relative: dict[int, list[float]], window_s: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3.2))
    for cpu, series in sorted(relative.items()):
        ax.plot([i * window_s for i in range(len(series))], series, lw=1, label=f"CPU {cpu}")
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.set_xlabel("seconds")
    ax.set_ylabel("work per window / median")
    ax.set_title(f"Speed each CPU delivered, {window_s * 1000:g} ms windows, all CPUs busy")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    allowed = sorted(os.sched_getaffinity(0))
    cpus = [int(c) for c in args.cpus.split(",") if c] if args.cpus else allowed
    missing = [c for c in cpus if c not in allowed]
    if missing:
        print(f"CPU(s) {missing} not available here (allowed: {allowed})", file=sys.stderr)
        return 2
    window_s = args.window_ms / 1000
    start = time.monotonic() + 0.5  # every process pinned and waiting before the first window
    with multiprocessing.get_context("spawn").Pool(len(cpus)) as pool:
        jobs = {c: pool.apply_async(probe, (c, start, args.seconds, window_s)) for c in cpus}
        counts = {c: job.get(timeout=args.seconds + 60) for c, job in jobs.items()}
    result = summarise(counts)
    print_table(
        f"work per {args.window_ms:g} ms window relative to each CPU's median, {args.seconds:g} s, "
        "every CPU busy",
        ["cpu", "windows", "lowest", "highest", "cv"],
        [
            [str(c), str(len(counts[c])), f"{s['lowest']:.2f}", f"{s['highest']:.2f}",
             f"{s['cv']:.3f}"]
            for c, s in result["per_cpu"].items()
        ],
    )  # fmt: skip
    if result["correlation"]:
        print("\ncorrelation between CPUs (1: they slow together; 0: each on its own)")
        for pair, r in result["correlation"].items():
            print(f"  CPU {pair}: {r:+.2f}")
    args.out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = args.out / "host_noise.json", args.out / "host_noise.png"
    document = {
        "command": " ".join(sys.argv),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "settings": {"seconds": args.seconds, "window_ms": args.window_ms, "cpus": cpus},
        "counts": {str(c): v for c, v in counts.items()},
        "per_cpu": {str(c): v for c, v in result["per_cpu"].items()},
        "correlation": result["correlation"],
    }
    json_path.write_text(json.dumps(document, indent=2) + "\n")
    plot(result["relative"], window_s, png_path)
    print(f"wrote {json_path} and {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
