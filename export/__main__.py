"""The export CLI: flags in, `export.pipeline.export_checkpoint` run, summary out.

python -m export --checkpoint checkpoints/mnist_cnn.pt --repository model_repository
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from export.pipeline import export_checkpoint
from export.repository import BatchingPolicy
from training.cli import HelpFormatter


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m export",
        description="Export a training checkpoint to ONNX (classifier and Grad-CAM explainer), "
        "verify both against PyTorch on real test images, and add them as new versions to a "
        "Triton-layout model repository.",
        formatter_class=HelpFormatter,
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
        help="dynamic batching: longest wait for a fuller batch, in microseconds; the server "
        "waits only with --batching delay (with eager batching it runs what is queued at once)",
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
        "--summary",
        type=Path,
        default=None,
        help="also write the summary as JSON here (default: not written)",
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
