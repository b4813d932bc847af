"""Each method's map from the ONNX graphs against the reference library's, on the same model.

pytorch-grad-cam 1.5.7's class for the CAMs, Captum 0.9's Saliency and IntegratedGradients for
the input attributions (`export.gradcam.references`). The comparison is on the raw map, before
the reference's post-processing (`scale_cam_image`: min-max then a cv2 resize, where ours
upsamples then min-maxes), per image relative to the reference map's largest |value|.
EigenCAM and EigenGradCAM: an SVD's sign is arbitrary and LAPACK's cannot be reproduced without
LAPACK; the signed projections must agree up to each image's sign, and how often the sign agrees
(so that the ReLU'd maps are equal) is reported.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from torch import nn

from export.errors import ExportVerificationError
from export.gradcam import references
from export.gradcam.run import MethodRunner
from modelrepo import ALL_METHODS, CAM_RAW, EXPLAINED_CLASS, PROJECTION

RELATIVE_TOL = 1e-4
# AblationCAM's weights are (score - ablated score) / score: where a class score is near zero the
# quotient amplifies the last bits of two nearly equal logits, which PyTorch and ONNX Runtime sum
# in different orders. The same arithmetic, worse conditioned: a looser bound, stated here.
# Integrated Gradients sums 50 input gradients taken at scaled inputs; near black (small alpha)
# a ReLU pre-activation sits at its kink, and float32 rounding (PyTorch's or ONNX Runtime's)
# decides its side: most images agree to ~1e-7, a few to ~2e-4, while Captum in float32 differs
# from Captum in float64 by up to ~1e-3 on the same images (mnist_cnn, 32 digits). On mobilenet
# trained to 99.08% (ReLU6: two kinks per unit) one image of 32 differed by 2.1e-3 from Captum
# in float32 and in float64 alike, while Captum's float32 missed its own float64 by 9.8e-4 on
# another: a side taken differently on one image, not a different method (untrained zoo models,
# He-initialised, do it on up to 3 images of 8). So the bound is 1e-2, and at least half the
# images must still agree to 1e-4 (MOST_WITHIN_1E4): a wrong step, baseline or weight would move
# every image.
# Grad-CAM++ (alpha = g^2 / (2 g^2 + sum(A) g^3)) and XGrad-CAM (sum(g A) / sum(A)) divide by
# per-channel sums that are tiny for channels a trained model barely uses: on mnist_cnn trained to
# 99.44% they differed by 5.5e-4 and 2.1e-4 relative (1-epoch checkpoints: under 1e-5).
# EigenCAM and EigenGradCAM take the first principal component by power iteration where the
# library calls LAPACK's SVD: not the same arithmetic (EigenGradCAM: 1.75e-4 on that model).
TOLERANCES = {
    "ablationcam": 1e-3,
    "integrated_gradients": 1e-2,
    "gradcam_plusplus": 1e-3,
    "xgradcam": 1e-3,
    "eigencam": 1e-3,
    "eigengradcam": 1e-3,
}
# Methods whose bound allows a few outlying images: the share of images that must agree to 1e-4.
MOST_WITHIN_1E4 = {"integrated_gradients": 0.5}
CHUNK = 8  # images per reference call: IG holds 50 gradients of each


@dataclass
class MethodCheck:
    """One method's agreement with its reference over the images checked."""

    method: str
    reference: str
    images: int
    max_abs: float
    max_relative: float  # per image: max |ours - reference| / max |reference|
    tolerance: float
    within_1e4: float = 0.0  # share of images within 1e-4 relative
    seconds: float = 0.0  # ours (ONNX Runtime, batches of CHUNK)
    reference_seconds: float = 0.0  # the reference library's, same batches
    sign_agreement: float | None = None  # Eigen methods: share of images with LAPACK's sign

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _relative(got: np.ndarray, want: np.ndarray) -> tuple[float, np.ndarray]:
    """(max abs difference, per image max abs difference / the reference's max |value|)."""
    n = len(want)
    diff = np.abs(got.reshape(n, -1) - want.reshape(n, -1)).max(axis=1)
    scale = np.abs(want.reshape(n, -1)).max(axis=1)
    return float(diff.max()), diff / np.maximum(scale, 1e-30)


