"""Export a checkpoint into the model repository: classifier + Grad-CAM explainer, both verified.

python -m export --checkpoint checkpoints/mnist_cnn.pt --repository model_repository
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from export.onnx_export import export_classifier, verify_classifier
from export.repository import BatchingPolicy, write_model
from training.checkpoint import Checkpoint, load_checkpoint
from training.data import load_dataset


def real_test_inputs(checkpoint: Checkpoint, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `count` real test inputs of the model's dataset, as float32 pixels in [0, 1]."""
    inputs, labels, _ = load_dataset(checkpoint.spec.dataset, "test")
    pixels = inputs[:count].astype(np.float32)[:, None] / 255.0
    return pixels, labels[:count]


def export_checkpoint(
    checkpoint_path: Path,
    repository: Path,
    *,
    name: str | None = None,
    gradcam: bool = True,
    gradcam_layer: str | None = None,
    policy: BatchingPolicy | None = None,
    verify_count: int = 64,
) -> dict[str, Any]:
    """Export, verify and write one checkpoint; returns a summary of what was written."""
    policy = policy or BatchingPolicy()
    ckpt = load_checkpoint(checkpoint_path)
    name = name or ckpt.name
    pixels, _ = real_test_inputs(ckpt, max(64, verify_count))
    summary: dict[str, Any] = {"model": name, "checkpoint": str(checkpoint_path)}
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        started = time.perf_counter()
        export_classifier(ckpt.model, ckpt.input_shape, ckpt.mean, ckpt.std, onnx_path)
        diff = verify_classifier(onnx_path, ckpt.model, pixels, ckpt.mean, ckpt.std)
        written = write_model(repository, name, onnx_path, ckpt.labels, policy)
        summary["classifier"] = {
            "path": str(written),
            "bytes": written.stat().st_size,
            "max_abs_diff_logits": diff,
            "seconds": time.perf_counter() - started,
        }
        print(
            f"{name}: wrote {written} ({written.stat().st_size / 1e6:.2f} MB); ONNX Runtime vs "
            f"PyTorch logits max abs diff {diff:.2e} at batch 1 and 64"
        )
        if gradcam:
            summary["explainer"] = export_explainer(
                ckpt, repository, name, gradcam_layer, policy, pixels[:verify_count], Path(tmp)
            )
    return summary


def export_explainer(
    ckpt: Checkpoint,
    repository: Path,
    name: str,
    layer: str | None,
    policy: BatchingPolicy,
    pixels: np.ndarray,
    tmp: Path,
) -> dict[str, Any]:
    """Write `<name>_gradcam`, verified on real images with mixed targets."""
    from export.gradcam import export_gradcam, verify_gradcam

    layer = layer or str(ckpt.config["gradcam_layer"])
    classes = len(ckpt.labels)
    path = tmp / "gradcam.onnx"
    started = time.perf_counter()
    export_gradcam(ckpt.model, layer, ckpt.input_shape, ckpt.mean, ckpt.std, classes, path)
    # Mixed targets: the predicted class for a third of the images, explicit classes for the rest.
    targets = np.arange(len(pixels), dtype=np.int64) % classes
    targets[::3] = -1
    diff = verify_gradcam(path, ckpt.model, layer, pixels, targets, ckpt.mean, ckpt.std)
    explainer = f"{name}_gradcam"
    written = write_model(
        repository,
        explainer,
        path,
        ckpt.labels,
        policy,
        parameters={"num_classes": str(classes), "target_layer": layer, "classifier": name},
    )
    print(
        f"{explainer}: wrote {written} ({written.stat().st_size / 1e6:.2f} MB), target layer "
        f"{layer!r}; cam_raw and logits vs PyTorch autograd: max abs diff {diff:.2e} on {len(pixels)} images"
    )
    return {
        "path": str(written),
        "bytes": written.stat().st_size,
        "target_layer": layer,
        "max_abs_diff_cam_raw": diff,
        "seconds": time.perf_counter() - started,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m export",
        description="Export a training checkpoint to ONNX (classifier and Grad-CAM explainer), "
        "verify both against PyTorch on real test images, and add them as new versions to a "
        "Triton-layout model repository.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--checkpoint", required=True, type=Path, help="checkpoint from training.train"
    )
    parser.add_argument(
        "--repository", type=Path, default=Path("model_repository"), help="model repository"
    )
    parser.add_argument(
        "--name", default=None, help="model name (default: the checkpoint's model name)"
    )
    parser.add_argument("--no-gradcam", action="store_true", help="skip the Grad-CAM explainer")
    parser.add_argument(
        "--gradcam-layer", default=None, help="target layer (default: the model's last conv block)"
    )
    parser.add_argument(
        "--max-batch-size", type=int, default=128, help="config.pbtxt max_batch_size"
    )
    parser.add_argument(
        "--max-queue-delay-us",
        type=int,
        default=1000,
        help="dynamic batching: longest wait for a fuller batch",
    )
    parser.add_argument(
        "--max-queue-size",
        type=int,
        default=2048,
        help="dynamic batching: queued requests before RESOURCE_EXHAUSTED",
    )
    parser.add_argument(
        "--instances", type=int, default=1, help="instance_group count (ONNX Runtime sessions)"
    )
    parser.add_argument(
        "--verify-images",
        type=int,
        default=64,
        help="real test images used to verify the explainer",
    )
    parser.add_argument(
        "--summary", type=Path, default=None, help="also write the summary as JSON here"
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    policy = BatchingPolicy(
        max_batch_size=args.max_batch_size,
        max_queue_delay_microseconds=args.max_queue_delay_us,
        max_queue_size=args.max_queue_size,
        instance_count=args.instances,
    )
    summary = export_checkpoint(
        args.checkpoint,
        args.repository,
        name=args.name,
        gradcam=not args.no_gradcam,
        gradcam_layer=args.gradcam_layer,
        policy=policy,
        verify_count=args.verify_images,
    )
    if args.summary:
        args.summary.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
