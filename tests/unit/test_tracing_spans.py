"""Tracing without a network: the flags, the missing extra, the off switch, and the engine's
spans recorded in memory (a batch serving two traced requests links both; an untraced chunk
opens no span at all)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import numpy as np
import pytest
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased

from service.config import ServerConfig, config_from_args
from service.engine.types import NO_TRACER, ChunkWork, StreamOptions
from service.errors import ConfigError
from service.server import build_tracing
from service.tracing import EXTRA_MISSING, NO_REQUEST_SPAN, NO_TRACING
from service.tracing_otel import OtelTracing
from tests.unit.engines import load_engine

ENDPOINT = "http://127.0.0.1:4317"


@pytest.mark.parametrize("ratio", ["1.5", "-0.1", "nan", "abc"])
def test_a_bad_sample_ratio_is_refused_naming_the_flag(ratio: str) -> None:
    with pytest.raises(ConfigError, match="--trace-sample-ratio"):
        config_from_args(["--trace-sample-ratio", ratio])


def test_an_endpoint_without_its_scheme_is_refused_naming_the_flag() -> None:
    with pytest.raises(ConfigError, match="--trace-otlp-endpoint 'collector:4317' needs its"):
        config_from_args(["--trace-otlp-endpoint", "collector:4317"])
    with pytest.raises(ConfigError, match="--trace-service-name is empty"):
        ServerConfig(trace_otlp_endpoint=ENDPOINT, trace_service_name=" ")


def test_the_flags_come_from_the_environment_too() -> None:
    config = config_from_args([], {"LSTM_SERVE_TRACE_OTLP_ENDPOINT": ENDPOINT,
                                   "LSTM_SERVE_TRACE_SAMPLE_RATIO": "0.25"})  # fmt: skip
    assert (config.trace_otlp_endpoint, config.trace_sample_ratio) == (ENDPOINT, 0.25)
    assert config.trace_service_name == "lstm-serve"


def test_tracing_is_off_without_an_endpoint() -> None:
    tracing = build_tracing(ServerConfig())
    assert tracing is NO_TRACING and not tracing.enabled
    assert tracing.rpc("s", "m", tracing.extract([("traceparent", "x")])) is NO_REQUEST_SPAN
    assert NO_TRACER.current() is None and not NO_TRACER.enabled


def test_a_missing_extra_is_one_line_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import service

    monkeypatch.delitem(sys.modules, "service.tracing_otel", raising=False)
    monkeypatch.delattr(service, "tracing_otel", raising=False)
    monkeypatch.setitem(sys.modules, "opentelemetry", None)  # not installed
    with pytest.raises(ConfigError) as caught:
        build_tracing(ServerConfig(trace_otlp_endpoint=ENDPOINT))
    assert str(caught.value) == EXTRA_MISSING
    assert "pip install 'lstm-serve[tracing]'" in EXTRA_MISSING and "\n" not in EXTRA_MISSING


def recorded(ratio: float = 1.0) -> tuple[OtelTracing, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ParentBased(ALWAYS_ON), resource=Resource({}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return OtelTracing(provider, ratio), exporter


def named(spans: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


def test_one_batch_links_every_traced_request_it_serves(tiny_repo: Path) -> None:
    tracing, exporter = recorded()
    engine = load_engine(tiny_repo, tracer=tracing)

    async def main() -> None:
        sessions = [await engine.open_session("tiny-gru", 0, StreamOptions()) for _ in range(3)]
        requests = [tracing.rpc("svc", "Stream", None) for _ in sessions]

        async def one(i: int) -> None:
            span = requests[i] if i < 2 else None  # the third is not traced
            if span is None:
                await engine.apply_chunk(sessions[i], 1, np.array([1, 2, 3]))
                return
            with span.active():
                await engine.apply_chunk(sessions[i], 1, np.array([1, 2, 3]))
            span.finish()

        await asyncio.gather(*(one(i) for i in range(3)))

    asyncio.run(main())
    engine.close()
    spans = exporter.get_finished_spans()
    (batch,) = named(spans, "batch")
    requests = named(spans, "svc/Stream")
    served = {r.context.span_id for r in requests}  # type: ignore[union-attr]
    assert {link.context.span_id for link in batch.links} == served
    assert batch.parent is None and batch.attributes is not None
    assert batch.attributes["lstmserve.batch.size"] == 3  # the untraced chunk rode along
    assert batch.attributes["lstmserve.model.name"] == "tiny-gru"
    queued = named(spans, "queue wait")
    assert len(queued) == 2 and all(q.links[0].context.span_id == batch.context.span_id  # type: ignore[union-attr]
                                    for q in queued)  # fmt: skip
    assert {q.parent.span_id for q in queued} == served  # type: ignore[union-attr]
    assert len(named(spans, "admission")) == 2  # the traced requests' (opens were outside)


def test_a_request_with_many_chunks_in_one_batch_is_linked_once(tiny_repo: Path) -> None:
    """A StreamMulti message: its chunks share its span, one link and one queue wait."""
    tracing, exporter = recorded()
    engine = load_engine(tiny_repo, tracer=tracing)

    async def main() -> None:
        sessions = [await engine.open_session("tiny-gru", 0, StreamOptions()) for _ in range(3)]
        span = tracing.rpc("svc", "StreamMulti", None)
        with span.active():
            await engine.apply_chunks([ChunkWork(s, 1, np.array([1, 2])) for s in sessions])
        span.finish()

    asyncio.run(main())
    engine.close()
    spans = exporter.get_finished_spans()
    (batch,) = named(spans, "batch")
    (queued,) = named(spans, "queue wait")
    assert len(batch.links) == 1 and batch.attributes["lstmserve.batch.size"] == 3  # type: ignore[index]
    assert queued.attributes == {"lstmserve.chunks": 3}
    assert len(named(spans, "admission")) == 3  # one per entry


def test_no_span_outside_a_sampled_request(tiny_repo: Path) -> None:
    """The engine's spans hang under a sampled request only: none for untraced work."""
    tracing, exporter = recorded(ratio=0.0)
    engine = load_engine(tiny_repo, tracer=tracing)

    async def main() -> None:
        session = await engine.open_session("tiny-gru", 0, StreamOptions())
        span = tracing.rpc("svc", "Stream", None)  # a root at ratio 0: not sampled
        assert span is NO_REQUEST_SPAN  # nothing more is done for it
        with span.active():
            assert tracing.current() is None
            await engine.apply_chunk(session, 1, np.array([1, 2]))
        span.finish()
        await engine.classify(session.model, [np.array([1, 2, 3])], False)

    asyncio.run(main())
    engine.close()
    assert exporter.get_finished_spans() == ()
    assert not trace.get_current_span().is_recording()


