"""Which HTTP server library to embed beside grpc.aio: server CPU per binary-extension infer.

Each candidate serves `POST /v2/models/m/infer` (KServe v2 binary tensor extension: a JSON header
of `Inference-Header-Content-Length` bytes, then the raw FP32 input) for a tiny in-process ONNX
model, on a uvloop event loop that also runs an (idle) grpc.aio server, in a process of its own.
`wrk` drives it at concurrency 16; the server process's CPU time over the window (psutil) divided
by the requests answered is the figure. Rounds alternate the candidates.

    .venv/bin/python -m bench.http_candidates --rounds 3 --seconds 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np

from training.cli import HelpFormatter

CANDIDATES = ("aiohttp", "uvicorn", "granian")
HEADER = "Inference-Header-Content-Length"


def tiny_model() -> bytes:
    """input [-1,1,28,28] -> flatten -> linear -> softmax [-1,10], as ONNX bytes."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = rng.normal(0, 0.05, (784, 10)).astype(np.float32)
    nodes = [
        helper.make_node("Flatten", ["input"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "W"], ["scores"]),
        helper.make_node("Softmax", ["scores"], ["probabilities"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 28, 28])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(weight, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return onnx._serialize(model) if hasattr(onnx, "_serialize") else model.SerializeToString()


def request_body() -> tuple[bytes, int]:
    """A binary-extension infer request for one image: (body, JSON header length)."""
    image = np.random.default_rng(1).random((1, 1, 28, 28), dtype=np.float32)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "datatype": "FP32",
                    "shape": [1, 1, 28, 28],
                    "parameters": {"binary_data_size": image.nbytes},
                }
            ],
            "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
        }
    ).encode()
    return header + image.tobytes(), len(header)


def make_infer() -> Callable[[bytes, int], tuple[bytes, int]]:
    """The protocol work every candidate shares: parse, run, encode (binary output)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(tiny_model(), options, providers=["CPUExecutionProvider"])

    def infer(body: bytes, header_length: int) -> tuple[bytes, int]:
        header = json.loads(body[:header_length])
        spec = header["inputs"][0]
        array = np.frombuffer(body, np.float32, offset=header_length).reshape(spec["shape"])
        (out,) = session.run(["probabilities"], {"input": array})
        data = out.tobytes()
        answer = json.dumps(
            {
                "model_name": "m",
                "model_version": "1",
                "outputs": [
                    {
                        "name": "probabilities",
                        "datatype": "FP32",
                        "shape": list(out.shape),
                        "parameters": {"binary_data_size": len(data)},
                    }
                ],
            }
        ).encode()
        return answer + data, len(answer)

    return infer


async def serve_aiohttp(port: int, infer: Callable[[bytes, int], tuple[bytes, int]]) -> Any:
    from aiohttp import web

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        answer, length = infer(body, int(request.headers[HEADER]))
        return web.Response(
            body=answer,
            headers={HEADER: str(length), "Content-Type": "application/octet-stream"},
        )

    app = web.Application()
    app.router.add_post("/v2/models/{model}/infer", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


def asgi_app(infer: Callable[[bytes, int], tuple[bytes, int]]) -> Callable[..., Awaitable[None]]:
    """A bare ASGI app (no framework): what an ASGI front would cost at its cheapest."""
    header_key = HEADER.lower().encode()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        length = int(dict(scope["headers"])[header_key])
        answer, answer_length = infer(b"".join(chunks), length)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"application/octet-stream"),
                    (header_key, str(answer_length).encode()),
                    (b"content-length", str(len(answer)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": answer})

    return app


async def serve_uvicorn(port: int, infer: Callable[[bytes, int], tuple[bytes, int]]) -> Any:
    import uvicorn

    config = uvicorn.Config(
        asgi_app(infer),
        host="127.0.0.1",
        port=port,
        http="httptools",
        lifespan="off",
        access_log=False,
        log_level="warning",
    )
    config.load()
    server = uvicorn.Server(config)
    server.lifespan = config.lifespan_class(config)
    # startup() without serve(): serve() would take over SIGINT/SIGTERM from the server's own
    # handlers; main_loop() only ticks housekeeping (the Date header) every 0.1 s.
    await server.startup()
    asyncio.get_running_loop().create_task(server.main_loop())
    return server


async def serve_granian(port: int, infer: Callable[[bytes, int], tuple[bytes, int]]) -> Any:
    from granian.constants import Interfaces
    from granian.server.embed import Server

    server = Server(
        asgi_app(infer), address="127.0.0.1", port=port, interface=Interfaces.ASGI, log_access=False
    )
    asyncio.get_running_loop().create_task(server.serve())
    return server


SERVERS = {"aiohttp": serve_aiohttp, "uvicorn": serve_uvicorn, "granian": serve_granian}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_forever(candidate: str, port: int) -> None:
    """The server process: uvloop, an idle grpc.aio server, and the candidate's HTTP server."""
    import grpc
    import uvloop

    async def main() -> None:
        grpc_server = grpc.aio.server()
        grpc_server.add_insecure_port("127.0.0.1:0")
        await grpc_server.start()
        await SERVERS[candidate](port, make_infer())
        print("ready", flush=True)
        await asyncio.Event().wait()

    uvloop.run(main())


