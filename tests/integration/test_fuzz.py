"""Fuzzing every LstmServe RPC against one running server.

Random bytes and structured messages (valid, boundary and hostile values: huge ids, NaN frames,
empty oneofs, very long strings) go to every method path. Every call must end with a status a
client can act on (never UNKNOWN or INTERNAL), every status and in-band error message stays
short, and afterwards the server is SERVING and a control session, opened before the fuzz and
continued after it, gives exactly the probabilities of one offline run.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from lstmserve.v1 import lstm_serve_pb2 as pb
from service.status import MAX_MESSAGE_BYTES
from tests.integration.conftest import Reference, ServerThread, make_config

SERVICE = pb.DESCRIPTOR.services_by_name["LstmServe"]
METHODS = [m.name for m in SERVICE.methods]
STREAMING = {m.name for m in SERVICE.methods if m.client_streaming}
KEY = "k1:" + base64.b64encode(b"fuzzing-key-fuzzing-key-fuzzing!").decode()
# Statuses a client can act on. UNKNOWN / INTERNAL (a server bug), DEADLINE_EXCEEDED (a hang) or
# RESOURCE_EXHAUSTED (a message over a client limit) fail the fuzz.
ACTIONABLE = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
}
CALL_TIMEOUT_S = 30.0
FUZZ = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
EMOJI = "\U0001f600"
CONTROL_MODEL = "tiny-lstm"
CONTROL_FIRST, CONTROL_SECOND = "ab", "cd"
CONTROL_IDS = np.array([1, 2, 3, 4], dtype=np.int64)  # "abcd" in the tiny tokenizer


# -- strategies -------------------------------------------------------------------------------

SERVED = ["tiny-lstm", "tiny-gru", "tiny-bilstm", "tiny-rnn-frames", "tiny-cifg-frames"]
STREAMABLE = ["tiny-lstm", "tiny-gru", "tiny-rnn-frames", "tiny-cifg-frames"]
# (text, times): built when drawn, so that no strategy's repr holds 100 KB
HOSTILE_STRINGS = st.sampled_from(
    [("", 1), (EMOJI, 2000), ("m", 100_000), ("\x00", 8), ("..", 1), ("../tiny-lstm", 1),
     ("a/b", 1), ("tiny-lstm\n", 1)]
).map(lambda p: p[0] * p[1])  # fmt: skip
strings = st.one_of(st.text(max_size=40), HOSTILE_STRINGS)
model_names = st.one_of(st.sampled_from(SERVED), strings)
uint32 = st.one_of(st.sampled_from([0, 1, 2, 3, 2**31 - 1, 2**32 - 1]), st.integers(0, 2**32 - 1))
uint64 = st.one_of(st.integers(0, 6), st.sampled_from([2**63 - 1, 2**63, 2**64 - 1]),
                   st.integers(0, 2**64 - 1))  # fmt: skip
int64 = st.one_of(
    st.integers(0, 27),
    st.sampled_from([-(2**63), -1, 28, 2**63 - 1]),
    st.integers(-(2**63), 2**63 - 1),
)
floats32 = st.one_of(st.floats(-3, 3, width=32), st.floats(width=32))  # NaN and +-inf included
versions = st.one_of(st.sampled_from([0, 1, 2, 3]), uint32)


def _tokens(ids: list[int]) -> pb.SequenceInput:
    return pb.SequenceInput(tokens=pb.TokenIds(ids=ids))


def _flat(values: list[float], count: int) -> pb.SequenceInput:
    return pb.SequenceInput(frames=pb.Frames(values=values, frame_count=count))


def _rows(rows: list[list[float]]) -> pb.SequenceInput:
    return pb.SequenceInput(frames=pb.Frames(frames=[pb.Frame(values=r) for r in rows]))


LONG_INPUTS = st.sampled_from([4096, 4097, 16_384, 16_385, -300]).map(
    lambda n: _tokens([1] * n) if n > 0 else _flat([0.5] * 5 * -n, 0)
)  # the chunk and sequence step limits, and either side of them
sequence_inputs = st.one_of(
    st.builds(_tokens, st.lists(int64, max_size=40)),
    st.builds(lambda t: pb.SequenceInput(text=t), strings),
    st.builds(_flat, st.lists(floats32, max_size=60), st.one_of(st.integers(0, 12), uint32)),
    st.builds(_rows, st.lists(st.lists(floats32, min_size=4, max_size=6), max_size=8)),
    st.just(pb.SequenceInput()),  # the empty oneof
    LONG_INPUTS,
)
stream_options = st.builds(pb.StreamOptions, every_step=st.booleans(), top_k=uint32)
opens = st.builds(pb.OpenSession, model=model_names, version=versions, options=stream_options)
valid_opens = st.builds(pb.OpenSession, model=st.sampled_from(STREAMABLE), options=stream_options)
session_ids = st.one_of(strings, st.sampled_from(["ab" * 16, "0" * 32, "f" * 33]))
resumes = st.builds(pb.ResumeSession, session_id=session_ids, options=stream_options)
restores = st.builds(pb.RestoreSession, snapshot=st.binary(max_size=200), options=stream_options)
chunks = st.builds(pb.Chunk, seq=uint64, input=sequence_inputs)
resets = st.builds(pb.Reset, seq=uint64)

stream_requests = st.one_of(
    st.builds(lambda o: pb.StreamRequest(open=o), opens),
    st.builds(lambda r: pb.StreamRequest(resume=r), resumes),
    st.builds(lambda r: pb.StreamRequest(restore=r), restores),
    st.builds(lambda c: pb.StreamRequest(chunk=c), chunks),
    st.builds(lambda r: pb.StreamRequest(reset=r), resets),
    st.just(pb.StreamRequest(end=pb.End())),
    st.just(pb.StreamRequest(snapshot=pb.TakeSnapshot())),
    st.just(pb.StreamRequest()),
)
stream_firsts = st.one_of(
    st.builds(lambda o: pb.StreamRequest(open=o), valid_opens), stream_requests
)
good_inputs = st.one_of(
    st.builds(_tokens, st.lists(st.integers(0, 27), min_size=1, max_size=8)),
    st.builds(lambda t: pb.SequenceInput(text=t), st.text("abcdefgh", min_size=1, max_size=8)),
    st.builds(_flat, st.lists(st.floats(-2, 2, width=32), min_size=5, max_size=5), st.just(1)),
)
good_chunks = st.builds(pb.Chunk, seq=st.integers(1, 4), input=good_inputs)
stream_rests = st.one_of(
    st.builds(lambda c: pb.StreamRequest(chunk=c), good_chunks), stream_requests
)
session_requests = st.one_of(
    st.builds(lambda s, o: pb.SessionRequest(session_id=s, open=o), session_ids, opens),
    st.builds(lambda o: pb.SessionRequest(open=o), valid_opens),
    st.builds(lambda r: pb.SessionRequest(resume=r), resumes),
    st.builds(lambda r: pb.SessionRequest(restore=r), restores),
    st.builds(lambda s, c: pb.SessionRequest(session_id=s, chunk=c), session_ids, chunks),
    st.builds(lambda s, r: pb.SessionRequest(session_id=s, reset=r), session_ids, resets),
    st.builds(lambda s: pb.SessionRequest(session_id=s, end=pb.End()), session_ids),
    st.builds(lambda s: pb.SessionRequest(session_id=s), session_ids),
)


multi_messages = st.builds(pb.StreamMultiRequest, entries=st.lists(session_requests, max_size=6))


def _packed(dtype: str, values: st.SearchStrategy, max_size: int = 8) -> st.SearchStrategy[bytes]:
    """A packed little-endian array field, sometimes cut mid-value."""
    whole = st.lists(values, max_size=max_size).map(lambda v: np.array(v, dtype=dtype).tobytes())
    return st.one_of(whole, whole.map(lambda b: b[:-1]), st.binary(max_size=24))


columns_messages = st.builds(
    pb.ColumnsRequest, open=st.lists(st.one_of(valid_opens, opens), max_size=3),
    resume=st.lists(session_ids, max_size=2), handles=_packed("<u4", st.integers(0, 6)),
    seqs=_packed("<u8", uint64), offsets=_packed("<u4", st.integers(0, 12)),
    tokens=_packed("<i8", int64, 24), frames=_packed("<f4", floats32, 60),
    end=_packed("<u4", st.integers(0, 6)),
)  # fmt: skip
classify_requests = st.one_of(
    st.builds(pb.ClassifyRequest, model=model_names, version=versions,
              sequences=st.lists(sequence_inputs, max_size=4),
              step_probabilities=st.booleans(), top_k=uint32),
    st.builds(pb.ClassifyRequest, model=st.sampled_from(SERVED),
              sequences=st.lists(st.one_of(good_inputs, sequence_inputs), min_size=1, max_size=4),
              step_probabilities=st.booleans(), top_k=st.integers(0, 4)),
)  # fmt: skip
MESSAGES: dict[str, st.SearchStrategy] = {  # one request message of each method
    "Classify": classify_requests,
    "Stream": stream_requests,
    "StreamMulti": multi_messages,
    "StreamColumns": columns_messages,
    "ListModels": st.just(pb.ListModelsRequest()),
    "GetModel": st.builds(pb.GetModelRequest, name=model_names, version=versions),
    "RepositoryIndex": st.just(pb.RepositoryIndexRequest()),
    "LoadModel": st.builds(pb.LoadModelRequest, name=model_names),
    "UnloadModel": st.builds(pb.UnloadModelRequest, name=model_names),
}
assert set(MESSAGES) == set(METHODS), "a new RPC needs its strategy here"


def _serialized(messages: st.SearchStrategy) -> st.SearchStrategy[bytes]:
    return messages.map(lambda m: m.SerializeToString())


def structured(method: str) -> st.SearchStrategy:
    """Serialized valid, boundary and hostile requests: a stream's first message, then 0..5."""
    if method not in STREAMING:
        return _serialized(MESSAGES[method])
    first, rest = (stream_firsts, stream_rests) if method == "Stream" else (MESSAGES[method],) * 2
    pair = st.tuples(_serialized(first), st.lists(_serialized(rest), max_size=5))
    return pair.map(lambda p: [p[0], *p[1]])


