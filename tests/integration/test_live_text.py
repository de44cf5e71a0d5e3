"""Live answers: after every chunk of streamed text, the reply is Classify of all the text sent
so far, exactly, on every path (native Stream, StreamMulti, a Triton sequence) and after a
snapshot restored on another replica mid-word.

Texts are drawn around the characters whose tokens depend on their neighbours (combining marks,
Hangul jamo, a capital sigma, ligatures), characters outside the vocabulary and any Unicode, cut
at random places. A chunk whose text so far Classify refuses (no known character) is refused
in-band with INVALID_ARGUMENT and not applied (the client sends its next piece with that seq).
"""

from __future__ import annotations

import itertools
import queue
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from tritonclient.utils import InferenceServerException

from lstmserve.v1 import lstm_serve_pb2 as pb
from lstmserve.v1 import lstm_serve_pb2_grpc as pb_grpc
from tests.integration.conftest import ServerThread, make_config

MODEL = "tiny-lstm"  # vocabulary: a-z and space; everything else is the unknown token
TRICKY = (
    "aeouxq AEΣσςΑ'.?-"  # letters, capital and final sigmas, case-ignorables, unknowns
    "\u0301\u0300\u0308\u0323\u0327\u0316\u0345"  # combining marks of several classes
    "\u1100\u1112\u1161\u1175\u11a8\u11c2가각"  # Hangul jamo (L, V, T) and syllables
    "éǖİﬁﬀ\u0f73ß☃שא"  # precomposed letters, ligatures, a two-mark decomposition, unknowns
)
TEXTS = st.one_of(
    st.text(st.sampled_from(TRICKY), min_size=1, max_size=20),
    st.text(min_size=1, max_size=12),
)
CUTS = st.lists(st.integers(1, 19), max_size=8)
PROFILE = settings(
    max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True
)
ATOL = 1e-6
KEY = "k1:" + "s" * 32
SEQUENCE_IDS = itertools.count(1)


def pieces(text: str, cuts: list[int], each: bool = False) -> list[str]:
    """`text` cut at `cuts`, or (`each`) one character per piece, as someone typing."""
    points = range(1, len(text)) if each else sorted({c for c in cuts if 0 < c < len(text)})
    return [text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=True)]


@dataclass
class Expected:
    """One piece as the client sends it: its seq, and Classify of the text sent so far
    (None: Classify refuses that text, so the chunk is refused and its seq used again)."""

    piece: str
    seq: int
    so_far: str
    whole: pb.SequenceResult | None


def classify(stub: pb_grpc.LstmServeStub, text: str) -> pb.SequenceResult | None:
    request = pb.ClassifyRequest(model=MODEL, sequences=[pb.SequenceInput(text=text)])
    try:
        return stub.Classify(request, timeout=30).results[0]
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, exc.details()
        return None


def plan(
    stub: pb_grpc.LstmServeStub, parts: list[str], seq: int = 1, sent: str = ""
) -> list[Expected]:
    out = []
    for piece in parts:
        whole = classify(stub, sent + piece)
        out.append(Expected(piece, seq, sent + piece if whole else sent, whole))
        if whole is not None:
            sent, seq = sent + piece, seq + 1
    return out


def check(reply: pb.ChunkResult, expected: Expected, previous_total: int) -> int:
    """The reply is Classify of the text so far (or refused where Classify refuses it); the
    total steps the reply covers after it."""
    if expected.whole is None:
        assert reply.error.code == "INVALID_ARGUMENT", (expected, reply)
        assert "vocabulary" in reply.error.message
        return previous_total
    assert not reply.HasField("error"), reply.error.message
    assert reply.total_steps == expected.whole.length, (expected.so_far, reply)
    assert previous_total - reply.rewound_steps + reply.steps == reply.total_steps
    np.testing.assert_allclose(
        reply.probabilities, expected.whole.probabilities, rtol=0, atol=ATOL, err_msg=repr(expected)
    )
    return reply.total_steps


def chunk(e: Expected) -> pb.Chunk:
    return pb.Chunk(seq=e.seq, input=pb.SequenceInput(text=e.piece))


def stream(stub: pb_grpc.LstmServeStub, expected: list[Expected]) -> list[pb.StreamResponse]:
    requests = [pb.StreamRequest(open=pb.OpenSession(model=MODEL))]
    requests += [pb.StreamRequest(chunk=chunk(e)) for e in expected]
    requests.append(pb.StreamRequest(end=pb.End()))
    return list(stub.Stream(iter(requests), timeout=30))


def multi(stub: pb_grpc.LstmServeStub, expected: list[Expected]) -> list[pb.ChunkResult]:
    """One StreamMulti session: open, then every chunk as entries of one message, then end."""
    requests: queue.Queue[pb.StreamMultiRequest | None] = queue.Queue()
    requests.put(
        pb.StreamMultiRequest(entries=[pb.SessionRequest(open=pb.OpenSession(model=MODEL))])
    )
    replies = stub.StreamMulti(iter(requests.get, None), timeout=30)
    try:
        session_id = next(replies).results[0].session_id
        entries = [pb.SessionRequest(session_id=session_id, chunk=chunk(e)) for e in expected]
        requests.put(pb.StreamMultiRequest(entries=entries))
        results = [r.chunk for r in next(replies).results]
        requests.put(
            pb.StreamMultiRequest(entries=[pb.SessionRequest(session_id=session_id, end=pb.End())])
        )
        assert next(replies).results[0].HasField("ended")
    finally:
        requests.put(None)
    return results


