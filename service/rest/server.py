"""The HTTP listener: uvicorn (httptools) on the server's own event loop, beside grpc.aio.

uvicorn's `Server.serve()` would take over SIGINT and SIGTERM; the server owns its signals, so
this runs `startup()` on a socket it binds itself (SO_REUSEPORT when worker processes share the
port, as the gRPC port does), ticks uvicorn's housekeeping loop, and drains with `shutdown()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import ssl
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

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


@dataclass(frozen=True)
class ConnectionLimits:
    """How long an HTTP connection may live: idle between requests (keep-alive), before its
    first complete request headers (as gRPC's handshake timeout), and in all (then `grace_s` for
    a request in progress); 0 turns a limit off."""

    idle_s: float = 300.0
    first_request_s: float = 20.0
    age_s: float = 0.0
    grace_s: float = 30.0

    @property
    def keep_alive_s(self) -> int:
        """uvicorn's keep-alive timeout, whole seconds (no "never" there: a day stands for it)."""
        return max(1, math.ceil(self.idle_s)) if self.idle_s > 0 else 86400

    @property
    def active(self) -> bool:
        """Whether a limit needs the reaper (the idle one is uvicorn's own)."""
        return self.first_request_s > 0 or self.age_s > 0

    def values(self) -> tuple[float, ...]:
        return self.first_request_s, self.age_s


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
        limits: ConnectionLimits | None = None,
    ) -> None:
        self.api = api
        self.limits = limits or ConnectionLimits()
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
            timeout_keep_alive=self.limits.keep_alive_s,
            ssl_certfile=str(tls[0]) if tls else None,
            ssl_keyfile=str(tls[1]) if tls else None,
            ssl_ca_certs=str(tls[2]) if tls and tls[2] else None,
            ssl_cert_reqs=ssl.CERT_REQUIRED if tls and tls[2] else ssl.CERT_NONE,
        )
        config.load()
        self._server = uvicorn.Server(config)
        self._server.lifespan = config.lifespan_class(config)
        self._ticker: asyncio.Task[None] | None = None
        self._reaper: asyncio.Task[None] | None = None
        self._opened: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()

    async def start(self) -> None:
        """Accept connections."""
        await self._server.startup(sockets=[self._socket])
        self._ticker = asyncio.create_task(self._server.main_loop(), name="http-housekeeping")
        if self.limits.active:
            self._reaper = asyncio.create_task(self._reap(), name="http-connection-limits")

    async def _reap(self) -> None:
        """Close connections past their limits, once a tick (a fifth of the shortest limit, at
        most 1 s): no complete request within the handshake timeout, or older than the maximum
        age (a request in progress gets the grace, then the connection closes after its answer
        or at the end of the grace)."""
        limits = self.limits
        tick = min(1.0, max(0.05, min(v for v in limits.values() if v > 0) / 5))
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            for connection in list(self._server.server_state.connections):
                opened = self._opened.setdefault(connection, now)
                age = now - opened
                transport = getattr(connection, "transport", None)
                if transport is None or transport.is_closing():
                    continue
                no_request = getattr(connection, "cycle", True) is None  # no headers complete yet
                if limits.first_request_s and age > limits.first_request_s and no_request:
                    transport.close()
                    continue
                if limits.age_s and age > limits.age_s + limits.grace_s:
                    transport.close()
                elif limits.age_s and age > limits.age_s:
                    connection.shutdown()  # closes now if idle, else after this answer

    async def stop(self, grace_s: float) -> None:
        """Stop accepting, let requests in progress finish within `grace_s`, close."""
        server = self._server
        server.config.timeout_graceful_shutdown = max(int(grace_s), 1)
        server.should_exit = True
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
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
        limits=ConnectionLimits(
            idle_s=settings.max_connection_idle_s,
            first_request_s=settings.handshake_timeout_s,
            age_s=settings.max_connection_age_s,
            grace_s=settings.max_connection_age_grace_s,
        ),
    )
    await front.start()
    log.info("HTTP API (KServe v2 REST) on %s port %d", settings.effective_http_host, front.port)
    return front


async def stop_http(front: HttpFront | None, grace_s: float) -> None:
    """Drain the HTTP front, if there is one."""
    if front is not None:
        await front.stop(grace_s)


__all__ = ["ConnectionLimits", "HttpFront", "bind", "start_http", "stop_http"]
