"""Tracing at the fronts: the caller's W3C trace context in, one span per request out.

Off by default: `NO_TRACING` does nothing and allocates nothing, and the fronts check
`enabled` (one attribute) before any tracing work on the per-chunk path. With
--trace-otlp-endpoint the composition root (service/server.py `build_tracing`) loads the
OpenTelemetry implementation (service/tracing_otel.py, the only module that imports
opentelemetry; the `tracing` extra), which is also the engine's tracer
(service/engine/types.py `EngineTracer`). Spans, attributes and links: docs/OPERATIONS.md,
"Tracing".
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Protocol

from service.engine.types import EngineTracer, NoTracer

EXTRA_MISSING = (
    "--trace-otlp-endpoint needs OpenTelemetry, which this environment lacks: "
    "pip install 'lstm-serve[tracing]'"
)
LSTM_SERVE_SERVICE = "lstmserve.v1.LstmServe"
TRITON_SERVICE = "inference.GRPCInferenceService"
# Probes, not requests: a Kubernetes probe every few seconds would be a trace every few seconds.
UNTRACED = frozenset({"ServerLive", "ServerReady", "ModelReady"})


class RequestSpan(Protocol):
    """The span of one request (a unary call, one message of a stream, an HTTP request)."""

    def active(self) -> AbstractContextManager[object]:
        """The span is current while the work runs (the engine's spans become its children)."""
        ...

    def reply(self) -> AbstractContextManager[object]:
        """A `reply` child span around encoding and handing over the answer."""
        ...

    def finish(self, code: str = "OK", kind: str = "") -> None:
        """End it with a gRPC status code name (an in-band error's for a stream's message) and
        the error's kind (its class name: never its message, which may name a session id)."""
        ...

    def fail(self, exc: BaseException) -> None:
        """End it with what the exception becomes on the wire."""
        ...

    def finish_http(self, status: int) -> None:
        """End an HTTP request's span with its response status."""
        ...


class Tracing(EngineTracer, Protocol):
    """What the fronts and the session layer trace with (and the engine: an EngineTracer)."""

    def extract(self, carrier: Iterable[tuple[str, str | bytes]]) -> object:
        """The caller's trace context from gRPC metadata or HTTP headers (traceparent,
        tracestate), as a parent for `rpc` / `http`."""
        ...

    def rpc(self, service: str, method: str, parent: object,
            attributes: dict[str, str | int] | None = None) -> RequestSpan:  # fmt: skip
        """A server span `SERVICE/METHOD` under `parent` (rpc.system=grpc)."""
        ...

    def http(self, method: str, route: str, path: str, parent: object) -> RequestSpan:
        """A server span `METHOD ROUTE` under `parent` (the HTTP semantic conventions)."""
        ...

    def shutdown(self) -> None:
        """Export what is buffered, then stop."""
        ...


class _NoRequestSpan:
    __slots__ = ()

    def active(self) -> AbstractContextManager[object]:
        return _NOTHING

    def reply(self) -> AbstractContextManager[object]:
        return _NOTHING

    def finish(self, code: str = "OK", kind: str = "") -> None:
        pass

    def fail(self, exc: BaseException) -> None:
        pass

    def finish_http(self, status: int) -> None:
        pass


class _NoTracing(NoTracer):
    """Tracing off: NO_TRACER for the engine, and fronts that trace nothing."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<no tracing>"

    def extract(self, carrier: Iterable[tuple[str, str | bytes]]) -> object:
        return None

    def rpc(self, service: str, method: str, parent: object,
            attributes: dict[str, str | int] | None = None) -> RequestSpan:  # fmt: skip
        return NO_REQUEST_SPAN

    def http(self, method: str, route: str, path: str, parent: object) -> RequestSpan:
        return NO_REQUEST_SPAN

    def shutdown(self) -> None:
        pass


_NOTHING: AbstractContextManager[object] = nullcontext()
NO_REQUEST_SPAN: RequestSpan = _NoRequestSpan()
NO_TRACING: Tracing = _NoTracing()


def grpc_parent(tracing: Tracing, context: Any) -> object:
    """The caller's trace context from a gRPC call's metadata; None when tracing is off."""
    return tracing.extract(context.invocation_metadata() or ()) if tracing.enabled else None


def grpc_span(tracing: Tracing, service: str, method: str, context: Any) -> RequestSpan:
    """A unary call's span under its caller's traceparent (NO_REQUEST_SPAN when off, and for
    the health probes)."""
    if not tracing.enabled or method in UNTRACED:
        return NO_REQUEST_SPAN
    return tracing.rpc(service, method, grpc_parent(tracing, context))
