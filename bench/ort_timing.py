"""ONNX Runtime alone, in-process: CPU and wall time per image by batch size and session options.

    .venv/bin/python bench/ort_timing.py --repository model_repository [--batches 1,5,16,32]

The reference for what a batch should cost inside the server. For each variant (session options,
the way of calling the session) and batch size, runs the session repeatedly on this thread and
reports the median over `--repeat` blocks of process CPU time (`time.process_time_ns`, every
ORT thread included, which a shared host's preemption does not inflate) and wall time per image. Variants interleave per
block so that drift hits them alike. Writes bench/results/ort_timing.json.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.loadgen import model_parser, print_table  # noqa: E402
from bench.reference_cli import latest_model  # noqa: E402

Runner = Callable[[np.ndarray], object]


def session(path: Path, **config: Any) -> ort.InferenceSession:
    """A CPU session with one intra-op thread unless `config` says otherwise."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = config.get("intra", 1)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    if "spinning" in config:
        flag = "1" if config["spinning"] else "0"
        options.add_session_config_entry("session.intra_op.allow_spinning", flag)
        options.add_session_config_entry("session.inter_op.allow_spinning", flag)
    if config.get("no_arena"):
        options.enable_cpu_mem_arena = False
    if config.get("no_pattern"):
        options.enable_mem_pattern = False
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def plain(sess: ort.InferenceSession) -> Runner:
    """session.run(None, {input: x}): what the server does."""
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: x})


def bound(sess: ort.InferenceSession) -> Runner:
    """IO binding with the outputs pre-allocated per batch size (numpy memory bound in place)."""
    name = sess.get_inputs()[0].name
    outputs = sess.get_outputs()
    cache: dict[int, tuple[ort.IOBinding, list[np.ndarray]]] = {}

    def run(x: np.ndarray) -> object:
        n = x.shape[0]
        if n not in cache:
            binding = sess.io_binding()
            arrays = [np.empty((n, *o.shape[1:]), dtype=np.float32) for o in outputs]
            for o, a in zip(outputs, arrays, strict=True):
                binding.bind_output(o.name, "cpu", 0, np.float32, list(a.shape), a.ctypes.data)
            cache[n] = binding, arrays
        binding, arrays = cache[n]
        binding.bind_cpu_input(name, x)
        sess.run_with_iobinding(binding)
        return arrays

    return run


def variants(path: Path) -> dict[str, Runner]:
    """The configurations compared: the server's (first) and one change each."""
    return {
        "intra1 run (server)": plain(session(path)),
        "intra1 spinning off": plain(session(path, spinning=False)),
        "intra1 no arena, no mem pattern": plain(session(path, no_arena=True, no_pattern=True)),
        "intra1 io binding, outputs preallocated": bound(session(path)),
        "intra2 spinning on": plain(session(path, intra=2, spinning=True)),
        "intra2 spinning off": plain(session(path, intra=2, spinning=False)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = model_parser(__doc__)
    parser.add_argument("--batches", default="1,5,16,32", help="batch sizes (default: 1,5,16,32)")
    parser.add_argument("--images", type=int, default=160,
                        help="images per timed block (default: 160)")  # fmt: skip
    parser.add_argument("--repeat", type=int, default=7, help="blocks per point (default: 7)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results",
                        help="output folder (default: bench/results)")  # fmt: skip
    args = parser.parse_args(argv)
    path = latest_model(args.repository, args.model)
    batches = [int(b) for b in args.batches.split(",")]
    runners = variants(path)
    shape = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_inputs()[0]
    item = [d if isinstance(d, int) else 1 for d in shape.shape[1:]]
    rng = np.random.default_rng(0)
    inputs = {b: rng.random((b, *item), dtype=np.float32) for b in batches}
    for run in runners.values():  # warm every batch size once
        for x in inputs.values():
            run(x)
    samples: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for _ in range(args.repeat):
        for batch in batches:
            calls = max(1, args.images // batch)
            for name, run in runners.items():
                x = inputs[batch]
                cpu0, wall0 = time.process_time_ns(), time.perf_counter_ns()
                for _ in range(calls):
                    run(x)
                cpu, wall = time.process_time_ns() - cpu0, time.perf_counter_ns() - wall0
                images = calls * batch
                samples.setdefault((name, batch), []).append((cpu / images / 1e3,
                                                              wall / images / 1e3))  # fmt: skip
    rows, table = [], []
    for (name, batch), values in samples.items():
        cpu = statistics.median(v[0] for v in values)
        wall = statistics.median(v[1] for v in values)
        rows.append({"variant": name, "batch": batch, "cpu_us_per_image": cpu,
                     "cpu_us_min": min(v[0] for v in values),
                     "cpu_us_max": max(v[0] for v in values), "wall_us_per_image": wall})  # fmt: skip
        table.append([name, str(batch), f"{cpu:.0f}",
                      f"{min(v[0] for v in values):.0f}-{max(v[0] for v in values):.0f}",
                      f"{wall:.0f}"])  # fmt: skip
    table.sort(key=lambda r: (list(runners).index(r[0]), int(r[1])))
    print_table(
        f"{args.model}: ONNX Runtime per image in-process (median of {args.repeat} blocks; "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)",
        ["variant", "batch", "CPU us/image", "range", "wall us/image"],
        table,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "ort_timing.json"
    out.write_text(json.dumps({"model": args.model, "load_average": os.getloadavg(),
                               "rows": rows}, indent=2) + "\n")  # fmt: skip
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
