"""OpenTelemetry tracing, end to end (docs/OPERATIONS.md, "Tracing"): the real server exports
to an OTLP receiver started here (a grpc server implementing the collector's TraceService from
opentelemetry-proto); each request carries a W3C traceparent and its spans must hang under it:
a streamed chunk, a Classify, and a Triton sequence request over gRPC and HTTP, with a real
redis-server as the session store (its save span)."""

from __future__ import annotations

import base64
import contextlib
import os
import queue
import secrets
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

from lstmserve.v1 import lstm_serve_pb2 as pb
from lstmserve.v1 import lstm_serve_pb2_grpc as pb_grpc
from tests.e2e.conftest import ServerProcess

ROOT = Path(__file__).resolve().parents[2]
MODEL = "langid-chars"
KEY = "trace:" + base64.b64encode(b"traces-and-sessions-share-a-key!").decode()
Span = trace_pb2.Span
SERVER = Span.SpanKind.SPAN_KIND_SERVER


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver on a free loopback port: keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.services: list[str] = []  # the service.name of each span's resource
        self._lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def Export(self, request: Any, context: Any) -> Any:
        with self._lock:
            for resource_spans in request.resource_spans:
                service = attributes(resource_spans.resource).get("service.name", "")
                for scope in resource_spans.scope_spans:
                    self.spans.extend(scope.spans)
                    self.services.extend([service] * len(scope.spans))
        return trace_service_pb2.ExportTraceServiceResponse()

    def of_service(self, name: str) -> list[Span]:
        with self._lock:
            return [s for s, n in zip(self.spans, self.services, strict=True) if n == name]

    def of_trace(self, trace_id: bytes) -> list[Span]:
        with self._lock:
            return [s for s in self.spans if s.trace_id == trace_id]

    def wait(self, found: Callable[[], Any], timeout: float = 30.0) -> Any:
        """`found()` once it is truthy (spans arrive in export batches), within `timeout`."""
        deadline = time.monotonic() + timeout
        while not (result := found()):
            if time.monotonic() > deadline:
                names = sorted({s.name for s in self.spans})
                raise AssertionError(f"spans not received in {timeout} s; have: {names}")
            time.sleep(0.05)
        return result


def attributes(item: Any) -> dict[str, Any]:
    """A span's (or resource's, or link's) attributes as a plain dict."""
    out: dict[str, Any] = {}
    for kv in item.attributes:
        value = kv.value
        out[kv.key] = getattr(value, value.WhichOneof("value"))
    return out


