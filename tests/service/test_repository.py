"""Unit tests for service.core.repository and model loading: version policy, broken models, configs."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from pb import model_config_pb2 as mc
from service.config import Settings
from service.core import loading as loading_module
from service.core.errors import ModelLoadError, ModelNotFound, ModelNotReady
from service.core.loading import load_version
from service.core.ort_options import APPLIED
from service.core.repository import READY, UNAVAILABLE, ModelRepository, read_model, select_versions
from service.observability.metrics import ServingMetrics
from tests.support.onnx_models import (
    classifier_config,
    classifier_graph,
    explainer_config,
    explainer_graph,
    images,
    write_model,
)


def policy(text: str) -> mc.ModelVersionPolicy:
    from google.protobuf import text_format

    return text_format.Parse(text, mc.ModelVersionPolicy())


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", [7]),
        ("latest { num_versions: 2 }", [3, 7]),
        ("all {}", [1, 3, 7]),
        ("specific { versions: [1, 3] }", [1, 3]),
    ],
)
def test_version_policy(text: str, expected: list[int]) -> None:
    assert select_versions([1, 3, 7], policy(text)) == expected


def test_read_model_selects_versions_and_labels(tmp_path: Path) -> None:
    config = classifier_config("m", versions=policy("latest { num_versions: 2 }"))
    write_model(tmp_path, config, classifier_graph(), versions=(1, 2, 3))
    spec = read_model(tmp_path / "m")
    assert sorted(spec.versions) == [2, 3]
    assert spec.labels["probabilities"][3] == "digit_3"


def test_specific_policy_reports_missing_versions(tmp_path: Path) -> None:
    config = classifier_config("m", versions=policy("specific { versions: [1, 5] }"))
    write_model(tmp_path, config, classifier_graph(), versions=(1,))
    spec = read_model(tmp_path / "m")
    assert list(spec.versions) == [1] and spec.missing_versions == (5,)


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda d: (d / "config.pbtxt").unlink(), "no config.pbtxt"),
        (lambda d: (d / "config.pbtxt").write_text("name: 'm' bogus_field: 1"), "bogus_field"),
        (lambda d: (d / "config.pbtxt").write_text("name: 'other'"), "folder is 'm'"),
        (lambda d: (d / "1" / "model.onnx").unlink(), "no loadable version"),
        (lambda d: (d / "labels.txt").unlink(), "labels"),
    ],
)
def test_unreadable_models_say_why(tmp_path: Path, mutate: object, reason: str) -> None:
    directory = write_model(tmp_path, classifier_config("m"), classifier_graph())
    mutate(directory)  # type: ignore[operator]
    with pytest.raises(ModelLoadError, match=reason):
        read_model(directory)


def load_repository(root: Path) -> tuple[ModelRepository, dict[str, str]]:
    """Load every model with real sessions; returns the repository and states by name."""
    settings = Settings(model_repository=root)
    metrics = ServingMetrics(CollectorRegistry())

    async def loader(spec, version):  # type: ignore[no-untyped-def]
        return await load_version(spec, version, settings, metrics)

    async def run() -> tuple[ModelRepository, dict[str, str]]:
        repository = ModelRepository(root, loader)
        await repository.load_all()
        states = {e.name: e.state for e in repository.entries()}
        reasons = {e.name: e.reason for e in repository.entries()}
        await repository.close()
        return repository, {n: f"{states[n]}|{reasons[n]}" for n in states}

    return asyncio.run(run())


def test_broken_models_are_unavailable_with_reason_and_others_load(tmp_path: Path) -> None:
    write_model(tmp_path, classifier_config("good"), classifier_graph())
    write_model(tmp_path, explainer_config("good_gradcam"), explainer_graph())
    write_model(tmp_path, classifier_config("garbage"), b"not onnx at all")
    wrong_type = classifier_config("wrong_type")
    wrong_type.input[0].data_type = mc.TYPE_FP64
    write_model(tmp_path, wrong_type, classifier_graph())
    wrong_dims = classifier_config("wrong_dims")
    del wrong_dims.input[0].dims[:]
    wrong_dims.input[0].dims.extend([3, 28, 28])
    write_model(tmp_path, wrong_dims, classifier_graph())
    missing_output = classifier_config("missing_output")
    missing_output.output.add(name="features", data_type=mc.TYPE_FP32, dims=[5])
    write_model(tmp_path, missing_output, classifier_graph())
    (tmp_path / "empty_folder").mkdir()
    _, states = load_repository(tmp_path)
    assert states["good"].startswith(READY) and states["good_gradcam"].startswith(READY)
    expected = {
        "garbage": "INVALID_PROTOBUF",
        "wrong_type": "config says FP64, ONNX graph has FP32",
        "wrong_dims": "does not fit the ONNX graph",
        "missing_output": "'features' is not in the ONNX graph",
        "empty_folder": "no config.pbtxt",
    }
    for name, reason in expected.items():
        state, _, why = states[name].partition("|")
        assert state == UNAVAILABLE, name
        assert reason in why, (name, why)


def test_get_routes_versions(tmp_path: Path) -> None:
    config = classifier_config("m", versions=policy("all {}"))
    write_model(tmp_path, config, classifier_graph(), versions=(1, 2))
    settings = Settings(model_repository=tmp_path)
    metrics = ServingMetrics(CollectorRegistry())

    async def run() -> None:
        async def loader(spec, version):  # type: ignore[no-untyped-def]
            return await load_version(spec, version, settings, metrics)

        repository = ModelRepository(tmp_path, loader)
        await repository.load_all()
        assert repository.get("m")[0] == 2
        assert repository.get("m", "1")[0] == 1
        with pytest.raises(ModelNotFound):
            repository.get("m", "3")
        with pytest.raises(ModelNotFound):
            repository.get("nope")
        await repository.unload("m")
        with pytest.raises(ModelNotReady, match="unloaded"):
            repository.get("m")
        await repository.load("m")
        assert repository.get("m")[0] == 2
        await repository.close()

    asyncio.run(run())


@pytest.mark.parametrize(
    ("latency_threads", "max_s", "fast_path"),
    [(2, 5.0, True), (0, 5.0, False), (2, 0.0, False)],  # on; turned off; model too slow
)
def test_idle_fast_path_session_only_for_quick_cpu_models(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    latency_threads: int,
    max_s: float,
    fast_path: bool,
) -> None:
    monkeypatch.setattr(loading_module, "FAST_PATH_MAX_S", max_s)
    write_model(tmp_path, classifier_config("m"), classifier_graph())
    settings = Settings(model_repository=tmp_path, latency_threads=latency_threads)
    metrics = ServingMetrics(CollectorRegistry())

    async def run() -> None:
        spec = read_model(tmp_path / "m")
        model = await load_version(spec, 1, settings, metrics)
        assert (model.latency_session is not None) is fast_path
        await model.close()

    asyncio.run(run())


def test_idle_fast_path_shares_the_instance_session_when_threads_match(tmp_path: Path) -> None:
    """The default (1 thread, as the instances): no second copy of the model; another count: one."""
    write_model(tmp_path, classifier_config("m"), classifier_graph())
    metrics = ServingMetrics(CollectorRegistry())

    async def run() -> None:
        spec = read_model(tmp_path / "m")
        shared = await load_version(spec, 1, Settings(model_repository=tmp_path), metrics)
        assert shared.latency_session is shared.sessions[0]
        await shared.close()
        settings = Settings(model_repository=tmp_path, latency_threads=2)
        separate = await load_version(spec, 1, settings, metrics)
        assert separate.latency_session is not None
        assert separate.latency_session not in separate.sessions
        await separate.close()

    asyncio.run(run())


def test_process_instances_keep_no_model_copy_here_without_the_fast_path(tmp_path: Path) -> None:
    """The session this process opens to check the graph stays only as the fast path's."""
    write_model(tmp_path, classifier_config("m"), classifier_graph())
    metrics = ServingMetrics(CollectorRegistry())

    async def run() -> None:
        spec = read_model(tmp_path / "m")
        for latency_threads in (0, 1):
            settings = Settings(
                model_repository=tmp_path, instances="process", latency_threads=latency_threads
            )
            model = await load_version(spec, 1, settings, metrics)
            assert model.sessions == ([model.latency_session] if latency_threads else [])
            result = await model.infer({"input": images(2)}, 2)
            assert result["logits"].shape == (2, 10)
            config = model.reported_config()
            assert config.parameters[APPLIED].string_value  # still says what the sessions got
            assert model.path == tmp_path / "m" / "1" / "model.onnx"
            await model.close()

    asyncio.run(run())


