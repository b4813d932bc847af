"""What the settings say about exposure, in one place the server asks: how to bind the gRPC port
(TLS or not), which interceptors check tokens, whether to open a plaintext health port, and a
warning when the server listens beyond loopback with nothing protecting it.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2_grpc

from ..config import Settings
from ..core.errors import Refused
from .auth import Authenticator, AuthInterceptor
from .tls import TlsFiles, check_files, server_credentials, tls_files

log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    """Whether a listen address reaches this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass
class ServerSecurity:
    """TLS files and token checks for one server, read from settings at start."""

    authenticator: Authenticator
    tls: TlsFiles | None

    @classmethod
    def from_settings(cls, settings: Settings) -> ServerSecurity:
        """Read the token files; OSError (naming the file) when one is unusable."""
        try:
            authenticator = Authenticator.from_files(
                settings.auth_token_file, settings.admin_token_file, settings.statistics_scope
            )
        except ValueError as exc:
            raise OSError(str(exc)) from exc
        files = tls_files(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
        if files is not None:
            check_files(files)  # before any model loads: a bad file stops the start at once
        return cls(authenticator, files)

    def interceptors(
        self, on_refusal: Callable[[str, Refused], None] | None = None
    ) -> list[grpc.aio.ServerInterceptor]:
        """The token check, when tokens are on; `on_refusal` hears of each refused call."""
        if not self.authenticator.enabled:
            return []
        if on_refusal is None:
            return [AuthInterceptor(self.authenticator)]
        return [AuthInterceptor(self.authenticator, on_refusal)]

    def add_port(self, server: grpc.aio.Server, address: str) -> int:
        """Bind the gRPC port, with TLS when configured; OSError when the bind fails."""
        try:
            if self.tls is None:
                return server.add_insecure_port(address)
            return server.add_secure_port(address, server_credentials(self.tls))
        except RuntimeError as exc:  # grpc reports a failed bind this way
            raise OSError(f"cannot listen on {address} (is the port in use?)") from exc

    def describe(self) -> str:
        """One line for the start-up log (file paths, never tokens)."""
        transport = (
            "plaintext" if self.tls is None else ("mutual TLS" if self.tls.mutual else "TLS")
        )
        auth = self.authenticator
        scopes = [
            name
            for name, tokens in (("inference", auth.inference), ("admin", auth.admin))
            if tokens is not None
        ]
        return f"{transport}, tokens: {', '.join(scopes) if scopes else 'off'}"

    def warn_if_exposed(self, host: str) -> None:
        if is_loopback(host):
            return
        if self.tls is None and not self.authenticator.enabled:
            log.warning(
                "listening on %s in plaintext with no tokens: anyone who reaches the port may "
                "call it (see --tls-cert, --auth-token-file, or keep it behind a mesh)",
                host,
            )

    def reload(self) -> None:
        """Re-read the token files (SIGHUP)."""
        self.authenticator.reload()


async def start_health_server(
    servicer: health_pb2_grpc.HealthServicer, host: str, port: int, *, shared: bool = False
) -> tuple[grpc.aio.Server, int]:
    """A plaintext server with grpc.health.v1 only, for probes that cannot speak TLS.

    `shared`: worker processes bind the same port (SO_REUSEPORT), as they do the gRPC port.
    """
    server = grpc.aio.server(options=[("grpc.so_reuseport", 1 if shared else 0)])
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    address = f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise OSError(f"cannot listen on {address} (health port; is it in use?)") from exc
    await server.start()
    return server, bound


__all__ = ["ServerSecurity", "is_loopback", "start_health_server"]
