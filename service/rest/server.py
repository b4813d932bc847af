"""The HTTP listener: uvicorn (httptools) on the server's own event loop, beside grpc.aio.

uvicorn's `Server.serve()` would take over SIGINT and SIGTERM; the server owns its signals, so
this runs `startup()` on a socket it binds itself (SO_REUSEPORT when worker processes share the
port, as the gRPC port does), ticks uvicorn's housekeeping loop, and drains with `shutdown()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from pathlib import Path
from typing import Protocol

import uvicorn

from ..config import Settings
from ..core.model import ServedModel
from ..core.model_control import ModelControl
from ..core.repository import ModelRepository
from ..observability.metrics import ServingMetrics
from ..rpc.servicers import PeerStatistics
from .routes import RejectionLog, RestApi, TokenCheck

log = logging.getLogger(__name__)


class _RateLimit(logging.Filter):
    """At most `burst` records per `interval_s` from uvicorn's loggers (clients trigger them)."""

    def __init__(self, burst: int = 5, interval_s: float = 10.0) -> None:
        super().__init__()
        self._burst, self._interval = burst, interval_s
        self._start, self._used = -interval_s, 0

    def filter(self, record: logging.LogRecord) -> bool:
        now = time.monotonic()
        if now - self._start >= self._interval:
            self._start, self._used = now, 0
        self._used += 1
        return self._used <= self._burst


_FILTER = _RateLimit()
for _name in ("uvicorn.error", "uvicorn"):
    if _FILTER not in logging.getLogger(_name).filters:
        logging.getLogger(_name).addFilter(_FILTER)


def bind(host: str, port: int, shared: bool) -> socket.socket:
    """A listening TCP socket; OSError naming the address when the bind fails."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if shared:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host.strip("[]"), port))
        sock.listen(2048)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port} (HTTP port; is it in use?)") from exc
    return sock


class HttpFront:
    """The running HTTP listener of one server process."""

    def __init__(
        self,
        api: RestApi,
        host: str,
        port: int,
        *,
        tls: tuple[Path, Path, Path | None] | None = None,
        shared: bool = False,
        limit_concurrency: int | None = None,
    ) -> None:
        self.api = api
        self._socket = bind(host, port, shared)
        self.port: int = self._socket.getsockname()[1]
        self.tls = tls
        config = uvicorn.Config(
            api,
            http="httptools",
            lifespan="off",
            access_log=False,
            log_config=None,  # the server configures logging, not uvicorn
            server_header=False,
            proxy_headers=False,  # no X-Forwarded-* rewriting: one coroutine less per request
            limit_concurrency=limit_concurrency,
            timeout_keep_alive=30,
            ssl_certfile=str(tls[0]) if tls else None,
            ssl_keyfile=str(tls[1]) if tls else None,
            ssl_ca_certs=str(tls[2]) if tls and tls[2] else None,
            ssl_cert_reqs=ssl.CERT_REQUIRED if tls and tls[2] else ssl.CERT_NONE,
        )
        config.load()
        self._server = uvicorn.Server(config)
        self._server.lifespan = config.lifespan_class(config)
        self._ticker: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Accept connections."""
        await self._server.startup(sockets=[self._socket])
        self._ticker = asyncio.create_task(self._server.main_loop(), name="http-housekeeping")

    async def stop(self, grace_s: float) -> None:
        """Stop accepting, let requests in progress finish within `grace_s`, close."""
        server = self._server
        server.config.timeout_graceful_shutdown = max(int(grace_s), 1)
        server.should_exit = True
        if self._ticker is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        if server.started:
            await server.shutdown()
        self._socket.close()


class _Security(Protocol):
    @property
    def authenticator(self) -> TokenCheck: ...


class _Server(Protocol):
    """What the HTTP front needs of the server it belongs to (service.app.InferenceServer)."""

    settings: Settings
    repository: ModelRepository[ServedModel]
    control: ModelControl
    metrics: ServingMetrics
    draining: bool
    peer_statistics: PeerStatistics | None

    @property
    def security(self) -> _Security: ...

    @property
    def rejections(self) -> RejectionLog: ...

    @property
    def ready(self) -> bool: ...


async def start_http(server: _Server) -> HttpFront:
    """Build the REST API over the server's core objects and start listening."""
    settings = server.settings
    api = RestApi(
        server.repository,
        server.control,
        lambda: server.ready,
        lambda: server.draining,
        server.rejections,
        server.security.authenticator,
        server.metrics.registry,
        settings.max_message_bytes,
        ui=settings.http_ui,
        peer_statistics=server.peer_statistics,
    )
    front = HttpFront(
        api,
        settings.effective_http_host,
        settings.http_port,
        tls=(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
        if settings.tls_cert and settings.tls_key
        else None,
        shared=settings.workers > 1,
        limit_concurrency=settings.max_concurrent_rpcs or None,
    )
    await front.start()
    log.info("HTTP API (KServe v2 REST) on %s port %d", settings.effective_http_host, front.port)
    return front


async def stop_http(front: HttpFront | None, grace_s: float) -> None:
    """Drain the HTTP front, if there is one."""
    if front is not None:
        await front.stop(grace_s)


__all__ = ["HttpFront", "bind", "start_http", "stop_http"]
