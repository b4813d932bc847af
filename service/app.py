"""The server's life cycle: `create_server` wires everything, `InferenceServer.stop` drains.

settings -> metrics -> repository -> models (sessions + batchers) -> servicers -> grpc.aio server,
plus grpc.health.v1, server reflection (when asked for), the Prometheus endpoint on its own port,
TLS and token checks (`security.py`), an optional plaintext health port, and model control.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import grpc
import onnxruntime as ort
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server

from pb import explain_pb2 as ex
from pb import grpc_service_pb2 as pb

from .config import Settings
from .core import placement
from .core.errors import Refused
from .core.loading import load_version
from .core.model import ServedModel
from .core.model_control import ModelControl
from .core.repository import READY, STATES, ModelEntry, ModelFolder, ModelRepository
from .observability.metrics import ServingMetrics
from .rest.server import HttpFront, start_http, stop_http
from .rpc.extensions import ServerExtensions
from .rpc.handlers import RateLimitedLog, Rejections, service_handler
from .rpc.servicers import ExplainServicer, InferenceServicer, PeerStatistics
from .security.exposure import ServerSecurity, start_health_server

log = logging.getLogger(__name__)

INFERENCE_SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
EXPLAIN_SERVICE = ex.DESCRIPTOR.services_by_name["Explainer"]
SERVICE_NAME = INFERENCE_SERVICE.full_name
EXPLAIN_SERVICE_NAME = EXPLAIN_SERVICE.full_name
CLOSE_MARGIN_S = 5.0  # after the grace period, how long unloading may take before we give up


class InferenceServer:
    """A running server: its bound ports, readiness, and a graceful stop."""

    def __init__(
        self,
        settings: Settings,
        registry: CollectorRegistry,
        peer_statistics: PeerStatistics | None = None,
    ) -> None:
        self.settings = settings
        self.peer_statistics = peer_statistics
        self.metrics = ServingMetrics(registry)
        self.repository: ModelRepository[ServedModel] = ModelRepository(
            settings.model_repository, self._load_version, on_state=self._state_changed
        )
        self.control = ModelControl(
            self.repository,
            settings.model_control_mode,
            settings.load_model,
            settings.repository_poll_secs,
        )
        self.security = ServerSecurity.from_settings(settings)
        self.rejections = Rejections(self.metrics.reject, RateLimitedLog(log))
        self.grpc = grpc.aio.server(
            interceptors=self.security.interceptors(self._refused),
            maximum_concurrent_rpcs=settings.max_concurrent_rpcs or None,
            options=[
                ("grpc.max_receive_message_length", settings.max_message_bytes),
                ("grpc.max_send_message_length", settings.max_message_bytes),
                # Workers share the port; a single server refuses a port already taken.
                ("grpc.so_reuseport", 1 if settings.workers > 1 else 0),
                *settings.connection_options(),
            ],
        )
        self.extensions = ServerExtensions.create(
            settings.shared_memory_regions, settings.trace_otlp_url
        )
        self.health = health.aio.HealthServicer()
        self.grpc_port = 0
        self.metrics_port: int | None = None
        self.health_port: int | None = None
        self._health_grpc: grpc.aio.Server | None = None
        self.draining = False
        self._started = False
        self._metrics_http: Any = None
        self.http: HttpFront | None = None
        self._stopped = asyncio.Event()

    async def _load_version(self, spec: ModelFolder, version: int) -> ServedModel:
        return await load_version(spec, version, self.settings, self.metrics)

    def _refused(self, method: str, refusal: Refused) -> None:
        """A call the token check refused: counted, and logged (rate-limited) without the token."""
        self.rejections.status(method, refusal)

    def _state_changed(self, entry: ModelEntry[ServedModel]) -> None:
        self.metrics.set_model_state(entry.name, entry.state, STATES)

    @property
    def ready(self) -> bool:
        """Started, not draining, and at least one model serving."""
        return self._started and not self.draining and self.repository.ready()

    async def start(self) -> None:
        """Load the models, then bind and start the gRPC and metrics servers."""
        settings = self.settings
        log.info(
            "onnxruntime %s, providers compiled in: %s",
            ort.__version__, ", ".join(ort.get_available_providers()),
        )  # fmt: skip
        await self.control.start()
        rejections = self.rejections
        inference = InferenceServicer(
            self.repository,
            lambda: self.ready,
            lambda: self.draining,
            rejections,
            stream_max_in_flight=self.settings.stream_max_in_flight,
            peer_statistics=self.peer_statistics,
            control=self.control,
            extensions=self.extensions,
        )
        self.grpc.add_generic_rpc_handlers(
            (
                service_handler(inference, INFERENCE_SERVICE, rejections),
                service_handler(
                    ExplainServicer(self.repository, self.metrics), EXPLAIN_SERVICE, rejections
                ),
            )
        )
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
        placement.name_grpc_poller()  # before the port answers: `top -H` shows grpc_poller
        await self.grpc.start()
        if settings.health_port >= 0:
            self._health_grpc, self.health_port = await start_health_server(
                self.health, settings.host, settings.health_port, shared=settings.workers > 1
            )
        if settings.metrics_port >= 0:
            httpd, _ = start_http_server(
                settings.metrics_port,
                addr=settings.effective_metrics_host,
                registry=self.metrics.registry,
            )
            self._metrics_http = httpd
            self.metrics_port = httpd.server_port
        if settings.http_port >= 0:
            self.http = await start_http(self)
        self._started = True
        status = health_pb2.HealthCheckResponse.SERVING
        for service in ("", SERVICE_NAME, EXPLAIN_SERVICE_NAME):
            await self.health.set(service, status)
        entries = list(self.repository.entries())
        ready = [e.name for e in entries if e.state == READY]
        off = "off"  # an unset port
        log.info(
            "serving %s on gRPC port %d, metrics port %s (%s, model control %s, health port %s)",
            ", ".join(ready) or "no models", self.grpc_port, self.metrics_port or off,
            self.security.describe(), self.control.mode, self.health_port or off,
        )  # fmt: skip
        if not entries:
            log.warning(
                "the model repository %s holds no models (expected <model>/config.pbtxt and "
                "<model>/<version>/model.onnx; `make model` trains and exports one)",
                settings.model_repository.resolve(),
            )
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
        cancelled_before = sum(m.cancelled for m in self.repository.serving())
        await asyncio.gather(self.grpc.stop(grace), stop_http(self.http, grace))
        if self._health_grpc is not None:
            await self._health_grpc.stop(0)
        served = self.repository.serving()
        answered = sum(m.stats.success.count for m in served)
        failed = sum(m.stats.fail.count for m in served)
        log.info("drained: %d requests succeeded, %d failed since start", answered, failed)
        abandoned = sum(m.cancelled for m in served) - cancelled_before
        if abandoned:
            log.warning("%d requests were still running at the end of the grace period", abandoned)
        try:  # what is left: batches already running, loads in progress
            await asyncio.wait_for(self.repository.close(), CLOSE_MARGIN_S)
        except TimeoutError:
            log.warning("models did not close within %.0f s after the grace period", CLOSE_MARGIN_S)
        self.extensions.close()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        log.info("stopped")
        self._stopped.set()


async def create_server(
    settings: Settings,
    registry: CollectorRegistry | None = None,
    peer_statistics: PeerStatistics | None = None,
) -> InferenceServer:
    """Build and start a server from settings (port 0 binds a free port; see `.grpc_port`).

    `peer_statistics` (worker processes) adds the other workers' counts to ModelStatistics.
    """
    server = InferenceServer(settings, registry or CollectorRegistry(), peer_statistics)
    try:
        await server.start()
    except BaseException:
        await server.stop(0)
        raise
    return server


__all__ = ["InferenceServer", "InferenceServicer", "create_server"]
