"""NativeStreams (service/protocol/native.py) without a network: what the native front's ticks
are answered with is what StreamConversation (Stream) and MultiConversation (StreamMulti)
answer, a tick's chunks share one engine call (StreamMulti's: batched runs)."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lstmserve.v1 import lstm_serve_pb2 as pb
from lstmserve.v1 import native_front_pb2 as npb
from service import codec, metrics
from service.engine.types import ChunkOutcome
from service.errors import AttachedElsewhere, Draining, InvalidInput, ProtocolError, SessionNotFound
from service.native_front import NativeFrontServicer, tick_messages
from service.native_front import read_chunks as packed_chunks
from service.protocol import messages as m
from service.protocol.multi import MultiConversation
from service.protocol.native import NativeEntry, NativeOutcome, NativeStreams
from service.protocol.session import Limits, SessionLayer
from service.protocol.stream import StreamConversation
from tests.unit.engines import load_engine
from tests.unit.test_protocol import OPEN, Tokens, collect, feed


@pytest.fixture
def layer(tiny_repo: Path) -> Any:
    engine = load_engine(tiny_repo)
    yield SessionLayer(engine, Limits(max_chunk_steps=8, max_multi_entries=4))
    engine.close()


def tick(streams: NativeStreams, *entries: tuple[int, Any]) -> list[Any]:
    return asyncio.run(streams.answer([NativeEntry(s, r) for s, r in entries]))


def packed(streams: NativeStreams, *chunks: tuple[int, int, list[int]]) -> list[Any]:
    """A tick of packed chunks (stream, seq, token ids), read as the ticks socket reads them."""
    offsets = np.cumsum([0] + [len(ids) for _, _, ids in chunks])
    message = npb.Tick(
        id=1,
        chunk_streams=np.array([s for s, _, _ in chunks], "<u8").tobytes(),
        chunk_seqs=np.array([q for _, q, _ in chunks], "<u8").tobytes(),
        chunk_offsets=offsets.astype("<u4").tobytes(),
        chunk_tokens=np.array([i for _, _, ids in chunks for i in ids], "<i8").tobytes(),
    )
    return asyncio.run(streams.answer([], packed=packed_chunks(message)))


def packed_frames(streams: NativeStreams, *chunks: tuple[int, int, int, list[float]]) -> list[Any]:
    """A tick of packed frame chunks (stream, seq, frame_count as sent, row-major values)."""
    offsets = np.cumsum([0] + [len(values) for *_, values in chunks])
    message = npb.Tick(
        id=1,
        frame_streams=np.array([c[0] for c in chunks], "<u8").tobytes(),
        frame_seqs=np.array([c[1] for c in chunks], "<u8").tobytes(),
        frame_counts=np.array([c[2] for c in chunks], "<u4").tobytes(),
        frame_offsets=offsets.astype("<u4").tobytes(),
        frame_values=np.array([v for *_, values in chunks for v in values], "<f4").tobytes(),
    )
    return asyncio.run(streams.answer([], packed=packed_chunks(message)))


def anonymous(exc: BaseException) -> str:
    """The message with session ids (twin sessions have different ones) blanked out."""
    return re.sub("[0-9a-f]{32}", "<session>", str(exc))


def wire_chunk(seq: int, ids: list[int]) -> m.Request:
    """A chunk as the codec reads it off the wire (its errors name chunk.input.tokens.ids)."""
    message = pb.Chunk(seq=seq, input=pb.SequenceInput(tokens=pb.TokenIds(ids=ids)))
    return codec.stream_request(pb.StreamRequest(chunk=message))


def body(outcome: NativeOutcome | ChunkOutcome) -> Any:
    """What the front writes: a plain chunk's outcome (packed), else the reply's body."""
    if isinstance(outcome, ChunkOutcome):
        return m.ChunkDone(outcome.seq, outcome, None, outcome.total_steps, (), 1)
    assert outcome.reply is not None
    return outcome.reply.body


def error(outcome: NativeOutcome | ChunkOutcome) -> BaseException | None:
    return None if isinstance(outcome, ChunkOutcome) else outcome.error


FRAMES = m.Open("tiny-rnn-frames", 0, OPEN.options)


def twins(layer: SessionLayer, *opens: m.Open) -> tuple[NativeStreams, NativeStreams]:
    """Two NativeStreams with the same sessions opened, on streams 1, 2, ...: one for the
    packed path, one for the entries path."""
    pair = NativeStreams(layer), NativeStreams(layer)
    for streams in pair:
        tick(streams, *enumerate(opens, 1))
    return pair


def engine_calls(layer: SessionLayer) -> list[int]:
    """From now on, the number of chunks in each engine call (apply_chunks), in order."""
    calls: list[int] = []
    apply_chunks = layer.engine.apply_chunks

    async def counted(work: list[Any]) -> Any:
        calls.append(len(work))
        return await apply_chunks(work)

    layer.engine.apply_chunks = counted  # type: ignore[method-assign]
    return calls


def test_a_ticks_chunks_share_one_engine_call_and_match_the_python_fronts(
    layer: SessionLayer,
) -> None:
    streams, calls = NativeStreams(layer), engine_calls(layer)
    tick(streams, *((s, OPEN) for s in (1, 2, 3)))
    outcomes = tick(streams, *((s, m.Chunk(1, Tokens(1, 2, s))) for s in (1, 2, 3)))
    assert calls == [3]
    for s, outcome in zip((1, 2, 3), outcomes, strict=True):
        requests = [OPEN, m.Chunk(1, Tokens(1, 2, s))]
        alone = asyncio.run(collect(StreamConversation(layer, feed(requests), "Stream").replies()))
        expected = alone[1].body.outcome.result.probs  # type: ignore[union-attr]
        got = body(outcome).outcome.result.probs
        assert got.tobytes() == expected.tobytes() and error(outcome) is None


def test_errors_end_a_stream_or_stay_in_band_as_on_the_python_front(layer: SessionLayer) -> None:
    streams = NativeStreams(layer)
    (first,) = tick(streams, (1, m.Chunk(1, Tokens(1))))
    assert isinstance(first.error, ProtocolError)  # the first message must attach
    tick(streams, (2, OPEN))
    (bad,) = tick(streams, (2, m.Chunk(1, Tokens(999))))
    assert bad.error is None and body(bad).error.code == "INVALID_ARGUMENT"
    (ended,) = tick(streams, (2, m.End()))
    assert ended.finish and isinstance(body(ended), m.Ended) and len(streams) == 0


def test_two_streams_naming_one_session_in_one_tick_are_applied_in_turn(
    layer: SessionLayer,
) -> None:
    streams = NativeStreams(layer)
    (opened,) = tick(streams, (1, OPEN))
    session_id = body(opened).session_id
    tick(streams, (2, m.Resume(session_id, None)))  # takes it over from stream 1
    old, new = tick(streams, (1, m.Chunk(1, Tokens(1))), (2, m.Chunk(1, Tokens(1))))
    assert isinstance(old.error, AttachedElsewhere)
    assert error(new) is None and not body(new).outcome.duplicate


def test_a_closed_stream_detaches_its_session(layer: SessionLayer) -> None:
    streams = NativeStreams(layer)
    (opened,) = tick(streams, (1, OPEN))
    session = layer.engine.store.peek(body(opened).session_id)
    assert session is not None and session.attached is not None
    asyncio.run(streams.answer([], closed=[(1, False)]))
    assert session.attached is None and len(streams) == 0


def test_drain_sends_each_idle_stream_its_last_message(layer: SessionLayer) -> None:
    streams, sent = NativeStreams(layer), []
    tick(streams, (1, OPEN), (2, OPEN))
    layer.engine.draining = True  # as LstmServer.shutdown starts it
    layer.engine.drain_started.set()

    async def send(stream: int, outcome: NativeOutcome) -> None:
        sent.append((stream, outcome))

    asyncio.run(streams.drain(send))
    assert sorted(s for s, _ in sent) == [1, 2]
    assert all(isinstance(o.error, Draining) for _, o in sent)  # no snapshot key: no snapshot
    (late,) = tick(streams, (3, OPEN))
    assert isinstance(late.error, Draining) and len(streams) == 0


def test_packed_chunks_are_answered_as_their_entries_would_be(layer: SessionLayer) -> None:
    """The packed path (Tick.chunk_*) beside the entries path, on twin sessions: the same
    probabilities to the bit, in one engine call; every refusal is the entry's, word for word."""
    fast, slow = twins(layer, OPEN, OPEN)
    calls = engine_calls(layer)
    got = packed(fast, (1, 1, [1, 2, 3]), (2, 1, [4]))
    assert calls == [2]
    want = tick(slow, (1, wire_chunk(1, [1, 2, 3])), (2, wire_chunk(1, [4])))
    for a, b in zip(got, want, strict=True):
        assert isinstance(a, ChunkOutcome) and isinstance(b, ChunkOutcome)
        assert a.result is not None and b.result is not None
        assert a.result.probs.tobytes() == b.result.probs.tobytes()
        assert (a.seq, a.total_steps, a.duplicate) == (b.seq, b.total_steps, b.duplicate)
    (resent,) = packed(fast, (1, 1, [1, 2, 3]))
    assert isinstance(resent, ChunkOutcome) and resent.duplicate
    # Refused in-band, ending the stream, or unknown: each exactly as the entry is answered.
    cases = [(1, 2, [999]), (1, 2, []), (1, 2, list(range(9))), (2, 5, [1]), (7, 1, [1])]
    for stream, seq, ids in cases:
        (a,) = packed(fast, (stream, seq, ids))
        (b,) = tick(slow, (stream, wire_chunk(seq, ids)))
        assert not isinstance(a, ChunkOutcome) and not isinstance(b, ChunkOutcome), ids
        if a.error is not None or b.error is not None:
            assert type(a.error) is type(b.error) and str(a.error) == str(b.error)
        else:
            assert body(a).error.code == body(b).error.code
            assert anonymous(body(a).error) == anonymous(body(b).error), ids


