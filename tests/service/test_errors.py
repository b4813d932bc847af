"""The one mapping from an error to its gRPC status name and metrics label."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from service.core import errors
from service.observability.metrics import OUTCOMES


@pytest.mark.parametrize(
    ("exc", "status"),
    [
        (errors.InvalidInput("x"), "INVALID_ARGUMENT"),
        (errors.ModelNotFound("x"), "NOT_FOUND"),
        (errors.ModelNotReady("x"), "UNAVAILABLE"),
        (errors.QueueFull("x"), "RESOURCE_EXHAUSTED"),
        (errors.DeadlineExceeded("x"), "DEADLINE_EXCEEDED"),
        (errors.Unsupported("x"), "UNIMPLEMENTED"),
        (errors.ModelLoadError("x"), "FAILED_PRECONDITION"),
        (errors.ModelControlDisabled("x"), "FAILED_PRECONDITION"),
        (errors.Cancelled("x"), "CANCELLED"),
        (errors.Unauthenticated("x"), "UNAUTHENTICATED"),
        (errors.PermissionDenied("x"), "PERMISSION_DENIED"),
        (asyncio.CancelledError(), "CANCELLED"),
        (RuntimeError("bug"), "INTERNAL"),
    ],
)
def test_outcome(exc: BaseException, status: str) -> None:
    got_status, label = errors.outcome(exc)
    assert got_status == status
    assert grpc.StatusCode[got_status].name == status  # a real gRPC code
    assert label == status.lower()
    assert label in errors.REJECT_REASONS


def test_label_lists_have_no_duplicates_and_agree() -> None:
    assert len(set(errors.REJECT_REASONS)) == len(errors.REJECT_REASONS)
    assert set(OUTCOMES) == {"success", *errors.REQUEST_FAILURES}
    assert set(errors.REQUEST_FAILURES) <= set(errors.REJECT_REASONS)
