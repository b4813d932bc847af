"""Write models into the Triton-layout repository (`modelrepo`): config from the graph, new versions."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from modelrepo import (
    LABELS_FILE,
    MODEL_FILE,
    PROBABILITIES,
    version_folders,
    write_config,
    write_labels,
)
from modelrepo.datatypes import ONNX_TO_CONFIG
from pb import model_config_pb2 as mc


@dataclass
class BatchingPolicy:
    """The dynamic-batching part of config.pbtxt."""

    max_batch_size: int = 128
    max_queue_delay_microseconds: int = 1000
    preferred_batch_size: list[int] = field(default_factory=list)
    max_queue_size: int = 2048
    instance_count: int = 1


def _tensor_dims(value: onnx.ValueInfoProto) -> tuple[int, list[int]]:
    """(ONNX elem type, dims without the batch dimension; -1 for a symbolic dim)."""
    tensor = value.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
    if not dims or dims[0] != -1:
        raise ValueError(f"{value.name}: the first dimension must be the dynamic batch, got {dims}")
    return tensor.elem_type, dims[1:]


def config_from_onnx(
    name: str,
    model_path: Path,
    policy: BatchingPolicy,
    labels_output: str | None = PROBABILITIES,
    parameters: dict[str, str] | None = None,
) -> mc.ModelConfig:
    """A ModelConfig whose inputs and outputs are read from the ONNX file itself."""
    graph = onnx.load(str(model_path), load_external_data=False).graph
    return config_from_graph(name, graph, policy, labels_output, parameters)


def config_from_graph(
    name: str,
    graph: onnx.GraphProto,
    policy: BatchingPolicy,
    labels_output: str | None = PROBABILITIES,
    parameters: dict[str, str] | None = None,
) -> mc.ModelConfig:
    """A ModelConfig whose inputs and outputs are read from an ONNX graph."""
    config = mc.ModelConfig(
        name=name,
        platform="onnxruntime_onnx",
        backend="onnxruntime",
        max_batch_size=policy.max_batch_size,
        version_policy=mc.ModelVersionPolicy(latest=mc.ModelVersionPolicy.Latest(num_versions=1)),
    )
    initialisers = {init.name for init in graph.initializer}
    for value in graph.input:
        if value.name in initialisers:
            continue
        elem, dims = _tensor_dims(value)
        tensor = config.input.add(name=value.name, data_type=ONNX_TO_CONFIG[elem])
        # A per-item scalar travels as [1] on the wire (Triton's convention) and [] in the graph.
        tensor.dims.extend(dims or [1])
        if not dims:
            tensor.reshape.SetInParent()
    for value in graph.output:
        elem, dims = _tensor_dims(value)
        out = config.output.add(name=value.name, data_type=ONNX_TO_CONFIG[elem])
        out.dims.extend(dims or [1])
        if not dims:
            out.reshape.SetInParent()
        if value.name == labels_output:
            out.label_filename = LABELS_FILE
    batching = config.dynamic_batching
    batching.max_queue_delay_microseconds = policy.max_queue_delay_microseconds
    batching.preferred_batch_size.extend(policy.preferred_batch_size)
    batching.default_queue_policy.max_queue_size = policy.max_queue_size
    config.instance_group.add(count=policy.instance_count, kind=mc.ModelInstanceGroup.KIND_AUTO)
    for key, text in (parameters or {}).items():
        config.parameters[key].string_value = text
    return config


def next_version(model_dir: Path) -> int:
    """1 for a new model, else one above the highest version folder (ASCII digits only)."""
    return max(version_folders(model_dir), default=0) + 1


def write_model(
    repository: Path,
    name: str,
    onnx_file: Path,
    labels: list[str],
    policy: BatchingPolicy,
    labels_output: str | None = PROBABILITIES,
    parameters: dict[str, str] | None = None,
) -> Path:
    """Add `onnx_file` as a new version of `name` (never overwriting one); returns its path."""
    model_dir = repository / name
    version_dir = model_dir / str(next_version(model_dir))
    version_dir.mkdir(parents=True)
    target = version_dir / MODEL_FILE
    shutil.copyfile(onnx_file, target)
    write_config(model_dir, config_from_onnx(name, target, policy, labels_output, parameters))
    write_labels(model_dir, labels)
    return target


def write_model_folder(
    repository: Path,
    name: str,
    folder: Path,
    labels: list[str],
    policy: BatchingPolicy,
    labels_output: str | None = PROBABILITIES,
    parameters: dict[str, str] | None = None,
) -> Path:
    """Add a folder (model.onnx and the files beside it) as a new version of `name`.

    The config is read from its model.onnx; returns the path of that file.
    """
    model_dir = repository / name
    version_dir = model_dir / str(next_version(model_dir))
    model_dir.mkdir(parents=True, exist_ok=True)
    shutil.copytree(folder, version_dir)
    target = version_dir / MODEL_FILE
    write_config(model_dir, config_from_onnx(name, target, policy, labels_output, parameters))
    write_labels(model_dir, labels)
    return target
