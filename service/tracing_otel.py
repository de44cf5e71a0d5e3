"""OpenTelemetry tracing (the `tracing` extra): the only module that imports opentelemetry,
loaded by service/server.py `build_tracing` when --trace-otlp-endpoint is set.

One tracer for the fronts (request and reply spans, the caller's W3C trace context taken from
gRPC metadata and HTTP headers) and the engine (admission, queue wait, batch, store save: an
`EngineTracer`). Spans go to the OTLP/gRPC endpoint through the SDK's batch processor (its
OTEL_BSP_* and OTEL_EXPORTER_OTLP_* variables apply); sampling is parent-based: a caller's
sampled flag is followed, a request without a trace context is sampled with
--trace-sample-ratio, and a batch span exists (sampled) only when it serves a sampled request.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar
from types import TracebackType
from typing import TYPE_CHECKING

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode

from service.errors import LstmServeError
from service.tracing import NO_REQUEST_SPAN

if TYPE_CHECKING:
    from service.config import ServerConfig
    from service.engine.types import TraceAttributes
    from service.tracing import RequestSpan

SCOPE = "lstm-serve"
MAX_DESCRIPTION = 256  # characters of an error kind kept in a span's status
# The gRPC status codes by name (rpc.grpc.status_code is the number): grpc's StatusCode order.
GRPC_CODES = {name: number for number, name in enumerate((
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
    "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED",
    "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
))}  # fmt: skip
_NOTHING: AbstractContextManager[object] = nullcontext()
# The sampled request span being served (set by its front around the work; read by the engine).
_ACTIVE: ContextVar[Span | None] = ContextVar("lstm_serve_request_span", default=None)


class OtelTracing:
    """The fronts' `Tracing` and the engine's `EngineTracer` over one TracerProvider."""

    enabled = True

    def __init__(self, provider: TracerProvider, ratio: float = 1.0) -> None:
        """`provider` samples what its parent samples and every root (ParentBased(ALWAYS_ON));
        a request without a parent is sampled here, with probability `ratio`, before any span
        is made, and a batch is made only for sampled requests."""
        self.provider = provider
        self.tracer = provider.get_tracer(SCOPE)
        self.ratio = ratio

    @classmethod
    def start(cls, config: ServerConfig) -> OtelTracing:
        """Export to the configured endpoint (plaintext for http://, TLS for https://)."""
        resource = Resource.create({"service.name": config.trace_service_name})
        provider = TracerProvider(resource=resource, sampler=ParentBased(ALWAYS_ON))
        endpoint = config.trace_otlp_endpoint
        exporter = OTLPSpanExporter(endpoint=endpoint, insecure=endpoint.startswith("http://"))
        provider.add_span_processor(BatchSpanProcessor(exporter))
        return cls(provider, config.trace_sample_ratio)

    def shutdown(self) -> None:
        self.provider.shutdown()  # exports what is buffered first

    # -- the fronts ------------------------------------------------------------------------

    def extract(self, carrier: Iterable[tuple[str, str | bytes]]) -> object:
        """The caller's context when it names a parent span (a valid traceparent), else None."""
        headers = {k.lower(): v for k, v in carrier if isinstance(v, str)}
        context = propagate.extract(headers, context=Context())
        return context if trace.get_current_span(context).get_span_context().is_valid else None

    def rpc(self, service: str, method: str, parent: object,
            attributes: dict[str, str | int] | None = None) -> RequestSpan:  # fmt: skip
        """The request's span; NO_REQUEST_SPAN when it is not sampled (nothing below it is,
        and a request without a parent costs a random number then)."""
        if parent is None and self.ratio < 1.0 and random.random() >= self.ratio:
            return NO_REQUEST_SPAN  # a root not sampled: no span made at all
        named = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}
        return self._request(f"{service}/{method}", parent,
                             named | attributes if attributes else named)  # fmt: skip

    def http(self, method: str, route: str, path: str, parent: object) -> RequestSpan:
        if parent is None and self.ratio < 1.0 and random.random() >= self.ratio:
            return NO_REQUEST_SPAN
        return self._request(f"{method} {route}", parent, {
            "http.request.method": method, "http.route": route, "url.path": path,
        })  # fmt: skip

    def _request(self, name: str, parent: object, attributes: dict[str, str | int]) -> RequestSpan:
        """A server span under the caller's context (a root without one: never the loop's
        current context); the caller's unsampled flag gives NO_REQUEST_SPAN."""
        context = parent if isinstance(parent, Context) else Context()
        span = self.tracer.start_span(name, context, SpanKind.SERVER, attributes)
        return _Request(self.tracer, span) if span.is_recording() else NO_REQUEST_SPAN

    # -- the engine ------------------------------------------------------------------------

    def current(self) -> object | None:
        return _ACTIVE.get()

    def span(self, name: str, attributes: TraceAttributes | None = None,
             ) -> AbstractContextManager[object]:  # fmt: skip
        """A child of the sampled request being served; nothing outside one."""
        parent = _ACTIVE.get()
        if parent is None:
            return _NOTHING
        return _Child(self.tracer.start_span(name, trace.set_span_in_context(parent),
                                             attributes=attributes))  # fmt: skip

    def batch(self, attributes: TraceAttributes, chunks: Sequence[tuple[object, float]],
              ) -> _Batch:  # fmt: skip
        """A batch's span (a root: it serves many requests), linked to each traced request
        span once; under each request a `queue wait` span from its first chunk's submission
        (perf_counter seconds) to now, linked to the batch."""
        requests: dict[int, tuple[Span, float, int]] = {}  # a StreamMulti's chunks share one
        for span, enqueued in chunks:
            _, first, n = requests.get(id(span), (span, enqueued, 0))
            requests[id(span)] = (span, min(first, enqueued), n + 1)  # type: ignore[assignment]
        links = [Link(span.get_span_context()) for span, _, _ in requests.values()]
        now_ns, now = time.time_ns(), time.perf_counter()
        batch = self.tracer.start_span("batch", Context(), SpanKind.INTERNAL, attributes,
                                       links, start_time=now_ns)  # fmt: skip
        to_batch = [Link(batch.get_span_context())]
        for span, enqueued, n in requests.values():
            since = now_ns - int((now - enqueued) * 1e9)
            queued = self.tracer.start_span("queue wait", trace.set_span_in_context(span),
                                            attributes={"lstmserve.chunks": n},
                                            links=to_batch, start_time=since)  # fmt: skip
            queued.end(end_time=now_ns)
        return _Batch(batch)


