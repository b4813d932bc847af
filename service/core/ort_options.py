"""Per-model ONNX Runtime options and warm-up samples from config.pbtxt, as Triton defines them.

Options follow Triton's onnxruntime_backend: `parameters` intra_op_thread_count,
inter_op_thread_count, execution_mode (0 sequential, 1 parallel), enable_mem_arena,
enable_mem_pattern, memory.enable_memory_arena_shrinkage (a run option),
session.use_device_allocator_for_initializers; `optimization { graph { level } }` (-1 basic,
1 extended, 2 none, otherwise all); `optimization { execution_accelerators { ... } }`: on the CPU
`openvino` when this ONNX Runtime has it, GPU accelerators only on a CUDA session. A parameter
this server does not know is refused at load, naming it. What was applied is reported back in
ModelConfig's parameters.

`model_warmup` samples (zero_data, random_data, input_data_file from the model's warmup/ folder,
batch_size, count) replace the default warm-up of one zero item.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

import modelrepo
from pb import model_config_pb2 as mc

from .errors import ModelLoadError
from .signature import CONFIG_DATATYPES, Signature

INTRA, INTER, MODE = "intra_op_thread_count", "inter_op_thread_count", "execution_mode"
ARENA, PATTERN = "enable_mem_arena", "enable_mem_pattern"
SHRINKAGE = "memory.enable_memory_arena_shrinkage"
DEVICE_ALLOCATOR = "session.use_device_allocator_for_initializers"
ORT_PARAMETERS = (INTRA, INTER, MODE, ARENA, PATTERN, SHRINKAGE, DEVICE_ALLOCATOR)
# The project's own config parameters (export writes them; the server reads them).
APPLIED = "onnxruntime_options"  # the ModelConfig parameter that reports what was applied
OWN_PARAMETERS = (*modelrepo.OWN_PARAMETERS, APPLIED)

GRAPH_LEVELS = {
    -1: ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    1: ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    2: ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
}
CUDA = "CUDAExecutionProvider"
CPU_ACCELERATORS = {"openvino": "OpenVINOExecutionProvider"}
GPU_ACCELERATORS = {"tensorrt": "TensorrtExecutionProvider", "cuda": CUDA}


def _bool(key: str, text: str) -> bool:
    """Triton's ParseBoolValue: true/false, yes/no, on/off, 1/0 (any case)."""
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ModelLoadError(f"parameter {key}: '{text}' is not a boolean (1/0, true/false)")


def _int(key: str, text: str, low: int) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise ModelLoadError(f"parameter {key}: '{text}' is not an integer") from None
    if value < low:
        raise ModelLoadError(f"parameter {key} must be at least {low}; got {value}")
    return value


@dataclass(frozen=True)
class OrtOptions:
    """The options one model asks for; None leaves the server's default."""

    intra_op_threads: int | None = None
    inter_op_threads: int | None = None
    parallel: bool | None = None
    graph_level: int | None = None
    mem_arena: bool | None = None
    mem_pattern: bool | None = None
    session_entries: Mapping[str, str] = field(default_factory=dict)
    run_entries: Mapping[str, str] = field(default_factory=dict)
    cpu_providers: tuple[str, ...] = ()
    gpu_providers: tuple[str, ...] = ()

    def apply(self, options: ort.SessionOptions, *, threads: bool = True) -> None:
        """Set these options on SessionOptions already holding the server's defaults."""
        if threads and self.intra_op_threads is not None:
            options.intra_op_num_threads = self.intra_op_threads
        if threads and self.inter_op_threads is not None:
            options.inter_op_num_threads = self.inter_op_threads
        if self.parallel is not None:
            options.execution_mode = (
                ort.ExecutionMode.ORT_PARALLEL
                if self.parallel
                else ort.ExecutionMode.ORT_SEQUENTIAL
            )
        if self.graph_level is not None:
            options.graph_optimization_level = GRAPH_LEVELS.get(
                self.graph_level, ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            )
        if self.mem_arena is not None:
            options.enable_cpu_mem_arena = self.mem_arena
        if self.mem_pattern is not None:
            options.enable_mem_pattern = self.mem_pattern
        for key, value in self.session_entries.items():
            options.add_session_config_entry(key, value)

    def providers(self, base: list[str]) -> list[str]:
        """The providers to ask for: the config's accelerators before the server's choice."""
        extra = self.gpu_providers if CUDA in base else self.cpu_providers
        return [*(p for p in extra if p not in base), *base]

    def run_options(self) -> ort.RunOptions | None:
        """RunOptions carrying the run-time entries (arena shrinkage), or None."""
        if not self.run_entries:
            return None
        run = ort.RunOptions()
        for key, value in self.run_entries.items():
            run.add_run_config_entry(key, value)
        return run

    def describe(self, options: ort.SessionOptions) -> str:
        """What a session got, Triton's names: 'key=value' pairs, for ModelConfig."""
        level = {v: k for k, v in GRAPH_LEVELS.items()}.get(options.graph_optimization_level, 0)
        parts = [
            f"{INTRA}={options.intra_op_num_threads}",
            f"{INTER}={options.inter_op_num_threads}",
            f"{MODE}={int(options.execution_mode == ort.ExecutionMode.ORT_PARALLEL)}",
            f"graph.level={level}",
            f"{ARENA}={int(options.enable_cpu_mem_arena)}",
            f"{PATTERN}={int(options.enable_mem_pattern)}",
            *(f"{k}={v}" for k, v in {**self.session_entries, **self.run_entries}.items()),
        ]
        parts += [f"accelerator={p}" for p in self.cpu_providers]
        return " ".join(parts)


