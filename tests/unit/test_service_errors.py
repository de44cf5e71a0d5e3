"""Each error of the family maps to its gRPC status, in the one place that maps them."""

from __future__ import annotations

import grpc
import pytest

from service import errors
from service.status import (
    CUT_MARK,
    MAX_MESSAGE_BYTES,
    capped,
    numeric_code,
    status_code,
    status_message,
)

MAPPING = {
    errors.ModelNotFound: grpc.StatusCode.NOT_FOUND,
    errors.InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotStreamable: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ProtocolError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.SessionNotFound: grpc.StatusCode.NOT_FOUND,
    errors.SessionExpired: grpc.StatusCode.NOT_FOUND,
    errors.SessionMoved: grpc.StatusCode.ABORTED,
    errors.SessionReplaced: grpc.StatusCode.ABORTED,
    errors.VersionRetired: grpc.StatusCode.UNAVAILABLE,
    errors.ModelLoadFailed: grpc.StatusCode.UNAVAILABLE,
    errors.Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.BudgetExceeded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.Draining: grpc.StatusCode.UNAVAILABLE,
    errors.SnapshotInvalid: grpc.StatusCode.INVALID_ARGUMENT,
    errors.MalformedRequest: grpc.StatusCode.INVALID_ARGUMENT,
    errors.SnapshotMismatch: grpc.StatusCode.FAILED_PRECONDITION,
    errors.SnapshotsDisabled: grpc.StatusCode.FAILED_PRECONDITION,
    errors.SnapshotRefused: grpc.StatusCode.FAILED_PRECONDITION,
    errors.SequenceGap: grpc.StatusCode.FAILED_PRECONDITION,
    errors.AttachedElsewhere: grpc.StatusCode.ABORTED,
    errors.AlreadyApplied: grpc.StatusCode.ALREADY_EXISTS,
    errors.LstmServeError: grpc.StatusCode.INTERNAL,
}


@pytest.mark.parametrize("cls", list(MAPPING), ids=lambda c: c.__name__)
def test_error_maps_to_its_status(cls: type[errors.LstmServeError]) -> None:
    exc = cls("field x = 3 is wrong")
    assert status_code(exc) == MAPPING[cls]
    assert status_message(exc) == "field x = 3 is wrong"


def test_every_error_of_the_family_is_mapped() -> None:
    family = {
        obj
        for obj in vars(errors).values()
        if isinstance(obj, type) and issubclass(obj, errors.LstmServeError)
    }
    assert family == set(MAPPING)


def test_unexpected_exceptions_are_internal_without_leaking_their_text() -> None:
    exc = RuntimeError("secret path /etc/x")
    assert status_code(exc) == grpc.StatusCode.INTERNAL
    assert "secret" not in status_message(exc)


def test_numeric_codes() -> None:
    assert numeric_code(grpc.StatusCode.INVALID_ARGUMENT) == 3
    assert numeric_code(grpc.StatusCode.NOT_FOUND) == 5


def test_expired_is_a_kind_of_not_found() -> None:
    assert issubclass(errors.SessionExpired, errors.SessionNotFound)


def test_status_messages_are_capped_at_a_kilobyte_on_a_character_boundary() -> None:
    for text in ("x" * 100_000, "\U0001f600" * 2000, "a" + "\u00e9" * 5000):
        message = status_message(errors.ModelNotFound(f"model {text!r} is not served"))
        size = len(message.encode("utf-8"))
        assert size <= MAX_MESSAGE_BYTES and message.startswith("model '") and "cut" in message
    assert capped("short") == "short"
    cut = capped("\u00e9" * 600, 100)  # 2 bytes a character: never half of one
    assert len(cut.encode()) <= 100 and cut.endswith(CUT_MARK)
    assert set(cut.removesuffix(CUT_MARK)) == {"\u00e9"}


def test_malformed_requests_are_invalid_input() -> None:
    assert issubclass(errors.MalformedRequest, errors.InvalidInput)