def random_bytes(method: str) -> st.SearchStrategy:
    """Random bytes, or a valid message with random bytes after it (a stream: 1..4 of them)."""
    tailed = st.builds(lambda m, tail: m.SerializeToString() + tail, MESSAGES[method],
                       st.binary(min_size=1, max_size=16))  # fmt: skip
    one = st.one_of(st.binary(max_size=300), tailed)
    return st.lists(one, min_size=1, max_size=4) if method in STREAMING else one


# -- calls ------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """How one call ended: its status, details and raw replies."""

    code: grpc.StatusCode
    details: str
    replies: list[bytes]


def method_path(method: str) -> str:
    """The gRPC path of an LstmServe method."""
    return f"/{SERVICE.full_name}/{method}"


def call(channel: grpc.Channel, method: str, request: bytes | list[bytes]) -> Outcome:
    """One call with raw bytes; its status, details and raw replies."""
    path = method_path(method)
    replies: list[bytes] = []
    try:
        if method in STREAMING:
            assert isinstance(request, list)
            for reply in channel.stream_stream(path)(iter(request), timeout=CALL_TIMEOUT_S):
                replies.append(reply)
        else:
            replies.append(channel.unary_unary(path)(request, timeout=CALL_TIMEOUT_S))
    except grpc.RpcError as exc:
        return Outcome(exc.code(), exc.details() or "", replies)
    return Outcome(grpc.StatusCode.OK, "", replies)


