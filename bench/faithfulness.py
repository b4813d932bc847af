"""Faithfulness and cost of every explanation method, from an explainer folder's ONNX graphs.

    .venv/bin/python -m bench.faithfulness --repository model_repository --model mnist_cnn

Deletion and insertion (Petsiuk et al. 2018, RISE): pixels are removed from the digit (set to
black, MNIST's background) or added to a black picture in the order of the method's map, most
important first, in `--steps` equal steps; the area under the explained class's probability
curve is the score (deletion: lower is better; insertion: higher is better). A random map is the
floor. Cost: ms per image of each method at batch 32 in-process (ONNX Runtime, one thread; process
CPU, so a busy host does not inflate it), served with `--served` (a real server, ModelInfer on
the explainer with the `method` parameter, one image per request, 16 in flight: images/s and
server CPU ms per image) and of the reference library (pytorch-grad-cam or Captum, one image per
call, as it is used per request) with `--checkpoint`. Prints the table and writes
bench/results/faithfulness-<model>.json.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from modelrepo import (
    ALL_METHODS,
    CAM,
    EXPLAINED_CLASS,
    FORWARD_FILE,
    INPUT,
    PROBABILITIES,
    explainer_name,
)
from training.cli import HelpFormatter

ROOT = Path(__file__).resolve().parent.parent


def curves(
    run_forward: Callable[[np.ndarray], np.ndarray],
    pixels: np.ndarray,
    maps: np.ndarray,
    classes: np.ndarray,
    steps: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Deletion and insertion AUC per image (probability of its class, trapezoid over [0, 1])."""
    n = len(pixels)
    flat = pixels.reshape(n, -1)
    order = np.argsort(-maps.reshape(n, -1), axis=1, kind="stable")
    size = flat.shape[1]
    counts = np.linspace(0, size, steps + 1).round().astype(int)
    deleted = np.repeat(flat[:, None], steps + 1, 1)
    inserted = np.zeros_like(deleted)
    for s, k in enumerate(counts):
        rows = np.arange(n)[:, None]
        top = order[:, :k]
        deleted[rows, s, top] = 0.0
        inserted[rows, s, top] = flat[rows, top]
    scores = []
    for variants in (deleted, inserted):
        batch = variants.reshape(n * (steps + 1), *pixels.shape[1:])
        probabilities = np.concatenate(
            [run_forward(batch[i : i + 2048]) for i in range(0, len(batch), 2048)]
        ).reshape(n, steps + 1, -1)
        p = probabilities[np.arange(n), :, classes]
        scores.append(((p[:, 1:] + p[:, :-1]) / 2).mean(axis=1))
    return scores[0], scores[1]


def _forward_ms(forward: Callable[[np.ndarray], np.ndarray], pixels: np.ndarray) -> float:
    """The classifier's own CPU cost per image at batch 32 (the forward graph, one thread)."""
    batch = pixels[:32]
    forward(batch)
    timings = []
    for _ in range(20):
        began = time.process_time()
        forward(batch)
        timings.append(time.process_time() - began)
    return float(np.median(timings) * 1e3 / len(batch))


def reference_cost(
    refs: Any, ckpt: Any, method: str, pixels: np.ndarray, classes: np.ndarray, calls: int = 7
) -> dict[str, float]:
    """The reference library's cost per image, one image per call as it is used per request:
    wall ms and process CPU ms (all of torch's threads), medians over `calls` after a first."""
    layer = ckpt.config.gradcam_layer
    walls, cpus = [], []
    for i in range(calls + 1):
        began, began_cpu = time.perf_counter(), time.process_time()
        item, cls = pixels[i : i + 1], classes[i : i + 1]
        if method in refs.CAM_CLASSES:
            refs.cam_reference(method, ckpt.model, layer, item, cls, ckpt.mean, ckpt.std)
        else:
            refs.captum_reference(method, ckpt.model, item, cls, ckpt.mean, ckpt.std)
        if i:  # the first call builds hooks and caches
            walls.append(time.perf_counter() - began)
            cpus.append(time.process_time() - began_cpu)
    return {
        "reference_ms_per_image": float(np.median(walls) * 1e3),
        "reference_cpu_ms_per_image": float(np.median(cpus) * 1e3),
    }