def test_instance_processes_poll_only_on_cpus_of_their_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--instance-spin-us applies where the placement gives the instances a CPU each; with no
    placement (several workers, one CPU, --pin-threads off) they would poll on the loop's."""
    write_model(tmp_path, classifier_config("m"), classifier_graph())
    spec = read_model(tmp_path / "m")
    settings = Settings(model_repository=tmp_path, instances="process", instance_spin_us=700)
    signature = loading_module.build_signature(spec)
    for cpus, spin in ((frozenset({1}), 700), (frozenset({1, 2, 3}), 700), (None, 0)):
        monkeypatch.setattr(loading_module, "back_cpus", lambda cpus=cpus: cpus)
        opened = loading_module._open_sessions(spec, 1, signature, settings)
        assert [p.spin_us for p in opened.processes] == [spin]
        assert opened.processes[0].cpus == cpus


def test_auto_instances_are_processes_only_where_they_have_cpus_of_their_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_model(tmp_path, classifier_config("m"), classifier_graph())
    spec = read_model(tmp_path / "m")
    signature = loading_module.build_signature(spec)
    for instances, cpus, processes in (
        ("auto", frozenset({1}), 1),
        ("auto", None, 0),  # one CPU, several workers, --pin-threads off: threads
        ("thread", frozenset({1}), 0),
        ("process", None, 1),
    ):
        monkeypatch.setattr(loading_module, "back_cpus", lambda cpus=cpus: cpus)
        settings = Settings(model_repository=tmp_path, instances=instances)
        opened = loading_module._open_sessions(spec, 1, signature, settings)
        assert len(opened.processes) == processes, (instances, cpus)


@pytest.mark.parametrize("stray", ["²", "v2", "٣", "2a", ".git"])
def test_a_stray_version_folder_is_ignored(tmp_path: Path, stray: str) -> None:
    """Only folders named with ASCII digits are versions; others holding a model are ignored."""
    config = classifier_config("m", versions=policy("all {}"))
    directory = write_model(tmp_path, config, classifier_graph(), versions=(1,))
    (directory / stray).mkdir()
    (directory / stray / "model.onnx").write_bytes(classifier_graph().SerializeToString())
    spec = read_model(directory)
    assert sorted(spec.versions) == [1]
