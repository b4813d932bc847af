"""Domain errors of the serving path and the one mapping from them to gRPC status names.

Nothing here imports grpc: the server turns a status name into a `grpc.StatusCode`.
"""

from __future__ import annotations


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


class Unsupported(ServingError):
    """The request asks for something this server does not implement."""

    status = "UNIMPLEMENTED"


INTERNAL_MESSAGE = "internal error (details are in the server log)"
MAX_ECHO = 100  # characters of a client's text (a name, a version) repeated in a message


def shorten(text: str, limit: int = MAX_ECHO) -> str:
    """A client's text cut to `limit` characters, on one line: safe to echo or to log."""
    text = text.replace("\n", " ").replace("\r", " ")
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


# Why a request was refused: a frame that is not a valid message, or the status it got. A fixed
# set, so the rejected-requests counter has bounded labels.
MALFORMED = "malformed"
REJECT_REASONS = (
    MALFORMED,
    "invalid_argument",
    "not_found",
    "unavailable",
    "resource_exhausted",
    "deadline_exceeded",
    "unimplemented",
    "failed_precondition",
    "already_exists",
    "unauthenticated",
    "permission_denied",
    "unauthenticated",
    "permission_denied",
    "cancelled",
    "internal",
)


class ModelLoadError(ServingError):
    """A model in the repository could not be read or loaded; the message gives the reason."""

    status = "FAILED_PRECONDITION"


class ModelControlDisabled(ServingError):
    """Load or unload over the API while the model-control mode does not allow it."""

    status = "FAILED_PRECONDITION"
