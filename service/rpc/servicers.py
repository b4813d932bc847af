"""The gRPC servicers: thin layers that decode, call the core and encode.

The protocol stops in `service/rpc/`: below it, models take and return numpy arrays and the
explain pipeline dataclasses. Methods raise domain errors (`core/errors.py`); `handlers.py`
parses each request and turns errors into statuses.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc

from pb import explain_pb2 as ex
from pb import explain_pb2_grpc as ex_grpc
from pb import grpc_service_pb2 as pb
from pb import grpc_service_pb2_grpc as pb_grpc

from .. import __version__
from ..core.errors import InvalidInput, ModelNotReady, Unsupported, outcome
from ..core.model import ServedModel
from ..core.model_control import ModelControl
from ..core.repository import ModelRepository
from ..explain import methods as explain_methods
from ..explain.pipeline import explain
from ..observability.metrics import ServingMetrics
from .codec import decode_request, encode_response
from .explain import explain_query, explain_response, method_parameters
from .extensions import ExtensionServicer, ServerExtensions
from .handlers import Rejections
from .shared_memory_io import output_placements, place_outputs
from .statistics import statistics_message

SERVER_NAME = "cnnserve"
EXTENSIONS = (
    "classification",
    "model_repository",
    "model_configuration",
    "system_shared_memory",
    "statistics",
    "trace",
    "logging",
)
# Worker processes: given the request and this process's statistics, return the whole group's.
PeerStatistics = Callable[
    [pb.ModelStatisticsRequest, list[pb.ModelStatistics]], Awaitable[list[pb.ModelStatistics]]
]


class InferenceServicer(ExtensionServicer, pb_grpc.GRPCInferenceServiceServicer):
    """The Open Inference Protocol over the model repository."""

    def __init__(
        self,
        repository: ModelRepository[ServedModel],
        ready: Callable[[], bool],
        draining: Callable[[], bool],
        rejections: Rejections,
        stream_max_in_flight: int = 128,
        peer_statistics: PeerStatistics | None = None,
        control: ModelControl | None = None,
        extensions: ServerExtensions | None = None,
    ) -> None:
        self._repository = repository
        self.extensions = extensions or ServerExtensions()
        self._peer_statistics = peer_statistics
        # load and unload go through model control: without one, they are refused (mode none)
        self._control = control or ModelControl(repository)
        self._stream_cap = stream_max_in_flight
        self._rejections = rejections
        self._ready = ready
        self._draining = draining

    def _model(self, name: str, version: str) -> ServedModel:
        return self._repository.get(name, version)[1]

    def _check_model(self, name: str) -> None:
        self._repository.entry(name)

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._ready())

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        try:
            self._repository.get(request.name, request.version)
        except ModelNotReady:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=not self._draining())

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name=SERVER_NAME, version=__version__, extensions=EXTENSIONS
        )

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        model = self._model(request.name, request.version)
        entry = self._repository.entry(request.name)
        lead = [-1] if model.signature.batching else []
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=model.name,
            versions=[str(v) for v in sorted(entry.versions)],
            platform=model.config.platform or "onnxruntime_onnx",
            inputs=[
                tensor(name=t.name, datatype=t.datatype, shape=[*lead, *t.dims])
                for t in model.signature.inputs
            ],
            outputs=[
                tensor(name=t.name, datatype=t.datatype, shape=[*lead, *t.dims])
                for t in model.signature.outputs
            ],
        )

    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelConfigResponse:
        model = self._model(request.name, request.version)
        return pb.ModelConfigResponse(config=model.reported_config())

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        return await self._infer(request, context.time_remaining())

    async def _infer(
        self, request: pb.ModelInferRequest, timeout_s: float | None
    ) -> pb.ModelInferResponse:
        """decode -> model.infer -> encode: the whole protocol work of one request."""
        start = time.perf_counter_ns()
        model = self._model(request.model_name, request.model_version)
        shm = self.extensions.shared_memory
        trace = self.extensions.tracing.start(model.name, model.version, request.id, start)
        try:
            decoded = decode_request(request, model.signature, shm)
            # (Both read fields the common request leaves empty: skipped when they are.)
            placements = output_placements(request) if request.outputs else {}
            # An explainer's `method` parameter: its maps from another method's graphs.
            method = None
            if request.parameters:
                method = explain_methods.requested(method_parameters(request))
                if method is not None:
                    explain_methods.check(model, *method)
        except Exception as exc:
            model.request_failed(start, exc)
            raise
        if trace is not None:
            trace.mark("REQUEST_START", start)
        outputs = await model.infer(decoded.inputs, decoded.batch_size, timeout_s, start, trace)
        if method is not None:
            outputs = await explain_methods.replace_maps(model, *method, decoded.inputs, outputs)
        response = encode_response(
            request, model.version, outputs, decoded.outputs, model.signature.batching
        )
        place_outputs(response, placements, shm)
        if trace is not None:
            trace.mark("REQUEST_END")
            self.extensions.tracing.finish(trace)
        return response

    async def ModelStreamInfer(
        self,
        request_iterator: AsyncIterator[pb.ModelInferRequest | InvalidInput],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Run each streamed request as it arrives; answers come back as they finish.

        At most `stream_max_in_flight` messages of one stream are read and not yet answered: at
        the cap the server stops reading, so a client that writes and never reads is held back
        by HTTP/2 flow control instead of growing the server. While the server drains, new
        messages are answered with an error and not run; accepted ones finish.
        """
        answers: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        slots = asyncio.Semaphore(self._stream_cap)
        pending: set[asyncio.Task[None]] = set()

        async def answer(request: pb.ModelInferRequest) -> None:
            answers.put_nowait(await self._stream_answer(request, context))

        async def read() -> None:
            messages = aiter(request_iterator)
            while True:
                await slots.acquire()  # the backpressure: no free slot, no reading
                try:
                    request = await anext(messages)
                except StopAsyncIteration:
                    break
                if isinstance(request, InvalidInput):  # a frame that did not parse
                    answers.put_nowait(pb.ModelStreamInferResponse(error_message=str(request)))
                elif self._draining():
                    answers.put_nowait(_stream_error(request, SHUTTING_DOWN))
                else:
                    task = asyncio.create_task(answer(request))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
            if pending:
                await asyncio.wait(set(pending))
            answers.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (item := await answers.get()) is not None:
                yield item
                slots.release()
            await reader
        finally:
            reader.cancel()
            if pending:
                self._rejections.log.log(
                    logging.WARNING,
                    "ModelStreamInfer: stream ended with %d requests unanswered",
                    len(pending),
                )
            for task in list(pending):
                task.cancel()

    async def _stream_answer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelStreamInferResponse:
        try:
            response = await self._infer(request, context.time_remaining())
        except Exception as exc:
            _, message = self._rejections.status("ModelStreamInfer", exc, request.model_name)
            return _stream_error(request, message)
        return pb.ModelStreamInferResponse(infer_response=response)

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelStatisticsResponse:
        models = self._repository.serving(request.name, request.version)
        stats = [statistics_message(m.stats) for m in models]
        if self._peer_statistics is not None:
            stats = await self._peer_statistics(request, stats)
        return pb.ModelStatisticsResponse(model_stats=stats)

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        index = pb.RepositoryIndexResponse()
        for row in self._repository.index(ready_only=request.ready):
            index.models.add(name=row.name, version=row.version, state=row.state, reason=row.reason)
        return index

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelLoadResponse:
        if request.parameters:
            raise Unsupported("load parameters (config or file overrides) are not supported")
        await self._control.load(request.model_name)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelUnloadResponse:
        await self._control.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()


