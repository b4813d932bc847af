"""Grad-CAM as a self-contained ONNX graph: forward, backward and the map, no PyTorch at serve time.

Three steps, one module each: `reference` (the math, and the eager autograd reference),
`trace` (forward and backward traced into one graph with the `decompositions`, then exported),
`verify` (the graph's structure, and its outputs in ONNX Runtime against the reference).
The names below are the public ones; import them from here.
"""

from export.errors import ExportVerificationError
from export.gradcam.reference import TargetLayerError, gradcam_reference
from export.gradcam.trace import (
    INPUT_NAMES,
    OUTPUT_NAMES,
    SALIENCY_OUTPUT_NAMES,
    export_gradcam,
    export_saliency,
    gradcam_graph,
    saliency_graph,
)
from export.gradcam.verify import run_explainer, verify_gradcam

__all__ = [
    "INPUT_NAMES",
    "OUTPUT_NAMES",
    "SALIENCY_OUTPUT_NAMES",
    "ExportVerificationError",
    "TargetLayerError",
    "export_gradcam",
    "export_saliency",
    "gradcam_graph",
    "gradcam_reference",
    "run_explainer",
    "saliency_graph",
    "verify_gradcam",
]
