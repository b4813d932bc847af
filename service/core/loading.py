"""Loading one model version: check its config and ONNX graph, open and warm its sessions.

`load_version` is the only way a `ServedModel` is made from the repository; everything that can
fail at load time (unsupported platform, config vs graph mismatch, a broken file) fails here with
a `ModelLoadError` naming the reason, and nothing of a failed load is left running.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import NamedTuple

import numpy as np

import modelrepo
from pb import model_config_pb2 as mc

from ..config import Settings
from ..observability.metrics import ServingMetrics
from .back_process import BackSpec
from .errors import ModelLoadError, ModelNotReady
from .model import ServedModel
from .ort_options import ort_options, warmup_samples
from .placement import back_cpus
from .repository import ModelFolder
from .runtime import CUDA, GraphTensor, OnnxSession, requested_providers
from .signature import Signature, TensorSpec

log = logging.getLogger(__name__)

ONNX_PLATFORMS = ("onnxruntime_onnx", "")
ONNX_BACKENDS = ("onnxruntime", "")
DEFAULT_CLASS_INPUTS = modelrepo.TARGET_CLASS
# The idle fast path runs on the event loop: it takes only requests expected to run within
# FAST_PATH_BUDGET_S (measured seconds per image x images, at least one image), and a model
# slower than FAST_PATH_MAX_S per image stays off it. The measurement at load is noisy on a
# busy host, hence a model limit above the per-request budget.
FAST_PATH_BUDGET_S = 0.001
FAST_PATH_MAX_S = 0.003


def build_signature(spec: ModelFolder) -> Signature:
    """The codec's view of a config; raises ModelLoadError for what we cannot serve."""
    config = spec.config
    value_range: tuple[int, int] | None = None
    class_inputs: set[str] = set()
    params = config.parameters
    if modelrepo.NUM_CLASSES in params:
        try:
            value_range = (-1, int(params[modelrepo.NUM_CLASSES].string_value))
        except ValueError:
            raise ModelLoadError(f"parameter {modelrepo.NUM_CLASSES} must be an integer") from None
        names = (
            params[modelrepo.CLASS_INPUTS].string_value
            if modelrepo.CLASS_INPUTS in params
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


def check_graph(sig: Signature, model: OnnxSession) -> None:
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


def instance_devices(config: mc.ModelConfig, device: str) -> list[str]:
    """One device per session to open: instance_group counts, KIND_CPU forcing the CPU."""
    devices: list[str] = []
    for group in config.instance_group:
        kind = "cpu" if group.kind == mc.ModelInstanceGroup.KIND_CPU else device
        devices.extend([kind] * max(group.count, 1))
    return devices or [device]


def _warmup_inputs(sig: Signature) -> dict[str, np.ndarray]:
    """One zero item per input, batch-first like every request inside the server."""
    return {
        t.name: np.zeros((1, *(max(d, 1) for d in t.model_dims)), dtype=t.dtype) for t in sig.inputs
    }


def _seconds(fn: Callable[[dict[str, np.ndarray]], object], arg: dict[str, np.ndarray]) -> float:
    start = time.perf_counter()
    fn(arg)
    return time.perf_counter() - start


def _check_config(config: mc.ModelConfig) -> None:
    if config.platform not in ONNX_PLATFORMS or config.backend not in ONNX_BACKENDS:
        raise ModelLoadError(
            f"platform '{config.platform or config.backend}' is not served; "
            "only onnxruntime_onnx models are"
        )
    if config.HasField("sequence_batching") or config.HasField("ensemble_scheduling"):
        raise ModelLoadError("sequence batching and ensembles are not supported")


class Sessions(NamedTuple):
    """What `_open_sessions` opened: the batch sessions (threads), the instance processes to
    start, the idle fast path's session (None when it is off or too slow) and its measured
    seconds per image."""

    sessions: list[OnnxSession]
    processes: list[BackSpec]
    latency: OnnxSession | None
    per_image: float


def _in_processes(settings: Settings, devices: list[str], signature: Signature) -> bool:
    """Whether the instances run in processes of their own: asked for, every instance on the
    CPU, and every input a plain numeric array (shared memory carries no Python objects)."""
    cpu_only = all(d == "cpu" or CUDA not in requested_providers(d) for d in devices)
    numeric = not any(np.dtype(t.dtype).hasobject for t in signature.inputs)
    # auto: where the placement gives the instances CPUs of their own. Where they share the
    # loop's CPU (one CPU, several workers) a process costs more than a thread (PROFILE item 33).
    wanted = settings.instances == "process" or (
        settings.instances == "auto" and back_cpus() is not None
    )
    return wanted and cpu_only and numeric


def _open_sessions(
    spec: ModelFolder, version: int, signature: Signature, settings: Settings
) -> Sessions:
    """Open, check and warm the sessions (blocking: run in a thread). With the instances in
    processes, this process opens one session only, to check the graph (and for the fast path)."""
    path = spec.versions[version]
    batching = signature.batching
    options = ort_options(spec.config)  # the config's ONNX Runtime options, over the defaults
    warmup = warmup_samples(spec.config, signature, spec.directory)
    devices = instance_devices(spec.config, settings.device)
    processes: list[BackSpec] = []
    if _in_processes(settings, devices, signature):
        cpus = back_cpus()
        # Polling for the next batch pays only on CPUs of the instances' own: elsewhere it would
        # take time from the event loop or from the other instances.
        own = cpus is not None and len(devices) <= len(cpus)
        processes = [
            BackSpec(
                path,
                settings.intra_op_threads,
                batching,
                options,
                tuple(warmup),
                cpus,
                settings.instance_spin_us if own else 0,
            )
            for _ in devices
        ]
        devices = devices[:1]
    sessions = [
        OnnxSession(
            path,
            intra_op_threads=settings.intra_op_threads,
            device=device,
            batched=batching,
            config_options=options,
        )
        for device in devices
    ]
    check_graph(signature, sessions[0])
    latency = None
    own_threads = (
        settings.intra_op_threads if options.intra_op_threads is None else options.intra_op_threads
    )
    if settings.latency_threads and sessions[0].provider != CUDA:
        # The first instance's own session when the thread counts match: no second copy of the
        # model in memory and in the caches (a second session cost 7-17% more CPU at 16 and 64).
        # Safe: the fast path runs only while no batch runs or waits, and while it runs the loop
        # cannot queue one.
        latency = (
            sessions[0]
            if settings.latency_threads == own_threads
            else OnnxSession(
                path,
                intra_op_threads=settings.latency_threads,
                device="cpu",
                spinning=False,
                batched=batching,
                config_options=replace(options, intra_op_threads=None, inter_op_threads=None),
            )
        )
    warmed = [] if processes else sessions  # an unused checking session needs no warm-up
    for session in [*warmed, *([latency] if latency and latency not in warmed else [])]:
        for sample in warmup:
            for _ in range(sample.count):
                session.run(sample.inputs)
    warm = _warmup_inputs(signature)
    per_image = 0.0
    if latency is not None:
        per_image = min(_seconds(latency.run, warm) for _ in range(5))
        if per_image > FAST_PATH_MAX_S:  # it would hold up the event loop: batcher only
            log.info("%s: one image takes %.1f ms, no idle fast path", spec.name, per_image * 1e3)
            latency = None
    return Sessions(sessions, processes, latency, per_image)


async def load_version(
    spec: ModelFolder, version: int, settings: Settings, metrics: ServingMetrics
) -> ServedModel:
    """Check the config, open the sessions (in a thread), warm them up and start serving."""
    _check_config(spec.config)
    signature = build_signature(spec)
    opened = await asyncio.to_thread(_open_sessions, spec, version, signature, settings)
    per_image = opened.per_image
    idle_max_size = max(1, int(FAST_PATH_BUDGET_S / per_image)) if per_image > 0 else 1
    model = ServedModel(
        spec,
        version,
        opened.sessions,
        signature,
        metrics,
        wait_for_preferred=settings.batching == "delay",
        max_queue_bytes=settings.max_queue_bytes,
        latency_session=opened.latency,
        idle_max_size=idle_max_size,
        processes=opened.processes,
    )
    try:
        await model.batcher.started()
    except BaseException as exc:
        await model.close()
        if isinstance(exc, ModelNotReady):
            raise ModelLoadError(f"an instance could not start: {exc}") from None
        raise
    where = "in processes" if opened.processes else "in threads"
    log.info(
        "loaded %s version %s: %d instance(s) on %s %s, max_batch_size %d",
        spec.name, version, model.instance_count, model.provider, where,
        signature.max_batch_size,
    )  # fmt: skip
    return model