def ort_options(config: mc.ModelConfig) -> OrtOptions:
    """Read a config's ONNX Runtime options; ModelLoadError names what is unknown or invalid."""
    params = {k: v.string_value for k, v in config.parameters.items()}
    unknown = sorted(set(params) - set(ORT_PARAMETERS) - set(OWN_PARAMETERS))
    if unknown:
        raise ModelLoadError(
            f"unknown config parameter '{unknown[0]}'; ONNX Runtime parameters are: "
            f"{', '.join(ORT_PARAMETERS)}"
        )
    mode = _int(MODE, params[MODE], 0) if MODE in params else None
    if mode is not None and mode > 1:
        raise ModelLoadError(f"parameter {MODE} must be 0 (sequential) or 1 (parallel)")
    graph_level = None
    if config.optimization.HasField("graph"):
        graph_level = config.optimization.graph.level
    session_entries: dict[str, str] = {}
    if DEVICE_ALLOCATOR in params:
        session_entries[DEVICE_ALLOCATOR] = (
            "1" if _bool(DEVICE_ALLOCATOR, params[DEVICE_ALLOCATOR]) else "0"
        )
    run_entries = {SHRINKAGE: params[SHRINKAGE]} if SHRINKAGE in params else {}
    accelerators = config.optimization.execution_accelerators
    available = ort.get_available_providers()
    cpu = []
    for accelerator in accelerators.cpu_execution_accelerator:
        provider = CPU_ACCELERATORS.get(accelerator.name)
        if provider is None:
            raise ModelLoadError(
                f"unknown CPU execution accelerator '{accelerator.name}'; known: "
                f"{', '.join(CPU_ACCELERATORS)}"
            )
        if provider not in available:
            raise ModelLoadError(
                f"CPU execution accelerator '{accelerator.name}' needs {provider}, which this "
                "ONNX Runtime build lacks"
            )
        cpu.append(provider)
    gpu = []
    for accelerator in accelerators.gpu_execution_accelerator:
        provider = GPU_ACCELERATORS.get(accelerator.name)
        if provider is None:
            raise ModelLoadError(
                f"unknown GPU execution accelerator '{accelerator.name}'; known: "
                f"{', '.join(GPU_ACCELERATORS)}"
            )
        gpu.append(provider)  # used only by sessions on CUDA; a CPU session ignores it
    return OrtOptions(
        intra_op_threads=_int(INTRA, params[INTRA], 0) if INTRA in params else None,
        inter_op_threads=_int(INTER, params[INTER], 0) if INTER in params else None,
        parallel=bool(mode) if mode is not None else None,
        graph_level=graph_level,
        mem_arena=_bool(ARENA, params[ARENA]) if ARENA in params else None,
        mem_pattern=_bool(PATTERN, params[PATTERN]) if PATTERN in params else None,
        session_entries=session_entries,
        run_entries=run_entries,
        cpu_providers=tuple(cpu),
        gpu_providers=tuple(gpu),
    )