def triton(client: tc.InferenceServerClient, expected: list[Expected]) -> None:
    """One Triton sequence, a request per piece; each reply's probs is Classify of the text so
    far; a refused START leaves no sequence, so the next piece starts it."""
    sequence_id = f"live-{next(SEQUENCE_IDS)}"
    accepted = [e for e in expected if e.whole is not None]
    started, total = False, 0
    for e in expected:
        data = np.array([[e.piece.encode("utf-8", "surrogatepass")]], dtype=object)
        text = tc.InferInput("text", [1, 1], "BYTES")
        text.set_data_from_numpy(data)
        try:
            result = client.infer(
                MODEL, [text], sequence_id=sequence_id, sequence_start=not started,
                sequence_end=bool(accepted) and e is accepted[-1],
                outputs=[tc.InferRequestedOutput("probs")],
            )  # fmt: skip
        except InferenceServerException as exc:
            assert e.whole is None and exc.status() == "StatusCode.INVALID_ARGUMENT", exc
            continue
        assert e.whole is not None, e
        started = True
        params = result.get_response().parameters
        rewound = params["lstm_serve_rewound_steps"].int64_param
        now = params["lstm_serve_total_steps"].int64_param
        assert now == e.whole.length and 0 <= rewound <= total
        total = now
        np.testing.assert_allclose(
            result.as_numpy("probs")[0], e.whole.probabilities, rtol=0, atol=ATOL
        )


@pytest.fixture(scope="module")
def stub(server: ServerThread) -> Iterator[pb_grpc.LstmServeStub]:
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.LstmServeStub(channel)


@pytest.fixture(scope="module")
def triton_client(server: ServerThread) -> Iterator[tc.InferenceServerClient]:
    client = tc.InferenceServerClient(server.address)
    yield client
    client.close()


@PROFILE
@given(text=TEXTS, cuts=CUTS, each=st.booleans())
@example(text="\u1100\u1161\u11a8 ab", cuts=[], each=True)  # Hangul L, V, T one per chunk
@example(text="cafe\u0301 ΟΔΟΣ", cuts=[], each=True)  # a mark after a held letter, final sigma
@example(text="☃ שלום ab", cuts=[1, 3], each=False)  # unknowns first: refused until "ab"
@example(text="ﬁe" + "\u0301" * 70 + "x", cuts=[], each=True)  # beyond the held bound
def test_every_reply_is_classify_of_the_text_sent_so_far_on_every_path(
    stub: pb_grpc.LstmServeStub, triton_client: tc.InferenceServerClient, text: str,
    cuts: list[int], each: bool,
) -> None:  # fmt: skip
    expected = plan(stub, pieces(text, cuts, each))
    replies = stream(stub, expected)
    total = 0
    for reply, e in zip(replies[1:-1], expected, strict=True):
        total = check(reply.chunk, e, total)
    ended = replies[-1].ended
    last = [e.whole for e in expected if e.whole is not None]
    assert ended.total_steps == (last[-1].length if last else 0) and ended.flushed_steps == 0
    if last:
        np.testing.assert_allclose(ended.probabilities, last[-1].probabilities, rtol=0, atol=ATOL)
    total = 0
    for result, e in zip(multi(stub, expected), expected, strict=True):
        total = check(result, e, total)
    triton(triton_client, expected)


@pytest.fixture(scope="module")
def replicas(tiny_repo: Path) -> Iterator[tuple[pb_grpc.LstmServeStub, pb_grpc.LstmServeStub]]:
    a = ServerThread(make_config(tiny_repo, snapshot_key=KEY)).start()
    b = ServerThread(make_config(tiny_repo, snapshot_key=KEY)).start()
    channels = [grpc.insecure_channel(s.address) for s in (a, b)]
    try:
        yield pb_grpc.LstmServeStub(channels[0]), pb_grpc.LstmServeStub(channels[1])
    finally:
        for channel in channels:
            channel.close()
        a.stop()
        b.stop()


@settings(PROFILE, max_examples=20)
@given(
    text=st.text(st.sampled_from(TRICKY), min_size=2, max_size=16), cuts=CUTS, at=st.integers(1, 8)
)
def test_replies_stay_classify_of_the_text_so_far_after_a_restore_on_another_replica(
    replicas: tuple[pb_grpc.LstmServeStub, pb_grpc.LstmServeStub], text: str, cuts: list[int],
    at: int,
) -> None:  # fmt: skip
    """A snapshot taken mid-word (held text in it) and restored on another replica: the next
    replies there still answer all the text sent, the held text included."""
    a, b = replicas
    parts = pieces(text, [*cuts, at])
    k = min(at, len(parts) - 1) or 1
    before = plan(a, parts[:k])
    requests = [pb.StreamRequest(open=pb.OpenSession(model=MODEL))]
    requests += [pb.StreamRequest(chunk=chunk(e)) for e in before]
    requests.append(pb.StreamRequest(snapshot=pb.TakeSnapshot()))
    replies = list(a.Stream(iter(requests), timeout=30))
    total = 0
    for reply, e in zip(replies[1:-1], before, strict=True):
        total = check(reply.chunk, e, total)
    snap = replies[-1].snapshot
    seq = snap.last_applied_seq + 1
    sent = before[-1].so_far
    after = plan(b, parts[k:], seq, sent)
    requests = [pb.StreamRequest(restore=pb.RestoreSession(snapshot=snap.data))]
    requests += [pb.StreamRequest(chunk=chunk(e)) for e in after]
    requests.append(pb.StreamRequest(end=pb.End()))
    replies = list(b.Stream(iter(requests), timeout=30))
    assert replies[0].opened.total_steps == total
    for reply, e in zip(replies[1:-1], after, strict=True):
        total = check(reply.chunk, e, total)
