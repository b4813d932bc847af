"""Run any explanation method from an explainer's version folder with plain ONNX Runtime.

The order of graph runs each method needs (the same the server follows): the explainer or the
input-gradient graph first, then the method's helper graphs and weight graphs, then its
weight-free method graph. Only array plumbing happens here; every number comes from ONNX Runtime.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from modelrepo import (
    ABLATE_FILE,
    ABLATED_INPUT,
    ABLATED_LOGITS,
    ACTIVATION_CAMS,
    ACTIVATIONS,
    EXPLAINED_CLASS,
    FORWARD_FILE,
    GRADIENT_CAMS,
    GRADIENTS,
    HEAD_FILE,
    HEAD_INPUT,
    IG_STEPS,
    INPUT,
    INPUT_GRADIENT,
    LOGITS,
    MASKED,
    MASKED_LOGITS,
    MASKS_FILE,
    METHODS_DIR,
    MODEL_FILE,
    SALIENCY_FILE,
    SCALED,
    SCALED_FILE,
    TARGET_CLASS,
)


class MethodRunner:
    """ONNX Runtime sessions over one explainer version folder, opened as methods need them."""

    def __init__(self, folder: Path, threads: int = 1) -> None:
        self.folder = Path(folder)
        self.threads = threads
        self._sessions: dict[str, ort.InferenceSession] = {}

    def session(self, relative: str) -> ort.InferenceSession:
        if relative not in self._sessions:
            options = ort.SessionOptions()
            options.intra_op_num_threads = self.threads
            options.inter_op_num_threads = 1
            options.log_severity_level = 3
            self._sessions[relative] = ort.InferenceSession(
                str(self.folder / relative), options, providers=["CPUExecutionProvider"]
            )
        return self._sessions[relative]

    def run(self, relative: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        session = self.session(relative)
        names = [o.name for o in session.get_outputs()]
        wanted = {i.name for i in session.get_inputs()}
        values = session.run(names, {k: v for k, v in feeds.items() if k in wanted})
        return dict(zip(names, values, strict=True))

    def methods(self) -> list[str]:
        """The methods whose graphs the folder holds."""
        return sorted(p.stem for p in (self.folder / METHODS_DIR).glob("*.onnx"))

    def explain(
        self, method: str, pixels: np.ndarray, target_class: np.ndarray, steps: int = 50
    ) -> dict[str, np.ndarray]:
        """cam_raw, cam and explained_class of `method` for a batch."""
        x = np.ascontiguousarray(pixels, dtype=np.float32)
        targets = np.ascontiguousarray(target_class, dtype=np.int64)
        graph = f"{METHODS_DIR}/{method}.onnx"
        if method in ("saliency", "integrated_gradients"):
            first = self.run(SALIENCY_FILE, {INPUT: x, TARGET_CLASS: targets})
            explained = first[EXPLAINED_CLASS]
            if method == "saliency":
                out = self.run(graph, {INPUT_GRADIENT: first[INPUT_GRADIENT]})
            else:
                counts = np.full(len(x), steps, dtype=np.int64)
                scaled = self.run(f"{METHODS_DIR}/{SCALED_FILE}", {INPUT: x, IG_STEPS: counts})
                repeated = np.repeat(explained, steps)
                grads = self.run(SALIENCY_FILE, {INPUT: scaled[SCALED], TARGET_CLASS: repeated})
                out = self.run(
                    graph, {INPUT: x, IG_STEPS: counts, INPUT_GRADIENT: grads[INPUT_GRADIENT]}
                )
            return {**out, EXPLAINED_CLASS: explained}
        first = self.run(MODEL_FILE, {INPUT: x, TARGET_CLASS: targets})
        explained = first[EXPLAINED_CLASS]
        feeds = {
            ACTIVATIONS: first[ACTIVATIONS],
            GRADIENTS: first[GRADIENTS],
            LOGITS: first[LOGITS],
            EXPLAINED_CLASS: explained,
            INPUT: x,
        }
        if method == "scorecam":
            masked = self.run(f"{METHODS_DIR}/{MASKS_FILE}", feeds)[MASKED]
            feeds[MASKED_LOGITS] = self.run(FORWARD_FILE, {INPUT: masked})[LOGITS]
        elif method == "ablationcam":
            ablated = self.run(f"{METHODS_DIR}/{ABLATE_FILE}", feeds)
            head = {INPUT: ablated[ABLATED_INPUT], HEAD_INPUT: ablated[HEAD_INPUT]}
            feeds[ABLATED_LOGITS] = self.run(HEAD_FILE, head)[LOGITS]
        elif method not in GRADIENT_CAMS + ACTIVATION_CAMS:
            raise ValueError(f"unknown method {method!r}")
        return {**self.run(graph, feeds), EXPLAINED_CLASS: explained}
