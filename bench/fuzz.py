"""Fuzz a live server with mutated ModelInfer, ModelStreamInfer and Explain messages.

    .venv/bin/python -m bench.fuzz --repository model_repository [--count 100000] [--quick]
    .venv/bin/python -m bench.fuzz --url 127.0.0.1:8001 --pid PID --metrics-url http://...

Starts `python -m service` on free ports (or uses `--url`), then sends `--count` messages built
from valid seeds and hostile-but-valid ones (huge dims, repeated outputs, odd versions, pictures
claiming 100000x100000 pixels...), each sent as is or mutated at the byte level: bit flips,
truncations, splices, huge varints, inserted and duplicated slices. Frames go as raw bytes
(`channel.unary_unary(path)` without serializers), so the server parses what the client could
never build. Prints counts by method and status, the server's RSS, threads and descriptors before
and after; fails if any request got INTERNAL or UNKNOWN, if the server's rejected-requests counter
saw an internal error, or if the server is not alive and serving afterwards. Writes
bench/results/fuzz.json.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import random
import re
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from PIL import Image

from bench.loadgen import MAX_MESSAGE, process_status, server_process
from bench.pictures import jpeg_claiming as _jpeg_claiming
from bench.pictures import png_claiming as _png_claiming
from pb import explain_pb2 as ex
from pb import explain_pb2_grpc as ex_grpc
from pb import grpc_service_pb2 as pb
from pb import grpc_service_pb2_grpc as pb_grpc
from service.core.errors import INTERNAL_MESSAGE
from training.cli import HelpFormatter

ROOT = Path(__file__).resolve().parent.parent

INFER = "/inference.GRPCInferenceService/ModelInfer"
STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"
EXPLAIN = "/cnnserve.explain.v1.Explainer/Explain"
FAILURES = {"INTERNAL", "UNKNOWN", "stream:internal"}
Seeds = list[bytes]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--repository", type=Path, default=Path("model_repository"), help="model repository"
    )
    parser.add_argument("--model", default="mnist_cnn", help="a model with a _gradcam explainer")
    parser.add_argument("--url", help="fuzz this server instead of starting one")
    parser.add_argument("--pid", type=int, help="with --url: the server's process, for RSS")
    parser.add_argument("--metrics-url", help="with --url: its /metrics, for internal errors")
    parser.add_argument("--count", type=int, default=100_000, help="messages to send")
    parser.add_argument("--quick", action="store_true", help="5,000 messages (a smoke run)")
    parser.add_argument("--concurrency", type=int, default=32, help="calls in flight")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--timeout", type=float, default=30.0, help="deadline of each call (s)")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results" / "fuzz.json", help="JSON results"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.count = 5_000
    return args


# Seeds: valid messages, and valid messages with hostile field values.


def _png(pixels: np.ndarray | Image.Image, fmt: str = "PNG", **options: Any) -> bytes:
    img = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _images(rng: np.random.Generator, count: int) -> np.ndarray:
    return rng.random((count, 1, 28, 28), dtype=np.float32)


def _infer(
    model: str, images: np.ndarray, targets: np.ndarray | None = None, **fields: Any
) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, id="fuzz", **fields)
    request.inputs.add(name="input", datatype="FP32", shape=images.shape)
    request.raw_input_contents.append(images.astype("<f4").tobytes())
    if targets is not None:
        request.inputs.add(name="target_class", datatype="INT64", shape=[len(targets), 1])
        request.raw_input_contents.append(targets.astype("<i8").tobytes())
    return request


def infer_seeds(model: str, rng: np.random.Generator) -> tuple[Seeds, Seeds]:
    """(valid, hostile) ModelInferRequests, serialized."""
    explainer = f"{model}_gradcam"
    valid = [
        _infer(model, _images(rng, 1)),
        _infer(model, _images(rng, 4)),
        _infer(explainer, _images(rng, 2), np.array([-1, 3])),
    ]
    with_outputs = _infer(model, _images(rng, 2))
    top = with_outputs.outputs.add(name="probabilities")
    top.parameters["classification"].int64_param = 3
    with_outputs.outputs.add(name="logits")
    valid.append(with_outputs)
    typed = pb.ModelInferRequest(model_name=model)
    tensor = typed.inputs.add(name="input", datatype="FP32", shape=[1, 1, 28, 28])
    tensor.contents.fp32_contents.extend(_images(rng, 1).reshape(-1).tolist())
    valid.append(typed)

    hostile: list[pb.ModelInferRequest] = []
    flood = _infer(model, _images(rng, 1))
    for _ in range(20_000):
        flood.outputs.add(name="probabilities")
    hostile.append(flood)
    for version in ["²", "1" * 5000, "-1", "0", "99999999999999999999", "\x00", " 1", "1.0"]:
        hostile.append(_infer(model, _images(rng, 1), model_version=version))
    for name in ["x" * 100_000, "../../etc/passwd", f"{model}\n", "", explainer + "_gradcam"]:
        hostile.append(_infer(name, _images(rng, 1)))
    for shape in (
        [2**62, 1, 28, 28],
        [-1, 1, 28, 28],
        [0, 1, 28, 28],
        [1] * 64,
        [129, 1, 28, 28],
        [1, 1, 2**31, 2**31],
        [],
        [2**63 - 1],
    ):
        request = pb.ModelInferRequest(model_name=model)
        request.inputs.add(name="input", datatype="FP32", shape=shape)
        request.raw_input_contents.append(bytes(3136))
        hostile.append(request)
    many = pb.ModelInferRequest(model_name=model)
    for _ in range(5000):
        many.inputs.add(name="input", datatype="FP32", shape=[1, 1, 28, 28])
    hostile.append(many)
    raws = _infer(model, _images(rng, 1))
    raws.raw_input_contents.extend([b""] * 1000)
    hostile.append(raws)
    params = _infer(model, _images(rng, 1))
    for i in range(5000):
        params.parameters[f"p{i}"].string_param = "v" * 10
    hostile.append(params)
    for choice in [
        {"int64_param": 2**63 - 1},
        {"int64_param": -1},
        {"uint64_param": 2**64 - 1},
        {"string_param": "3"},
        {"double_param": float("nan")},
        {"bool_param": True},
    ]:
        request = _infer(model, _images(rng, 1))
        wanted = request.outputs.add(name="probabilities")
        wanted.parameters["classification"].CopyFrom(pb.InferParameter(**choice))
        hostile.append(request)
    strings = pb.ModelInferRequest(model_name=model)
    strings.inputs.add(name="input", datatype="BYTES", shape=[1000]).contents.bytes_contents.extend(
        [b"\xff" * 8] * 1000
    )
    hostile.append(strings)
    special = np.full((1, 1, 28, 28), np.nan, dtype=np.float32)
    special[0, 0, 0] = np.inf
    hostile.append(_infer(model, special))
    hostile.append(_infer(model, _images(rng, 128)))  # the largest batch: valid, and large
    hostile.append(_infer(explainer, _images(rng, 2), np.array([2**62, -(2**63)])))
    hostile.append(_infer(explainer, _images(rng, 1), np.array([10])))
    both = _infer(model, _images(rng, 1))
    both.inputs[0].contents.fp32_contents.extend([0.5] * 784)
    hostile.append(both)
    return [m.SerializeToString() for m in valid], [m.SerializeToString() for m in hostile]


def explain_seeds(model: str, rng: np.random.Generator) -> tuple[Seeds, Seeds]:
    """(valid, hostile) ExplainRequests, serialized."""
    digit = np.zeros((28, 28), dtype=np.uint8)
    digit[6:22, 12:16] = 255
    tensor = ex.RawTensor(shape=[1, 28, 28], data=_images(rng, 1).tobytes())
    valid = [
        ex.ExplainRequest(model_name=model, image=_png(digit)),
        ex.ExplainRequest(
            model_name=model, image=_png(255 - np.kron(digit, np.ones((3, 3), np.uint8))), top_k=3
        ),
        ex.ExplainRequest(
            model_name=model, image=_png(digit, "JPEG"), predictions_only=True, top_k=5
        ),
        ex.ExplainRequest(model_name=model, tensor=tensor, target_classes=[1, 7]),
        ex.ExplainRequest(model_name=model, image=_png(digit), feature_maps=True),
    ]
    palette = Image.fromarray(digit).convert("P")
    palette.info["transparency"] = 0
    pictures = [
        _png_claiming(100_000, 100_000),
        _png_claiming(6000, 6000),
        _png_claiming(0, 5),
        _jpeg_claiming(60_000, 60_000),
        _jpeg_claiming(9000, 9000),
        _png(Image.new("L", (4000, 1))),
        _png(Image.new("L", (1, 4000))),
        _png(Image.new("1", (1, 1))),
        _png(Image.new("I;16", (64, 64))),
        _png(palette, transparency=0),
        _png(Image.new("CMYK", (64, 64)), "JPEG"),
        _png(Image.fromarray(digit), "JPEG", progressive=True),
        _png(Image.new("RGBA", (300, 200))),
        _png(digit)[:40],
        b"GIF89a" + bytes(40),
        b"",
    ]
    hostile = [ex.ExplainRequest(model_name=model, image=p, top_k=2) for p in pictures]
    hostile += [
        ex.ExplainRequest(model_name=model, image=_png(digit), top_k=2**32 - 1),
        ex.ExplainRequest(model_name=model, image=_png(digit), top_k=11),
        ex.ExplainRequest(model_name=model, image=_png(digit), target_classes=[2**62]),
        ex.ExplainRequest(model_name=model, image=_png(digit), target_classes=[-2]),
        ex.ExplainRequest(model_name=model, image=_png(digit), target_classes=[1] * 100_000),
        ex.ExplainRequest(model_name=model, image=_png(digit), polarity=12345),  # type: ignore[arg-type]
        ex.ExplainRequest(model_name=model, image=_png(digit), model_version="1" * 5000),
        ex.ExplainRequest(model_name="x" * 50_000, image=_png(digit)),
        ex.ExplainRequest(model_name=model),
        ex.ExplainRequest(model_name=model, tensor=ex.RawTensor(shape=[2**62], data=b"")),
        ex.ExplainRequest(model_name=model, tensor=ex.RawTensor(shape=[1] * 1000, data=b"")),
        ex.ExplainRequest(
            model_name=model,
            tensor=ex.RawTensor(shape=[1, 28, 28], data=np.full(784, np.nan, "<f4").tobytes()),
        ),
        ex.ExplainRequest(
            model_name=model, tensor=tensor, feature_maps=True, predictions_only=True
        ),
    ]
    return [m.SerializeToString() for m in valid], [m.SerializeToString() for m in hostile]


# Byte-level mutations.


def _varint(value: int) -> bytes:
    out = bytearray()
    value &= (1 << 70) - 1
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _huge_field(rng: random.Random) -> bytes:
    """A field whose varint or length is far past sense (10 bytes, 2**63, an overlong form)."""
    tag = _varint(rng.randint(1, 20) << 3 | rng.choice([0, 2]))
    value = rng.choice(
        [
            b"\xff" * 9 + b"\x01",
            b"\xff" * 10 + b"\x01",
            _varint(2**63),
            _varint(2**64 - 1),
            b"\x80" * 9 + b"\x00",
            _varint(2**31),
            _varint(rng.randint(0, 2**35)),
        ]
    )
    return tag + value


def mutate(data: bytes, pool: Seeds, rng: random.Random) -> bytes:
    kind = rng.random()
    buf = bytearray(data)
    if kind < 0.30 and buf:  # bit flips
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
        return bytes(buf)
    if kind < 0.45:  # truncation
        return bytes(buf[: rng.randint(0, len(buf))])
    if kind < 0.60:  # splice two messages (of possibly different methods)
        other = rng.choice(pool)
        return bytes(buf[: rng.randint(0, len(buf))]) + other[rng.randint(0, len(other)) :]
    if kind < 0.75:  # a field with a huge varint or length, inserted or appended
        at = rng.choice([len(buf), 0, rng.randint(0, len(buf))])
        return bytes(buf[:at]) + _huge_field(rng) + bytes(buf[at:])
    if kind < 0.85 and buf:  # a slice duplicated or deleted
        i = rng.randrange(len(buf))
        j = min(len(buf), i + rng.randint(1, 64))
        return (
            bytes(buf[:j] + buf[i:j] + buf[j:]) if rng.random() < 0.5 else bytes(buf[:i] + buf[j:])
        )
    if kind < 0.95:  # random bytes overwritten or inserted
        chunk = rng.randbytes(rng.randint(1, 16))
        at = rng.randint(0, len(buf))
        return bytes(buf[:at] + chunk + buf[at + (len(chunk) if rng.random() < 0.5 else 0) :])
    return bytes(rng.randbytes(rng.randint(0, 64)))  # noise


# Sending.


class Tally:
    def __init__(self) -> None:
        self.codes: Counter[tuple[str, str]] = Counter()
        self.messages = 0
        self.examples: dict[str, str] = {}

    def add(self, method: str, code: str, frame: bytes, details: str = "") -> None:
        self.codes[(method, code)] += 1
        if code in FAILURES and code not in self.examples:
            self.examples[code] = f"{method}: {details[:200]!r} frame={frame[:120].hex()}"


async def fuzz(address: str, args: argparse.Namespace, tally: Tally) -> float:
    rng = random.Random(args.seed)
    nprng = np.random.default_rng(args.seed)
    infer_valid, infer_hostile = infer_seeds(args.model, nprng)
    explain_valid, explain_hostile = explain_seeds(args.model, nprng)
    pool = infer_valid + infer_hostile + explain_valid + explain_hostile

    def frame(valid: Seeds, hostile: Seeds) -> bytes:
        seed = rng.choice(hostile) if rng.random() < 0.25 else rng.choice(valid)
        return seed if rng.random() < 0.08 else mutate(seed, pool, rng)

    options = [
        ("grpc.max_send_message_length", MAX_MESSAGE),
        ("grpc.max_receive_message_length", MAX_MESSAGE),
    ]
    start = time.perf_counter()
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        infer = channel.unary_unary(INFER)  # no serializers: frames go as raw bytes
        explain = channel.unary_unary(EXPLAIN)
        stream = channel.stream_stream(STREAM)

        async def unary(call: Any, method: str, data: bytes) -> None:
            try:
                await call(data, timeout=args.timeout)
                tally.add(method, "OK", data)
            except grpc.aio.AioRpcError as err:
                tally.add(method, err.code().name, data, err.details() or "")

        async def streamed(frames: list[bytes]) -> None:
            call = stream(iter(frames), timeout=args.timeout)
            try:
                async for raw in call:
                    answer = pb.ModelStreamInferResponse.FromString(raw)
                    if not answer.error_message:
                        tally.add("ModelStreamInfer message", "stream:ok", b"")
                    elif answer.error_message == INTERNAL_MESSAGE:
                        tally.add("ModelStreamInfer message", "stream:internal", frames[0])
                    else:
                        tally.add("ModelStreamInfer message", "stream:error", b"")
                tally.add("ModelStreamInfer", "OK", b"")
            except grpc.aio.AioRpcError as err:
                tally.add("ModelStreamInfer", err.code().name, frames[0], err.details() or "")

        async def worker() -> None:
            while tally.messages < args.count:
                pick = rng.random()
                if pick < 0.45:
                    tally.messages += 1
                    await unary(infer, "ModelInfer", frame(infer_valid, infer_hostile))
                elif pick < 0.65:
                    tally.messages += 1
                    await unary(explain, "Explain", frame(explain_valid, explain_hostile))
                else:
                    frames = [frame(infer_valid, infer_hostile) for _ in range(rng.randint(1, 16))]
                    tally.messages += len(frames)
                    await streamed(frames)

        async def progress() -> None:
            while True:
                await asyncio.sleep(15)
                rate = tally.messages / (time.perf_counter() - start)
                print(f"  {tally.messages:,} messages sent ({rate:,.0f}/s)", flush=True)

        reporter = asyncio.create_task(progress())
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        reporter.cancel()
    return time.perf_counter() - start


def internal_rejections(metrics_url: str | None) -> float | None:
    """The server's count of requests that ended INTERNAL (any method, streams included)."""
    if not metrics_url:
        return None
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    match = re.search(r'^cnnserve_rejected_requests_total\{reason="internal"\} (\S+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


def still_serving(address: str, model: str) -> bool:
    """Ready, and a valid ModelInfer and Explain succeed."""
    digit = np.zeros((28, 28), dtype=np.uint8)
    digit[6:22, 12:16] = 255
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        if not stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready:
            return False
        stub.ModelInfer(_infer(model, np.zeros((1, 1, 28, 28), np.float32)), timeout=30)
        explained = ex_grpc.ExplainerStub(channel).Explain(
            ex.ExplainRequest(model_name=model, image=_png(digit)), timeout=30
        )
        return len(explained.explanations) == 1


def _status(pid: int | None) -> dict[str, int]:
    return process_status(pid) if pid else {}


def _mib(status: dict[str, int], key: str) -> str:
    return f"{status[key] / 2**20:.0f} MiB" if key in status else "n/a"


@contextmanager
def target(
    args: argparse.Namespace,
) -> Iterator[tuple[str, int | None, str | None, Callable[[], bool]]]:
    """(address, pid, metrics URL, is-the-process-alive) of the server to fuzz."""
    if args.url:
        yield args.url, args.pid, args.metrics_url, lambda: True
        return
    with server_process(args.repository) as (address, proc, metrics_url):
        yield address, proc.pid, metrics_url, lambda: proc.poll() is None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tally = Tally()
    with target(args) as (address, pid, metrics_url, alive):
        still_serving(address, args.model)  # warm: load the sessions before measuring
        before = _status(pid)
        internal_before = internal_rejections(metrics_url)
        print(f"fuzzing {address} with {args.count:,} messages ({args.concurrency} in flight)")
        print(
            f"server RSS before: {_mib(before, 'rss')}, threads {before.get('threads', 'n/a')}, "
            f"fds {before.get('fds', 'n/a')}"
        )
        seconds = asyncio.run(fuzz(address, args, tally))
        after = _status(pid)
        internal_after = internal_rejections(metrics_url)
        serving = alive() and still_serving(address, args.model)
        after_check = _status(pid)

    methods = sorted({m for m, _ in tally.codes})
    codes = sorted({c for _, c in tally.codes})
    print(f"\n{tally.messages:,} messages in {seconds:.0f} s ({tally.messages / seconds:,.0f}/s)")
    width = max(len(m) for m in methods)
    print("status".ljust(26) + "".join(m.rjust(width + 2) for m in methods))
    for code in codes:
        print(
            code.ljust(26)
            + "".join(f"{tally.codes[(m, code)]:,}".rjust(width + 2) for m in methods)
        )
    print(
        f"\nserver RSS: {_mib(before, 'rss')} before, {_mib(after, 'rss')} after "
        f"(peak {_mib(after, 'peak_rss')}); threads {before.get('threads')} -> "
        f"{after_check.get('threads')}; fds {before.get('fds')} -> {after_check.get('fds')}"
    )
    failures = {c: n for (_, c), n in tally.codes.items() if c in FAILURES}
    internal = None
    if internal_before is not None and internal_after is not None:
        internal = internal_after - internal_before
        print(f"server-side INTERNAL (rejected_requests_total{{reason=internal}}): {internal:.0f}")
    print(f"server alive and serving afterwards: {serving}")
    for code, example in tally.examples.items():
        print(f"first {code}: {example}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "command": " ".join(["bench/fuzz.py", *(argv if argv is not None else sys.argv[1:])]),
        "messages": tally.messages,
        "seconds": round(seconds, 1),
        "counts": {f"{m} {c}": n for (m, c), n in sorted(tally.codes.items())},
        "server_before": before,
        "server_after": after_check,
        "internal_server_side": internal,
        "alive": serving,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    ok = not failures and not internal and serving and tally.messages >= args.count
    print("PASS" if ok else f"FAIL: {failures or ''} internal={internal} alive={serving}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
