"""One served model version: its sessions, signature, batcher, statistics and metrics.

`ServedModel.infer` is the whole request path after routing: decode, queue, run, encode.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping

import numpy as np

from pb import grpc_service_pb2 as pb
from pb import model_config_pb2 as mc

from .batcher import BatchFunction, BatchRecord, BatchResult, DynamicBatcher
from .codec import Signature, TensorSpec, decode_request, encode_response
from .config import Settings
from .errors import ModelLoadError, ServingError
from .metrics import ServingMetrics
from .repository import ModelSpec
from .runtime import CUDA, GraphTensor, OnnxModel
from .statistics import VersionStatistics

log = logging.getLogger(__name__)

ONNX_PLATFORMS = ("onnxruntime_onnx", "")
ONNX_BACKENDS = ("onnxruntime", "")
# Explainer configs name their class count; these inputs must then hold a class index or -1.
NUM_CLASSES_PARAMETER = "num_classes"
CLASS_INPUTS_PARAMETER = "class_inputs"
DEFAULT_CLASS_INPUTS = "target_class"
# The idle fast path runs on the event loop; a model slower than this per image stays off it.
FAST_PATH_MAX_S = 0.005


def build_signature(spec: ModelSpec) -> Signature:
    """The codec's view of a config; raises ModelLoadError for what we cannot serve."""
    config = spec.config
    value_range: tuple[int, int] | None = None
    class_inputs: set[str] = set()
    params = config.parameters
    if NUM_CLASSES_PARAMETER in params:
        try:
            value_range = (-1, int(params[NUM_CLASSES_PARAMETER].string_value))
        except ValueError:
            raise ModelLoadError(f"parameter {NUM_CLASSES_PARAMETER} must be an integer") from None
        names = (
            params[CLASS_INPUTS_PARAMETER].string_value
            if CLASS_INPUTS_PARAMETER in params
            else DEFAULT_CLASS_INPUTS
        )
        class_inputs = {n.strip() for n in names.split(",") if n.strip()}
    try:
        inputs = tuple(
            TensorSpec.from_config(t, value_range if t.name in class_inputs else None)
            for t in config.input
        )
        outputs = tuple(
            TensorSpec.from_config(t, labels=spec.labels.get(t.name, ())) for t in config.output
        )
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from None
    if not inputs or not outputs:
        raise ModelLoadError("config.pbtxt must list the model's inputs and outputs")
    return Signature(inputs, outputs, max(config.max_batch_size, 0))


def check_graph(sig: Signature, model: OnnxModel) -> None:
    """Check that the ONNX graph's inputs and outputs agree with the config."""
    graph_inputs = {t.name: t for t in model.inputs}
    graph_outputs = {t.name: t for t in model.outputs}
    for spec in sig.inputs:
        _check_tensor("input", spec, graph_inputs.get(spec.name), sig.batching)
    extra = sorted(set(graph_inputs) - set(sig.inputs_by_name))
    if extra:
        raise ModelLoadError(f"the ONNX graph has inputs the config lacks: {', '.join(extra)}")
    for spec in sig.outputs:
        _check_tensor("output", spec, graph_outputs.get(spec.name), sig.batching)


def _check_tensor(kind: str, spec: TensorSpec, graph: GraphTensor | None, batching: bool) -> None:
    if graph is None:
        raise ModelLoadError(f"config {kind} '{spec.name}' is not in the ONNX graph")
    if graph.datatype != spec.datatype:
        raise ModelLoadError(
            f"{kind} '{spec.name}': config says {spec.datatype}, ONNX graph has {graph.datatype}"
        )
    want = ((-1,) if batching else ()) + spec.model_dims
    if len(graph.shape) != len(want) or any(
        g != -1 and w != -1 and g != w for g, w in zip(graph.shape, want, strict=True)
    ):
        raise ModelLoadError(
            f"{kind} '{spec.name}': config shape {list(want)} (batch first) does not fit the "
            f"ONNX graph's {list(graph.shape)}"
        )


def _instance_devices(config: mc.ModelConfig, device: str) -> list[str]:
    """One device per session to open: instance_group counts, KIND_CPU forcing the CPU."""
    devices: list[str] = []
    for group in config.instance_group:
        kind = "cpu" if group.kind == mc.ModelInstanceGroup.KIND_CPU else device
        devices.extend([kind] * max(group.count, 1))
    return devices or [device]


def _warmup_inputs(sig: Signature) -> dict[str, np.ndarray]:
    lead = (1,) if sig.batching else ()
    return {
        t.name: np.zeros(lead + tuple(max(d, 1) for d in t.model_dims), dtype=t.dtype)
        for t in sig.inputs
    }


def _seconds(fn: Callable[[dict[str, np.ndarray]], object], arg: dict[str, np.ndarray]) -> float:
    start = time.perf_counter()
    fn(arg)
    return time.perf_counter() - start


