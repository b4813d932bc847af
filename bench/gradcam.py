"""Grad-CAM throughput: served by cnnserve vs the explainer graph in-process vs PyTorch autograd.

    .venv/bin/python bench/gradcam.py --repository model_repository --checkpoint checkpoints/mnist_cnn.pt

Prints a table and writes bench/results/gradcam.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.loadgen import ROOT, closed_loop, print_table, running_server
from pb import grpc_service_pb2 as pb


def timed(fn, seconds: float) -> tuple[int, float]:  # type: ignore[no-untyped-def]
    """Call fn() repeatedly for about `seconds`; (calls, elapsed)."""
    fn()
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        calls += 1
    return calls, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "checkpoints" / "mnist_cnn.pt")
    parser.add_argument("--model", default="mnist_cnn")
    parser.add_argument("--seconds", type=float, default=5.0, help="measurement time per row")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gradcam.json")
    args = parser.parse_args()

    import onnxruntime as ort
    import torch

    from export.__main__ import real_test_inputs
    from export.gradcam import gradcam_reference
    from training.checkpoint import load_checkpoint

    ckpt = load_checkpoint(args.checkpoint)
    pixels, _ = real_test_inputs(ckpt, 256)
    layer = str(ckpt.config["gradcam_layer"])
    explainer = args.model + "_gradcam"
    versions = sorted(
        (args.repository / explainer).glob("[0-9]*/model.onnx"), key=lambda p: int(p.parent.name)
    )
    onnx_path = versions[-1]
    rows: list[dict[str, object]] = []

    # (b) PyTorch autograd in-process, the way users compute Grad-CAM today.
    torch.set_num_threads(2)
    for batch in (1, 32):
        x = torch.from_numpy(pixels[:batch])
        targets = torch.full((batch,), -1, dtype=torch.int64)
        calls, elapsed = timed(
            lambda x=x, t=targets: gradcam_reference(ckpt.model, layer, x, t, ckpt.mean, ckpt.std),
            args.seconds,
        )
        rows.append(
            {
                "how": "PyTorch autograd in-process",
                "setting": f"batch {batch}",
                "images_per_s": calls * batch / elapsed,
                "ms_per_call": 1000 * elapsed / calls,
            }
        )

    # (a) the explainer graph run in-process by ONNX Runtime: the ceiling.
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    for batch in (1, 32):
        feeds = {"input": pixels[:batch], "target_class": np.full(batch, -1, dtype=np.int64)}
        calls, elapsed = timed(lambda f=feeds: session.run(["cam"], f), args.seconds)
        rows.append(
            {
                "how": "ONNX Runtime in-process (1 thread)",
                "setting": f"batch {batch}",
                "images_per_s": calls * batch / elapsed,
                "ms_per_call": 1000 * elapsed / calls,
            }
        )

    # Served: ModelInfer on <model>_gradcam, one image per request, closed loop.
    images = [np.ascontiguousarray(pixels[i : i + 1]) for i in range(len(pixels))]

    def request(n: int) -> pb.ModelInferRequest:
        req = pb.ModelInferRequest(model_name=explainer)
        req.inputs.add(name="input", datatype="FP32", shape=[1, 1, 28, 28])
        req.inputs.add(name="target_class", datatype="INT64", shape=[1, 1])
        req.raw_input_contents.extend([images[n % len(images)].tobytes(), np.int64(-1).tobytes()])
        req.outputs.add(name="cam")
        return req

    with running_server(args.repository) as address:
        for concurrency in args.concurrency:
            result = asyncio.run(closed_loop(address, request, concurrency, args.seconds))
            rows.append(
                {
                    "how": "served (ModelInfer, 1 image/request)",
                    "setting": f"concurrency {concurrency}",
                    "images_per_s": result.throughput,
                    "ms_per_call": result.percentile(50),
                    "p99_ms": result.percentile(99),
                    "errors": result.errors,
                }
            )

    autograd_best = max(r["images_per_s"] for r in rows if str(r["how"]).startswith("PyTorch"))  # type: ignore[type-var]
    served_16 = next((r["images_per_s"] for r in rows if r["setting"] == "concurrency 16"), None)
    print_table(
        f"Grad-CAM throughput, {explainer} ({platform.processor() or platform.machine()}, client and server on one machine)",
        ["how", "setting", "images/s", "ms (p50 served)"],
        [
            [
                str(r["how"]),
                str(r["setting"]),
                f"{r['images_per_s']:.0f}",
                f"{r['ms_per_call']:.2f}",
            ]
            for r in rows
        ],
    )
    if served_16 is not None:
        print(
            f"\nserved at concurrency 16 / best PyTorch autograd: {served_16 / autograd_best:.1f}x"
        )  # type: ignore[operator]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "model": explainer,
                "rows": rows,
                "served16_over_autograd": (served_16 / autograd_best) if served_16 else None,
            },
            indent=2,
        )
        + "\n"
    )  # type: ignore[operator]
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
