"""Domain errors of the serving path and the one mapping from an error to its outcome.

Each error class names its gRPC status code (`status`); `outcome` maps any exception to that
status name and the label metrics count it under, and is the only place that decides it. Nothing
here imports grpc: a front turns the status name into its own code (`grpc.StatusCode[name]`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any


class ServingError(Exception):
    """An error the client may see: `status` names the gRPC status code, the message is safe."""

    status = "INTERNAL"


class InvalidInput(ServingError):
    """The request is malformed: wrong datatype, shape, size, names or values."""

    status = "INVALID_ARGUMENT"


class ModelNotFound(ServingError):
    """No such model, or no such version of it, in the repository."""

    status = "NOT_FOUND"


class ModelNotReady(ServingError):
    """The model exists but cannot serve now (failed to load, loading, unloading, draining)."""

    status = "UNAVAILABLE"


class QueueFull(ServingError):
    """The model's request queue is at its configured limit."""

    status = "RESOURCE_EXHAUSTED"


class DeadlineExceeded(ServingError):
    """The request's deadline passed before it could run."""

    status = "DEADLINE_EXCEEDED"


class Cancelled(ServingError):
    """The client went away; the work was abandoned (nobody reads this status)."""

    status = "CANCELLED"


class Refused(ServingError):
    """A call refused before it ran: the token check said no."""


class Unauthenticated(Refused):
    """The call carries no valid bearer token."""

    status = "UNAUTHENTICATED"


class PermissionDenied(Refused):
    """The token is valid but not for this method (an inference token on an admin call)."""

    status = "PERMISSION_DENIED"


class Unsupported(ServingError):
    """The request asks for something this server does not implement."""

    status = "UNIMPLEMENTED"


class BatchShapeError(RuntimeError):
    """The batch function returned outputs whose batch dimension does not match its input."""

    @classmethod
    def check(cls, outputs: Mapping[str, Any], size: int) -> None:
        """Raise for the first output (an array) that is not `size` items, batch first."""
        for name, array in outputs.items():
            if array.ndim == 0 or array.shape[0] != size:
                raise cls(
                    f"output '{name}' has shape {list(array.shape)}; expected batch {size} first"
                )


INTERNAL_MESSAGE = "internal error (details are in the server log)"
MAX_ECHO = 100  # characters of a client's text (a name, a version) repeated in a message


def shorten(text: str, limit: int = MAX_ECHO) -> str:
    """A client's text cut to `limit` characters, on one line: safe to echo or to log."""
    text = text.replace("\n", " ").replace("\r", " ")
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


class ModelLoadError(ServingError):
    """A model in the repository could not be read or loaded; the message gives the reason."""

    status = "FAILED_PRECONDITION"


class ModelControlDisabled(ServingError):
    """Load or unload over the API while the model-control mode does not allow it."""

    status = "FAILED_PRECONDITION"


INTERNAL = "INTERNAL"
# Why a request was refused: a frame that is not a valid message, or the status it got. A fixed
# set, so the rejected-requests counter has bounded labels.
MALFORMED = "malformed"
# How a request that reached a model can fail (the requests counter's labels, beside "success").
REQUEST_FAILURES = (
    "invalid_argument",
    "not_found",
    "unavailable",
    "resource_exhausted",
    "deadline_exceeded",
    "cancelled",
    "internal",
)
REJECT_REASONS = (
    MALFORMED,
    *REQUEST_FAILURES,
    "unimplemented",
    "failed_precondition",
    "already_exists",
    "unauthenticated",
    "permission_denied",
)


def outcome(exc: BaseException) -> tuple[str, str]:
    """The gRPC status name and the metrics label of a failed request: the one mapping."""
    if isinstance(exc, ServingError):
        return exc.status, exc.status.lower()
    if isinstance(exc, asyncio.CancelledError):
        return Cancelled.status, Cancelled.status.lower()
    return INTERNAL, INTERNAL.lower()
