"""The gRPC front without the rest of the server: the raw-bytes handlers (parsing, the error
mapping, counting and rate-limited logging) and the servicers over a real repository, each on a
real grpc.aio server on a free port."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

import service
from pb import explain_pb2 as ex
from pb import explain_pb2_grpc as ex_grpc
from pb import grpc_service_pb2 as pb
from pb import grpc_service_pb2_grpc as pb_grpc
from service.app import EXPLAIN_SERVICE, INFERENCE_SERVICE
from service.config import Settings
from service.core.errors import INTERNAL_MESSAGE, ModelNotFound, QueueFull
from service.core.loading import load_version
from service.core.model import ServedModel
from service.core.repository import ModelRepository
from service.observability.metrics import ServingMetrics
from service.rpc.handlers import RateLimitedLog, Rejections, service_handler
from service.rpc.servicers import ExplainServicer, InferenceServicer
from tests.support.harness import infer_request
from tests.support.onnx_models import (
    classifier_config,
    classifier_graph,
    explainer_config,
    explainer_graph,
    images,
    reference_logits,
    write_model,
)


def rejections(counts: Counter[str]) -> Rejections:
    return Rejections(
        lambda reason: counts.update([reason]), RateLimitedLog(logging.getLogger("t"))
    )


async def serve(*handlers: grpc.GenericRpcHandler) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(handlers)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


class Failing(pb_grpc.GRPCInferenceServiceServicer):
    """Each method fails its own way."""

    async def ServerLive(self, request: Any, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ModelReady(self, request: Any, context: Any) -> pb.ModelReadyResponse:
        raise ModelNotFound("no model 'x'")

    async def ServerReady(self, request: Any, context: Any) -> pb.ServerReadyResponse:
        raise QueueFull("full")

    async def ServerMetadata(self, request: Any, context: Any) -> pb.ServerMetadataResponse:
        raise RuntimeError("a bug with a secret in its message")

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[Any], context: Any
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        async for request in request_iterator:  # a bad frame arrives as an InvalidInput item
            yield pb.ModelStreamInferResponse(error_message=str(request)[:60])


def test_handlers_parse_map_count_and_hide_internal_errors() -> None:
    counts: Counter[str] = Counter()

    async def run() -> None:
        server, address = await serve(
            service_handler(Failing(), INFERENCE_SERVICE, rejections(counts))
        )
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                assert (await stub.ServerLive(pb.ServerLiveRequest())).live
                cases: list[tuple[Callable[[], Any], grpc.StatusCode, str]] = [
                    (lambda: stub.ModelReady(pb.ModelReadyRequest(name="x")),
                     grpc.StatusCode.NOT_FOUND, "no model 'x'"),
                    (lambda: stub.ServerReady(pb.ServerReadyRequest()),
                     grpc.StatusCode.RESOURCE_EXHAUSTED, "full"),
                    (lambda: stub.ServerMetadata(pb.ServerMetadataRequest()),
                     grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE),
                    (lambda: channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")(
                        b"\xff\xff\xff"),
                     grpc.StatusCode.INVALID_ARGUMENT,
                     "the request is not a valid inference.ModelInferRequest message"),
                ]  # fmt: skip
                for call, code, message in cases:
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await call()
                    assert (err.value.code(), err.value.details()) == (code, message)
                stream = channel.stream_stream(
                    "/inference.GRPCInferenceService/ModelStreamInfer",
                    response_deserializer=pb.ModelStreamInferResponse.FromString,
                )
                answers = [a async for a in stream(iter([b"\xff\xff"]))]
                assert answers[0].error_message.startswith("the request is not a valid")
        finally:
            await server.stop(0)

    asyncio.run(run())
    assert counts == Counter(
        {"not_found": 1, "resource_exhausted": 1, "internal": 1, "malformed": 2}
    )


def test_rate_limited_log_lets_a_burst_through_then_counts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    limited = RateLimitedLog(logging.getLogger("limited"), burst=3, interval_s=3600)
    for i in range(10):
        limited.log(logging.INFO, "line %d", i)
    assert [r.getMessage() for r in caplog.records] == ["line 0", "line 1", "line 2"]


@pytest.fixture
def repository(tmp_path: Path) -> ModelRepository[ServedModel]:
    write_model(tmp_path, classifier_config("classifier"), classifier_graph())
    write_model(tmp_path, explainer_config("classifier_gradcam"), explainer_graph())
    settings = Settings(model_repository=tmp_path, latency_threads=0)
    metrics = ServingMetrics(CollectorRegistry())

    async def loader(spec: Any, version: int) -> ServedModel:
        return await load_version(spec, version, settings, metrics)

    return ModelRepository(tmp_path, loader)


def test_servicers_over_a_real_repository(repository: ModelRepository[ServedModel]) -> None:
    counts: Counter[str] = Counter()

    async def run() -> None:
        await repository.load_all()
        refused = rejections(counts)
        inference = InferenceServicer(repository, lambda: True, lambda: False, refused)
        server, address = await serve(
            service_handler(inference, INFERENCE_SERVICE, refused),
            service_handler(ExplainServicer(repository), EXPLAIN_SERVICE, refused),
        )
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                metadata = await stub.ServerMetadata(pb.ServerMetadataRequest())
                assert metadata.version == service.__version__
                model = await stub.ModelMetadata(pb.ModelMetadataRequest(name="classifier"))
                assert [list(t.shape) for t in model.inputs] == [[-1, 1, 28, 28]]
                x = images(2)
                reply = await stub.ModelInfer(infer_request("classifier", x))
                logits = np.frombuffer(reply.raw_output_contents[0], np.float32).reshape(2, -1)
                np.testing.assert_allclose(logits, reference_logits(x), atol=1e-5)
                stats = await stub.ModelStatistics(pb.ModelStatisticsRequest(name="classifier"))
                assert stats.model_stats[0].inference_count == 2
                index = await stub.RepositoryIndex(pb.RepositoryIndexRequest())
                assert {m.name: m.state for m in index.models} == {
                    "classifier": "READY",
                    "classifier_gradcam": "READY",
                }
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.RepositoryModelLoad(
                        pb.RepositoryModelLoadRequest(model_name="classifier")
                    )
                assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # mode none
                explain = ex_grpc.ExplainerStub(channel)
                tensor = ex.RawTensor(shape=[1, 28, 28], data=x[0].astype("<f4").tobytes())
                answer = await explain.Explain(
                    ex.ExplainRequest(model_name="classifier", tensor=tensor, top_k=2)
                )
                assert len(answer.predictions) == 2 and len(answer.explanations) == 2
                assert list(answer.explanations[0].heatmap_shape) == [28, 28]
                assert answer.explanations[0].overlay_png.startswith(b"\x89PNG")
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await explain.Explain(ex.ExplainRequest(model_name="classifier"))
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        finally:
            await server.stop(0)
            await repository.close()

    asyncio.run(run())
    assert counts == Counter({"failed_precondition": 1, "invalid_argument": 1})
