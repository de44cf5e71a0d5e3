"""The one place where lstm-serve errors become gRPC statuses."""

from __future__ import annotations

import grpc

from service.errors import LstmServeError


def status_code(exc: BaseException) -> grpc.StatusCode:
    """The gRPC status for an exception: its `code` for the family, INTERNAL for anything else."""
    if isinstance(exc, LstmServeError):
        return grpc.StatusCode[exc.code]
    return grpc.StatusCode.INTERNAL


def status_message(exc: BaseException) -> str:
    """The client-facing message: the error's text for the family, a generic one otherwise."""
    if isinstance(exc, LstmServeError):
        return str(exc)
    return f"internal error: {type(exc).__name__}"


def numeric_code(code: grpc.StatusCode) -> int:
    """The integer value of a status code (e.g. 3 for INVALID_ARGUMENT)."""
    return int(code.value[0])