def test_the_ratio_samples_that_share_of_requests_without_a_parent() -> None:
    tracing, exporter = recorded(ratio=0.25)
    for _ in range(2000):
        tracing.rpc("svc", "Classify", None).finish()
    assert 400 <= len(exporter.get_finished_spans()) <= 600  # 500 expected, sd 19


def test_a_caller_traceparent_is_the_parent_and_tracestate_kept() -> None:
    tracing, exporter = recorded(ratio=0.0)
    parent = tracing.extract([
        ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        ("tracestate", "vendor=opaque"), ("authorization", "Bearer secret"),
        ("grpc-trace-bin", b"\x00"),
    ])  # fmt: skip
    span = tracing.rpc("lstmserve.v1.LstmServe", "Classify", parent)
    span.finish("INVALID_ARGUMENT", "InvalidInput")
    (done,) = exporter.get_finished_spans()
    assert done.context is not None and done.parent is not None
    assert f"{done.context.trace_id:032x}" == "0af7651916cd43dd8448eb211c80319c"
    assert f"{done.parent.span_id:016x}" == "b7ad6b7169203331"
    assert done.context.trace_state.get("vendor") == "opaque"
    assert done.attributes is not None and done.attributes["rpc.grpc.status_code"] == 3
    assert done.status.description == "InvalidInput"
    assert "secret" not in str(dict(done.attributes))