def wait_ready(port: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {port}")


def measure(candidate: str, seconds: int, concurrency: int, workdir: Path) -> dict[str, Any]:
    """Start the candidate, warm it up, run wrk and read the server's CPU time around it."""
    import psutil

    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.http_candidates", "--serve", candidate, "--port", str(port)],
        stdout=subprocess.DEVNULL,
    )
    try:
        wait_ready(port)
        url = f"http://127.0.0.1:{port}/v2/models/m/infer"
        script = workdir / "post.lua"
        wrk = ["wrk", "-t1", f"-c{concurrency}", "-s", str(script), url]
        subprocess.run([*wrk[:1], "-d1s", *wrk[1:]], capture_output=True, check=True)  # warm up
        proc = psutil.Process(process.pid)
        before = proc.cpu_times()
        done = subprocess.run(
            [*wrk[:1], f"-d{seconds}s", *wrk[1:]], capture_output=True, text=True, check=True
        )
        after = proc.cpu_times()
    finally:
        process.terminate()
        process.wait(10)
    out = done.stdout
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: .*", out)
    cpu = (after.user - before.user) + (after.system - before.system)
    return {
        "candidate": candidate,
        "requests": requests,
        "rps": requests / seconds,
        "cpu_s": cpu,
        "cpu_us_per_request": 1e6 * cpu / max(requests, 1),
        "non_2xx": int(bad.group(1)) if bad else 0,
        "socket_errors": errors.group(0) if errors else "",
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=HelpFormatter
    )
    parser.add_argument(
        "--candidates", nargs="+", default=list(CANDIDATES), choices=CANDIDATES,
        help="libraries to measure",
    )  # fmt: skip
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    parser.add_argument("--seconds", type=int, default=5, help="wrk window per run")
    parser.add_argument("--concurrency", type=int, default=16, help="wrk connections")
    parser.add_argument("--serve", choices=CANDIDATES, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument(
        "--out", type=Path, default=Path("bench/results/http_candidates.json"), help="JSON rows"
    )
    args = parser.parse_args()
    if args.serve:
        serve_forever(args.serve, args.port)
        return
    body, header_length = request_body()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        (workdir / "body.bin").write_bytes(body)
        (workdir / "post.lua").write_text(
            'wrk.method = "POST"\n'
            f'local f = io.open("{workdir / "body.bin"}", "rb")\n'
            "wrk.body = f:read('*a')\nf:close()\n"
            f'wrk.headers["{HEADER}"] = "{header_length}"\n'
            'wrk.headers["Content-Type"] = "application/octet-stream"\n'
        )
        for round_ in range(args.rounds):
            order = args.candidates if round_ % 2 == 0 else list(reversed(args.candidates))
            for candidate in order:
                row = measure(candidate, args.seconds, args.concurrency, workdir)
                row["round"] = round_ + 1
                rows.append(row)
                print(
                    f"round {round_ + 1} {candidate:8s} {row['rps']:7.0f} req/s  "
                    f"{row['cpu_us_per_request']:6.0f} us CPU/request  non-2xx {row['non_2xx']}"
                    f"  {row['socket_errors']}",
                    flush=True,
                )
    print(f"\nserver CPU per request at concurrency {args.concurrency} (us): median [min-max]")
    for candidate in args.candidates:
        values = sorted(r["cpu_us_per_request"] for r in rows if r["candidate"] == candidate)
        rps = sorted(r["rps"] for r in rows if r["candidate"] == candidate)
        print(
            f"  {candidate:8s} {values[len(values) // 2]:6.0f} [{values[0]:.0f}-{values[-1]:.0f}]"
            f"   {rps[len(rps) // 2]:6.0f} req/s"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