def _describe(span: Span, code: str, kind: str) -> None:
    """ERROR with the error's kind, never its message (a message may name a session id)."""
    if code != "OK":
        span.set_status(Status(StatusCode.ERROR, kind[:MAX_DESCRIPTION] or code))


class _Active:
    """The sampled request being served, for the engine's spans (this module's own context
    variable: one lookup per chunk, not OpenTelemetry's context chain)."""

    __slots__ = ("span", "token")

    def __init__(self, span: Span) -> None:
        self.span = span

    def __enter__(self) -> Span:
        self.token = _ACTIVE.set(self.span)
        return self.span

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:  # fmt: skip
        _ACTIVE.reset(self.token)


class _Child:
    """A span under the current one, ended when the block ends (not made current: nothing
    nests under admission, a store save or a reply)."""

    __slots__ = ("span",)

    def __init__(self, span: Span) -> None:
        self.span = span

    def __enter__(self) -> Span:
        return self.span

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:  # fmt: skip
        if exc is not None:
            _failed(self.span, exc)
        self.span.end()


def _failed(span: Span, error: BaseException) -> None:
    """ERROR with the error's kind (never its message: it may name a session id)."""
    span.set_status(Status(StatusCode.ERROR, type(error).__name__))


class _Batch:
    __slots__ = ("span",)

    def __init__(self, span: Span) -> None:
        self.span = span

    def end(self, error: BaseException | None = None) -> None:
        if error is not None:
            _failed(self.span, error)
        self.span.end()


class _Request:
    """One request's server span; ended by its front once the reply is handed over."""

    __slots__ = ("span", "tracer")

    def __init__(self, tracer: trace.Tracer, span: Span) -> None:
        self.tracer = tracer
        self.span = span

    def active(self) -> AbstractContextManager[object]:
        return _Active(self.span)

    @contextmanager
    def reply(self) -> Iterator[None]:
        """Not made current: a stream's reply span stays open across the conversation's
        yield, and no context variable may."""
        span = self.tracer.start_span("reply", trace.set_span_in_context(self.span))
        try:
            yield
        finally:
            span.end()

    def finish(self, code: str = "OK", kind: str = "") -> None:
        span = self.span
        span.set_attribute("rpc.grpc.status_code", GRPC_CODES.get(code, 2))
        _describe(span, code, kind)
        span.end()

    def fail(self, exc: BaseException) -> None:
        if isinstance(exc, LstmServeError):
            self.finish(exc.code, type(exc).__name__)
        elif isinstance(exc, GeneratorExit | asyncio.CancelledError):
            self.finish("CANCELLED", "the client went away")
        else:
            self.finish("INTERNAL", type(exc).__name__)

    def finish_http(self, status: int) -> None:
        span = self.span
        span.set_attribute("http.response.status_code", status)
        _describe(span, "OK" if status < 400 else str(status), f"HTTP {status}")
        span.end()
