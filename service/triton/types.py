"""The neutral messages of the Open Inference Protocol (KServe v2) between a front and the core.

A front (gRPC, HTTP/REST) builds an `InferRequest` whose inputs already hold numpy arrays
(`service/triton/tensors.py` turns raw bytes or typed values into them, with named-field
errors) and encodes the `InferResponse` it gets back. No gRPC and no HTTP here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from service.errors import LstmServeError

# A request or output parameter's value, as both protocols carry them.
ParamValue = bool | int | float | str

# Each error's `code` (a gRPC status name) -> the HTTP status the REST front answers with.
HTTP_STATUS = {
    "INVALID_ARGUMENT": 400,
    "FAILED_PRECONDITION": 400,
    "OUT_OF_RANGE": 400,
    "ALREADY_EXISTS": 409,
    "NOT_FOUND": 404,
    "UNAVAILABLE": 503,
    "RESOURCE_EXHAUSTED": 429,
    "ABORTED": 409,
    "UNIMPLEMENTED": 501,
    "DEADLINE_EXCEEDED": 504,
    "CANCELLED": 499,
    "INTERNAL": 500,
}


class TritonError(LstmServeError):
    """An error of the Triton layer with its own status code (a gRPC status name) and, where
    HTTP has a more precise one than the code's (413, 408, 415), that HTTP status."""

    def __init__(self, code: str, message: str, http: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.http = http


def http_status(exc: BaseException) -> int:
    """The HTTP status for any exception the core raises (500 for anything unexpected)."""
    if isinstance(exc, TritonError) and exc.http is not None:
        return exc.http
    if isinstance(exc, LstmServeError):
        return HTTP_STATUS.get(exc.code, 500)
    return 500


def invalid(message: str) -> TritonError:
    return TritonError("INVALID_ARGUMENT", message)


def too_large(message: str) -> TritonError:
    """A request larger than a limit of the server: HTTP 413, gRPC RESOURCE_EXHAUSTED."""
    return TritonError("RESOURCE_EXHAUSTED", message, http=413)


def too_slow(message: str) -> TritonError:
    """A request body that did not arrive in time: HTTP 408."""
    return TritonError("DEADLINE_EXCEEDED", message, http=408)


@dataclass(frozen=True, slots=True)
class InferInput:
    """One input tensor: `data` is a numpy array of `shape` (BYTES: dtype object, bytes items)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray


@dataclass(frozen=True, slots=True)
class RequestedOutput:
    """An output the client asked for; `parameters` may hold "classification" (top-k)."""

    name: str
    parameters: dict[str, ParamValue] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class InferRequest:
    """One inference request. `parameters` as sent: sequence_id (int or str), sequence_start,
    sequence_end, lstm_serve_seq (int, exactly-once resends); others are ignored. `outputs`
    empty: every output of the model."""

    model: str
    version: str = ""
    id: str = ""
    inputs: tuple[InferInput, ...] = ()
    outputs: tuple[RequestedOutput, ...] = ()
    parameters: dict[str, ParamValue] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class InferOutput:
    """One output tensor: FP32 arrays, or BYTES (dtype object, bytes items) for classification."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray


@dataclass(frozen=True, slots=True)
class InferResponse:
    """The reply: the version that answered, the request's id echoed, the outputs in request
    order (model order when none was named). `parameters` carries our extension's fields
    (lstm_serve_seq, lstm_serve_duplicate, lstm_serve_total_steps) for sequence requests."""

    model: str
    version: str
    id: str
    outputs: tuple[InferOutput, ...]
    parameters: dict[str, ParamValue] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class TensorMetadata:
    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ModelMetadata:
    """What ModelMetadata answers (shapes with -1 for variable dimensions, batch first)."""

    name: str
    versions: tuple[str, ...]
    platform: str
    inputs: tuple[TensorMetadata, ...]
    outputs: tuple[TensorMetadata, ...]


@dataclass(frozen=True, slots=True)
class ServerMetadata:
    name: str
    version: str
    extensions: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class IndexEntry:
    """One row of the repository index; state is READY, UNAVAILABLE, LOADING or UNLOADING."""

    name: str
    version: str
    state: str
    reason: str


@dataclass(frozen=True, slots=True)
class Duration:
    count: int = 0
    ns: int = 0


@dataclass(frozen=True, slots=True)
class ModelStats:
    """One version's statistics, as the statistics extension defines them (durations in ns,
    last_inference in ms since the epoch)."""

    name: str
    version: str
    last_inference: int
    inference_count: int
    execution_count: int
    success: Duration
    fail: Duration
