"""The one place where lstm-serve errors become gRPC statuses."""

from __future__ import annotations

import grpc

from service.errors import LstmServeError

# Every status message (trailer or in-band ErrorStatus) is cut to this many UTF-8 bytes: a
# client's metadata limit (16 KB by default) must never turn an error into RESOURCE_EXHAUSTED.
MAX_MESSAGE_BYTES = 1024
CUT_MARK = " ... (cut)"


def status_code(exc: BaseException) -> grpc.StatusCode:
    """The gRPC status for an exception: its `code` for the family, INTERNAL for anything else."""
    if isinstance(exc, LstmServeError):
        return grpc.StatusCode[exc.code]
    return grpc.StatusCode.INTERNAL


def status_message(exc: BaseException) -> str:
    """The client-facing message: the error's text (capped) for the family, a generic one else."""
    if isinstance(exc, LstmServeError):
        return capped(str(exc))
    return f"internal error: {type(exc).__name__}"


def capped(text: str, limit: int = MAX_MESSAGE_BYTES) -> str:
    """`text` cut to at most `limit` UTF-8 bytes on a character boundary, marked when cut."""
    data = text.encode("utf-8", "replace")
    if len(data) <= limit:
        return text
    keep = data[: limit - len(CUT_MARK)].decode("utf-8", "ignore")
    return keep + CUT_MARK


def numeric_code(code: grpc.StatusCode) -> int:
    """The integer value of a status code (e.g. 3 for INVALID_ARGUMENT)."""
    return int(code.value[0])