class ExplainServicer(ex_grpc.ExplainerServicer):
    """The explain API: an image in, predictions, Grad-CAM heatmaps and pictures out."""

    def __init__(
        self, repository: ModelRepository[ServedModel], metrics: ServingMetrics | None = None
    ) -> None:
        self._repository = repository
        self._metrics = metrics

    async def Explain(
        self, request: ex.ExplainRequest, context: grpc.aio.ServicerContext
    ) -> ex.ExplainResponse:
        start, label = time.perf_counter(), "success"
        try:
            query = explain_query(request)
            return explain_response(
                await explain(self._repository, query, context.time_remaining())
            )
        except (Exception, asyncio.CancelledError) as exc:
            label = outcome(exc)[1]
            raise
        finally:
            if self._metrics is not None:  # the whole call: decode, model calls, drawing
                seconds = time.perf_counter() - start
                self._metrics.explain_done(request.model_name, label, seconds)


SHUTTING_DOWN = "the server is shutting down; this request was not run"


def _stream_error(request: pb.ModelInferRequest, message: str) -> pb.ModelStreamInferResponse:
    """An in-band error answer on a stream, naming the request it answers."""
    return pb.ModelStreamInferResponse(
        error_message=message,
        infer_response=pb.ModelInferResponse(
            model_name=request.model_name, model_version=request.model_version, id=request.id
        ),
    )