def in_band_messages(method: str, replies: list[bytes]) -> list[str]:
    """Every in-band error message of a call's replies."""
    if method == "Stream":
        return [pb.StreamResponse.FromString(r).chunk.error.message for r in replies]
    if method == "StreamMulti":
        results = [res for r in replies for res in pb.StreamMultiResponse.FromString(r).results]
        return [res.error.message or res.chunk.error.message for res in results]
    if method == "StreamColumns":
        parsed = [pb.ColumnsResponse.FromString(r) for r in replies]
        failed = [e for r in parsed for e in (*r.attach_errors, *r.errors, *r.end_errors)]
        return [e.message for e in failed]
    return []


def check(channel: grpc.Channel, method: str, request: bytes | list[bytes]) -> None:
    """One call: an actionable status, and every message it carries short."""
    outcome = call(channel, method, request)
    event(outcome.code.name)  # the mix of outcomes, in --hypothesis-show-statistics
    assert outcome.code in ACTIONABLE, (outcome.code, outcome.details[:300])
    assert len(outcome.details.encode()) <= MAX_MESSAGE_BYTES
    for message in in_band_messages(method, outcome.replies):
        assert len(message.encode()) <= MAX_MESSAGE_BYTES


# -- the server and the control session -------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_server(tiny_repo: Path) -> Iterator[ServerThread]:
    """A server of its own (snapshots on, so restore is really verified)."""
    srv = ServerThread(make_config(tiny_repo, snapshot_key=KEY)).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def channel(fuzz_server: ServerThread) -> Iterator[grpc.Channel]:
    options = [("grpc.max_metadata_size", 16 * 1024)]  # a client's usual metadata limit
    with grpc.insecure_channel(fuzz_server.address, options=options) as chan:
        yield chan