# model_warmup --------------------------------------------------------------------------------

WARMUP_DIR = "warmup"


@dataclass(frozen=True)
class WarmupSample:
    """One warm-up request: batch-first inputs, run `count` times."""

    name: str
    inputs: dict[str, np.ndarray]
    count: int


def warmup_samples(config: mc.ModelConfig, sig: Signature, model_dir: Path) -> list[WarmupSample]:
    """The config's model_warmup as arrays; one zero item per input when it has none."""
    if not config.model_warmup:
        zeros = {
            t.name: np.zeros((1, *(max(d, 1) for d in t.model_dims)), dtype=t.dtype)
            for t in sig.inputs
        }
        return [WarmupSample("zero", zeros, 1)]
    rng = np.random.default_rng(0)
    samples = []
    for warm in config.model_warmup:
        label = f"model_warmup '{warm.name}'"
        batch = max(warm.batch_size, 1)
        if sig.batching and batch > sig.max_batch_size:
            raise ModelLoadError(f"{label}: batch_size {batch} exceeds max_batch_size")
        if not sig.batching and warm.batch_size > 1:
            raise ModelLoadError(f"{label}: batch_size above 1 needs max_batch_size > 0")
        missing = sorted(set(sig.inputs_by_name) - set(warm.inputs))
        extra = sorted(set(warm.inputs) - set(sig.inputs_by_name))
        if missing or extra:
            raise ModelLoadError(
                f"{label}: inputs must be the model's ({', '.join(sig.inputs_by_name)}); "
                f"missing {missing or 'none'}, unknown {extra or 'none'}"
            )
        arrays = {}
        for name, spec in sig.inputs_by_name.items():
            item = warm.inputs[name]
            if CONFIG_DATATYPES.get(item.data_type) != spec.datatype:
                raise ModelLoadError(f"{label}: input '{name}' data_type differs from the model's")
            dims = tuple(item.dims)
            if not spec.accepts(dims):
                raise ModelLoadError(
                    f"{label}: input '{name}' dims {list(dims)} do not match the model's "
                    f"{list(spec.dims)}"
                )
            count = math.prod(dims)
            shape = spec.model_dims if -1 not in spec.model_dims else dims
            kind = item.WhichOneof("input_data_type")
            if kind == "random_data":
                if spec.dtype.kind == "f":
                    one = rng.random(count).astype(spec.dtype)
                elif spec.dtype.kind in "iu":
                    one = rng.integers(0, 2, count).astype(spec.dtype)  # valid in any range
                else:
                    one = np.zeros(count, spec.dtype)
            elif kind == "input_data_file":
                one = _from_file(label, name, model_dir, item.input_data_file, spec.dtype, count)
            else:  # zero_data, or nothing chosen
                one = np.zeros(count, spec.dtype)
            # one sample, repeated batch_size times, batch-first as everything in the server
            arrays[name] = np.broadcast_to(one.reshape(shape), (batch, *shape)).copy()
            if spec.value_range is not None and one.size:
                low, high = spec.value_range
                arrays[name] = np.clip(arrays[name], low, high - 1)
        samples.append(WarmupSample(warm.name, arrays, max(warm.count, 1)))
    return samples


def _from_file(
    label: str, name: str, model_dir: Path, filename: str, dtype: np.dtype, count: int
) -> np.ndarray:
    folder = (model_dir / WARMUP_DIR).resolve()
    path = (folder / filename).resolve()
    if folder not in path.parents:
        raise ModelLoadError(f"{label}: input_data_file '{filename}' is outside {WARMUP_DIR}/")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelLoadError(
            f"{label}: cannot read {WARMUP_DIR}/{filename}: {exc.strerror}"
        ) from None
    if len(data) != count * dtype.itemsize:
        raise ModelLoadError(
            f"{label}: {WARMUP_DIR}/{filename} holds {len(data)} bytes; input '{name}' needs "
            f"{count * dtype.itemsize}"
        )
    return np.frombuffer(data, dtype=dtype).copy()
