"""Bearer-token authentication: token files, two scopes, and one gRPC server interceptor.

Clients send `authorization: Bearer <token>` in the call's metadata. Tokens come from files, one a
line (blank lines and `#` comments skipped), re-read on SIGHUP (`reload`) or when a file changes.
Two scopes: `inference` (infer, stream, metadata, config, readiness, explain, reflection) and
`admin` (the repository API, and statistics when the operator says so); an admin token passes
every inference check. grpc.health.v1 is exempt so that probes work. A missing or unknown token is
UNAUTHENTICATED, a valid token of the wrong scope PERMISSION_DENIED. Tokens are never logged: files
and refusals are reported by path, line number and method only.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import grpc

from ..core.errors import PermissionDenied, Refused, Unauthenticated

log = logging.getLogger(__name__)

INFERENCE = "inference"
ADMIN = "admin"
SCOPES = (INFERENCE, ADMIN)

AUTHORIZATION = "authorization"
BEARER = "bearer"
MIN_TOKEN_CHARS = 16  # shorter tokens are accepted with a warning: they are guessable
CHECK_INTERVAL_S = 1.0  # how often a request may stat a token file for changes

_INFERENCE_SERVICE = "inference.GRPCInferenceService"
_HEALTH_SERVICE = "grpc.health.v1.Health"


def method_scopes(statistics_scope: str = INFERENCE) -> dict[str, str | None]:
    """Full method name -> scope it needs (None: exempt). Methods not listed need `admin`."""
    if statistics_scope not in SCOPES:
        raise ValueError(f"statistics scope must be one of {', '.join(SCOPES)}")
    inference = (
        "ServerLive",
        "ServerReady",
        "ModelReady",
        "ServerMetadata",
        "ModelMetadata",
        "ModelConfig",
        "ModelInfer",
        "ModelStreamInfer",
    )
    admin = ("RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload")
    scopes: dict[str, str | None] = {f"/{_INFERENCE_SERVICE}/{m}": INFERENCE for m in inference}
    scopes.update({f"/{_INFERENCE_SERVICE}/{m}": ADMIN for m in admin})
    scopes[f"/{_INFERENCE_SERVICE}/ModelStatistics"] = statistics_scope
    scopes["/cnnserve.explain.v1.Explainer/Explain"] = INFERENCE
    for version in ("v1alpha", "v1"):  # the schema only: anyone who may call may read it
        scopes[f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo"] = INFERENCE
    scopes[f"/{_HEALTH_SERVICE}/Check"] = None
    scopes[f"/{_HEALTH_SERVICE}/Watch"] = None
    return scopes


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def read_tokens(path: Path) -> list[str]:
    """The tokens in a file, one a line; blank lines and lines starting with `#` are skipped."""
    tokens = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        token = line.strip()
        if not token or token.startswith("#"):
            continue
        if any(c.isspace() for c in token):
            raise ValueError(f"{path}: line {number}: a token must not contain whitespace")
        if len(token) < MIN_TOKEN_CHARS:
            log.warning(
                "%s: line %d: token shorter than %d characters", path, number, MIN_TOKEN_CHARS
            )
        tokens.append(token)
    return tokens


class TokenFile:
    """The tokens of one file, kept as SHA-256 digests and re-read when the file changes."""

    def __init__(
        self,
        path: Path,
        *,
        check_interval_s: float = CHECK_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self._check_interval_s = check_interval_s
        self._clock = clock
        self._digests: tuple[bytes, ...] = ()
        self._stamp: tuple[int, int, int] | None = None
        self._checked = clock()
        self._problem = ""  # the last reload problem, logged once rather than every second
        try:
            self._read()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"token file {path}: {exc}") from exc
        if not self._digests:
            raise ValueError(f"token file {path} holds no token")

    def __len__(self) -> int:
        return len(self._digests)

    def _file_stamp(self) -> tuple[int, int, int]:
        st = os.stat(self.path)
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _read(self) -> None:
        stamp = self._file_stamp()
        self._digests = tuple(_digest(t) for t in read_tokens(self.path))
        self._stamp = stamp

    def reload(self) -> bool:
        """Re-read the file now; on failure keep the tokens we had. Returns success."""
        try:
            self._read()
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            self._report(str(exc))
            return False
        self._problem = ""
        if not self._digests:
            log.warning("token file %s is empty now: every token of it is revoked", self.path)
        log.info("token file %s loaded: %d tokens", self.path, len(self))
        return True

    def refresh(self) -> None:
        """Re-read the file if it changed since the last look (looks at most once a second)."""
        now = self._clock()
        if now - self._checked < self._check_interval_s:
            return
        self._checked = now
        try:
            stamp = self._file_stamp()
        except OSError as exc:
            self._report(str(exc))
            return
        if stamp != self._stamp:
            self.reload()

    def _report(self, problem: str) -> None:
        if problem != self._problem:
            log.error(
                "token file %s not reloaded, keeping %d tokens: %s", self.path, len(self), problem
            )
            self._problem = problem

    def matches(self, token: str) -> bool:
        """Whether `token` is in the file, comparing in constant time against every entry."""
        self.refresh()
        candidate = _digest(token)
        found = False
        for digest in self._digests:  # no early exit: the time does not say which one matched
            found |= hmac.compare_digest(candidate, digest)
        return found


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The token of the first `authorization: Bearer <token>` entry, or None."""
    for key, value in metadata or ():
        if key.lower() != AUTHORIZATION:
            continue
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() != BEARER or not token.strip():
            return None
        return token.strip()
    return None


