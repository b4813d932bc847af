"""Grad-CAM throughput: served by cnnserve vs the explainer graph in-process vs PyTorch autograd.

    .venv/bin/python -m bench.gradcam --repository model_repository --checkpoint checkpoints/mnist_cnn.pt

Prints a table and writes bench/results/gradcam.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import time
from pathlib import Path

import numpy as np

from bench.loadgen import ROOT, closed_loop, print_table, running_server, save_grid
from bench.reference_cli import latest_model
from modelrepo import CAM, INPUT, TARGET_CLASS, explainer_name
from pb import grpc_service_pb2 as pb
from service.core.runtime import session_options
from training.cli import HelpFormatter


def timed(fn, seconds: float) -> tuple[int, float]:  # type: ignore[no-untyped-def]
    """Call fn() repeatedly for about `seconds`; (calls, elapsed)."""
    fn()
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        calls += 1
    return calls, time.perf_counter() - start


def overlay_picture(address: str, model: str, out: Path, count: int = 8) -> None:
    """Real test digits explained through the explain API, overlays side by side with captions."""
    import io

    import grpc
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from pb import explain_pb2 as ex
    from pb import explain_pb2_grpc as ex_grpc
    from training.mnist import load_mnist

    images, labels = load_mnist("test")
    fig, axes = plt.subplots(2, count, figsize=(1.5 * count, 3.3))
    with grpc.insecure_channel(address) as channel:
        explainer = ex_grpc.ExplainerStub(channel)
        for col in range(count):
            buffer = io.BytesIO()
            Image.fromarray(np.kron(images[col], np.ones((4, 4), dtype=np.uint8))).save(
                buffer, "PNG"
            )
            reply = explainer.Explain(
                ex.ExplainRequest(model_name=model, image=buffer.getvalue()), timeout=30
            )
            top = reply.predictions[0]
            axes[0, col].imshow(images[col], cmap="gray")
            axes[0, col].set_title(f"label {labels[col]}", fontsize=8)
            axes[1, col].imshow(Image.open(io.BytesIO(reply.explanations[0].overlay_png)))
            axes[1, col].set_title(f"{top.label} ({100 * top.probability:.1f}%)", fontsize=8)
    save_grid(fig, f"{model}: Grad-CAM of the predicted class, served by the explain API", out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "checkpoints" / "mnist_cnn.pt")
    parser.add_argument("--model", default="mnist_cnn")
    parser.add_argument("--seconds", type=float, default=5.0, help="measurement time per row")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gradcam.json")
    parser.add_argument("--picture", type=Path, default=ROOT / "docs" / "gradcam_digits.png")
    args = parser.parse_args()

    import onnxruntime as ort
    import torch

    from export.gradcam import gradcam_reference
    from export.pipeline import real_test_inputs
    from training.checkpoint import load_checkpoint

    ckpt = load_checkpoint(args.checkpoint)
    pixels, _ = real_test_inputs(ckpt, 256)
    layer = ckpt.config.gradcam_layer
    explainer = explainer_name(args.model)
    onnx_path = latest_model(args.repository, explainer)
    rows: list[dict[str, object]] = []

    # (b) PyTorch autograd in-process, the way users compute Grad-CAM today.
    torch.set_num_threads(1)  # as the server and the in-process ONNX Runtime rows: one core each
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
    options = session_options(1)
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    for batch in (1, 32):
        feeds = {INPUT: pixels[:batch], TARGET_CLASS: np.full(batch, -1, dtype=np.int64)}
        calls, elapsed = timed(lambda f=feeds: session.run([CAM], f), args.seconds)
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
        req.inputs.add(name=INPUT, datatype="FP32", shape=[1, 1, 28, 28])
        req.inputs.add(name=TARGET_CLASS, datatype="INT64", shape=[1, 1])
        req.raw_input_contents.extend([images[n % len(images)].tobytes(), np.int64(-1).tobytes()])
        req.outputs.add(name=CAM)
        return req

    with running_server(args.repository) as address:
        overlay_picture(address, args.model, args.picture)
        print(f"wrote {args.picture}")
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

    autograd = {
        r["setting"]: float(r["images_per_s"]) for r in rows if str(r["how"]).startswith("PyTorch")
    }  # type: ignore[arg-type]
    served_16 = next(
        (float(r["images_per_s"]) for r in rows if r["setting"] == "concurrency 16"), None
    )  # type: ignore[arg-type]
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
    # The target compares served Grad-CAM with autograd as users run it: one image per call
    # (a request at a time); batched autograd is printed beside it for the whole picture.
    ratios = (
        {f"served16_over_autograd_{k.replace(' ', '')}": served_16 / v for k, v in autograd.items()}
        if served_16
        else {}
    )
    for key, ratio in ratios.items():
        print(f"served at concurrency 16 / PyTorch autograd {key.rsplit('_', 1)[-1]}: {ratio:.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": explainer, "rows": rows, **ratios}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