def test_tracing_off_costs_a_tick_no_span_work(
    layer: SessionLayer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tracing off (the layer's NO_TRACING): no tick looks for spans, and every packed chunk
    takes the packed path (a traced one would go as an entry, in its span)."""

    def no_spans(*args: Any) -> None:
        raise AssertionError("spans opened with tracing off")

    monkeypatch.setattr("service.protocol.native.open_spans", no_spans)
    streams = NativeStreams(layer)
    tick(streams, (1, OPEN), (2, OPEN))
    got = packed(streams, (1, 1, [1, 2, 3]), (2, 1, [4]))
    assert all(isinstance(o, ChunkOutcome) for o in got), got


def test_a_tick_whose_chunk_columns_do_not_fit_is_refused(layer: SessionLayer) -> None:
    bad = npb.Tick(id=3, chunk_streams=b"\0" * 8, chunk_seqs=b"\0" * 8, chunk_offsets=b"\0" * 4)
    with pytest.raises(ProtocolError, match="tick 3: chunk columns"):
        packed_chunks(bad)
    bad.chunk_offsets = np.array([0, 2], "<u4").tobytes()
    bad.chunk_tokens = np.array([1], "<i8").tobytes()
    with pytest.raises(ProtocolError, match="chunk offsets do not fit their values"):
        packed_chunks(bad)


def test_packed_frames_are_answered_as_their_entries_would_be(layer: SessionLayer) -> None:
    """Feature frames packed (Tick.frame_*), beside the entries path on twin sessions."""
    fast, slow = twins(layer, FRAMES, FRAMES, OPEN)
    rng = np.random.default_rng(5)
    one, two = rng.normal(size=10).tolist(), rng.normal(size=5).tolist()
    got = packed_frames(fast, (1, 1, 2, one), (2, 1, 0, two))
    want = tick(slow, (1, wire_frames(1, 2, one)), (2, wire_frames(1, 0, two)))
    for a, b in zip(got, want, strict=True):
        assert isinstance(a, ChunkOutcome) and isinstance(b, ChunkOutcome)
        assert a.result is not None and b.result is not None
        assert a.result.probs.tobytes() == b.result.probs.tobytes()
        assert a.total_steps == b.total_steps
    cases = [
        (1, 2, 3, one),  # frame_count 3 x feature_dim 5 is not 10 floats
        (1, 2, 0, one[:7]),  # not whole frames
        (1, 2, 0, [float("nan")] * 5),  # not finite
        (1, 2, 0, []),  # no frame
        (3, 1, 0, two),  # a token model's session
        (9, 1, 0, two),  # no session on that stream
    ]
    for stream, seq, count, values in cases:
        (a,) = packed_frames(fast, (stream, seq, count, values))
        (b,) = tick(slow, (stream, wire_frames(seq, count, values)))
        assert not isinstance(a, ChunkOutcome) and not isinstance(b, ChunkOutcome), values
        if a.error is not None or b.error is not None:
            assert type(a.error) is type(b.error) and str(a.error) == str(b.error)
        else:
            assert anonymous(body(a).error) == anonymous(body(b).error), values


def test_a_tick_with_both_kinds_packed_answers_each_in_message_order(
    layer: SessionLayer,
) -> None:
    """Token and frame chunks in one tick (a token chunk refused and answered as its entry)."""
    streams = NativeStreams(layer)
    tick(streams, (1, OPEN), (2, FRAMES))
    message = npb.Tick(
        id=4,
        chunk_streams=np.array([1], "<u8").tobytes(),
        chunk_seqs=np.array([1], "<u8").tobytes(),
        chunk_offsets=np.array([0, 1], "<u4").tobytes(),
        chunk_tokens=np.array([999], "<i8").tobytes(),
        frame_streams=np.array([2], "<u8").tobytes(),
        frame_seqs=np.array([1], "<u8").tobytes(),
        frame_counts=np.array([1], "<u4").tobytes(),
        frame_offsets=np.array([0, 5], "<u4").tobytes(),
        frame_values=np.ones(5, "<f4").tobytes(),
    )
    assert tick_messages(message) == 2
    refused, applied = asyncio.run(streams.answer([], packed=packed_chunks(message)))
    assert isinstance(refused, NativeOutcome) and body(refused).error.code == "INVALID_ARGUMENT"
    assert "chunk.input.tokens.ids[0] = 999" in str(body(refused).error)
    assert isinstance(applied, ChunkOutcome) and applied.total_steps == 1


def wire_frames(seq: int, count: int, values: list[float]) -> m.Request:
    flat = pb.Frames(values=values, frame_count=count)
    message = pb.Chunk(seq=seq, input=pb.SequenceInput(frames=flat))
    return codec.stream_request(pb.StreamRequest(chunk=message))


def packed_text(streams: NativeStreams, *chunks: tuple[int, int, str]) -> list[Any]:
    """A tick of packed text chunks (stream, seq, text), read as the ticks socket reads them."""
    data = [text.encode() for _, _, text in chunks]
    message = npb.Tick(
        id=1,
        text_streams=np.array([s for s, _, _ in chunks], "<u8").tobytes(),
        text_seqs=np.array([q for _, q, _ in chunks], "<u8").tobytes(),
        text_offsets=np.cumsum([0] + [len(d) for d in data]).astype("<u4").tobytes(),
        text_bytes=b"".join(data),
    )
    return asyncio.run(streams.answer([], packed=packed_chunks(message)))


def wire_text(seq: int, text: str) -> m.Request:
    message = pb.Chunk(seq=seq, input=pb.SequenceInput(text=text))
    return codec.stream_request(pb.StreamRequest(chunk=message))


def assert_same(a: NativeOutcome | ChunkOutcome, b: NativeOutcome | ChunkOutcome) -> None:
    """Packed (a) and entry (b) answers of twin sessions: the same in every field the front
    writes (probabilities to the bit), every refusal word for word."""
    assert type(a) is type(b)
    if isinstance(a, ChunkOutcome):
        assert isinstance(b, ChunkOutcome) and a.result is not None and b.result is not None
        assert a.result.probs.tobytes() == b.result.probs.tobytes()
        fields = ("seq", "total_steps", "duplicate", "held_characters", "ended")
        assert [getattr(a, f) for f in fields] == [getattr(b, f) for f in fields]
        assert (a.result.steps, a.result.rewound_steps) == (b.result.steps, b.result.rewound_steps)
        return
    assert isinstance(b, NativeOutcome) and a.finish == b.finish
    if a.error is not None or b.error is not None:
        assert type(a.error) is type(b.error) and str(a.error) == str(b.error)
    if a.reply is not None or b.reply is not None:
        assert a.reply is not None and b.reply is not None
        assert body(a).error.code == body(b).error.code
        assert anonymous(body(a).error) == anonymous(body(b).error)
        assert body(a).total_steps == body(b).total_steps


def test_packed_text_is_answered_as_its_entries_would_be(layer: SessionLayer) -> None:
    """Text packed (Tick.text_*) beside the entries path on twin sessions: the same
    probabilities to the bit and held characters, in one engine call; every refusal the
    entry's, word for word."""
    fast, slow = twins(layer, OPEN, OPEN, FRAMES)
    calls = engine_calls(layer)
    conversation = [
        [(1, 1, "hello wo"), (2, 1, "cafe\u0301")],  # held: a character that may still combine
        [(1, 2, "rld"), (2, 2, "\u0301 e")],  # combines with what was held
        [(1, 3, "  "), (2, 3, "ΣΑΣ")],  # unknown characters: the unknown token
    ]
    for chunks in conversation:
        calls.clear()
        got = packed_text(fast, *chunks)
        assert calls == [2]
        want = tick(slow, *((s, wire_text(q, t)) for s, q, t in chunks))
        for a, b in zip(got, want, strict=True):
            assert isinstance(a, ChunkOutcome)
            assert_same(a, b)
    assert any(o.held_characters for o in got)  # type: ignore[union-attr]
    (resent,) = packed_text(fast, (1, 3, "  "))
    assert isinstance(resent, ChunkOutcome) and resent.duplicate
    tick(slow, (1, wire_text(3, "  ")))
    cases = [
        (1, 4, ""),  # empty: no step
        (1, 4, "abcdefghij"),  # more steps than --max-chunk-steps (8)
        (1, 4, "x" * 100),  # more characters than 8 steps can take
        (1, 9, "gap"),  # a sequence gap (the engine's refusal)
        (3, 1, "text"),  # a frames model: no text
        (7, 1, "no session on this stream"),
    ]
    for stream, seq, text in cases:
        (a,) = packed_text(fast, (stream, seq, text))
        (b,) = tick(slow, (stream, wire_text(seq, text)))
        assert not isinstance(a, ChunkOutcome), text
        assert_same(a, b)
    (a,) = packed_text(fast, (3, 1, "text"))
    assert "chunk.input.text: model tiny-rnn-frames v1 takes features, not tokens" in str(
        body(a).error
    )
    for streams in (fast, slow):  # ended: the stream is over, later chunks refused as entries
        tick(streams, (2, m.End()))
    assert_same(packed_text(fast, (2, 4, "more"))[0], tick(slow, (2, wire_text(4, "more")))[0])
    layer.engine.draining = True  # a draining server: the stream's last message
    layer.engine.drain_started.set()
    (a,) = packed_text(fast, (1, 4, "late"))
    (b,) = tick(slow, (1, wire_text(4, "late")))
    assert isinstance(a.error, Draining)
    assert_same(a, b)


def test_a_tick_with_tokens_frames_and_text_answers_each_in_message_order(
    layer: SessionLayer,
) -> None:
    """All three packed kinds and an entry in one tick: answers in the proto's order (entries,
    tokens, frames, text), the chunks in one engine call, a refused chunk of each kind answered
    as its entry (from its own columns)."""
    streams = NativeStreams(layer)
    tick(streams, (1, OPEN), (2, FRAMES), (3, OPEN), (4, OPEN), (5, FRAMES))
    calls = engine_calls(layer)
    message = npb.Tick(
        id=5,
        entries=[npb.TickEntry(stream=4, request=pb.StreamRequest(reset=pb.Reset(seq=1)))],
        chunk_streams=np.array([1], "<u8").tobytes(),
        chunk_seqs=np.array([1], "<u8").tobytes(),
        chunk_offsets=np.array([0, 2], "<u4").tobytes(),
        chunk_tokens=np.array([3, 4], "<i8").tobytes(),
        frame_streams=np.array([2, 5], "<u8").tobytes(),
        frame_seqs=np.array([1, 1], "<u8").tobytes(),
        frame_counts=np.array([1, 0], "<u4").tobytes(),
        frame_offsets=np.array([0, 5, 12], "<u4").tobytes(),
        frame_values=np.ones(12, "<f4").tobytes(),
        text_streams=np.array([3, 1], "<u8").tobytes(),
        text_seqs=np.array([1, 2], "<u8").tobytes(),
        text_offsets=np.array([0, 3, 3], "<u4").tobytes(),
        text_bytes=b"abc",
    )
    assert tick_messages(message) == 6
    entries = [NativeEntry(4, codec.stream_request(message.entries[0].request))]
    reset, ids, frames, not_frames, text, empty = asyncio.run(
        streams.answer(entries, packed=packed_chunks(message))
    )
    assert calls == [3]
    assert isinstance(body(reset), m.ResetDone)
    assert isinstance(ids, ChunkOutcome) and ids.total_steps == 2
    assert isinstance(frames, ChunkOutcome) and frames.total_steps == 1
    assert isinstance(not_frames, NativeOutcome)
    assert "chunk.input.frames.values has 7 floats" in str(body(not_frames).error)
    assert isinstance(text, ChunkOutcome) and (text.total_steps, text.held_characters) == (3, 1)
    assert isinstance(empty, NativeOutcome) and "chunk.input.text is empty" in str(
        body(empty).error
    )


def test_a_tick_whose_text_columns_do_not_fit_is_refused(layer: SessionLayer) -> None:
    bad = npb.Tick(id=6, text_streams=b"\0" * 8, text_seqs=b"\0" * 16,
                   text_offsets=np.array([0, 1], "<u4").tobytes(), text_bytes=b"a")  # fmt: skip
    with pytest.raises(ProtocolError, match="tick 6: text columns of different lengths"):
        packed_chunks(bad)
    bad.text_seqs = b"\0" * 8
    bad.text_offsets = np.array([0, 2], "<u4").tobytes()
    with pytest.raises(ProtocolError, match="tick 6: text offsets do not fit their values"):
        packed_chunks(bad)
    bad.text_offsets = np.array([0, 2], "<u4").tobytes()
    bad.text_bytes = "é".encode()[:1] + b"a"  # a character cut in two: not UTF-8
    with pytest.raises(ProtocolError, match="tick 6: text 0 is not UTF-8"):
        packed_chunks(bad)


# -- StreamMulti: every message through the stream's MultiConversation ---------------------------


def multi(stream: int, *entries: m.SessionEntry) -> NativeEntry:
    return NativeEntry(stream, list(entries), multi=True)


def batches(model: str) -> tuple[float, float]:
    """(model runs, chunks in them) so far for `model` (lstm_serve_batch_size)."""
    from prometheus_client import REGISTRY

    labels = {"model": model}
    count = REGISTRY.get_sample_value("lstm_serve_batch_size_count", labels) or 0.0
    return count, REGISTRY.get_sample_value("lstm_serve_batch_size_sum", labels) or 0.0


def test_multi_messages_get_the_python_fronts_replies_and_share_batches(
    layer: SessionLayer,
) -> None:
    """Two StreamMulti streams and a Stream in one tick: each multi message answered as
    MultiConversation answers it on the Python front (probabilities to the bit), and their
    chunks run in one batched model run."""
    streams = NativeStreams(layer)
    opens = [m.SessionEntry("", OPEN), m.SessionEntry("", OPEN)]
    a, b, _ = asyncio.run(
        streams.answer([multi(1, *opens), multi(2, opens[0]), NativeEntry(3, OPEN)])
    )
    ids = [r.session_id for r in a.reply.replies] + [b.reply.replies[0].session_id]
    before = batches("tiny-gru")
    chunks = [m.SessionEntry(ids[0], m.Chunk(1, Tokens(1))),
              m.SessionEntry(ids[1], m.Chunk(1, Tokens(3))),
              m.SessionEntry(ids[0], m.Chunk(2, Tokens(4)))]  # fmt: skip
    got = asyncio.run(streams.answer([
        multi(1, *chunks), multi(2, m.SessionEntry(ids[2], m.Chunk(1, Tokens(5)))),
        NativeEntry(3, m.Chunk(1, Tokens(6))),
    ]))  # fmt: skip
    runs, sizes = (x - y for x, y in zip(batches("tiny-gru"), before, strict=True))
    assert (runs, sizes) == (2, 5)  # round 1: the 4 sessions' chunks at once; round 2: one
    # (one step each: the batcher puts chunks of different lengths in different runs)

    async def python_front() -> list[m.MultiReply]:
        conversation = MultiConversation(layer, feed([]))
        [o1, o2] = (await conversation.answer(opens)).replies
        twin = [m.SessionEntry(o1.session_id, c.request) if c.session_id == ids[0] else
                m.SessionEntry(o2.session_id, c.request) for c in chunks]  # fmt: skip
        return [await conversation.answer(twin)]

    (expected,) = asyncio.run(python_front())
    assert got[0].error is None and len(got[0].reply.replies) == 3
    for native, python in zip(got[0].reply.replies, expected.replies, strict=True):
        n, p = native.body.outcome, python.body.outcome
        assert n.result.probs.tobytes() == p.result.probs.tobytes()
        assert (n.seq, n.total_steps) == (p.seq, p.total_steps)
    assert got[1].reply.replies[0].body.outcome.total_steps == 1
    assert isinstance(got[2], ChunkOutcome) and got[2].total_steps == 1


def test_multi_refusals_are_the_python_fronts(layer: SessionLayer) -> None:
    """In-band: an unknown session, an empty entry; too many entries (limit 4) ends the stream
    INVALID_ARGUMENT, counted as the Python front counts StreamMulti."""
    from prometheus_client import REGISTRY

    streams = NativeStreams(layer)
    unknown = m.SessionEntry("f" * 32, m.Chunk(1, Tokens(1)))
    empty = m.SessionEntry("", m.Unset("open, resume, chunk, reset or end"))
    (first,) = tick_multi(streams, multi(1, unknown, empty))
    expected = asyncio.run(MultiConversation(layer, feed([])).answer([unknown, empty]))
    got = [(type(r.body.error), str(r.body.error)) for r in first.reply.replies]
    assert got == [(type(r.body.error), str(r.body.error)) for r in expected.replies]
    assert isinstance(first.reply.replies[0].body.error, SessionNotFound)
    labels = {"rpc": "StreamMulti", "model": metrics.UNKNOWN_MODEL, "code": "INVALID_ARGUMENT",
              "protocol": metrics.PROTOCOL_NATIVE}  # fmt: skip
    counted = REGISTRY.get_sample_value("lstm_serve_requests_total", labels) or 0.0
    (over,) = tick_multi(streams, multi(1, *[m.SessionEntry("", OPEN)] * 5))
    assert isinstance(over.error, InvalidInput) and over.reply is None
    assert str(over.error) == "entries has 5 entries, more than the maximum 4"
    assert REGISTRY.get_sample_value("lstm_serve_requests_total", labels) == counted + 1
    assert len(streams) == 0


def test_a_malformed_multi_message_and_a_reply_on_the_wire(layer: SessionLayer) -> None:
    """Through the ticks' servicer: a StreamMulti message that did not parse ends its stream
    with the Python front's status and message; a good one comes back as `multi_reply`."""
    servicer = NativeFrontServicer(layer, 60.0, None)
    streams = NativeStreams(layer)
    good = pb.StreamMultiRequest(entries=[pb.SessionRequest(open=pb.OpenSession(model="tiny-gru"))])
    message = npb.Tick(id=2, entries=[
        npb.TickEntry(stream=1, first=True, malformed=True, size=5, multi_stream=True),
        npb.TickEntry(stream=2, first=True, multi=good, multi_stream=True),
    ])  # fmt: skip
    reply = asyncio.run(servicer.answer(streams, message))
    bad, opened = reply.outcomes
    assert (bad.code, bad.message) == (
        3, "the request is not a valid lstmserve.v1.StreamMultiRequest (5 bytes)")  # fmt: skip
    assert not bad.HasField("multi_reply") and not bad.HasField("reply")
    result = pb.StreamMultiResponse.FromString(opened.multi_reply).results[0]
    assert opened.code == 0 and result.opened.model == "tiny-gru"
    assert not opened.HasField("reply") and len(streams) == 1


def test_a_closed_multi_stream_detaches_its_sessions(layer: SessionLayer) -> None:
    streams = NativeStreams(layer)
    (opened,) = tick_multi(streams, multi(1, m.SessionEntry("", OPEN), m.SessionEntry("", OPEN)))
    held = [layer.engine.store.peek(r.session_id) for r in opened.reply.replies]
    assert all(s is not None and s.attached is not None for s in held)
    asyncio.run(streams.answer([], closed=[(1, True)]))
    assert all(s.attached is None for s in held) and len(streams) == 0  # type: ignore[union-attr]


def test_drain_hands_each_idle_multi_stream_its_final_snapshots(tiny_repo: Path) -> None:
    """With --snapshot-key: an idle multi stream gets one last MultiReply with the final
    snapshot of each live session it named, then UNAVAILABLE; a message arriving after the
    drain began is not applied and gets the same."""
    import base64

    from service.engine.continuity.continuity import SessionContinuity
    from service.engine.continuity.snapshots import SnapshotKeys

    engine = load_engine(tiny_repo)
    keys = SnapshotKeys.parse("k1:" + base64.b64encode(b"x" * 32).decode())
    engine.continuity = SessionContinuity(engine.store, keys=keys)
    layer = SessionLayer(engine, Limits())
    streams, sent = NativeStreams(layer), []
    (opened,) = tick_multi(streams, multi(1, m.SessionEntry("", OPEN), m.SessionEntry("", OPEN)))
    sid = opened.reply.replies[0].session_id
    tick_multi(streams, multi(1, m.SessionEntry(sid, m.Chunk(1, Tokens(1, 2)))))
    tick_multi(streams, multi(2, m.SessionEntry("", OPEN)))
    engine.drain_started.set()
    layer.begin_drain()

    async def send(stream: int, outcome: NativeOutcome) -> None:
        sent.append((stream, outcome))

    async def drain_with_one_busy() -> list[Any]:
        streams._busy.add(2)  # stream 2 has a message in flight: it gets its last one in reply
        await streams.drain(send)
        streams._busy.discard(2)
        return await streams.answer([multi(2, m.SessionEntry("", OPEN))])

    (late,) = asyncio.run(drain_with_one_busy())
    engine.close()
    ((stream, last),) = sent
    assert stream == 1 and isinstance(last.error, Draining)
    snaps = [r.body for r in last.reply.replies]
    assert all(isinstance(s, m.Snapshot) and s.final for s in snaps) and len(snaps) == 2
    assert sorted(s.last_seq for s in snaps) == [0, 1]
    assert isinstance(late.error, Draining) and len(late.reply.replies) == 1
    assert len(streams) == 0


def tick_multi(streams: NativeStreams, *entries: NativeEntry) -> list[Any]:
    return asyncio.run(streams.answer(list(entries)))
