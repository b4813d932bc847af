"""The Python request path without gRPC: CPU per request on the event-loop thread and on the
ONNX Runtime thread, the project's path beside the minimal server's, in one process.

    .venv/bin/python bench/hotpath.py --repository model_repository [--concurrency 16,64]

gRPC's own cost (HTTP/2, the C core, the cython layer) is the same in both servers and is left
out: each of `--concurrency` tasks calls the method handler with the serialized request bytes,
as grpc.aio would, and serializes the answer, in a closed loop. Thread CPU comes from
/proc/self/task (the loop thread; the batch thread), so a busy host's preemption does not count;
rounds alternate the two paths. Prints per-request microseconds and the executed batch; writes
bench/results/hotpath.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.loadgen import grpc_frame, infer_request, model_parser, print_table  # noqa: E402
from bench.reference_cli import latest_model  # noqa: E402

Handler = Callable[[bytes], Awaitable[bytes]]


class Context:
    """What a servicer asks of grpc.aio's context on the success path."""

    def time_remaining(self) -> float | None:
        return None

    async def abort(self, code: Any, details: str) -> None:
        raise RuntimeError(f"{code}: {details}")


def thread_cpu() -> dict[int, float]:
    """CPU seconds per thread id of this process."""
    ticks = os.sysconf("SC_CLK_TCK")
    out = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            text = (task / "stat").read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        out[int(task.name)] = (int(fields[11]) + int(fields[12])) / ticks
    return out


async def project_handler(repository: Path, model: str) -> tuple[Handler, Callable[[], Any]]:
    """The project's ModelInfer handler (handlers.py around servicers.py), as the server wires it."""
    from prometheus_client import CollectorRegistry

    from service.app import INFERENCE_SERVICE, InferenceServer
    from service.config import Settings
    from service.rpc.servicers import InferenceServicer

    settings = Settings(model_repository=repository, grpc_port=0, metrics_port=-1,
                        log_level="WARNING")  # fmt: skip
    server = InferenceServer(settings, CollectorRegistry())
    await server.control.start()
    servicer = InferenceServicer(server.repository, lambda: True, lambda: False,
                                 server.rejections, control=server.control)  # fmt: skip
    from service.rpc.handlers import service_handler

    generic = service_handler(servicer, INFERENCE_SERVICE, server.rejections)
    details = type("Details", (), {"method": "/inference.GRPCInferenceService/ModelInfer"})()
    method = generic.service(details)
    assert method is not None
    call, serialize, context = method.unary_unary, method.response_serializer, Context()

    async def handle(raw: bytes) -> bytes:
        return serialize(await call(raw, context))

    def stats() -> Any:
        from service.rpc.statistics import statistics_message

        return statistics_message(server.repository.get(model)[1].stats)

    return handle, stats


async def minimal_handler(repository: Path, model: str) -> tuple[Handler, Callable[[], Any]]:
    """bench/minimal_server.py's ModelInfer with grpc's registered (de)serializers around it."""
    from google.protobuf import text_format

    sys.path.insert(0, str(ROOT / "bench"))
    import minimal_server

    from pb import grpc_service_pb2 as pb
    from pb import model_config_pb2

    config = text_format.Parse(
        (repository / model / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
    )
    config.name = model
    servicer = minimal_server.Servicer(config, latest_model(repository, model), 32)
    parse, context = pb.ModelInferRequest.FromString, Context()

    async def handle(raw: bytes) -> bytes:
        response = await servicer.ModelInfer(parse(raw), context)
        return response.SerializeToString()  # type: ignore[no-any-return]

    def stats() -> Any:
        return pb.ModelStatistics(inference_count=servicer.batcher.images,
                                  execution_count=servicer.batcher.batches)  # fmt: skip

    return handle, stats


async def drive(handle: Handler, raw: bytes, concurrency: int, seconds: float) -> int:
    """Closed loop: `concurrency` tasks, each one request at a time, for `seconds`."""
    stop = time.monotonic() + seconds
    done = 0

    async def worker() -> None:
        nonlocal done
        while time.monotonic() < stop:
            await handle(raw)
            done += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    request = infer_request(args.repository, args.model)
    raw = grpc_frame(request)[5:]
    handlers = {
        "project": await project_handler(args.repository, args.model),
        "minimal": await minimal_handler(args.repository, args.model),
    }
    loop_tid = threading.get_native_id()
    levels = [int(c) for c in args.concurrency.split(",")]
    for handle, _ in handlers.values():
        await drive(handle, raw, 16, 0.5)  # warm up
    rows: list[dict[str, Any]] = []
    for _ in range(args.repeat):
        for level in levels:
            for name, (handle, stats) in handlers.items():
                before, s0, t0 = thread_cpu(), stats(), time.monotonic()
                done = await drive(handle, raw, level, args.seconds)
                after, s1, wall = thread_cpu(), stats(), time.monotonic() - t0
                images = s1.inference_count - s0.inference_count
                batches = s1.execution_count - s0.execution_count
                loop_s = after[loop_tid] - before.get(loop_tid, 0.0)
                other_s = sum(after.values()) - sum(before.values()) - loop_s
                rows.append({"server": name, "concurrency": level, "requests": done,
                             "loop_us": 1e6 * loop_s / done, "batch_thread_us": 1e6 * other_s / done,
                             "avg_batch": images / max(batches, 1),
                             "requests_per_s": done / wall})  # fmt: skip
    return {"model": args.model, "load_average": os.getloadavg(), "rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = model_parser(__doc__)
    parser.add_argument("--concurrency", default="1,16,64", help="levels (default: 1,16,64)")
    parser.add_argument("--seconds", type=float, default=2.0,
                        help="seconds per point (default: 2)")  # fmt: skip
    parser.add_argument("--repeat", type=int, default=5, help="rounds (default: 5)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results",
                        help="output folder (default: bench/results)")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        import uvloop

        result = uvloop.run(main_async(args))
    except ImportError:
        result = asyncio.run(main_async(args))
    table = []
    for name in ("project", "minimal"):
        for level in sorted({r["concurrency"] for r in result["rows"]}):
            rows = [r for r in result["rows"] if r["server"] == name and r["concurrency"] == level]
            cells = [name, str(level)]
            for key, spec in (("loop_us", ".1f"), ("batch_thread_us", ".1f"), ("avg_batch", ".1f")):
                values = [r[key] for r in rows]
                cells.append(f"{statistics.median(values):{spec}} "
                             f"({min(values):{spec}}-{max(values):{spec}})")  # fmt: skip
            table.append(cells)
    print_table(
        f"CPU us per request without gRPC, median (min-max) of {args.repeat} rounds; load average "
        f"{os.getloadavg()[0]:.1f}",
        ["server", "conc", "loop thread", "batch thread", "batch"],
        table,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "hotpath.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
