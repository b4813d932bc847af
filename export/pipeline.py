"""The export pipeline: checkpoint -> classifier -> verify -> explainer -> verify -> repository.

`export_checkpoint` runs the steps in that order; each step is a function of its own, so tests
and benchmarks can call one without the others. Both graphs are built and verified in a scratch
folder and written to the repository only once both passed, each as a new version of its model.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from export.onnx_export import export_classifier, verify_classifier
from export.repository import BatchingPolicy, write_model, write_model_folder
from modelrepo import CLASSIFIER, METHODS, MODEL_FILE, NUM_CLASSES, TARGET_LAYER, explainer_name
from training.checkpoint import Checkpoint, load_checkpoint
from training.data import load_dataset

METHODS_VERIFY_COUNT = 32  # real test digits each method is checked on against its reference


@dataclass
class VerifiedGraph:
    """An ONNX file in the scratch folder that matched PyTorch within tolerance."""

    onnx_file: Path
    max_abs_diff: float  # classifier: logits; explainer: cam_raw and logits
    seconds: float  # export and verification
    target_layer: str | None = None  # explainers only
    methods: dict[str, Any] | None = None  # explainers: each method's check against its reference


def real_test_inputs(checkpoint: Checkpoint, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `count` real test inputs of the model's dataset, as float32 pixels in [0, 1]."""
    inputs, labels, _ = load_dataset(checkpoint.spec.dataset, "test")
    pixels = inputs[:count].astype(np.float32)[:, None] / 255.0
    return pixels, labels[:count]


def build_classifier(ckpt: Checkpoint, pixels: np.ndarray, scratch: Path) -> VerifiedGraph:
    """Export the classifier (normalisation inside) and check its logits at batch 1 and 64."""
    started = time.perf_counter()
    path = scratch / MODEL_FILE
    export_classifier(ckpt.model, ckpt.input_shape, ckpt.mean, ckpt.std, path)
    diff = verify_classifier(path, ckpt.model, pixels, ckpt.mean, ckpt.std)
    return VerifiedGraph(path, diff, time.perf_counter() - started)


def explainer_targets(count: int, num_classes: int) -> np.ndarray:
    """Mixed targets: the predicted class (-1) for a third of the images, explicit ones for the rest."""
    targets = np.arange(count, dtype=np.int64) % num_classes
    targets[::3] = -1
    return targets


def build_explainer(
    ckpt: Checkpoint, layer: str, pixels: np.ndarray, scratch: Path
) -> VerifiedGraph:
    """Export the explainer's folder at `layer` (Grad-CAM graph, weight graphs sharing one
    weights file, a graph per method); check Grad-CAM against autograd and every method
    against pytorch-grad-cam / Captum on `pixels`."""
    # make_fx, the reference libraries and friends: imported late.
    from export.gradcam import verify_gradcam
    from export.gradcam.bundle import export_bundle
    from export.gradcam.verify_methods import verify_methods

    started = time.perf_counter()
    folder = scratch / "explainer"
    classes = len(ckpt.labels)
    export_bundle(ckpt.model, layer, ckpt.input_shape, ckpt.mean, ckpt.std, classes, folder)
    targets = explainer_targets(len(pixels), classes)
    path = folder / MODEL_FILE
    diff = verify_gradcam(path, ckpt.model, layer, pixels, targets, ckpt.mean, ckpt.std)
    # The references run one library call per method and chunk: fewer images than Grad-CAM's.
    few = slice(0, METHODS_VERIFY_COUNT)
    checks = verify_methods(
        folder, ckpt.model, layer, pixels[few], targets[few], ckpt.mean, ckpt.std
    )
    methods = {name: check.as_dict() for name, check in checks.items()}
    return VerifiedGraph(
        path, diff, time.perf_counter() - started, target_layer=layer, methods=methods
    )


def write_classifier(
    repository: Path, name: str, ckpt: Checkpoint, graph: VerifiedGraph, policy: BatchingPolicy
) -> dict[str, Any]:
    """Add the classifier as a new version of `name`; its summary."""
    started = time.perf_counter()
    written = write_model(repository, name, graph.onnx_file, ckpt.labels, policy)
    print(
        f"{name}: wrote {written} ({written.stat().st_size / 1e6:.2f} MB); ONNX Runtime vs "
        f"PyTorch logits max abs diff {graph.max_abs_diff:.2e} at batch 1 and 64"
    )
    return {
        "path": str(written),
        "bytes": written.stat().st_size,
        "max_abs_diff_logits": graph.max_abs_diff,
        "seconds": graph.seconds + time.perf_counter() - started,
    }


def write_explainer(
    repository: Path,
    name: str,
    ckpt: Checkpoint,
    graph: VerifiedGraph,
    policy: BatchingPolicy,
    verified_on: int,
) -> dict[str, Any]:
    """Add the explainer's folder as a new version of `<name>_gradcam`; its summary."""
    started = time.perf_counter()
    layer = str(graph.target_layer)
    explainer = explainer_name(name)
    methods = list(graph.methods or {})
    parameters = {
        NUM_CLASSES: str(len(ckpt.labels)),
        TARGET_LAYER: layer,
        CLASSIFIER: name,
        METHODS: ",".join(methods),
    }
    written = write_model_folder(
        repository, explainer, graph.onnx_file.parent, ckpt.labels, policy, parameters=parameters
    )
    size = sum(p.stat().st_size for p in written.parent.rglob("*") if p.is_file())
    print(
        f"{explainer}: wrote {written.parent} ({size / 1e6:.2f} MB), target layer {layer!r}; "
        f"cam_raw and logits vs PyTorch autograd: max abs diff {graph.max_abs_diff:.2e} on "
        f"{verified_on} images"
    )
    for check in (graph.methods or {}).values():
        sign = check.get("sign_agreement")
        print(
            f"  {check['method']:<22} vs {check['reference']:<19} max rel diff "
            f"{check['max_relative']:.1e} (tolerance {check['tolerance']:g})"
            + (f", LAPACK's sign on {sign:.0%} of images" if sign is not None else "")
        )
    return {
        "path": str(written),
        "bytes": size,
        "target_layer": layer,
        "max_abs_diff_cam_raw": graph.max_abs_diff,
        "methods": graph.methods,
        "seconds": graph.seconds + time.perf_counter() - started,
    }


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
    layer = gradcam_layer or ckpt.config.gradcam_layer
    pixels, _ = real_test_inputs(ckpt, max(64, verify_count))
    summary: dict[str, Any] = {"model": name, "checkpoint": str(checkpoint_path)}
    with tempfile.TemporaryDirectory() as tmp:
        classifier = build_classifier(ckpt, pixels, Path(tmp))
        explainer = (
            build_explainer(ckpt, layer, pixels[:verify_count], Path(tmp)) if gradcam else None
        )
        summary["classifier"] = write_classifier(repository, name, ckpt, classifier, policy)
        if explainer is not None:
            summary["explainer"] = write_explainer(
                repository, name, ckpt, explainer, policy, verified_on=len(pixels[:verify_count])
            )
    return summary
