"""The KServe v2 REST protocol as a bare ASGI application over the core objects.

No web framework: a dozen routes matched on the raw path, each a thin call on the same objects the
gRPC servicers use (the repository, `ServedModel.infer`, model control, statistics). Errors are
`{"error": "..."}` with the HTTP status Triton's HTTP front gives the same case; every refused
request is counted and logged through the server's rate-limited `Rejections`. Tokens are checked
against the scope of the equivalent gRPC method, so both fronts share one policy.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from prometheus_client import CollectorRegistry, Counter

import modelrepo
from pb import grpc_service_pb2 as pb

from .. import __version__
from ..core.errors import (
    InvalidInput,
    ModelNotReady,
    ServingError,
    Unauthenticated,
    Unsupported,
    outcome,
)
from ..core.model import ServedModel
from ..core.model_control import ModelControl
from ..core.repository import ModelRepository
from ..core.statistics import Duration, VersionStatistics
from ..explain import methods as explain_methods
from ..explain.pipeline import explain
from ..observability.metrics import CALL, NAMESPACE
from ..rpc.servicers import PeerStatistics
from ..rpc.statistics import statistics_message
from .codec import HEADER_LENGTH, decode_infer, encode_infer, parse_json, split_body
from .explain import explain_json, explain_query

# The page runs only its own files: no inline script, nothing from elsewhere.
_PAGE_HEADERS = (
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self' data: blob:; style-src 'self'",
    ),
    (b"x-content-type-options", b"nosniff"),
)

log = logging.getLogger(__name__)

SERVER_NAME = "cnnserve"
EXTENSIONS = (
    "classification",
    "binary_tensor_data",
    "model_repository",
    "model_configuration",
    "statistics",
)
_SERVICE = "/inference.GRPCInferenceService/"
EXPLAIN_METHOD = "/cnnserve.explain.v1.Explainer/Explain"  # the token scope of explain
UI_DIR = Path(__file__).resolve().parent / "ui"
UI_FILES = {
    "index.html": b"text/html; charset=utf-8",
    "page.css": b"text/css; charset=utf-8",
    "page.js": b"text/javascript; charset=utf-8",
}
# gRPC status name -> HTTP status, as Triton's HTTP front maps its error codes
# (INVALID_ARG 400, NOT_FOUND 404, UNAVAILABLE 503, UNSUPPORTED 501, INTERNAL 500, others 400).
HTTP_STATUS = {
    "INVALID_ARGUMENT": 400,
    "NOT_FOUND": 404,
    "UNAVAILABLE": 503,
    "RESOURCE_EXHAUSTED": 503,  # Triton: a full queue is UNAVAILABLE
    "DEADLINE_EXCEEDED": 503,  # Triton: an expired timeout is UNAVAILABLE
    "UNIMPLEMENTED": 501,
    "INTERNAL": 500,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
}


class RejectionLog(Protocol):
    """The server's rejections (rpc.handlers.Rejections): counts by reason, rate-limited log."""

    def status(self, method: str, exc: BaseException) -> tuple[Any, str]: ...


class TokenCheck(Protocol):
    """The server's token check (security.auth.Authenticator), shared with the gRPC front."""

    @property
    def enabled(self) -> bool: ...

    def check(self, method: str, metadata: Any) -> None: ...


Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class HttpError(Exception):
    """An answer decided at the HTTP level (bad route, method, body size)."""

    def __init__(self, status: int, message: str, headers: tuple[tuple[bytes, bytes], ...] = ()):
        super().__init__(message)
        self.status = status
        self.headers = headers


@dataclass
class Response:
    """What a route returns: status, body and content type (JSON unless said otherwise)."""

    body: bytes = b""
    status: int = 200
    content_type: bytes = b"application/json"
    headers: tuple[tuple[bytes, bytes], ...] = ()


def json_response(value: Any, status: int = 200) -> Response:
    return Response(json.dumps(value, separators=(",", ":")).encode(), status)


