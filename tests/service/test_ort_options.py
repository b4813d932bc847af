"""Per-model ONNX Runtime options and model_warmup from config.pbtxt, as Triton names them."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from prometheus_client import CollectorRegistry

from pb import model_config_pb2 as mc
from service.config import Settings
from service.core import loading as loading_module
from service.core.errors import ModelLoadError
from service.core.loading import build_signature, load_version
from service.core.ort_options import APPLIED, ort_options, warmup_samples
from service.core.repository import read_model
from service.observability.metrics import ServingMetrics
from tests.support.onnx_models import classifier_config, classifier_graph, write_model


def config_with(**params: str) -> mc.ModelConfig:
    config = classifier_config("m")
    for key, value in params.items():
        config.parameters[key.replace("__", ".")].string_value = value
    return config


def test_triton_parameters_are_applied_to_the_session_options() -> None:
    config = config_with(
        intra_op_thread_count="3",
        inter_op_thread_count="2",
        execution_mode="1",
        enable_mem_arena="0",
        enable_mem_pattern="false",
        memory__enable_memory_arena_shrinkage="cpu:0",
    )
    config.optimization.graph.level = 2
    options = ort_options(config)
    session_options = ort.SessionOptions()
    session_options.intra_op_num_threads = 1  # the server's default, overridden by the config
    options.apply(session_options)
    assert session_options.intra_op_num_threads == 3
    assert session_options.inter_op_num_threads == 2
    assert session_options.execution_mode == ort.ExecutionMode.ORT_PARALLEL
    assert session_options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    assert not session_options.enable_cpu_mem_arena and not session_options.enable_mem_pattern
    assert options.run_options() is not None
    described = options.describe(session_options)
    assert "intra_op_thread_count=3" in described and "graph.level=2" in described
    assert "memory.enable_memory_arena_shrinkage=cpu:0" in described


@pytest.mark.parametrize(
    ("level", "expected"),
    [
        (-1, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC),
        (1, ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED),
        (2, ort.GraphOptimizationLevel.ORT_DISABLE_ALL),
        (0, ort.GraphOptimizationLevel.ORT_ENABLE_ALL),
    ],
)
def test_graph_levels_mean_what_triton_says(level: int, expected: object) -> None:
    config = classifier_config("m")
    config.optimization.graph.level = level
    session_options = ort.SessionOptions()
    ort_options(config).apply(session_options)
    assert session_options.graph_optimization_level == expected


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"intra_op_threads": "2"}, "unknown config parameter 'intra_op_threads'"),
        ({"execution_mode": "2"}, "0 \\(sequential\\) or 1"),
        ({"intra_op_thread_count": "many"}, "not an integer"),
        ({"inter_op_thread_count": "-1"}, "at least 0"),
        ({"enable_mem_arena": "maybe"}, "not a boolean"),
    ],
)
def test_bad_parameters_are_refused_naming_them(params: dict[str, str], message: str) -> None:
    with pytest.raises(ModelLoadError, match=message):
        ort_options(config_with(**params))


def test_accelerators() -> None:
    config = classifier_config("m")
    config.optimization.execution_accelerators.cpu_execution_accelerator.add(name="fpga")
    with pytest.raises(ModelLoadError, match="unknown CPU execution accelerator 'fpga'"):
        ort_options(config)
    config = classifier_config("m")
    config.optimization.execution_accelerators.cpu_execution_accelerator.add(name="openvino")
    if "OpenVINOExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(ModelLoadError, match="lacks"):
            ort_options(config)
    config = classifier_config("m")
    config.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
    options = ort_options(config)  # GPU accelerators: only sessions on CUDA use them
    assert options.providers(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert options.providers(["CUDAExecutionProvider", "CPUExecutionProvider"])[0] == (
        "TensorrtExecutionProvider"
    )


def test_warmup_samples(tmp_path: Path) -> None:
    config = classifier_config("m")
    sig = build_signature(read_model(write_model(tmp_path, config, classifier_graph())))
    [default] = warmup_samples(config, sig, tmp_path / "m")
    assert default.inputs["input"].shape == (1, 1, 28, 28) and not default.inputs["input"].any()

    sample = np.arange(784, dtype=np.float32) / 784
    (tmp_path / "m" / "warmup").mkdir()
    (tmp_path / "m" / "warmup" / "digit.bin").write_bytes(sample.tobytes())
    for name, kind, value in (
        ("zeros", "zero_data", True),
        ("noise", "random_data", True),
        ("file", "input_data_file", "digit.bin"),
    ):
        warm = config.model_warmup.add(name=name, batch_size=4, count=2)
        item = warm.inputs["input"]
        item.data_type = mc.TYPE_FP32
        item.dims.extend([1, 28, 28])
        setattr(item, kind, value)
    zeros, noise, from_file = warmup_samples(config, sig, tmp_path / "m")
    assert zeros.inputs["input"].shape == (4, 1, 28, 28) and zeros.count == 2
    assert not zeros.inputs["input"].any() and noise.inputs["input"].std() > 0.1
    np.testing.assert_array_equal(from_file.inputs["input"][3].ravel(), sample)

    config.model_warmup[2].inputs["input"].input_data_file = "../config.pbtxt"
    with pytest.raises(ModelLoadError, match="outside warmup/"):
        warmup_samples(config, sig, tmp_path / "m")
    config.model_warmup[2].inputs["input"].input_data_file = "missing.bin"
    with pytest.raises(ModelLoadError, match=r"cannot read warmup/missing\.bin"):
        warmup_samples(config, sig, tmp_path / "m")
    config.model_warmup[2].batch_size = 64
    with pytest.raises(ModelLoadError, match="exceeds max_batch_size"):
        warmup_samples(config, sig, tmp_path / "m")


def test_loaded_model_reports_its_options_and_runs_its_warmup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = config_with(intra_op_thread_count="2", enable_mem_pattern="0")
    warm = config.model_warmup.add(name="w", batch_size=3, count=5)
    item = warm.inputs["input"]
    item.data_type = mc.TYPE_FP32
    item.dims.extend([1, 28, 28])
    item.random_data = True
    write_model(tmp_path, config, classifier_graph())
    runs: list[int] = []
    original = loading_module.OnnxSession.run

    def counting(self: loading_module.OnnxSession, inputs: dict[str, np.ndarray]) -> object:
        runs.append(next(iter(inputs.values())).shape[0])
        return original(self, inputs)

    monkeypatch.setattr(loading_module.OnnxSession, "run", counting)
    # Instance threads: the warm-up runs in this process, where it can be counted.
    settings = Settings(model_repository=tmp_path, latency_threads=0, instances="thread")

    async def run() -> mc.ModelConfig:
        model = await load_version(
            read_model(tmp_path / "m"), 1, settings, ServingMetrics(CollectorRegistry())
        )
        reported = model.reported_config()
        await model.close()
        return reported

    reported = asyncio.run(run())
    applied = reported.parameters[APPLIED].string_value
    assert "intra_op_thread_count=2" in applied and "enable_mem_pattern=0" in applied
    assert runs == [3] * 5  # the config's warm-up, five times, instead of one zero item
    # Instance processes get the same samples to run before they report ready.
    spec = read_model(tmp_path / "m")
    opened = loading_module._open_sessions(
        spec, 1, loading_module.build_signature(spec), replace(settings, instances="process")
    )
    ((sample,),) = [p.warmup for p in opened.processes]
    assert (sample.count, sample.inputs["input"].shape) == (5, (3, 1, 28, 28))

    config.parameters["intra_op_threads"].string_value = "2"
    write_model(tmp_path, config, classifier_graph())
    with pytest.raises(ModelLoadError, match="'intra_op_threads'"):
        asyncio.run(run())