class Authenticator:
    """Decides, per method and token, whether a call may go on.

    A scope is open when no token file covers it: no files at all turns authentication off;
    only --admin-token-file protects the repository API and leaves inference open; with only
    --auth-token-file the admin calls need an admin token, which nobody has, so they are refused.
    """

    def __init__(
        self,
        inference: TokenFile | None,
        admin: TokenFile | None,
        scopes: Mapping[str, str | None] | None = None,
    ) -> None:
        self.inference = inference
        self.admin = admin
        self.scopes = dict(method_scopes() if scopes is None else scopes)

    @classmethod
    def from_files(
        cls,
        auth_token_file: Path | None,
        admin_token_file: Path | None,
        statistics_scope: str = INFERENCE,
    ) -> Authenticator:
        """Read the token files (ValueError when one is unreadable or empty)."""
        return cls(
            TokenFile(auth_token_file) if auth_token_file else None,
            TokenFile(admin_token_file) if admin_token_file else None,
            method_scopes(statistics_scope),
        )

    @property
    def enabled(self) -> bool:
        return self.inference is not None or self.admin is not None

    def reload(self) -> None:
        """Re-read every token file (the SIGHUP handler calls this)."""
        for tokens in (self.inference, self.admin):
            if tokens is not None:
                tokens.reload()

    def scope_of(self, method: str) -> str | None:
        return self.scopes.get(method, ADMIN)

    def check(self, method: str, metadata: Iterable[tuple[str, str | bytes]] | None) -> None:
        """Return if the call may go on; raise Unauthenticated or PermissionDenied otherwise."""
        if not self.enabled:
            return
        scope = self.scope_of(method)
        if scope is None or (scope == INFERENCE and self.inference is None):
            return
        token = bearer_token(metadata)
        if token is None:
            raise Unauthenticated(
                "missing bearer token: send the metadata 'authorization: Bearer <token>'",
            )
        if self.admin is not None and self.admin.matches(token):
            return
        inference_ok = self.inference is not None and self.inference.matches(token)
        if inference_ok and scope == INFERENCE:
            return
        if inference_ok:
            raise PermissionDenied(
                f"{method.rsplit('/', 1)[-1]} needs an admin token; this one is for inference",
            )
        raise Unauthenticated("invalid bearer token")


def _refusing_handler(handler: grpc.RpcMethodHandler, refusal: Refused) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that answers with the refusal.

    No deserializer: a refused request's payload is never parsed.
    """

    async def refuse(_request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode[refusal.status], str(refusal))

    async def refuse_stream(_request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await context.abort(grpc.StatusCode[refusal.status], str(refusal))
        yield  # never reached: this makes it the async generator a streaming answer is

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse_stream)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse_stream)
    return grpc.unary_unary_rpc_method_handler(refuse)


def _log_refusal(method: str, refusal: Refused) -> None:
    log.debug("refused %s: %s %s", method, refusal.status, refusal)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Checks every call's bearer token against the scope its method needs.

    `on_refusal(method, refusal)` hears of each refused call (the server counts it and logs it,
    rate-limited: clients trigger these); by default a debug log line.
    """

    def __init__(
        self,
        authenticator: Authenticator,
        on_refusal: Callable[[str, Refused], None] = _log_refusal,
    ) -> None:
        self.authenticator = authenticator
        self._on_refusal = on_refusal

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        try:
            self.authenticator.check(method, handler_call_details.invocation_metadata)
        except Refused as refusal:
            handler = await continuation(handler_call_details)
            if handler is None:  # unknown method: let gRPC answer UNIMPLEMENTED
                return handler
            self._on_refusal(method, refusal)
            return _refusing_handler(handler, refusal)
        return await continuation(handler_call_details)


__all__ = [
    "ADMIN",
    "INFERENCE",
    "AuthInterceptor",
    "Authenticator",
    "TokenFile",
    "bearer_token",
    "method_scopes",
    "read_tokens",
]
