"""Classifier export: checkpoint model -> one self-contained ONNX file, verified against PyTorch."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from export.errors import ExportVerificationError
from modelrepo import INPUT, LOGITS, PROBABILITIES

OPSET = 20  # the classifier and the explainer alike


class Classifier(nn.Module):
    """Normalisation inside the graph: pixels in [0, 1] in, (logits, probabilities) out."""

    def __init__(self, model: nn.Module, mean: float, std: float) -> None:
        super().__init__()
        self.model = model
        self.mean = mean
        self.std = std

    def forward(self, input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model((input - self.mean) / self.std)
        return logits, torch.softmax(logits, dim=1)


def export_classifier(
    model: nn.Module, input_shape: tuple[int, ...], mean: float, std: float, path: Path
) -> None:
    """Write `input` FP32 [-1, *input_shape] -> `logits`, `probabilities` FP32 [-1, classes]."""
    wrapper = Classifier(model, mean, std).eval()
    example = torch.rand(2, *input_shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            wrapper,
            (example,),
            dynamo=True,
            input_names=[INPUT],
            output_names=[LOGITS, PROBABILITIES],
            # By position: the keys of a dict would be forward()'s parameter names.
            dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
            opset_version=OPSET,
            external_data=False,
            verbose=False,
        )
    assert program is not None
    program.save(str(path), external_data=False)
    onnx.checker.check_model(str(path), full_check=True)


def verify_classifier(
    path: Path,
    model: nn.Module,
    pixels: np.ndarray,
    mean: float,
    std: float,
    batch_sizes: tuple[int, ...] = (1, 64),
    tol: float = 1e-4,
) -> float:
    """Max abs difference of ONNX Runtime's logits from PyTorch's; raises over `tol`."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    wrapper = Classifier(model, mean, std).eval()
    worst = 0.0
    for batch in batch_sizes:
        x = np.ascontiguousarray(pixels[:batch], dtype=np.float32)
        logits_ort, probs_ort = session.run([LOGITS, PROBABILITIES], {INPUT: x})
        with torch.no_grad():
            logits_pt, _ = wrapper(torch.from_numpy(x))
        diff = float(np.abs(logits_ort - logits_pt.numpy()).max())
        if not np.allclose(probs_ort.sum(axis=1), 1.0, atol=1e-5):
            raise ExportVerificationError(f"{path}: probabilities do not sum to 1 at batch {batch}")
        worst = max(worst, diff)
        if diff > tol:
            raise ExportVerificationError(
                f"{path}: ONNX Runtime logits differ from PyTorch by {diff:.3g} (max abs) at "
                f"batch {batch}; tolerance {tol:g}"
            )
    return worst