def verify_methods(
    folder: Path,
    model: nn.Module,
    target_layer: str,
    pixels: np.ndarray,
    target_class: np.ndarray,
    mean: float,
    std: float,
    methods: tuple[str, ...] | None = None,
    ig_steps: int = 50,
) -> dict[str, MethodCheck]:
    """Check every method graph in `folder` against its reference; raise when one differs."""
    runner = MethodRunner(folder)
    offered = [m for m in ALL_METHODS if m in set(runner.methods())]
    chosen = [m for m in offered if methods is None or m in methods]
    x = np.ascontiguousarray(pixels, dtype=np.float32)
    targets = np.asarray(target_class, dtype=np.int64)
    checks: dict[str, MethodCheck] = {}
    failed: list[str] = []
    for method in chosen:
        worst_abs = worst_rel = 0.0
        agree = close = 0
        ours = theirs = 0.0
        for start in range(0, len(x), CHUNK):
            chunk = slice(start, start + CHUNK)
            explained = references.explained_classes(model, x[chunk], targets[chunk], mean, std)
            began = time.perf_counter()
            got = runner.explain(method, x[chunk], targets[chunk], steps=ig_steps)
            ours += time.perf_counter() - began
            began = time.perf_counter()
            if not np.array_equal(got[EXPLAINED_CLASS], explained):
                raise ExportVerificationError(
                    f"{folder}: {method} explains other classes than PyTorch: "
                    f"{got[EXPLAINED_CLASS].tolist()} against {explained.tolist()}"
                )
            if method in references.CAM_CLASSES:
                want = references.cam_reference(
                    method, model, target_layer, x[chunk], explained, mean, std
                )
                theirs += time.perf_counter() - began
                if PROJECTION in want:
                    mine, lapack = got[PROJECTION], want[PROJECTION]
                    n = len(lapack)
                    flat_mine, flat_lapack = mine.reshape(n, -1), lapack.reshape(n, -1)
                    same = np.abs(flat_mine - flat_lapack).max(1) <= np.abs(
                        flat_mine + flat_lapack
                    ).max(1)
                    agree += int(same.sum())
                    sign = np.where(same, 1.0, -1.0).reshape(n, *[1] * (lapack.ndim - 1))
                    diff_abs, diff_rel = _relative(mine, sign * lapack)
                else:
                    diff_abs, diff_rel = _relative(got[CAM_RAW], want[CAM_RAW])
            else:
                want_raw = references.captum_reference(
                    method, model, x[chunk], explained, mean, std, steps=ig_steps
                )
                diff_abs, diff_rel = _relative(got[CAM_RAW], want_raw)
            if method not in references.CAM_CLASSES:
                theirs += time.perf_counter() - began
            worst_abs = max(worst_abs, diff_abs)
            worst_rel = max(worst_rel, float(diff_rel.max()))
            close += int((diff_rel <= 1e-4).sum())
        eigen = method in ("eigencam", "eigengradcam")
        check = MethodCheck(
            method=method,
            reference=references.CAM_CLASSES.get(method)
            or references.CAPTUM_CLASSES.get(method, "?"),
            images=len(x),
            max_abs=worst_abs,
            max_relative=worst_rel,
            tolerance=TOLERANCES.get(method, RELATIVE_TOL),
            within_1e4=close / len(x),
            seconds=ours,
            reference_seconds=theirs,
            sign_agreement=agree / len(x) if eigen else None,
        )
        checks[method] = check
        if not worst_rel <= check.tolerance:
            failed.append(f"{method} by {worst_rel:.3g} (max abs {worst_abs:.3g})")
        elif check.within_1e4 < MOST_WITHIN_1E4.get(method, 0.0):
            failed.append(
                f"{method} on {len(x) - close} of {len(x)} images by more than 1e-4 (at most "
                f"{1 - MOST_WITHIN_1E4[method]:.0%} may)"
            )
    if failed:
        raise ExportVerificationError(
            f"{folder}: methods differ from their reference libraries over {len(x)} images, "
            f"relative to each reference map's largest |value|: {', '.join(failed)}"
        )
    return checks