@dataclass
class Control:
    """The control session (left open) and what it and a Classify gave before the fuzz."""

    session_id: str
    first: pb.ChunkResult
    classify: pb.ClassifyResponse


def _chunk_stream(channel: grpc.Channel, first: pb.StreamRequest, seq: int, text: str) -> list:
    """A stream of an attach message and one chunk (no end: the session stays); its replies.
    The chunk is sent as token ids, so all of it is fed at once (text would hold back its last
    letter until the next chunk)."""
    ids = CONTROL_IDS[[CONTROL_FIRST, CONTROL_SECOND].index(text) * 2 :][:2].tolist()
    chunk = pb.StreamRequest(
        chunk=pb.Chunk(seq=seq, input=pb.SequenceInput(tokens=pb.TokenIds(ids=ids)))
    )
    requests = [first.SerializeToString(), chunk.SerializeToString()]
    replies = channel.stream_stream(method_path("Stream"))(iter(requests), timeout=CALL_TIMEOUT_S)
    return [pb.StreamResponse.FromString(r) for r in replies]


def _control_classify(channel: grpc.Channel) -> pb.ClassifyResponse:
    request = pb.ClassifyRequest(
        model=CONTROL_MODEL, version=1, step_probabilities=True,
        sequences=[pb.SequenceInput(text=CONTROL_FIRST + CONTROL_SECOND)],
    )  # fmt: skip
    raw = channel.unary_unary(method_path("Classify"))(request.SerializeToString())
    return pb.ClassifyResponse.FromString(raw)


@pytest.fixture(scope="module")
def control(channel: grpc.Channel) -> Control:
    """A session opened and stepped before any fuzz example; left open (no end) for later."""
    options = pb.StreamOptions(every_step=True)
    first = pb.StreamRequest(open=pb.OpenSession(model=CONTROL_MODEL, version=1, options=options))
    opened, chunk = _chunk_stream(channel, first, 1, CONTROL_FIRST)
    assert not chunk.chunk.HasField("error")
    return Control(opened.opened.session_id, chunk.chunk, _control_classify(channel))


# -- the fuzz ---------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@FUZZ
@given(data=st.data())
def test_random_bytes_to_every_rpc(
    method: str, channel: grpc.Channel, control: Control, data: st.DataObject
) -> None:
    check(channel, method, data.draw(random_bytes(method), label="request"))


@pytest.mark.parametrize("method", METHODS)
@FUZZ
@given(data=st.data())
def test_valid_boundary_and_hostile_messages_to_every_rpc(
    method: str, channel: grpc.Channel, control: Control, data: st.DataObject
) -> None:
    check(channel, method, data.draw(structured(method), label="request"))


def test_after_the_fuzz_the_server_serves_and_the_control_session_is_exact(
    channel: grpc.Channel, control: Control, reference: Reference
) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", SERVICE.full_name):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    probs, step_probs = reference.run(CONTROL_MODEL, CONTROL_IDS)  # (C,), (T, C)
    resume = pb.StreamRequest(resume=pb.ResumeSession(session_id=control.session_id))
    resumed, second = _chunk_stream(channel, resume, 2, CONTROL_SECOND)
    assert resumed.opened.resumed and resumed.opened.last_applied_seq == 1
    assert not second.chunk.HasField("error") and second.chunk.total_steps == 4
    before = [np.asarray(p.values, np.float32) for p in control.first.step_probabilities]
    np.testing.assert_array_equal(np.stack(before), step_probs[:2])
    np.testing.assert_array_equal(np.asarray(second.chunk.probabilities, np.float32), probs)
    got = [np.asarray(p.values, np.float32) for p in second.chunk.step_probabilities]
    np.testing.assert_array_equal(np.stack(got), step_probs[2:])
    assert _control_classify(channel) == control.classify