def served_cost(
    repository: Path, model: str, pixels: np.ndarray, methods: list[str], seconds: float
) -> dict[str, dict[str, float]]:
    """Each method served: ModelInfer on the explainer with the `method` parameter, one image
    per request, 16 in flight; images/s, p50 and the server's CPU ms per image."""
    import asyncio

    from bench.loadgen import CpuMeter, closed_loop, server_process
    from modelrepo import METHOD, TARGET_CLASS
    from pb import grpc_service_pb2 as pb

    images = [np.ascontiguousarray(pixels[i : i + 1]) for i in range(min(len(pixels), 256))]
    results: dict[str, dict[str, float]] = {}
    with server_process(repository) as (address, proc, _):
        for method in methods:

            def request(n: int, method: str = method) -> pb.ModelInferRequest:
                req = pb.ModelInferRequest(model_name=explainer_name(model))
                req.inputs.add(name=INPUT, datatype="FP32", shape=[1, *pixels.shape[1:]])
                req.inputs.add(name=TARGET_CLASS, datatype="INT64", shape=[1, 1])
                image = images[n % len(images)].tobytes()
                req.raw_input_contents.extend([image, np.int64(-1).tobytes()])
                req.parameters[METHOD].string_param = method
                req.outputs.add(name=CAM)
                return req

            asyncio.run(closed_loop(address, request, 16, 1.0, warmup=0.5))  # sessions open
            with CpuMeter(proc.pid) as cpu:
                result = asyncio.run(closed_loop(address, request, 16, seconds, warmup=0.0))
            served = result.throughput
            results[method] = {
                "served_images_per_s_c16": served,
                "served_p50_ms_c16": result.percentile(50),
                "served_cpu_ms_per_image_c16": cpu.cores * 1e3 / served if served else float("nan"),
                "served_errors": float(result.errors),
            }
            print(
                f"{method:<22} served at 16 in flight: {served:8.1f} images/s, "
                f"{results[method]['served_cpu_ms_per_image_c16']:7.2f} ms server CPU per image, "
                f"{result.errors} errors",
                flush=True,
            )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--repository", type=Path, required=True, help="model repository")
    parser.add_argument("--model", default="mnist_cnn", help="classifier name")
    parser.add_argument("--images", type=int, default=1000, help="real test digits scored")
    parser.add_argument("--steps", type=int, default=16, help="deletion/insertion steps")
    parser.add_argument(
        "--checkpoint", type=Path, default=None, help="also time the reference libraries"
    )
    parser.add_argument(
        "--served",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="also serve every method and load it at 16 in flight for this long (0: not served)",
    )
    parser.add_argument(
        "--update-reference",
        action="store_true",
        help="only time the reference libraries again (--checkpoint) into an existing JSON",
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON (default: bench/results/)")
    args = parser.parse_args()
    out = args.out or ROOT / "bench" / "results" / f"faithfulness-{args.model}.json"

    from export.gradcam.run import MethodRunner
    from training.mnist import load_mnist

    model_dir = args.repository / explainer_name(args.model)
    folder = max((p for p in model_dir.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    runner = MethodRunner(folder)
    offered = [m for m in ALL_METHODS if m in set(runner.methods())]
    images, _ = load_mnist("test")
    pixels = (images[: args.images].astype(np.float32) / 255.0)[:, None]
    targets = np.full(len(pixels), -1, dtype=np.int64)

    def forward(batch: np.ndarray) -> np.ndarray:
        return runner.run(FORWARD_FILE, {INPUT: batch})[PROBABILITIES]

    reference = None
    if args.checkpoint is not None:
        from export.gradcam import references
        from training.checkpoint import load_checkpoint

        ckpt = load_checkpoint(args.checkpoint)
        reference = (references, ckpt)
    if args.update_reference:
        if reference is None or not out.is_file():
            parser.error("--update-reference needs --checkpoint and an existing results file")
        results = json.loads(out.read_text())
        classes = np.argmax(forward(pixels[:16]), axis=1)
        for row in results["rows"]:
            if row["method"] != "random":
                row.update(reference_cost(*reference, row["method"], pixels, classes))
                print(
                    f"{row['method']:<22} reference {row['reference_ms_per_image']:8.2f} ms, "
                    f"{row['reference_cpu_ms_per_image']:8.2f} ms CPU per image",
                    flush=True,
                )
        out.write_text(json.dumps(results, indent=2))
        print(f"wrote {out}")
        return

    classes = np.concatenate(
        [
            runner.explain("gradcam", pixels[i : i + 256], targets[i : i + 256])[EXPLAINED_CLASS]
            for i in range(0, len(pixels), 256)
        ]
    )
    rows = []
    generator = np.random.default_rng(0)
    random_maps = generator.random((len(pixels), *pixels.shape[2:]))
    for method in ["random", *offered]:
        started = time.process_time()
        if method == "random":
            maps = random_maps
            ms = 0.0
        else:
            chunks = [
                runner.explain(method, pixels[i : i + 32], targets[i : i + 32])
                for i in range(0, len(pixels), 32)
            ]
            ms = (time.process_time() - started) * 1e3 / len(pixels)
            maps = np.concatenate([c[CAM] for c in chunks])
        deletion, insertion = curves(forward, pixels, maps, classes, args.steps)
        row = {
            "method": method,
            "deletion_auc": float(deletion.mean()),
            "insertion_auc": float(insertion.mean()),
            "ms_per_image_batch32": ms,
        }
        if reference is not None and method != "random":
            row.update(reference_cost(*reference, method, pixels, classes))
        rows.append(row)
        print(
            f"{method:<22} deletion {row['deletion_auc']:.3f}  insertion "
            f"{row['insertion_auc']:.3f}  {ms:7.2f} ms/image (batch 32)"
            + (
                f"  reference {row['reference_ms_per_image']:7.2f} ms/image (1 per call)"
                if "reference_ms_per_image" in row
                else ""
            ),
            flush=True,
        )
    forward_ms = _forward_ms(forward, pixels)
    print(f"{'classifier':<22} {forward_ms:7.2f} ms/image (batch 32, the forward graph alone)")
    if args.served:
        served = served_cost(args.repository, args.model, pixels, offered, args.served)
        for row in rows:
            row.update(served.get(row["method"], {}))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "model": args.model,
                "folder": str(folder),
                "images": len(pixels),
                "steps": args.steps,
                "classifier_ms_per_image_batch32": forward_ms,
                "cpu_ms": "process CPU (in-process) or server process CPU (served), per image",
                "rows": rows,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