class Traceparent:
    """A client's W3C trace context: a trace id and its own (parent) span id."""

    def __init__(self, sampled: bool = True) -> None:
        self.trace_id = secrets.token_bytes(16)
        self.span_id = secrets.token_bytes(8)
        self.header = f"00-{self.trace_id.hex()}-{self.span_id.hex()}-{'01' if sampled else '00'}"


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    found = Receiver()
    yield found
    found.server.stop(0)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real langid-chars model alone (its text tokenizer included)."""
    repo = tmp_path_factory.mktemp("traced-models")
    shutil.copytree(ROOT / "models" / MODEL, repo / MODEL)
    return repo


def start(repo: Path, *flags: str) -> ServerProcess:
    server = ServerProcess(repo, *flags)
    server.wait_event("ready", 60)
    return server


@pytest.fixture(scope="module")
def traced(
    repo: Path, receiver: Receiver, redis_url: str, monkeypatch_module: pytest.MonkeyPatch
) -> Iterator[ServerProcess]:
    """Traced at 100 %, exported every 100 ms, sessions written through to redis-server."""
    monkeypatch_module.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    server = start(repo, "--trace-otlp-endpoint", receiver.endpoint, "--trace-sample-ratio",
                   "1", "--snapshot-key", KEY, "--session-store", redis_url)  # fmt: skip
    yield server
    server.stop()


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def stream_text(address: str, texts: list[str], traceparent: str) -> list[Any]:
    """One native Stream: open langid-chars, one chunk per text, end."""
    requests = [pb.StreamRequest(open=pb.OpenSession(model=MODEL))]
    requests += [pb.StreamRequest(chunk=pb.Chunk(seq=i + 1, input=pb.SequenceInput(text=t)))
                 for i, t in enumerate(texts)]  # fmt: skip
    requests.append(pb.StreamRequest(end=pb.End()))
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.LstmServeStub(channel)
        return list(stub.Stream(iter(requests), metadata=(("traceparent", traceparent),)))


def classify(address: str, traceparent: str) -> Any:
    with grpc.insecure_channel(address) as channel:
        request = pb.ClassifyRequest(model=MODEL, sequences=[
            pb.SequenceInput(text="bonjour"), pb.SequenceInput(text="guten morgen")])  # fmt: skip
        return pb_grpc.LstmServeStub(channel).Classify(
            request, metadata=(("traceparent", traceparent),)
        )


def triton_text(client: Any, text: str) -> Any:
    chunk = client.InferInput("text", [1, 1], "BYTES")
    chunk.set_data_from_numpy(np.array([[text.encode()]], dtype=np.object_))
    return chunk


def children(spans: list[Span], parent: Span) -> dict[str, list[Span]]:
    found: dict[str, list[Span]] = {}
    for span in spans:
        if span.parent_span_id == parent.span_id:
            found.setdefault(span.name, []).append(span)
    return found


def request_span(spans: list[Span], client: Traceparent, name: str,
                 message: str | None = None) -> Span:  # fmt: skip
    """The server span of the client's request: in its trace, its parent the client's span."""
    found = [s for s in spans if s.name == name and s.parent_span_id == client.span_id]
    if message is not None:
        found = [s for s in found if attributes(s).get("lstmserve.message") == message]
    assert len(found) == 1, [(s.name, attributes(s)) for s in spans]
    (span,) = found
    assert span.kind == SERVER and span.trace_id == client.trace_id
    assert span.status.code != trace_pb2.Status.STATUS_CODE_ERROR, span.status
    return span


def batch_linking(receiver: Receiver, request: Span) -> Span:
    """The batch span that served `request` (a root span in its own trace, linked to it)."""

    def find() -> Span | None:
        with receiver._lock:
            for span in receiver.spans:
                if span.name == "batch" and any(
                    link.trace_id == request.trace_id and link.span_id == request.span_id
                    for link in span.links
                ):
                    return span
        return None

    batch = receiver.wait(find)
    assert batch.parent_span_id == b"" and batch.trace_id != request.trace_id
    return batch


def check_queued_batch(receiver: Receiver, spans: list[Span], request: Span) -> None:
    """Admission, queue wait (linked to its batch), store save and reply under the request;
    the batch names the model version and its size."""
    below = children(spans, request)
    assert {"admission", "queue wait", "store save", "reply"} <= set(below), sorted(below)
    batch = batch_linking(receiver, request)
    facts = attributes(batch)
    assert facts["lstmserve.model.name"] == MODEL and facts["lstmserve.model.version"] == 1
    assert facts["lstmserve.batch.size"] >= 1 and facts["lstmserve.batch.steps"] >= 1
    (queued,) = below["queue wait"]
    assert [link.span_id for link in queued.links] == [batch.span_id]
    assert queued.end_time_unix_nano <= batch.end_time_unix_nano


def test_a_streamed_chunk_has_a_complete_trace(traced: ServerProcess, receiver: Receiver) -> None:
    client = Traceparent()
    replies = stream_text(traced.address, ["bonj", "our"], client.header)
    assert replies[-1].HasField("ended"), replies[-1]
    name = "lstmserve.v1.LstmServe/Stream"

    def complete() -> list[Span] | None:
        spans = receiver.of_trace(client.trace_id)
        chunks = [s for s in spans if attributes(s).get("lstmserve.message") == "chunk"]
        return spans if len(chunks) == 2 and len(children(spans, chunks[1])) >= 4 else None

    spans = receiver.wait(complete)
    chunk = next(s for s in spans if attributes(s).get("lstmserve.message") == "chunk")
    facts = attributes(chunk)
    assert facts["rpc.system"] == "grpc" and facts["rpc.service"] == "lstmserve.v1.LstmServe"
    assert facts["rpc.method"] == "Stream" and facts["rpc.grpc.status_code"] == 0
    check_queued_batch(receiver, spans, chunk)
    opened = request_span(spans, client, name, "open")  # the open: its admission, its save
    assert {"admission", "store save"} <= set(children(spans, opened))
    request_span(spans, client, name, "end")


def test_a_chunk_refused_in_band_ends_its_span_with_the_code(
    traced: ServerProcess, receiver: Receiver
) -> None:
    """A gap in seq: answered in-band FAILED_PRECONDITION, the stream goes on; the chunk's span
    says so (ERROR, rpc.grpc.status_code 9, the error's kind, never the session id its message
    names), the stream's next one is OK."""
    client = Traceparent()
    requests = [pb.StreamRequest(open=pb.OpenSession(model=MODEL)),
                pb.StreamRequest(chunk=pb.Chunk(seq=5, input=pb.SequenceInput(text="hallo"))),
                pb.StreamRequest(end=pb.End())]  # fmt: skip
    with grpc.insecure_channel(traced.address) as channel:
        replies = list(pb_grpc.LstmServeStub(channel).Stream(
            iter(requests), metadata=(("traceparent", client.header),)))  # fmt: skip
    assert replies[1].chunk.error.numeric_code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    session_id = replies[0].opened.session_id
    spans = receiver.wait(lambda: len(s := receiver.of_trace(client.trace_id)) >= 3 and s)
    (refused,) = [s for s in spans if attributes(s).get("lstmserve.message") == "chunk"]
    assert attributes(refused)["rpc.grpc.status_code"] == 9
    assert refused.status.code == trace_pb2.Status.STATUS_CODE_ERROR
    assert refused.status.message == "SequenceGap"  # the kind: the message names the session
    assert session_id and not [s for s in spans if session_id in str(s)]
    (admission,) = children(spans, refused)["admission"]  # where it was refused
    assert admission.status.code == trace_pb2.Status.STATUS_CODE_ERROR
    request_span(spans, client, "lstmserve.v1.LstmServe/Stream", "end")


