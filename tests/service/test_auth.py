"""Unit tests for service.security.auth: token files, scopes, and the interceptor on a real grpc.aio server."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from service.core.errors import Refused
from service.security.auth import (
    ADMIN,
    INFERENCE,
    Authenticator,
    AuthInterceptor,
    TokenFile,
    bearer_token,
    method_scopes,
    read_tokens,
)

INFER_TOKEN = "infer-token-0123456789abcdef"
ADMIN_TOKEN = "admin-token-0123456789abcdef"
SERVICE = "/inference.GRPCInferenceService"


def write(path: Path, *lines: str) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def test_read_tokens_skips_blanks_and_comments(tmp_path: Path) -> None:
    path = write(tmp_path / "t", "# a comment", "", f"  {INFER_TOKEN}  ", "second-token-0123456789")
    assert read_tokens(path) == [INFER_TOKEN, "second-token-0123456789"]


def test_token_with_whitespace_is_an_error_without_the_token(tmp_path: Path) -> None:
    path = write(tmp_path / "t", "secret-part other-part")
    with pytest.raises(ValueError, match="line 1") as info:
        TokenFile(path)
    assert "secret-part" not in str(info.value)


def test_empty_or_missing_file_is_refused_at_start(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="holds no token"):
        TokenFile(write(tmp_path / "t", "# nothing"))
    with pytest.raises(ValueError, match="token file"):
        TokenFile(tmp_path / "absent")


def test_short_token_warns_without_logging_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        TokenFile(write(tmp_path / "t", "short"))
    assert "shorter than" in caplog.text and "short\n" not in caplog.text
    assert "'short'" not in caplog.text


def test_bearer_token_parsing() -> None:
    assert bearer_token(bearer("abc")) == "abc"
    assert bearer_token((("authorization", "bearer   abc  "),)) == "abc"
    assert bearer_token((("authorization", b"Bearer abc"),)) == "abc"
    assert bearer_token((("authorization", "Basic abc"),)) is None
    assert bearer_token((("authorization", "Bearer "),)) is None
    assert bearer_token((("x-other", "Bearer abc"),)) is None
    assert bearer_token(None) is None


def test_file_change_is_picked_up_and_a_broken_file_keeps_old_tokens(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    now = [0.0]
    path = write(tmp_path / "t", INFER_TOKEN)
    tokens = TokenFile(path, check_interval_s=1.0, clock=lambda: now[0])
    assert tokens.matches(INFER_TOKEN)
    write(path, "rotated-token-0123456789abc")
    os.utime(path, ns=(1, 1))  # a different mtime even on coarse clocks
    assert tokens.matches(INFER_TOKEN), "not re-read within the check interval"
    now[0] = 2.0
    assert not tokens.matches(INFER_TOKEN) and tokens.matches("rotated-token-0123456789abc")

    path.unlink()
    now[0] = 4.0
    with caplog.at_level(logging.ERROR):
        assert tokens.matches("rotated-token-0123456789abc"), "a vanished file keeps its tokens"
        now[0] = 6.0
        tokens.matches("x")
    assert caplog.text.count("not reloaded") == 1, "the same problem is logged once"
    assert "rotated-token" not in caplog.text

    write(path, "")  # an empty file revokes every token
    assert tokens.reload() and len(tokens) == 0
    assert not tokens.matches("rotated-token-0123456789abc")


def test_scopes_map() -> None:
    scopes = method_scopes()
    assert scopes[f"{SERVICE}/ModelInfer"] == INFERENCE
    assert scopes[f"{SERVICE}/ModelStreamInfer"] == INFERENCE
    assert scopes["/cnnserve.explain.v1.Explainer/Explain"] == INFERENCE
    for method in ("RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload"):
        assert scopes[f"{SERVICE}/{method}"] == ADMIN
    assert scopes[f"{SERVICE}/ModelStatistics"] == INFERENCE
    assert method_scopes(ADMIN)[f"{SERVICE}/ModelStatistics"] == ADMIN
    assert scopes["/grpc.health.v1.Health/Check"] is None
    with pytest.raises(ValueError):
        method_scopes("everyone")


def authenticator(tmp_path: Path, *, inference: bool = True, admin: bool = True) -> Authenticator:
    return Authenticator.from_files(
        write(tmp_path / "infer", INFER_TOKEN) if inference else None,
        write(tmp_path / "admin", ADMIN_TOKEN) if admin else None,
    )


def refusal(auth: Authenticator, method: str, token: str | None) -> str | None:
    try:
        auth.check(f"{SERVICE}/{method}", bearer(token) if token else ())
    except Refused as exc:
        return exc.status
    return None


def test_decisions_with_both_files(tmp_path: Path) -> None:
    auth = authenticator(tmp_path)
    assert refusal(auth, "ModelInfer", INFER_TOKEN) is None
    assert refusal(auth, "ModelInfer", ADMIN_TOKEN) is None
    assert refusal(auth, "ModelInfer", None) == "UNAUTHENTICATED"
    assert refusal(auth, "ModelInfer", "wrong-token-0123456789abcdef") == "UNAUTHENTICATED"
    assert refusal(auth, "RepositoryModelUnload", INFER_TOKEN) == "PERMISSION_DENIED"
    assert refusal(auth, "RepositoryModelUnload", ADMIN_TOKEN) is None
    assert refusal(auth, "RepositoryModelUnload", None) == "UNAUTHENTICATED"
    assert refusal(auth, "SomethingNew", INFER_TOKEN) == "PERMISSION_DENIED", "unknown: admin"
    auth.check("/grpc.health.v1.Health/Check", ())


def test_only_admin_file_leaves_inference_open(tmp_path: Path) -> None:
    auth = authenticator(tmp_path, inference=False)
    assert refusal(auth, "ModelInfer", None) is None
    assert refusal(auth, "RepositoryIndex", None) == "UNAUTHENTICATED"
    assert refusal(auth, "RepositoryIndex", ADMIN_TOKEN) is None


def test_only_inference_file_closes_admin(tmp_path: Path) -> None:
    auth = authenticator(tmp_path, admin=False)
    assert refusal(auth, "ModelInfer", INFER_TOKEN) is None
    assert refusal(auth, "RepositoryModelLoad", INFER_TOKEN) == "PERMISSION_DENIED"


def test_no_files_means_no_checks() -> None:
    auth = Authenticator(None, None)
    assert not auth.enabled
    assert refusal(auth, "RepositoryModelUnload", None) is None


# -- the interceptor on a real server: raw-bytes handlers of each kind ----------------------------


async def _echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return b"ok:" + request


async def _stream(
    requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
) -> AsyncIterator[bytes]:
    async for request in requests:
        yield b"ok:" + request


def _handlers() -> grpc.GenericRpcHandler:
    unary = grpc.unary_unary_rpc_method_handler(_echo)
    return grpc.method_handlers_generic_handler(
        "inference.GRPCInferenceService",
        {
            "ModelInfer": unary,
            "RepositoryModelUnload": unary,
            "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(_stream),
        },
    )


def test_interceptor_on_a_real_server(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    auth = authenticator(tmp_path)

    def calls(port: int) -> dict[str, str]:
        # a sync client: grpc.aio's client sometimes reports a stream the server refused before
        # reading it as INTERNAL ("Internal error from Core") while it still sends; this one,
        # like tritonclient, sees the server's status
        seen: dict[str, str] = {}
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            infer = channel.unary_unary(f"{SERVICE}/ModelInfer")
            unload = channel.unary_unary(f"{SERVICE}/RepositoryModelUnload")
            stream = channel.stream_stream(f"{SERVICE}/ModelStreamInfer")
            cases = {
                "infer_ok": (infer, bearer(INFER_TOKEN)),
                "infer_missing": (infer, ()),
                "infer_wrong": (infer, bearer("not-a-token-0123456789abc")),
                "unload_inference_token": (unload, bearer(INFER_TOKEN)),
                "unload_admin_token": (unload, bearer(ADMIN_TOKEN)),
            }
            for name, (method, metadata) in cases.items():
                try:
                    seen[name] = method(b"x" * 1000, metadata=metadata, timeout=10)[:3].decode()
                except grpc.RpcError as exc:
                    seen[name] = exc.code().name
                    if name == "infer_wrong":
                        assert "not-a-token" not in (exc.details() or "")
            for name, metadata in (("stream_ok", bearer(INFER_TOKEN)), ("stream_missing", ())):
                try:
                    replies = stream(iter([b"a", b"b"]), metadata=metadata, timeout=10)
                    seen[name] = ",".join(r.decode() for r in replies)
                except grpc.RpcError as exc:
                    seen[name] = exc.code().name
            try:
                channel.unary_unary(f"{SERVICE}/NoSuchMethod")(b"", timeout=10)
            except grpc.RpcError as exc:
                seen["unknown"] = exc.code().name
        return seen

    async def scenario() -> dict[str, str]:
        server = grpc.aio.server(interceptors=[AuthInterceptor(auth)])
        server.add_generic_rpc_handlers((_handlers(),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            return await asyncio.to_thread(calls, port)
        finally:
            await server.stop(0)

    with caplog.at_level(logging.DEBUG):
        seen = asyncio.run(scenario())
    assert seen == {
        "infer_ok": "ok:",
        "infer_missing": "UNAUTHENTICATED",
        "infer_wrong": "UNAUTHENTICATED",
        "unload_inference_token": "PERMISSION_DENIED",
        "unload_admin_token": "ok:",
        "stream_ok": "ok:a,ok:b",
        "stream_missing": "UNAUTHENTICATED",
        "unknown": "UNIMPLEMENTED",
    }
    for secret in (INFER_TOKEN, ADMIN_TOKEN, "not-a-token"):
        assert secret not in caplog.text