def message_to_json(message: Message) -> dict[str, Any]:
    """A protobuf message as JSON with field names as in the .proto and integers as numbers.

    protobuf's own JSON printer writes 64-bit integers as strings and leaves out zeros; Triton's
    HTTP front and the clients that read it (tritonclient, perf_analyzer) expect numbers, and
    counters that are present when zero.
    """
    out: dict[str, Any] = {}
    for fd in message.DESCRIPTOR.fields:
        value = getattr(message, fd.name)
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            value_fd = fd.message_type.fields_by_name["value"]
            out[fd.name] = {k: _json_value(value_fd, v) for k, v in value.items()}
        elif _repeated(fd):
            out[fd.name] = [_json_value(fd, v) for v in value]
        elif fd.message_type is not None or fd.containing_oneof is not None:
            if message.HasField(fd.name):
                out[fd.name] = _json_value(fd, value)
        else:
            out[fd.name] = _json_value(fd, value)
    return out


def _repeated(fd: Any) -> bool:
    is_repeated = getattr(fd, "is_repeated", None)  # protobuf >= 6; `label` before
    if is_repeated is not None:
        return bool(is_repeated)
    return bool(fd.label == FieldDescriptor.LABEL_REPEATED)


def _json_value(fd: Any, value: Any) -> Any:
    if fd.type == FieldDescriptor.TYPE_MESSAGE:
        return message_to_json(value)
    if fd.type == FieldDescriptor.TYPE_ENUM and fd.enum_type is not None:
        return fd.enum_type.values_by_number[value].name
    if fd.type == FieldDescriptor.TYPE_BYTES:
        import base64

        return base64.b64encode(value).decode()
    return value


def _duration(d: Duration) -> dict[str, int]:
    return {"count": d.count, "ns": d.ns}


def statistics_json(stats: VersionStatistics) -> dict[str, Any]:
    """One version's counters as Triton's HTTP statistics extension writes them."""
    return {
        "name": stats.name,
        "version": stats.version,
        "last_inference": stats.last_inference_ms,
        "inference_count": stats.inference_count,
        "execution_count": stats.execution_count,
        "inference_stats": {
            "success": _duration(stats.success),
            "fail": _duration(stats.fail),
            "queue": _duration(stats.queue),
            "compute_input": _duration(stats.compute_input),
            "compute_infer": _duration(stats.compute_infer),
            "compute_output": _duration(stats.compute_output),
        },
        "batch_stats": [
            {
                "batch_size": size,
                "compute_input": {"count": b.count, "ns": b.input_ns},
                "compute_infer": {"count": b.count, "ns": b.infer_ns},
                "compute_output": {"count": b.count, "ns": b.output_ns},
            }
            for size, b in sorted(stats.batches.items())
        ],
    }


def _message_duration(d: Any) -> dict[str, int]:
    return {"count": d.count, "ns": d.ns}


def statistics_message_json(stats: pb.ModelStatistics) -> dict[str, Any]:
    """A ModelStatistics message (summed over workers) as Triton's HTTP statistics JSON."""
    durations = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")
    steps = ("compute_input", "compute_infer", "compute_output")
    return {
        "name": stats.name,
        "version": stats.version,
        "last_inference": stats.last_inference,
        "inference_count": stats.inference_count,
        "execution_count": stats.execution_count,
        "inference_stats": {
            d: _message_duration(getattr(stats.inference_stats, d)) for d in durations
        },
        "batch_stats": [
            {"batch_size": b.batch_size, **{s: _message_duration(getattr(b, s)) for s in steps}}
            for b in stats.batch_stats
        ],
    }


