"""Grad-CAM graphs checked: their structure, and their outputs in ONNX Runtime against autograd."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from export.errors import ExportVerificationError
from export.gradcam.reference import gradcam_reference
from modelrepo import CAM_RAW, EXPLAINED_CLASS, INPUT, LOGITS, TARGET_CLASS

VERIFY_CHUNK = 256  # images per reference/ONNX run, to bound memory on large checks


def check_graph(proto: Any, path: Path) -> None:
    """Every input and output keeps a symbolic batch; only the standard ONNX domain is used."""
    static = []
    for value in [*proto.graph.input, *proto.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if not dims or not dims[0].dim_param:
            static.append(value.name)
    if static:
        raise ExportVerificationError(
            f"{path}: the explainer graph lost its dynamic batch dimension on {static} "
            "(the tracer specialised the example's batch of 2)"
        )
    domains = {node.domain for node in proto.graph.node} | {
        opset.domain for opset in proto.opset_import
    }
    custom = sorted(domains - {"", "ai.onnx"})
    if custom or len(proto.functions):
        raise ExportVerificationError(
            f"{path}: the explainer graph uses custom domains {custom} or local functions; "
            "plain ONNX Runtime must run it"
        )


def run_explainer(
    path: Path, pixels: np.ndarray, target_class: np.ndarray, threads: int = 1
) -> dict[str, np.ndarray]:
    """Run an explainer ONNX file in plain ONNX Runtime (CPU); outputs by name."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(
        str(path), sess_options=options, providers=["CPUExecutionProvider"]
    )
    names = [output.name for output in session.get_outputs()]
    feeds = {
        INPUT: np.ascontiguousarray(pixels, dtype=np.float32),
        TARGET_CLASS: np.ascontiguousarray(target_class, dtype=np.int64),
    }
    return dict(zip(names, session.run(names, feeds), strict=True))


def verify_gradcam(
    path: Path,
    model: nn.Module,
    target_layer: str,
    pixels: np.ndarray,
    target_class: np.ndarray,
    mean: float,
    std: float,
    tol: float = 1e-4,
    *,
    rtol: float = 0.0,
) -> float:
    """Check the explainer at `path` against `gradcam_reference`; return the max abs difference.

    `pixels` is [N, *input_shape] in [0, 1] (uint8 is scaled by 1/255); `target_class` [N].
    Compares cam_raw and logits (max abs) and requires the same explained classes; raises
    ExportVerificationError when a difference exceeds `tol` + `rtol` * (the largest |value| of
    that image's reference output; 0 by default: absolute only).
    """
    images = np.asarray(pixels)
    images = (images.astype(np.float32) / 255.0) if images.dtype == np.uint8 else images
    images = images.astype(np.float32, copy=False)
    targets = np.asarray(target_class).astype(np.int64)
    if images.shape[0] != targets.shape[0] or targets.ndim != 1:
        raise ValueError(
            f"pixels {images.shape} and target_class {targets.shape} need one target per image"
        )
    worst: dict[str, float] = {CAM_RAW: 0.0, LOGITS: 0.0}
    excess: dict[str, float] = {CAM_RAW: 0.0, LOGITS: 0.0}
    for start in range(0, len(images), VERIFY_CHUNK):
        chunk = slice(start, start + VERIFY_CHUNK)
        reference = gradcam_reference(
            model,
            target_layer,
            torch.from_numpy(images[chunk]),
            torch.from_numpy(targets[chunk]),
            mean,
            std,
        )
        got = run_explainer(path, images[chunk], targets[chunk])
        explained = reference[EXPLAINED_CLASS].numpy()
        if not np.array_equal(got[EXPLAINED_CLASS], explained):
            wrong = np.flatnonzero(got[EXPLAINED_CLASS] != explained)[:10]
            raise ExportVerificationError(
                f"{path}: the explainer explains other classes than PyTorch for images "
                f"{(wrong + start).tolist()} (ONNX {got[EXPLAINED_CLASS][wrong].tolist()}, "
                f"PyTorch {explained[wrong].tolist()})"
            )
        for name in worst:
            want = reference[name].numpy().reshape(len(explained), -1)
            diff = np.abs(got[name].reshape(want.shape) - want).max(axis=1)
            allowed = tol + rtol * np.abs(want).max(axis=1)
            worst[name] = max(worst[name], float(diff.max()))
            excess[name] = max(excess[name], float((diff / allowed).max()))
    failed = [name for name in worst if excess[name] > 1.0]
    if failed:
        relative = f" + {rtol:.3g} x the image's largest |value|" if rtol else ""
        raise ExportVerificationError(
            f"{path}: Grad-CAM outputs differ from the PyTorch autograd reference over "
            f"{len(images)} images: "
            + ", ".join(f"{name} by {worst[name]:.3g} (max abs)" for name in failed)
            + f"; tolerance {tol:.3g}{relative}"
        )
    return max(worst.values())
