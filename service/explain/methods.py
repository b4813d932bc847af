"""Explanation methods beyond Grad-CAM: the explainer folder's other graphs, run for a model.

The explainer itself (`model.onnx`) runs through `ServedModel.infer` like any request (batched,
counted); its activations and gradients then go through the method's weight-free graph, and
where a method needs more passes (ScoreCAM's masked inputs, AblationCAM's head, the input
gradient of Saliency and Integrated Gradients) through the folder's weight graphs, each an
`OnnxSession` opened on first use. Every number comes from ONNX Runtime; the chaining is
`modelrepo.methods.explain_with_graphs`, the same the export step verifies.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Mapping
from pathlib import Path

import numpy as np

import modelrepo
from modelrepo.methods import (
    NEEDS_EXPLAINER,
    TAKES_EXPLAINER_OUTPUTS,
    check_method,
    explain_with_graphs,
    parse_methods,
)

from ..core.errors import InvalidInput
from ..core.model import ServedModel
from ..core.ort_options import SHRINKAGE, OrtOptions
from ..core.runtime import OnnxSession

# Method graphs run now and then, some on hundreds of variants of an image (Integrated
# Gradients' steps, Score-CAM's masks): ONNX Runtime's arena gives what a run used back at its end,
# so one large request does not keep its peak for the life of the process.
SHRINK_AFTER_RUN = OrtOptions(run_entries={SHRINKAGE: "cpu:0"})


class MethodGraphs:
    """The sessions of one explainer version's method and weight graphs, opened on first use."""

    # Method runs at once per explainer version: each can hold MAX_VARIANTS images' activations.
    CONCURRENT_RUNS = 2

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._sessions: dict[str, OnnxSession] = {}
        self._lock = threading.Lock()
        self._runs = threading.BoundedSemaphore(self.CONCURRENT_RUNS)

    def run(self, relative: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one graph of the folder (blocking: call from a worker thread)."""
        with self._lock:
            session = self._sessions.get(relative)
            if session is None:
                if not (self.folder / relative).is_file():
                    raise FileNotFoundError(self.folder / relative)
                session = OnnxSession(
                    self.folder / relative,
                    intra_op_threads=1,
                    device="cpu",
                    config_options=SHRINK_AFTER_RUN,
                )
                self._sessions[relative] = session
        wanted = {t.name for t in session.inputs}
        return session.run({k: v for k, v in feeds.items() if k in wanted})

    def explain(
        self,
        method: str,
        pixels: np.ndarray,
        targets: np.ndarray,
        steps: int,
        first: Mapping[str, np.ndarray] | None,
    ) -> dict[str, np.ndarray]:
        """The method's outputs (cam, cam_raw, ...) for a batch (blocking)."""
        with self._runs:
            return explain_with_graphs(method, self.run, pixels, targets, steps, first)


# How the pictures name each method (the papers' spellings).
TITLES = {
    "gradcam": "Grad-CAM",
    "hirescam": "HiResCAM",
    "gradcam_elementwise": "Grad-CAM element-wise",
    "gradcam_plusplus": "Grad-CAM++",
    "xgradcam": "XGrad-CAM",
    "layercam": "LayerCAM",
    "eigengradcam": "EigenGradCAM",
    "eigencam": "EigenCAM",
    "scorecam": "Score-CAM",
    "ablationcam": "Ablation-CAM",
    "saliency": "Saliency",
    "integrated_gradients": "Integrated Gradients",
}


def title(method: str) -> str:
    """A method's name as people write it."""
    return TITLES.get(method, method)


_GRAPHS: weakref.WeakKeyDictionary[ServedModel, MethodGraphs] = weakref.WeakKeyDictionary()
_GRAPHS_LOCK = threading.Lock()


def offered(model: ServedModel) -> tuple[str, ...]:
    """The methods an explainer offers (its config's `methods`; Grad-CAM alone without it)."""
    parameter = model.config.parameters.get(modelrepo.METHODS)
    listed = parse_methods(parameter.string_value) if parameter is not None else ()
    return listed or (modelrepo.DEFAULT_METHOD,)


def check(model: ServedModel, method: str, steps: int = modelrepo.DEFAULT_IG_STEPS) -> str:
    """The method to run ('' means the default); InvalidInput for one the model lacks."""
    chosen = method or modelrepo.DEFAULT_METHOD
    try:
        check_method(chosen, offered(model), steps)
    except ValueError as exc:
        raise InvalidInput(f"method: {exc}") from None
    return chosen


def graphs_of(model: ServedModel) -> MethodGraphs:
    """The method graphs beside a loaded explainer's model.onnx (one set per loaded version)."""
    with _GRAPHS_LOCK:
        graphs = _GRAPHS.get(model)
        if graphs is None:
            graphs = MethodGraphs(model.path.parent)
            _GRAPHS[model] = graphs
        return graphs


def needs_explainer(method: str) -> bool:
    """Whether the method needs the explainer's gradients first (the gradient CAMs); the others
    start from a forward pass or the input gradient."""
    return method in NEEDS_EXPLAINER


def requested(parameters: Mapping[str, object]) -> tuple[str, int] | None:
    """(method, ig_steps) asked for by a ModelInfer request's parameters, None for Grad-CAM.

    `parameters` maps names to values already decoded from the protocol (str or int).
    """
    method = parameters.get(modelrepo.METHOD)
    steps = parameters.get(modelrepo.IG_STEPS, modelrepo.DEFAULT_IG_STEPS)
    if method is None and modelrepo.IG_STEPS not in parameters:
        return None
    if not isinstance(method, str | type(None)) or not isinstance(steps, int):
        raise InvalidInput(
            f"parameters: '{modelrepo.METHOD}' takes a string, '{modelrepo.IG_STEPS}' an integer"
        )
    chosen = method or modelrepo.DEFAULT_METHOD
    return (chosen, steps) if chosen != modelrepo.DEFAULT_METHOD else None


async def replace_maps(
    model: ServedModel,
    method: str,
    steps: int,
    inputs: Mapping[str, np.ndarray],
    outputs: dict[str, np.ndarray],
) -> dict[str, np.ndarray]:
    """An explainer's ModelInfer outputs with `cam` and `cam_raw` from another method.

    `cam` keeps its shape; `cam_raw` is the method's raw map (for Saliency and Integrated
    Gradients the attribution itself, shaped as the input).
    """
    chosen = check(model, method, steps)
    targets = np.asarray(outputs[modelrepo.EXPLAINED_CLASS]).reshape(-1)
    pixels = inputs[modelrepo.INPUT]
    first = outputs if chosen in TAKES_EXPLAINER_OUTPUTS else None
    result = await asyncio.to_thread(
        graphs_of(model).explain, chosen, pixels, targets, steps, first
    )
    replaced = dict(outputs)
    replaced[modelrepo.CAM] = result[modelrepo.CAM]
    replaced[modelrepo.CAM_RAW] = result[modelrepo.CAM_RAW]
    return replaced