class RestApi:
    """The ASGI app: routes KServe v2 REST calls onto the core."""

    def __init__(
        self,
        repository: ModelRepository[ServedModel],
        control: ModelControl,
        ready: Callable[[], bool],
        draining: Callable[[], bool],
        rejections: RejectionLog,
        authenticator: TokenCheck,
        registry: CollectorRegistry,
        max_body_bytes: int,
        ui: bool = True,
        peer_statistics: PeerStatistics | None = None,
    ) -> None:
        self.repository = repository
        self.peer_statistics = peer_statistics  # worker processes: the group's sum
        self.control = control
        self.ready = ready
        self.draining = draining
        self.rejections = rejections
        self.authenticator = authenticator
        self.max_body_bytes = max_body_bytes
        self.ui = ui
        self._ui_cache: dict[str, bytes] = {}
        self.responses = Counter(
            "http_responses", "HTTP API answers by route and status code",
            ("route", "code"), namespace=NAMESPACE, registry=registry,
        )  # fmt: skip
        self._children: dict[tuple[str, int], Any] = {}  # routes and statuses: a bounded set

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan and websockets are not served
            return
        route = "unknown"
        try:
            route, handler, method_name, args = self._route(scope)
            CALL.set(f"HTTP {route}")  # uvicorn runs each request in its own task
            self._check_token(method_name, scope)
            response = await handler(scope, receive, *args)
        except HttpError as exc:
            self.rejections.status(f"HTTP {route}", InvalidInput(str(exc)))
            response = json_response({"error": str(exc)}, exc.status)
            response.headers = exc.headers
        except Exception as exc:
            _, message = self.rejections.status(f"HTTP {route}", exc)
            response = json_response({"error": message}, HTTP_STATUS.get(outcome(exc)[0], 400))
            if isinstance(exc, Unauthenticated):
                response.headers = ((b"www-authenticate", b"Bearer"),)
        self._counter(route, response.status).inc()
        await send(
            {
                "type": "http.response.start",
                "status": response.status,
                "headers": [
                    (b"content-type", response.content_type),
                    (b"content-length", str(len(response.body)).encode()),
                    *response.headers,
                ],
            }
        )
        await send({"type": "http.response.body", "body": response.body})

    def _counter(self, route: str, status: int) -> Any:
        """The responses counter's child for (route, status), looked up once."""
        key = (route, status)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.responses.labels(route, str(status))
        return child

    # -- routing ------------------------------------------------------------------------------

    def _route(self, scope: Scope) -> tuple[str, Any, str | None, tuple[Any, ...]]:
        """(route name, handler, gRPC method for the token scope, handler arguments)."""
        raw = scope.get("raw_path") or scope["path"].encode()
        path = raw.split(b"?", 1)[0].decode("latin-1")
        parts = [unquote(p) for p in path.strip("/").split("/")] if path.strip("/") else []
        method = scope["method"]
        get, post = ("GET", "HEAD"), ("POST",)
        if self.ui and (not parts or parts[0] == "ui"):
            page = "index.html" if not parts else "/".join(parts[1:])
            if page in UI_FILES:
                return self._allow("ui", method, get, self.ui_file, "ModelMetadata", page)
            if page == "models":
                return self._allow("ui", method, get, self.ui_models, "ModelMetadata")
        if not parts or parts[0] != "v2":
            raise HttpError(404, f"no such endpoint: {method} {path[:100]}")
        rest = parts[1:]
        if not rest:
            return self._allow(
                "server_metadata", method, get, self.server_metadata, "ServerMetadata"
            )
        if rest[0] == "health" and len(rest) == 2 and rest[1] in ("live", "ready"):
            handler: Any = self.live if rest[1] == "live" else self.server_ready
            return self._allow(f"health_{rest[1]}", method, get, handler, None)
        if rest[0] == "repository":
            if rest[1:] == ["index"]:
                return self._allow("repository_index", method, post, self.index, "RepositoryIndex")
            if len(rest) == 4 and rest[1] == "models" and rest[3] in ("load", "unload"):
                grpc_name = "RepositoryModelLoad" if rest[3] == "load" else "RepositoryModelUnload"
                handler = self.load if rest[3] == "load" else self.unload
                return self._allow(
                    f"repository_{rest[3]}", method, post, handler, grpc_name, rest[2]
                )
        if rest[0] == "models":
            if rest[1:] == ["stats"]:
                return self._allow(
                    "statistics", method, get, self.statistics, "ModelStatistics", "", ""
                )
            if len(rest) >= 2:
                name, tail, version = rest[1], rest[2:], ""
                if len(tail) >= 2 and tail[0] == "versions":
                    version, tail = tail[1], tail[2:]
                if not tail:
                    return self._allow(
                        "model_metadata",
                        method,
                        get,
                        self.model_metadata,
                        "ModelMetadata",
                        name,
                        version,
                    )
                if len(tail) == 1:
                    routes = {
                        "ready": ("model_ready", get, self.model_ready, "ModelReady"),
                        "config": ("model_config", get, self.model_config, "ModelConfig"),
                        "stats": ("statistics", get, self.statistics, "ModelStatistics"),
                        "infer": ("infer", post, self.infer, "ModelInfer"),
                        "explain": ("explain", post, self.explain, EXPLAIN_METHOD),
                    }
                    if tail[0] in routes:
                        route, allowed, handler, grpc_name = routes[tail[0]]
                        return self._allow(
                            route, method, allowed, handler, grpc_name, name, version
                        )
        raise HttpError(404, f"no such endpoint: {method} {path[:100]}")

    @staticmethod
    def _allow(
        route: str,
        method: str,
        allowed: tuple[str, ...],
        handler: Any,
        grpc_name: str | None,
        *args: Any,
    ) -> tuple[str, Any, str | None, tuple[Any, ...]]:
        if method not in allowed:
            raise HttpError(
                405,
                f"method {method[:10]} not allowed here; use {allowed[0]}",
                ((b"allow", ", ".join(allowed).encode()),),
            )
        full = grpc_name if grpc_name is None or grpc_name.startswith("/") else _SERVICE + grpc_name
        return route, handler, full, args

    def _check_token(self, method_name: str | None, scope: Scope) -> None:
        if method_name is None or not self.authenticator.enabled:
            return
        metadata = [
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, v in scope["headers"]
            if k == b"authorization"
        ]
        self.authenticator.check(method_name, metadata)

    async def _body(self, scope: Scope, receive: Receive) -> bytes:
        """The request body, refused with 413 past the limit before it is all read."""
        limit = self.max_body_bytes
        for key, value in scope["headers"]:
            if key == b"content-length" and value.isdigit() and int(value) > limit:
                raise HttpError(
                    413, f"request body of {int(value)} bytes exceeds the limit of {limit}"
                )
            if key == b"content-encoding" and value.lower() not in (b"identity", b""):
                raise HttpError(415, "compressed request bodies are not supported")
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise HttpError(400, "the client went away")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise HttpError(413, f"request body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body"):
                return b"".join(chunks)

    @staticmethod
    def _header(scope: Scope, name: bytes) -> str | None:
        for key, value in scope["headers"]:
            if key == name:
                return str(value.decode("latin-1"))
        return None

    # -- handlers -----------------------------------------------------------------------------

    async def live(self, scope: Scope, receive: Receive) -> Response:
        return Response()

    async def server_ready(self, scope: Scope, receive: Receive) -> Response:
        return Response(status=200 if self.ready() else 400)  # Triton: 400 when not ready

    async def server_metadata(self, scope: Scope, receive: Receive) -> Response:
        return json_response(
            {"name": SERVER_NAME, "version": __version__, "extensions": list(EXTENSIONS)}
        )

    def _model(self, name: str, version: str) -> ServedModel:
        return self.repository.get(name, version)[1]

    async def model_ready(
        self, scope: Scope, receive: Receive, name: str, version: str
    ) -> Response:
        try:
            self._model(name, version)
        except ModelNotReady:
            return Response(status=400)
        return Response(status=400 if self.draining() else 200)

    async def model_metadata(
        self, scope: Scope, receive: Receive, name: str, version: str
    ) -> Response:
        model = self._model(name, version)
        entry = self.repository.entry(name)
        lead = [-1] if model.signature.batching else []
        return json_response(
            {
                "name": model.name,
                "versions": [str(v) for v in sorted(entry.versions)],
                "platform": model.config.platform or "onnxruntime_onnx",
                "inputs": [
                    {"name": t.name, "datatype": t.datatype, "shape": [*lead, *t.dims]}
                    for t in model.signature.inputs
                ],
                "outputs": [
                    {"name": t.name, "datatype": t.datatype, "shape": [*lead, *t.dims]}
                    for t in model.signature.outputs
                ],
            }
        )

    async def model_config(
        self, scope: Scope, receive: Receive, name: str, version: str
    ) -> Response:
        return json_response(message_to_json(self._model(name, version).reported_config()))

    async def statistics(self, scope: Scope, receive: Receive, name: str, version: str) -> Response:
        models = self.repository.serving(name, version)
        if self.peer_statistics is None:
            return json_response({"model_stats": [statistics_json(m.stats) for m in models]})
        # Worker processes: this one's counts plus its peers', summed as ModelStatistics does.
        request = pb.ModelStatisticsRequest(name=name, version=version)
        stats = await self.peer_statistics(request, [statistics_message(m.stats) for m in models])
        return json_response({"model_stats": [statistics_message_json(m) for m in stats]})

    async def index(self, scope: Scope, receive: Receive) -> Response:
        body = await self._body(scope, receive)
        ready = False
        if body.strip():
            request = parse_json(body)
            if not isinstance(request, dict):
                raise InvalidInput("the index request must be a JSON object")
            ready = request.get("ready", False)
            if not isinstance(ready, bool):
                raise InvalidInput("'ready' must be true or false")
        rows = []
        for row in self.repository.index(ready_only=ready):
            item = {"name": row.name, "version": row.version, "state": row.state}
            if row.reason:
                item["reason"] = row.reason
            rows.append(item)
        return json_response(rows)

    async def _control_parameters(self, scope: Scope, receive: Receive) -> dict[str, Any]:
        body = await self._body(scope, receive)
        if not body.strip():
            return {}
        request = parse_json(body)
        if not isinstance(request, dict):
            raise InvalidInput("the request must be a JSON object")
        params = request.get("parameters", {})
        if not isinstance(params, dict):
            raise InvalidInput("'parameters' must be a JSON object")
        return params

    async def load(self, scope: Scope, receive: Receive, name: str) -> Response:
        if await self._control_parameters(scope, receive):
            raise Unsupported("load parameters (config or file overrides) are not supported")
        await self.control.load(name)
        return Response()

    async def unload(self, scope: Scope, receive: Receive, name: str) -> Response:
        params = await self._control_parameters(scope, receive)
        if params.get("unload_dependents", False) not in (False, True) or set(params) - {
            "unload_dependents"
        }:
            raise InvalidInput("the only unload parameter is 'unload_dependents' (true or false)")
        await self.control.unload(name)
        return Response()

    async def explain(self, scope: Scope, receive: Receive, name: str, version: str) -> Response:
        body = await self._body(scope, receive)
        content_type = self._header(scope, b"content-type") or ""
        query, timeout_s = explain_query(
            name, version, body, content_type, scope.get("query_string", b"")
        )
        result = await explain(self.repository, query, timeout_s)
        accept = (self._header(scope, b"accept") or "").lower()
        if "image/png" in accept and "json" not in accept:
            if not result.explanations:
                raise InvalidInput("Accept: image/png needs an explanation (not predictions_only)")
            first = result.explanations[0]
            picture = first.annotated_png if query.options.annotated else first.overlay_png
            return Response(picture, content_type=b"image/png")
        return json_response(explain_json(result))

    async def ui_file(self, scope: Scope, receive: Receive, page: str) -> Response:
        """The explanation viewer's files, shipped in the package."""
        data = self._ui_cache.get(page)
        if data is None:
            data = self._ui_cache[page] = (UI_DIR / page).read_bytes()
        return Response(data, content_type=UI_FILES[page], headers=_PAGE_HEADERS)

    async def ui_models(self, scope: Scope, receive: Receive) -> Response:
        """The models the viewer can explain (ready, with a ready explainer beside them), the
        methods each one's explainer offers, and how the page names each method."""
        ready = {row.name for row in self.repository.index(ready_only=True)}
        names = sorted(n for n in ready if modelrepo.explainer_name(n) in ready)
        offered: dict[str, list[str]] = {}
        for name in names:
            try:
                _, explainer = self.repository.get(modelrepo.explainer_name(name))
            except ServingError:  # unloaded since the index was read: not offered this time
                continue
            offered[name] = list(explain_methods.offered(explainer))
        titles = {m: explain_methods.title(m) for ms in offered.values() for m in ms}
        return json_response(
            {"models": [n for n in names if n in offered], "methods": offered, "titles": titles}
        )

    async def infer(self, scope: Scope, receive: Receive, name: str, version: str) -> Response:
        model = self._model(name, version)
        start = time.perf_counter_ns()
        try:
            body = await self._body(scope, receive)
            header, binary = split_body(body, self._header(scope, HEADER_LENGTH.encode()))
            request = decode_infer(header, binary, model.signature)
        except ServingError as exc:
            model.request_failed(start, exc)
            raise
        except HttpError as exc:
            model.request_failed(start, InvalidInput(str(exc)))
            raise
        decoded = request.decoded
        outputs = await model.infer(decoded.inputs, decoded.batch_size, request.timeout_s, start)
        body, header_length = encode_infer(
            model.name, model.version, request, outputs, model.signature.batching
        )
        if header_length is None:
            return Response(body)
        return Response(
            body,
            content_type=b"application/octet-stream",
            headers=((HEADER_LENGTH.encode(), str(header_length).encode()),),
        )


__all__ = ["HTTP_STATUS", "RestApi", "message_to_json"]
