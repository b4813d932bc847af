"""Run any explanation method from an explainer's version folder with plain ONNX Runtime.

The chaining of the graphs is `modelrepo.methods.explain_with_graphs` (the server's too); this
only opens the sessions, one per graph file, as methods need them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from modelrepo import METHODS_DIR
from modelrepo.methods import explain_with_graphs


class MethodRunner:
    """ONNX Runtime sessions over one explainer version folder, opened as methods need them."""

    def __init__(self, folder: Path, threads: int = 1) -> None:
        self.folder = Path(folder)
        self.threads = threads
        self._sessions: dict[str, ort.InferenceSession] = {}

    def session(self, relative: str) -> ort.InferenceSession:
        """The session of one graph file of the folder (opened once)."""
        if relative not in self._sessions:
            if not (self.folder / relative).is_file():
                raise FileNotFoundError(self.folder / relative)
            options = ort.SessionOptions()
            options.intra_op_num_threads = self.threads
            options.inter_op_num_threads = 1
            options.log_severity_level = 3
            self._sessions[relative] = ort.InferenceSession(
                str(self.folder / relative), options, providers=["CPUExecutionProvider"]
            )
        return self._sessions[relative]

    def run(self, relative: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one graph file with the feeds it takes; every output by name."""
        session = self.session(relative)
        names = [o.name for o in session.get_outputs()]
        wanted = {i.name for i in session.get_inputs()}
        values = session.run(names, {k: v for k, v in feeds.items() if k in wanted})
        return dict(zip(names, values, strict=True))

    def methods(self) -> list[str]:
        """The graph files under methods/ (the methods and their helper graphs), by stem."""
        return sorted(p.stem for p in (self.folder / METHODS_DIR).glob("*.onnx"))

    def explain(
        self, method: str, pixels: np.ndarray, target_class: np.ndarray, steps: int = 50
    ) -> dict[str, np.ndarray]:
        """cam_raw, cam (and the method's other outputs) and explained_class for a batch."""
        return explain_with_graphs(method, self.run, pixels, target_class, steps)
