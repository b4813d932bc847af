"""ONNX Runtime sessions for one model version: provider choice, I/O signature, running a batch.

Knows nothing of gRPC or queues: `run` maps input arrays to output arrays.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from modelrepo.datatypes import ORT_DATATYPES

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


@dataclass(frozen=True)
class GraphTensor:
    """An ONNX graph input or output: name, protocol datatype, shape (-1 for symbolic dims)."""

    name: str
    datatype: str
    shape: tuple[int, ...]


def requested_providers(device: str) -> list[str]:
    """Providers to ask for: CUDA first when wanted and compiled in, the CPU always last."""
    available = ort.get_available_providers()
    if device in ("auto", "cuda") and CUDA in available:
        return [CUDA, CPU]
    if device == "cuda":
        log.warning("CUDA requested but this onnxruntime build has no %s; using the CPU", CUDA)
    return [CPU]


def session_options(intra_op_threads: int = 1, *, spinning: bool = True) -> ort.SessionOptions:
    """The server's ONNX Runtime session options: `intra_op_threads`, one graph at a time."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    # Idle intra-op threads spin by default; a session used now and then should not.
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return options


class OnnxSession:
    """One ONNX Runtime session; `run` is safe to call from one thread at a time.

    `run` takes and returns batch-first arrays, as everything in the server does. For a graph
    without a batch dimension (`batched=False`) it is the one place that drops the leading axis
    of 1 before running and puts it back after.
    """

    def __init__(
        self,
        path: Path,
        *,
        intra_op_threads: int = 1,
        device: str = "auto",
        spinning: bool = True,
        batched: bool = True,
    ) -> None:
        options = session_options(intra_op_threads, spinning=spinning)
        self.path = path
        self.batched = batched
        self.session = ort.InferenceSession(
            str(path), sess_options=options, providers=requested_providers(device)
        )
        # What a session really got: asking for CUDA silently falls back to the CPU.
        self.provider: str = self.session.get_providers()[0]
        if device == "cuda" and self.provider != CUDA:
            log.warning("%s: CUDA requested, session runs on %s", path, self.provider)
        self.inputs = tuple(_graph_tensor(t) for t in self.session.get_inputs())
        self.outputs = tuple(_graph_tensor(t) for t in self.session.get_outputs())
        self._output_names = [t.name for t in self.outputs]

    def run(
        self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Run one batch; returns every output (or those named) by name."""
        names = list(output_names) if output_names is not None else self._output_names
        if self.batched:
            values = self.session.run(names, dict(inputs))
            return dict(zip(names, values, strict=True))
        values = self.session.run(names, {k: v[0] for k, v in inputs.items()})
        return {name: value[np.newaxis] for name, value in zip(names, values, strict=True)}


def _graph_tensor(arg: ort.NodeArg) -> GraphTensor:
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or ()))
    return GraphTensor(arg.name, ORT_DATATYPES.get(arg.type, arg.type), shape)
