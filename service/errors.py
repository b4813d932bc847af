"""Domain errors of the serving path and the one mapping from them to gRPC status names.

Nothing here imports grpc: the server turns a status name into a `grpc.StatusCode`.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


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


def to_status(exc: BaseException) -> tuple[str, str]:
    """Return (status name, client message) for an exception; unexpected ones are logged."""
    if isinstance(exc, ServingError):
        return exc.status, str(exc)
    log.error("unhandled error while serving a request", exc_info=exc)
    return "INTERNAL", INTERNAL_MESSAGE


class ModelLoadError(ServingError):
    """A model in the repository could not be read or loaded; the message gives the reason."""

    status = "FAILED_PRECONDITION"


class ModelControlDisabled(ServingError):
    """Load or unload over the API while the model-control mode does not allow it."""

    status = "FAILED_PRECONDITION"
