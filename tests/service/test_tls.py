"""Unit tests for service.security.tls: credentials from PEM files, TLS and mutual TLS on a real server."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from service.security.tls import TlsFiles, check_files, server_credentials, tls_files
from tests.support.certs import CertFiles, write_certs

METHOD = "/test.Echo/Echo"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertFiles:
    return write_certs(tmp_path_factory.mktemp("certs"))


def test_tls_files_from_settings(certs: CertFiles) -> None:
    assert tls_files(None, None) is None
    files = tls_files(certs.server_cert, certs.server_key, certs.ca)
    assert files is not None and files.mutual


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing_cert", "No such file"),
        ("key_of_another_cert", "key values mismatch"),
        ("ca_is_not_pem", "client CA"),
    ],
)
def test_bad_files_are_reported_at_start(
    certs: CertFiles, tmp_path: Path, case: str, message: str
) -> None:
    (tmp_path / "ca.pem").write_text("not a certificate\n")
    files = {
        "missing_cert": TlsFiles(tmp_path / "absent.pem", certs.server_key),
        "key_of_another_cert": TlsFiles(certs.server_cert, certs.client_key),
        "ca_is_not_pem": TlsFiles(certs.server_cert, certs.server_key, tmp_path / "ca.pem"),
    }[case]
    with pytest.raises(OSError, match=message):
        check_files(files)


async def _echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return request


def _call_each(port: int, channels: dict[str, grpc.ChannelCredentials | None]) -> dict[str, str]:
    seen = {}
    for name, credentials in channels.items():
        target = f"localhost:{port}"
        if credentials is None:
            channel = grpc.insecure_channel(target)
        else:
            channel = grpc.secure_channel(target, credentials)
        with channel:
            try:
                seen[name] = channel.unary_unary(METHOD)(b"hi", timeout=5).decode()
            except grpc.RpcError as exc:
                seen[name] = exc.code().name
    return seen


def serve_and_call(
    files: TlsFiles, channels: dict[str, grpc.ChannelCredentials | None]
) -> dict[str, str]:
    async def scenario() -> dict[str, str]:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "test.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(_echo)}
                ),
            )
        )
        port = server.add_secure_port("127.0.0.1:0", server_credentials(files))
        await server.start()
        try:
            return await asyncio.to_thread(_call_each, port, channels)
        finally:
            await server.stop(0)

    return asyncio.run(scenario())


def test_tls_and_mutual_tls(certs: CertFiles) -> None:
    ca = certs.ca.read_bytes()
    client = (certs.client_key.read_bytes(), certs.client_cert.read_bytes())
    stranger = (certs.other_client_key.read_bytes(), certs.other_client_cert.read_bytes())
    plain_tls = serve_and_call(
        TlsFiles(certs.server_cert, certs.server_key),
        {
            "tls": grpc.ssl_channel_credentials(ca),
            "plaintext": None,
            "untrusted_server": grpc.ssl_channel_credentials(certs.other_ca.read_bytes()),
        },
    )
    assert plain_tls == {"tls": "hi", "plaintext": "UNAVAILABLE", "untrusted_server": "UNAVAILABLE"}
    mutual = serve_and_call(
        TlsFiles(certs.server_cert, certs.server_key, certs.ca),
        {
            "client_cert": grpc.ssl_channel_credentials(ca, *client),
            "no_client_cert": grpc.ssl_channel_credentials(ca),
            "other_ca_cert": grpc.ssl_channel_credentials(ca, *stranger),
            "plaintext": None,
        },
    )
    assert mutual == {
        "client_cert": "hi",
        "no_client_cert": "UNAVAILABLE",
        "other_ca_cert": "UNAVAILABLE",
        "plaintext": "UNAVAILABLE",
    }
