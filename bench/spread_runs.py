"""How the spread of each server's throughput compared with the minimal server's over every saved
run of `bench/compare.py`, not only one: a single run's 12 rounds estimate a coefficient of
variation to about +-20%, so one run can read level by chance.

    .venv/bin/python -m bench.spread_runs [RUN.json ...]

For each run (by default every `bench/results/compare*.json`), each series measured beside the
minimal server at 16 and 64 in flight: its cv of infer/s over the minimal server's, with the 90%
paired bootstrap interval of `compare.py`, and whether the run could tell them apart. Then, per
series, how the runs fell. Prints both tables; writes bench/results/spread-runs.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from bench.compare import spread_ratio
from bench.loadgen import ROOT

RESULTS = ROOT / "bench" / "results"
REFERENCE = "minimal"


def pairs(
    run: dict[str, Any], series: str, lane: str, concurrency: int
) -> list[tuple[float, float]]:
    """(series' lane, minimal server's unary) infer/s, round by round."""
    found = []
    for measured in run.get("rounds", []):
        rows = {(r["server"], r["lane"], r["concurrency"]): r for r in measured if "error" not in r}
        a, b = rows.get((series, lane, concurrency)), rows.get((REFERENCE, "unary", concurrency))
        if a and b and a.get("infer_per_s") and b.get("infer_per_s"):
            found.append((a["infer_per_s"], b["infer_per_s"]))
    return found


def verdict(ratio: dict[str, float]) -> str:
    if ratio["low"] > 1:
        return "wider"
    return "narrower" if ratio["high"] < 1 else "level"


def rows_of(paths: list[Path]) -> list[dict[str, Any]]:
    rows = []
    for path in paths:
        run = json.loads(path.read_text())
        if not run.get("rounds"):
            continue
        in_turns = int(run.get("settings", {}).get("slices", 1) or 1) > 1
        lanes = sorted({(r["server"], r["lane"]) for m in run["rounds"] for r in m if "lane" in r})
        for name, lane in lanes:
            if (
                name == REFERENCE
                or lane == "stream"
                or not name.startswith(("project", "minimal-"))
            ):
                continue
            for concurrency in (16, 64):
                measured = pairs(run, name, lane, concurrency)
                ratio = spread_ratio(measured)
                if ratio:
                    series = name if lane == "unary" else f"{name} ({lane})"
                    rows.append({"run": path.stem, "turns": in_turns, "series": series,
                                 "concurrency": concurrency, "rounds": len(measured), **ratio,
                                 "verdict": verdict(ratio)})  # fmt: skip
    return rows


def tables(rows: list[dict[str, Any]]) -> str:
    lines = ["| run | in turns | series | in flight | rounds | cv over the minimal server's "
             "(90% interval) | |", "| --- | --- | --- | ---: | ---: | ---: | --- |"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['run']} | {'yes' if r['turns'] else 'no'} | {r['series']} | "
                     f"{r['concurrency']} | {r['rounds']} | {r['ratio']:.2f} ({r['low']:.2f}-"
                     f"{r['high']:.2f}) | {r['verdict']} |")  # fmt: skip
    lines += ["", "| series | in flight | runs | median ratio | narrower / level / wider beyond "
              "doubt |", "| --- | ---: | ---: | ---: | --- |"]  # fmt: skip
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["series"], r["concurrency"]), []).append(r)
    for (series, concurrency), group in sorted(groups.items()):
        count = {v: sum(r["verdict"] == v for r in group) for v in ("narrower", "level", "wider")}
        median = statistics.median(r["ratio"] for r in group)
        lines.append(
            f"| {series} | {concurrency} | {len(group)} | {median:.2f} | "
            f"{count['narrower']} / {count['level']} / {count['wider']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "runs",
        nargs="*",
        type=Path,
        help="saved runs of bench/compare.py (default: bench/results/compare*.json)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=RESULTS / "spread-runs.md",
        help="the tables (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    paths = args.runs or sorted(RESULTS.glob("compare*.json"))
    text = tables(rows_of(paths))
    print(text)
    args.out.write_text(
        "# Each server's spread over the minimal server's, run by run (`python -m "
        "bench.spread_runs`)\n\nThe runs are described in their own `.md` files; `project` is "
        "the default configuration of the commit each was measured on.\n\n" + text + "\n"
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
