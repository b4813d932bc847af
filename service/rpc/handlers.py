"""gRPC method handlers built from a service descriptor: each method decodes its own request.

grpcio's generated registration parses requests before our code runs, and a frame that is not
valid protobuf then gets UNKNOWN with the parser's text and a traceback in the log. Here each
handler receives the raw bytes, parses them itself (INVALID_ARGUMENT naming the message type),
calls the servicer method, and maps domain errors to status codes in one place. Every rejected
request is counted by reason and logged through a rate limit, so no client can flood the log.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass

from ..core.errors import (
    INTERNAL_MESSAGE,
    MALFORMED,
    InvalidInput,
    ServingError,
    outcome,
    shorten,
)

log = logging.getLogger(__name__)


class RateLimitedLog:
    """At most `burst` lines per `interval_s`; then one line saying how many were dropped."""

    def __init__(self, logger: logging.Logger, burst: int = 5, interval_s: float = 10.0) -> None:
        self._log = logger
        self._burst = burst
        self._interval = interval_s
        self._window_start = -interval_s
        self._used = 0
        self._suppressed = 0

    def log(self, level: int, message: str, *args: object, exc_info: Any = None) -> None:
        """Log a line if this interval's budget allows, else count it as suppressed."""
        now = time.monotonic()
        if now - self._window_start >= self._interval:
            if self._suppressed:
                self._log.warning(
                    "%d similar log lines suppressed in the last %.0f s",
                    self._suppressed, now - self._window_start,
                )  # fmt: skip
            self._window_start, self._used, self._suppressed = now, 0, 0
        if self._used < self._burst:
            self._used += 1
            self._log.log(level, message, *args, exc_info=exc_info)
        else:
            self._suppressed += 1


@dataclass
class Rejections:
    """Where rejected requests go: a counter by reason and a rate-limited log."""

    count: Callable[[str], None]
    log: RateLimitedLog

    def status(self, method: str, exc: BaseException) -> tuple[grpc.StatusCode, str]:
        """Count and log a failed request; returns the status and the message for the client."""
        status, label = outcome(exc)
        self.count(label)
        if isinstance(exc, ServingError):
            message = str(exc)
            self.log.log(logging.INFO, "%s: %s %s", method, status, shorten(message))
            return grpc.StatusCode[status], message
        self.log.log(logging.ERROR, "%s: unhandled error", method, exc_info=exc)
        return grpc.StatusCode[status], INTERNAL_MESSAGE

    def malformed(self, method: str, message_type: str) -> InvalidInput:
        """Count and log a frame that does not parse; returns the error to answer with."""
        self.count(MALFORMED)
        self.log.log(logging.INFO, "%s: request is not a valid %s", method, message_type)
        return InvalidInput(f"the request is not a valid {message_type} message")


Unary = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Message]]
Streaming = Callable[[AsyncIterator[Any], grpc.aio.ServicerContext], AsyncIterator[Message]]


def _unary(
    method: str, impl: Unary, request_type: type[Message], rejections: Rejections
) -> Callable[[bytes, grpc.aio.ServicerContext], Awaitable[Message]]:
    parse, type_name = request_type.FromString, request_type.DESCRIPTOR.full_name

    async def handle(raw: bytes, context: grpc.aio.ServicerContext) -> Message:
        try:
            request = parse(raw)
        except DecodeError:
            error = rejections.malformed(method, type_name)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        try:
            return await impl(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            code, message = rejections.status(method, exc)
            await context.abort(code, message)
        raise AssertionError("unreachable")  # abort always raises

    return handle


def _streaming(
    method: str, impl: Streaming, request_type: type[Message], rejections: Rejections
) -> Callable[[AsyncIterator[bytes], grpc.aio.ServicerContext], AsyncIterator[Message]]:
    """A bad frame on a stream becomes an InvalidInput item; the servicer answers it in band."""
    parse, type_name = request_type.FromString, request_type.DESCRIPTOR.full_name

    async def decoded(raw_iterator: AsyncIterator[bytes]) -> AsyncIterator[Message | InvalidInput]:
        async for raw in raw_iterator:
            try:
                yield parse(raw)
            except DecodeError:
                yield rejections.malformed(method, type_name)

    async def handle(
        raw_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Message]:
        try:
            async for response in impl(decoded(raw_iterator), context):
                yield response
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            code, message = rejections.status(method, exc)
            await context.abort(code, message)

    return handle


def service_handler(
    servicer: object, service: ServiceDescriptor, rejections: Rejections
) -> grpc.GenericRpcHandler:
    """Handlers for every method of `service`, taking raw bytes, served by `servicer`."""
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in service.methods:
        request_type = GetMessageClass(method.input_type)
        response_type = GetMessageClass(method.output_type)
        impl = getattr(servicer, method.name)
        if method.client_streaming and method.server_streaming:
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(
                _streaming(method.name, impl, request_type, rejections),
                response_serializer=response_type.SerializeToString,
            )
        elif not method.client_streaming and not method.server_streaming:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _unary(method.name, impl, request_type, rejections),
                response_serializer=response_type.SerializeToString,
            )
        else:
            raise ValueError(f"{service.full_name}/{method.name}: streaming kind not supported")
    return grpc.method_handlers_generic_handler(service.full_name, handlers)