def test_each_stream_multi_message_is_a_span_its_batch_links_to(
    traced: ServerProcess, receiver: Receiver
) -> None:
    """StreamMulti: one span per message (its entries share it), linked from their batch."""
    spans, messages = stream_multi_spans(traced.address, receiver)
    check_queued_batch(receiver, spans, max(messages, key=lambda s: s.start_time_unix_nano))


@contextlib.contextmanager
def traced_native_front(
    repo: Path, receiver: Receiver, monkeypatch_module: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[tuple[ServerProcess, Any]]:
    """A server tracing every message to `receiver`, and a native front in front of it."""
    from tests.native_front import NativeFront, binary

    binary()
    monkeypatch_module.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    server = start(repo, "--trace-otlp-endpoint", receiver.endpoint, "--trace-sample-ratio",
                   "1", "--native-front-dir", str(tmp_path / "sockets"))  # fmt: skip
    front = NativeFront(tmp_path / "sockets")
    try:
        yield server, front
    finally:
        front.stop()
        server.stop()


def test_a_stream_multi_message_through_the_native_front_hangs_under_its_traceparent(
    repo: Path, receiver: Receiver, monkeypatch_module: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The native front forwards a StreamMulti call's traceparent with its first message: each
    message's span is the caller's child, as on the Python front, linked from its batch."""
    with traced_native_front(repo, receiver, monkeypatch_module, tmp_path) as (_, front):
        spans, messages = stream_multi_spans(front.address, receiver, 6)  # no store: no save
    chunk = max(messages, key=lambda s: s.start_time_unix_nano)
    assert "queue wait" in children(spans, chunk) and "reply" in children(spans, chunk)
    assert attributes(batch_linking(receiver, chunk))["lstmserve.batch.size"] >= 1


def test_a_native_stream_is_traced_as_the_python_front_traces_it(
    repo: Path, receiver: Receiver, monkeypatch_module: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The same Stream (open, a text chunk, one refused in-band, another, end) through the
    Python front and the native front of one traced server: the same spans (names, parents,
    attributes, status), each message's under the caller's traceparent, and the caller's
    tracestate in their context. The native front's chunks after the first message travel
    packed: traced, each is answered in its own span."""
    with traced_native_front(repo, receiver, monkeypatch_module, tmp_path) as (server, front):
        python, native = (traced_stream_shape(a, receiver) for a in (server.address, front.address))
    assert native == python
    messages = [s for s in native if s[1] == "caller"]
    kinds = sorted(s[2]["lstmserve.message"] for s in messages)
    assert kinds == ["chunk", "chunk", "chunk", "end", "open"], kinds
    assert {s[5] for s in messages} == {TRACESTATE}, messages
    assert ("reply", ("chunk", 9), {}, trace_pb2.Status.STATUS_CODE_UNSET, "", TRACESTATE) in native


TRACESTATE = "vendor=opaque,other=7"
STREAM = "lstmserve.v1.LstmServe/Stream"


def traced_stream_shape(address: str, receiver: Receiver) -> list[tuple[Any, ...]]:
    """One Stream under a fresh traceparent and TRACESTATE: its trace's spans, each as (name,
    its parent: "caller" or the parent's (message kind, status code), attributes, status code,
    status message, trace state), sorted (the ids and times differ from call to call)."""
    client = Traceparent()
    texts = [(1, "bonj"), (5, "gap"), (2, "our")]  # seq 5: a gap, refused in-band
    requests = [pb.StreamRequest(open=pb.OpenSession(model=MODEL))]
    requests += [pb.StreamRequest(chunk=pb.Chunk(seq=seq, input=pb.SequenceInput(text=text)))
                 for seq, text in texts]  # fmt: skip
    requests.append(pb.StreamRequest(end=pb.End()))
    metadata = (("traceparent", client.header), ("tracestate", TRACESTATE))
    with grpc.insecure_channel(address) as channel:
        replies = list(pb_grpc.LstmServeStub(channel).Stream(iter(requests), metadata=metadata))
    assert replies[2].chunk.error.numeric_code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert replies[-1].HasField("ended"), replies[-1]

    def all_messages() -> list[Span] | None:
        spans = receiver.of_trace(client.trace_id)
        mine = [s for s in spans if s.parent_span_id == client.span_id]
        return spans if len(mine) >= len(requests) else None  # children end (and go) first

    spans = receiver.wait(all_messages)
    by_id = {s.span_id: s for s in spans}

    def parent(span: Span) -> Any:
        if span.parent_span_id == client.span_id:
            return "caller"
        above = by_id[span.parent_span_id]
        facts = attributes(above)
        return facts.get("lstmserve.message"), facts.get("rpc.grpc.status_code")

    shape = [(s.name, parent(s), attributes(s), s.status.code, s.status.message, s.trace_state)
             for s in spans]  # fmt: skip
    assert all(s.trace_id == client.trace_id for s in spans)
    assert {s[0] for s in shape if s[1] == "caller"} == {STREAM}
    return sorted(shape, key=repr)


def stream_multi_spans(address: str, receiver: Receiver,
                       at_least: int = 7) -> tuple[list[Span], list[Span]]:  # fmt: skip
    """Two StreamMulti messages (an open, a chunk) under a traceparent: the trace's spans (once
    `at_least` arrived) and the two message spans (children of the caller's)."""
    client = Traceparent()
    outbox: queue.Queue[Any] = queue.Queue()
    outbox.put(pb.StreamMultiRequest(entries=[pb.SessionRequest(open=pb.OpenSession(model=MODEL))]))
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.LstmServeStub(channel)
        replies = stub.StreamMulti(iter(outbox.get, None),
                                   metadata=(("traceparent", client.header),))  # fmt: skip
        session_id = next(replies).results[0].session_id
        chunk = pb.Chunk(seq=1, input=pb.SequenceInput(text="ciao"))
        outbox.put(pb.StreamMultiRequest(entries=[pb.SessionRequest(session_id=session_id,
                                                                    chunk=chunk)]))  # fmt: skip
        assert next(replies).results[0].HasField("chunk")
        outbox.put(None)
        list(replies)
    name = "lstmserve.v1.LstmServe/StreamMulti"
    spans = receiver.wait(lambda: len(s := receiver.of_trace(client.trace_id)) >= at_least and s)
    messages = [s for s in spans if s.name == name and s.parent_span_id == client.span_id]
    assert len(messages) == 2, [s.name for s in spans]
    return spans, messages


def test_a_classify_has_its_batch_as_a_child(traced: ServerProcess, receiver: Receiver) -> None:
    client = Traceparent()
    assert len(classify(traced.address, client.header).results) == 2
    name = "lstmserve.v1.LstmServe/Classify"
    spans = receiver.wait(lambda: (s := receiver.of_trace(client.trace_id)) and len(s) >= 4 and s)
    span = request_span(spans, client, name)
    below = children(spans, span)
    assert {"admission", "batch", "reply"} <= set(below), sorted(below)
    facts = attributes(below["batch"][0])
    assert facts["lstmserve.batch.size"] == 2 and facts["lstmserve.model.version"] == 1


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_triton_sequence_request_hangs_under_its_traceparent(
    traced: ServerProcess, receiver: Receiver, protocol: str
) -> None:
    """Stock tritonclient: START then END of a sequence, each with its own traceparent."""
    module, url = grpcclient, traced.address
    if protocol == "http":
        module, url = httpclient, f"127.0.0.1:{traced.http_port}"
    client = module.InferenceServerClient(url)
    probe = Traceparent()  # health probes are not traced
    assert client.is_server_ready(headers={"traceparent": probe.header})
    sent = []
    for i, text in enumerate(["schm", "etterling"]):
        parent = Traceparent()
        client.infer(MODEL, [triton_text(module, text)], sequence_id=70 + len(protocol),
                     sequence_start=i == 0, sequence_end=i == 1,
                     headers={"traceparent": parent.header})  # fmt: skip
        sent.append(parent)
    client.close()
    name = "inference.GRPCInferenceService/ModelInfer"
    if protocol == "http":
        name = "POST /v2/models/{name}/infer"
    for parent in sent:
        spans = receiver.wait(lambda p=parent: len(s := receiver.of_trace(p.trace_id)) >= 5 and s)
        span = request_span(spans, parent, name)
        if protocol == "http":
            facts = attributes(span)
            assert facts["http.response.status_code"] == 200
            assert facts["http.request.method"] == "POST"
        check_queued_batch(receiver, spans, span)
    assert receiver.of_trace(probe.trace_id) == []


def test_sampling_zero_exports_only_what_a_caller_samples(
    repo: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ratio 0: a request without a traceparent, or with an unsampled one, gives no span; a
    caller's sampled traceparent is still followed (parent-based)."""
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    server = start(repo, "--trace-otlp-endpoint", receiver.endpoint, "--trace-sample-ratio", "0",
                   "--trace-service-name", "ratio-zero")  # fmt: skip
    unsampled, sampled = Traceparent(sampled=False), Traceparent()
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.LstmServeStub(channel)
            stub.Classify(pb.ClassifyRequest(model=MODEL, sequences=[
                pb.SequenceInput(text="hola")]))  # fmt: skip
        classify(server.address, unsampled.header)
        stream_text(server.address, ["ciao"], unsampled.header)
        classify(server.address, sampled.header)
    finally:
        assert server.stop() == 0  # the stop exports what is buffered
    assert receiver.of_trace(sampled.trace_id), "a sampled caller's request was not traced"
    exported = receiver.of_service("ratio-zero")
    assert {s.trace_id for s in exported} == {sampled.trace_id}, [s.name for s in exported]


def test_without_the_flag_nothing_is_exported_even_with_otel_variables(
    repo: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OTEL_EXPORTER_OTLP_ENDPOINT alone does not turn tracing on."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    server = start(repo)
    client = Traceparent()
    try:
        classify(server.address, client.header)
        stream_text(server.address, ["hallo"], client.header)
    finally:
        assert server.stop() == 0
    assert receiver.of_trace(client.trace_id) == []


def test_the_serving_path_without_the_flag_never_imports_opentelemetry(repo: Path) -> None:
    """A server without --trace-otlp-endpoint, started and serving, loads neither our tracing
    module nor OpenTelemetry's tracing SDK or exporter. (redis-py imports OpenTelemetry's
    metrics API by itself where it is installed: not ours to stop; tests/unit/test_architecture.py
    checks that only service/tracing_otel.py names opentelemetry.)"""
    code = f"""
import asyncio, sys
import grpc
from lstmserve.v1 import lstm_serve_pb2 as pb, lstm_serve_pb2_grpc as pb_grpc
from service.config import ServerConfig
from service.server import create_server

async def main():
    config = ServerConfig(model_repository={str(repo)!r}, host="127.0.0.1", grpc_port=0,
                          http_port=0, metrics_port=-1)
    app, port = create_server(config)
    await app.start()
    await app.wait_until_loaded(60)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{{port}}") as channel:
        stub = pb_grpc.LstmServeStub(channel)
        await stub.Classify(pb.ClassifyRequest(model="{MODEL}", sequences=[
            pb.SequenceInput(text="hola")]), metadata=(("traceparent", "00-" + "1" * 32 + "-"
            + "2" * 16 + "-01"),))
    await app.shutdown(0)

asyncio.run(main())
ours = ("service.tracing_otel", "opentelemetry.sdk.trace", "opentelemetry.exporter")
loaded = sorted(m for m in sys.modules if m.startswith(ours))
assert not loaded, loaded
assert "service.tracing" in sys.modules  # the no-op interface is what runs
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=env, timeout=120)
