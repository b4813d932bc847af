"""Soak: steady load for a long time, watching the server's memory, threads and descriptors.

    .venv/bin/python -m bench.soak --repository model_repository [--minutes 30] [--concurrency 64]

Starts `python -m service` (or uses `--url` with `--pid`), then keeps `--concurrency` clients
busy with ModelInfer (batches of 1-4), ModelStreamInfer (streams of 1-16 messages) and some
Explain calls for `--minutes`, sampling the server's RSS, threads and open file descriptors from
/proc. After the warm-up it reports the drift: the median of the last tenth of the samples
against the median of the first tenth. Targets: RSS drift under 5 %, no errors. Prints a table;
writes bench/results/soak.json. Malloc arenas: the server limits glibc to 2 by default
(`--malloc-arena-max`); with glibc's own default of 8 a core RSS creeps for many minutes as
threads take arenas of their own, so `--malloc-arena-max 0` here shows the server without the
limit, and runs compare only at the same setting.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import random
import statistics
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from PIL import Image

from bench.loadgen import MAX_MESSAGE, print_table, process_status, server_process
from pb import explain_pb2 as ex
from pb import explain_pb2_grpc as ex_grpc
from pb import grpc_service_pb2 as pb
from pb import grpc_service_pb2_grpc as pb_grpc
from training.cli import HelpFormatter

ROOT = Path(__file__).resolve().parent.parent

RSS_DRIFT_TARGET = 5.0  # percent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--repository", type=Path, default=Path("model_repository"), help="model repository"
    )
    parser.add_argument("--model", default="mnist_cnn", help="a model with a _gradcam explainer")
    parser.add_argument("--url", help="load this server instead of starting one (needs --pid)")
    parser.add_argument("--pid", type=int, help="with --url: the server's process id")
    parser.add_argument("--minutes", type=float, default=30.0, help="length of the soak")
    parser.add_argument(
        "--warmup-minutes",
        type=float,
        help="samples before this are not counted (default: a fifth of the run, at most 5)",
    )
    parser.add_argument("--concurrency", type=int, default=64, help="clients in flight")
    parser.add_argument("--explain-share", type=float, default=0.03, help="share of Explain")
    parser.add_argument("--stream-share", type=float, default=0.3, help="share of streams")
    parser.add_argument("--sample-s", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument(
        "--checkpoints",
        default="5,10,20,30",
        help="minutes at which to report RSS, threads and descriptors (those within the run)",
    )
    parser.add_argument(
        "--malloc-arena-max",
        type=int,
        help="start the server with --malloc-arena-max set to this (glibc malloc arenas; 0: "
        "glibc's own number; unset, the server keeps its own setting of 2)",
    )
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results" / "soak.json", help="JSON results"
    )
    args = parser.parse_args(argv)
    if args.url and not args.pid:
        parser.error("--url needs --pid (the server's memory is read from /proc/PID)")
    if args.warmup_minutes is None:
        args.warmup_minutes = min(5.0, args.minutes / 5)
    if args.url and args.malloc_arena_max is not None:
        parser.error("--malloc-arena-max applies to a server this script starts (not --url)")
    args.checkpoints = [float(m) for m in args.checkpoints.split(",") if m.strip()]
    return args


def at_checkpoints(samples: list[dict[str, Any]], minutes: list[float]) -> list[dict[str, Any]]:
    """The sample nearest each checkpoint minute that the run reached."""
    rows = []
    end = samples[-1]["t"] if samples else 0.0
    for minute in minutes:
        if minute * 60 > end + 1:
            continue
        nearest = min(samples, key=lambda s: abs(s["t"] - minute * 60))
        rows.append({"minute": minute, **nearest})
    return rows


def _infer(model: str, images: np.ndarray) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, id="soak")
    request.inputs.add(name="input", datatype="FP32", shape=images.shape)
    request.raw_input_contents.append(images.astype("<f4").tobytes())
    return request


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


class Load:
    """Counts by kind and outcome, shared by the clients."""

    def __init__(self) -> None:
        self.done: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.first_errors: list[str] = []

    def failed(self, kind: str, err: grpc.aio.AioRpcError | str) -> None:
        code = err if isinstance(err, str) else err.code().name
        self.errors[f"{kind} {code}"] += 1
        if len(self.first_errors) < 5:
            details = err if isinstance(err, str) else err.details()
            self.first_errors.append(f"{kind} {code}: {details}")


async def soak(address: str, pid: int, args: argparse.Namespace) -> tuple[Load, list[dict]]:
    rng = random.Random(args.seed)
    images = np.random.default_rng(args.seed).random((64, 1, 28, 28), dtype=np.float32)
    digit = np.zeros((56, 56), dtype=np.uint8)
    digit[12:44, 24:32] = 255
    pictures = [_png(digit), _png(255 - digit), _png(np.kron(digit, np.ones((4, 4), np.uint8)))]
    load = Load()
    samples: list[dict[str, Any]] = []
    options = [
        ("grpc.max_send_message_length", MAX_MESSAGE),
        ("grpc.max_receive_message_length", MAX_MESSAGE),
    ]
    loop = asyncio.get_running_loop()
    start = loop.time()
    end = start + args.minutes * 60

    def request() -> pb.ModelInferRequest:
        batch = rng.randint(1, 4)
        first = rng.randrange(len(images) - batch)
        return _infer(args.model, images[first : first + batch])

    async with grpc.aio.insecure_channel(address, options=options) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        explainer = ex_grpc.ExplainerStub(channel)

        async def unary() -> None:
            try:
                response = await stub.ModelInfer(request(), timeout=60)
                load.done["ModelInfer"] += 1
                if not response.raw_output_contents:
                    load.failed("ModelInfer", "EMPTY")
            except grpc.aio.AioRpcError as err:
                load.failed("ModelInfer", err)

        async def stream() -> None:
            messages = [request() for _ in range(rng.randint(1, 16))]
            answers = 0
            try:
                async for answer in stub.ModelStreamInfer(iter(messages), timeout=120):
                    answers += 1
                    if answer.error_message:
                        load.failed("ModelStreamInfer message", answer.error_message)
                    else:
                        load.done["ModelStreamInfer message"] += 1
                if answers != len(messages):
                    load.failed("ModelStreamInfer", f"{answers} answers to {len(messages)}")
            except grpc.aio.AioRpcError as err:
                load.failed("ModelStreamInfer", err)

        async def explain() -> None:
            picture = rng.choice(pictures)
            wanted = ex.ExplainRequest(
                model_name=args.model, image=picture, top_k=rng.randint(1, 3)
            )
            try:
                response = await explainer.Explain(wanted, timeout=60)
                load.done["Explain"] += 1
                if not response.explanations:
                    load.failed("Explain", "EMPTY")
            except grpc.aio.AioRpcError as err:
                load.failed("Explain", err)

        async def client() -> None:
            while loop.time() < end:
                pick = rng.random()
                if pick < args.explain_share:
                    await explain()
                elif pick < args.explain_share + args.stream_share:
                    await stream()
                else:
                    await unary()

        async def sampler() -> None:
            while True:
                status = process_status(pid)
                elapsed = loop.time() - start
                samples.append(
                    {
                        "t": round(elapsed, 1),
                        **status,
                        "done": sum(load.done.values()),
                        "errors": sum(load.errors.values()),
                    }
                )
                if len(samples) % max(1, round(60 / args.sample_s)) == 1:
                    print(
                        f"  {elapsed / 60:5.1f} min  RSS {status['rss'] / 2**20:6.1f} MiB  "
                        f"threads {status['threads']}  fds {status['fds']}  "
                        f"requests {samples[-1]['done']:,}  errors {samples[-1]['errors']}",
                        flush=True,
                    )
                await asyncio.sleep(args.sample_s)

        watcher = asyncio.create_task(sampler())
        await asyncio.gather(*(client() for _ in range(args.concurrency)))
        watcher.cancel()
    samples.append(
        {
            "t": round(loop.time() - start, 1),
            **process_status(pid),
            "done": sum(load.done.values()),
            "errors": sum(load.errors.values()),
        }
    )
    return load, samples


def drift(samples: list[dict[str, Any]], key: str) -> dict[str, float]:
    """Median of the last tenth of the samples against the first tenth (at least one each)."""
    values = [s[key] for s in samples]
    tenth = max(1, len(values) // 10)
    first, last = statistics.median(values[:tenth]), statistics.median(values[-tenth:])
    return {
        "start": first,
        "end": last,
        "max": max(values),
        "drift_percent": round((last - first) / first * 100, 2) if first else 0.0,
    }


@contextmanager
def target(args: argparse.Namespace) -> Iterator[tuple[str, int, Any]]:
    if args.url:
        yield args.url, args.pid, None
        return
    extra = (
        () if args.malloc_arena_max is None else ("--malloc-arena-max", str(args.malloc_arena_max))
    )
    with server_process(args.repository, *extra) as (address, proc, _):
        yield address, proc.pid, proc


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setting = 2 if args.malloc_arena_max is None else args.malloc_arena_max
    arenas = os.environ.get("MALLOC_ARENA_MAX") or (str(setting) if setting else "glibc default")
    with target(args) as (address, pid, proc):
        print(
            f"soak: {address} (pid {pid}), {args.concurrency} clients for {args.minutes:g} min "
            f"(warm-up {args.warmup_minutes:g} min, malloc arenas {arenas})"
        )
        started = time.perf_counter()
        load, samples = asyncio.run(soak(address, pid, args))
        seconds = time.perf_counter() - started
        alive = proc is None or proc.poll() is None
    steady = [s for s in samples if s["t"] >= args.warmup_minutes * 60] or samples[-1:]
    figures = {key: drift(steady, key) for key in ("rss", "threads", "fds")}
    errors = sum(load.errors.values())
    rows = [
        [
            key,
            f"{f['start']:,.0f}",
            f"{f['end']:,.0f}",
            f"{f['max']:,.0f}",
            f"{f['drift_percent']:+.2f} %",
        ]
        for key, f in figures.items()
    ]
    for row in rows[:1]:
        row[1:4] = [f"{float(v.replace(',', '')) / 2**20:.1f} MiB" for v in row[1:4]]
    print_table(
        f"after warm-up ({len(steady)} samples)", ["", "start", "end", "max", "drift"], rows
    )
    marks = at_checkpoints(samples, args.checkpoints)
    if marks:
        print_table(
            "at the checkpoints",
            ["minute", "RSS", "threads", "fds", "requests", "errors"],
            [
                [
                    f"{m['minute']:g}",
                    f"{m['rss'] / 2**20:.1f} MiB",
                    str(m["threads"]),
                    str(m["fds"]),
                    f"{m['done']:,}",
                    str(m["errors"]),
                ]
                for m in marks
            ],
        )
    total = sum(load.done.values())
    print(
        f"\nrequests: {total:,} in {seconds / 60:.1f} min ({total / seconds:,.0f}/s): "
        + ", ".join(f"{k} {v:,}" for k, v in sorted(load.done.items()))
    )
    print(f"errors: {errors}" + "".join(f"\n  {e}" for e in load.first_errors))
    print(f"server alive at the end: {alive}")

    ok = errors == 0 and alive and abs(figures["rss"]["drift_percent"]) < RSS_DRIFT_TARGET
    result = {
        "command": " ".join(["bench/soak.py", *(argv if argv is not None else sys.argv[1:])]),
        "host": platform.node(),
        "minutes": args.minutes,
        "warmup_minutes": args.warmup_minutes,
        "concurrency": args.concurrency,
        "requests": dict(load.done),
        "errors": dict(load.errors),
        "drift": figures,
        "malloc_arena_max": arenas,
        "checkpoints": marks,
        "rss_drift_target_percent": RSS_DRIFT_TARGET,
        "alive": alive,
        "passed": ok,
        "samples": samples,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    print("PASS" if ok else "FAIL: RSS drift, errors or a dead server (see above)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
