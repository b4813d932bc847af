"""TLS and mutual TLS for the gRPC port, from PEM files.

`--tls-cert` and `--tls-key` turn TLS on; `--tls-client-ca` adds mutual TLS: a client must
present a certificate signed by one of those CAs or the handshake fails. The files are checked
with the standard `ssl` module at start (a key that does not match its certificate is an error
then, not at the first handshake).

Health probes: a probe that speaks TLS (`python -m service.probe --tls-ca ...`, or
`grpc_health_probe -tls ...`) checks the main port; one that cannot (Kubernetes' built-in gRPC
probe) checks the plaintext `--health-port`, which serves grpc.health.v1 and nothing else.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc


@dataclass(frozen=True)
class TlsFiles:
    """The PEM files of a TLS set-up; `client_ca` set means mutual TLS."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    @property
    def mutual(self) -> bool:
        return self.client_ca is not None


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise OSError(f"TLS {what} {path}: {exc.strerror or exc}") from exc


def check_files(files: TlsFiles) -> None:
    """Parse the files as a server would use them; OSError says which one is wrong and why."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(files.cert, files.key)
    except (OSError, ssl.SSLError) as exc:
        raise OSError(
            f"TLS certificate {files.cert} with key {files.key}: {_ssl_reason(exc)}"
        ) from exc
    if files.client_ca is not None:
        try:
            context.load_verify_locations(cafile=files.client_ca)
        except (OSError, ssl.SSLError) as exc:
            raise OSError(f"TLS client CA {files.client_ca}: {_ssl_reason(exc)}") from exc


def _ssl_reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return exc.reason.replace("_", " ").lower()
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    """gRPC server credentials for the files: TLS, and mutual TLS when a client CA is given."""
    check_files(files)
    key = _read(files.key, "key")
    cert = _read(files.cert, "certificate")
    client_ca = _read(files.client_ca, "client CA") if files.client_ca is not None else None
    return grpc.ssl_server_credentials(
        [(key, cert)],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def tls_files(
    cert: Path | None, key: Path | None, client_ca: Path | None = None
) -> TlsFiles | None:
    """The TLS files from settings, or None for plaintext."""
    if cert is None or key is None:
        return None
    return TlsFiles(cert, key, client_ca)


__all__ = ["TlsFiles", "check_files", "server_credentials", "tls_files"]