class ServedModel:
    """A loaded model version behind its dynamic batcher."""

    def __init__(
        self,
        spec: ModelSpec,
        version: int,
        sessions: list[OnnxModel],
        signature: Signature,
        settings: Settings,
        metrics: ServingMetrics,
        latency_session: OnnxModel | None = None,
    ) -> None:
        self.name = spec.name
        self.version = str(version)
        self.config = spec.config
        self.signature = signature
        self.sessions = sessions
        self.provider = sessions[0].provider
        self.stats = VersionStatistics(self.name, self.version)
        self.metrics = metrics.version(self.name, self.version)
        self.in_flight = 0
        batching = spec.config.dynamic_batching
        functions: list[BatchFunction] = [self._function(s, signature.batching) for s in sessions]
        self.latency_session = latency_session
        self.batcher = DynamicBatcher(
            functions,
            max_batch_size=max(signature.max_batch_size, 1),
            max_queue_size=batching.default_queue_policy.max_queue_size,
            max_queue_delay_s=batching.max_queue_delay_microseconds / 1e6,
            preferred_batch_sizes=tuple(batching.preferred_batch_size),
            wait_for_preferred=settings.batching == "delay",
            on_batch=self._batch_done,
            idle_function=(
                self._function(latency_session, signature.batching) if latency_session else None
            ),
            name=f"{self.name}:{self.version}",
        )
        self.metrics.watch(lambda: self.batcher.queue_depth, lambda: self.in_flight)
        self.metrics.set_provider(self.provider)
        if any(s.provider == CUDA for s in sessions):
            metrics.enable_gpu()

    @staticmethod
    def _function(session: OnnxModel, batching: bool) -> BatchFunction:
        if batching:
            return session.run

        def unbatched(inputs: dict[str, np.ndarray]) -> Mapping[str, np.ndarray]:
            # A model without a batch dim runs one request at a time; the batcher sees batch 1.
            outputs = session.run({k: v[0] for k, v in inputs.items()})
            return {k: v[np.newaxis] for k, v in outputs.items()}

        return unbatched

    @classmethod
    async def load(
        cls, spec: ModelSpec, version: int, settings: Settings, metrics: ServingMetrics
    ) -> ServedModel:
        """Open the sessions (in a thread), check them against the config and warm them up."""
        config = spec.config
        if config.platform not in ONNX_PLATFORMS or config.backend not in ONNX_BACKENDS:
            raise ModelLoadError(
                f"platform '{config.platform or config.backend}' is not served; "
                "only onnxruntime_onnx models are"
            )
        if config.HasField("sequence_batching") or config.HasField("ensemble_scheduling"):
            raise ModelLoadError("sequence batching and ensembles are not supported")
        signature = build_signature(spec)
        path = spec.versions[version]

        def open_sessions() -> tuple[list[OnnxModel], OnnxModel | None]:
            sessions = [
                OnnxModel(path, intra_op_threads=settings.intra_op_threads, device=device)
                for device in _instance_devices(config, settings.device)
            ]
            check_graph(signature, sessions[0])
            latency = None
            if settings.latency_threads and sessions[0].provider != CUDA:
                latency = OnnxModel(
                    path, intra_op_threads=settings.latency_threads, device="cpu", spinning=False
                )
            warm = _warmup_inputs(signature)
            for session in [*sessions, *([latency] if latency else [])]:
                session.run(warm)
            if latency is not None:
                took = min(_seconds(latency.run, warm) for _ in range(3))
                if took > FAST_PATH_MAX_S:  # it would hold up the event loop: batcher only
                    log.info(
                        "%s: one image takes %.1f ms, no idle fast path", spec.name, took * 1e3
                    )
                    latency = None
            return sessions, latency

        sessions, latency = await asyncio.to_thread(open_sessions)
        model = cls(spec, version, sessions, signature, settings, metrics, latency)
        log.info(
            "loaded %s version %s: %d instance(s) on %s, max_batch_size %d",
            spec.name, version, len(sessions), model.provider, signature.max_batch_size,
        )  # fmt: skip
        return model

    async def infer(
        self, request: pb.ModelInferRequest, timeout_s: float | None = None
    ) -> pb.ModelInferResponse:
        """Decode, queue for a batch, run and encode one request, recording its statistics."""
        start = time.perf_counter_ns()
        self.in_flight += 1
        try:
            decoded = decode_request(request, self.signature)
            inputs = decoded.inputs
            if not self.signature.batching:
                inputs = {k: v[np.newaxis] for k, v in inputs.items()}
            result: BatchResult = await self.batcher.submit(inputs, decoded.batch_size, timeout_s)
            outputs = result.outputs
            if not self.signature.batching:
                outputs = {k: v[0] for k, v in outputs.items()}
            response = encode_response(
                request, self.version, outputs, decoded.outputs, self.signature.batching
            )
        except asyncio.CancelledError:
            self._failed(start, "cancelled")
            raise
        except Exception as exc:
            self._failed(start, exc.status.lower() if isinstance(exc, ServingError) else "internal")
            raise
        finally:
            self.in_flight -= 1
        elapsed = time.perf_counter_ns() - start
        self.stats.request_succeeded(elapsed, result, decoded.batch_size)
        self.metrics.request_done("success", elapsed / 1e9)
        self.metrics.queue_seconds.observe(result.queue_ns / 1e9)
        self.metrics.inferences.inc(decoded.batch_size)
        return response

    def _failed(self, start: int, outcome: str) -> None:
        elapsed = time.perf_counter_ns() - start
        self.stats.request_failed(elapsed)
        self.metrics.request_done(outcome, elapsed / 1e9)

    def _batch_done(self, record: BatchRecord) -> None:
        self.stats.batch_executed(record)
        if record.error is None:
            self.metrics.batch_size.observe(record.size)
            self.metrics.compute_seconds.observe(
                (record.input_ns + record.infer_ns + record.output_ns) / 1e9
            )

    async def close(self) -> None:
        """Finish the accepted requests, then stop the batcher and drop live metrics."""
        await self.batcher.close()
        self.metrics.remove()
