"""The gRPC servicers (thin: route, call, answer) and `create_server`, which wires everything.

settings -> metrics -> repository -> models (sessions + batchers) -> servicers -> grpc.aio server,
plus grpc.health.v1, server reflection and the Prometheus endpoint on its own port.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
import onnxruntime as ort
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server

from pb import explain_pb2 as ex
from pb import explain_pb2_grpc as ex_grpc
from pb import grpc_service_pb2 as pb
from pb import grpc_service_pb2_grpc as pb_grpc
from pb import model_config_pb2 as mc

from . import __version__
from .config import Settings
from .errors import ModelNotReady, Unsupported, to_status
from .explain import explain
from .metrics import ServingMetrics
from .model import ServedModel
from .model_control import ModelControl
from .repository import READY, STATES, UNAVAILABLE, ModelEntry, ModelRepository, ModelSpec
from .runtime import CUDA
from .security import ServerSecurity, start_health_server

log = logging.getLogger(__name__)

SERVER_NAME = "cnnserve"
SERVICE_NAME = "inference.GRPCInferenceService"
EXPLAIN_SERVICE_NAME = ex.DESCRIPTOR.services_by_name["Explainer"].full_name
EXTENSIONS = ("classification", "model_repository", "model_configuration", "statistics")
PROVIDER_PARAMETER = "execution_provider"

Request = TypeVar("Request")
Response = TypeVar("Response")
Handler = Callable[[Any, Request, grpc.aio.ServicerContext], Awaitable[Response]]


def map_errors(method: Handler[Request, Response]) -> Handler[Request, Response]:
    """Answer domain errors with their status code; anything else is INTERNAL, text withheld."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Request, context: grpc.aio.ServicerContext) -> Response:
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            code, message = to_status(exc)
            await context.abort(grpc.StatusCode[code], message)
            raise AssertionError("unreachable") from None  # abort always raises

    return wrapper


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The Open Inference Protocol over the model repository."""

    def __init__(
        self, repository: ModelRepository, control: ModelControl, server: InferenceServer
    ) -> None:
        self._repository = repository
        self._control = control
        self._server = server

    def _model(self, name: str, version: str) -> ServedModel:
        _, model = self._repository.get(name, version)
        assert isinstance(model, ServedModel)
        return model

    @map_errors
    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @map_errors
    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._server.ready)

    @map_errors
    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        try:
            self._repository.get(request.name, request.version)
        except ModelNotReady:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=not self._server.draining)

    @map_errors
    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name=SERVER_NAME, version=__version__, extensions=EXTENSIONS
        )

    @map_errors
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

    @map_errors
    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelConfigResponse:
        model = self._model(request.name, request.version)
        config = mc.ModelConfig()
        config.CopyFrom(model.config)
        # Say where the sessions really run, as Triton resolves KIND_AUTO.
        kinds = [s.provider == CUDA for s in model.sessions]
        del config.instance_group[:]
        for index, on_gpu in enumerate(kinds):
            config.instance_group.add(
                name=f"{model.name}_{index}",
                count=1,
                kind=mc.ModelInstanceGroup.KIND_GPU if on_gpu else mc.ModelInstanceGroup.KIND_CPU,
            )
        config.parameters[PROVIDER_PARAMETER].string_value = model.provider
        return pb.ModelConfigResponse(config=config)

    @map_errors
    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        model = self._model(request.model_name, request.model_version)
        return await model.infer(request, context.time_remaining())

    async def ModelStreamInfer(
        self,
        request_iterator: AsyncIterator[pb.ModelInferRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Run each streamed request as it arrives; answers come back as they finish."""
        answers: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        pending: set[asyncio.Task[None]] = set()
        reading = True

        async def answer(request: pb.ModelInferRequest) -> None:
            try:
                model = self._model(request.model_name, request.model_version)
                response = await model.infer(request, context.time_remaining())
                answers.put_nowait(pb.ModelStreamInferResponse(infer_response=response))
            except Exception as exc:
                _, message = to_status(exc)
                answers.put_nowait(
                    pb.ModelStreamInferResponse(
                        error_message=message,
                        infer_response=pb.ModelInferResponse(
                            model_name=request.model_name,
                            model_version=request.model_version,
                            id=request.id,
                        ),
                    )
                )

        def finished(task: asyncio.Task[None]) -> None:
            pending.discard(task)
            if not reading and not pending:
                answers.put_nowait(None)

        async def read() -> None:
            nonlocal reading
            try:
                async for request in request_iterator:
                    task = asyncio.create_task(answer(request))
                    pending.add(task)
                    task.add_done_callback(finished)
            finally:
                reading = False
                if not pending:
                    answers.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (item := await answers.get()) is not None:
                yield item
            await reader
        finally:
            reader.cancel()
            for task in list(pending):
                task.cancel()

    @map_errors
    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelStatisticsResponse:
        if request.name:
            entry = self._repository.entry(request.name)
            if request.version:
                _, model = self._repository.get(request.name, request.version)
                models = [model]
            else:
                models = [entry.versions[v] for v in sorted(entry.versions)]
        else:
            models = [e.versions[v] for e in self._repository.entries() for v in sorted(e.versions)]
        return pb.ModelStatisticsResponse(
            model_stats=[m.stats.to_proto() for m in models if isinstance(m, ServedModel)]
        )

    @map_errors
    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        index = pb.RepositoryIndexResponse()
        known = {e.name for e in self._repository.entries()}
        for entry in self._repository.entries():
            for version in sorted(entry.versions):
                index.models.add(name=entry.name, version=str(version), state=READY)
            if request.ready:
                continue
            for version, reason in sorted(entry.failed.items()):
                index.models.add(
                    name=entry.name, version=str(version), state=UNAVAILABLE, reason=reason
                )
            if not entry.versions and not entry.failed:
                index.models.add(name=entry.name, state=entry.state, reason=entry.reason)
        if not request.ready:
            for name in self._repository.model_names():
                if name not in known:
                    index.models.add(name=name, state=UNAVAILABLE, reason="not loaded")
        return index

    @map_errors
    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelLoadResponse:
        if request.parameters:
            raise Unsupported("load parameters (config or file overrides) are not supported")
        await self._control.load(request.model_name)
        return pb.RepositoryModelLoadResponse()

    @map_errors
    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelUnloadResponse:
        await self._control.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()


class ExplainServicer(ex_grpc.ExplainerServicer):
    """The explain API: an image in, predictions, Grad-CAM heatmaps and pictures out."""

    def __init__(self, repository: ModelRepository) -> None:
        self._repository = repository

    @map_errors
    async def Explain(
        self, request: ex.ExplainRequest, context: grpc.aio.ServicerContext
    ) -> ex.ExplainResponse:
        return await explain(self._repository, request)


class InferenceServer:
    """A running server: its bound ports, readiness, and a graceful stop."""

    def __init__(self, settings: Settings, registry: CollectorRegistry) -> None:
        self.settings = settings
        self.metrics = ServingMetrics(registry)
        self.repository = ModelRepository(
            settings.model_repository, self._load_version, on_state=self._state_changed
        )
        self.control = ModelControl(
            self.repository,
            settings.model_control_mode,
            settings.load_model,
            settings.repository_poll_secs,
        )
        self.security = ServerSecurity.from_settings(settings)
        self.grpc = grpc.aio.server(
            interceptors=self.security.interceptors(),
            options=[
                ("grpc.max_receive_message_length", settings.max_message_bytes),
                ("grpc.max_send_message_length", settings.max_message_bytes),
                ("grpc.so_reuseport", 0),
            ],
        )
        self.health = health.aio.HealthServicer()
        self.grpc_port = 0
        self.metrics_port: int | None = None
        self.health_port: int | None = None
        self._health_grpc: grpc.aio.Server | None = None
        self.draining = False
        self._started = False
        self._metrics_http: Any = None
        self._stopped = asyncio.Event()

    async def _load_version(self, spec: ModelSpec, version: int) -> ServedModel:
        return await ServedModel.load(spec, version, self.settings, self.metrics)

    def _state_changed(self, entry: ModelEntry) -> None:
        self.metrics.set_model_state(entry.name, entry.state, STATES)

    @property
    def ready(self) -> bool:
        """Started, not draining, and at least one model serving."""
        return (
            self._started
            and not self.draining
            and any(e.state == READY for e in self.repository.entries())
        )

    async def start(self) -> None:
        """Load the models, then bind and start the gRPC and metrics servers."""
        settings = self.settings
        log.info(
            "onnxruntime %s, providers compiled in: %s",
            ort.__version__, ", ".join(ort.get_available_providers()),
        )  # fmt: skip
        await self.control.start()
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceServicer(self.repository, self.control, self), self.grpc
        )
        ex_grpc.add_ExplainerServicer_to_server(ExplainServicer(self.repository), self.grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        if settings.reflection:
            reflection.enable_server_reflection(
                (
                    SERVICE_NAME,
                    EXPLAIN_SERVICE_NAME,
                    health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                    reflection.SERVICE_NAME,
                ),
                self.grpc,
            )
        self.grpc_port = self.security.add_port(self.grpc, f"{settings.host}:{settings.grpc_port}")
        await self.grpc.start()
        if settings.health_port >= 0:
            self._health_grpc, self.health_port = await start_health_server(
                self.health, settings.host, settings.health_port
            )
        if settings.metrics_port >= 0:
            httpd, _ = start_http_server(
                settings.metrics_port,
                addr=settings.effective_metrics_host,
                registry=self.metrics.registry,
            )
            self._metrics_http = httpd
            self.metrics_port = httpd.server_port
        self._started = True
        status = health_pb2.HealthCheckResponse.SERVING
        for service in ("", SERVICE_NAME, EXPLAIN_SERVICE_NAME):
            await self.health.set(service, status)
        ready = [e.name for e in self.repository.entries() if e.state == READY]
        log.info(
            "serving %s on gRPC port %d (%s, model control %s), metrics port %s, health port %s",
            ", ".join(ready) or "no models", self.grpc_port, self.security.describe(),
            self.control.mode, self.metrics_port, self.health_port,
        )  # fmt: skip
        self.security.warn_if_exposed(settings.host)

    def reload_tokens(self) -> None:
        """Re-read the token files (the SIGHUP handler)."""
        self.security.reload()

    async def stop(self, grace_s: float | None = None) -> None:
        """Drain: health NOT_SERVING, refuse new RPCs, finish accepted ones, unload, close."""
        if self.draining:
            await self._stopped.wait()
            return
        self.draining = True
        grace = self.settings.grace_period_s if grace_s is None else grace_s
        log.info("draining (grace period %.1f s)", grace)
        with contextlib.suppress(Exception):
            await self.health.enter_graceful_shutdown()
        await self.control.stop()  # no repository change while draining
        await self.grpc.stop(grace)
        if self._health_grpc is not None:
            await self._health_grpc.stop(0)
        served = [m for e in self.repository.entries() for m in e.versions.values()]
        answered = sum(m.stats.success.count for m in served if isinstance(m, ServedModel))
        failed = sum(m.stats.fail.count for m in served if isinstance(m, ServedModel))
        log.info("drained: %d requests succeeded, %d failed since start", answered, failed)
        await self.repository.close()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        log.info("stopped")
        self._stopped.set()

    async def wait_for_termination(self) -> None:
        """Return once `stop` has finished."""
        await self._stopped.wait()


async def create_server(
    settings: Settings, registry: CollectorRegistry | None = None
) -> InferenceServer:
    """Build and start a server from settings (port 0 binds a free port; see `.grpc_port`)."""
    server = InferenceServer(settings, registry or CollectorRegistry())
    try:
        await server.start()
    except BaseException:
        await server.stop(0)
        raise
    return server


__all__ = ["InferenceServer", "InferenceServicer", "create_server"]
