"""NativeStreams (service/protocol/native.py) without a network: what the native front's ticks
are answered with is what StreamConversation answers, a tick's chunks share one engine call."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from service.errors import AttachedElsewhere, Draining, ProtocolError
from service.protocol import messages as m
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


def tick(streams: NativeStreams, *entries: tuple[int, Any]) -> list[NativeOutcome]:
    return asyncio.run(streams.answer([NativeEntry(s, r) for s, r in entries]))


def body(outcome: NativeOutcome) -> Any:
    assert outcome.reply is not None
    return outcome.reply.body


def test_a_ticks_chunks_share_one_engine_call_and_match_the_python_fronts(
    layer: SessionLayer,
) -> None:
    streams, calls = NativeStreams(layer), []
    apply_chunks = layer.engine.apply_chunks

    async def counted(work: list[Any]) -> Any:
        calls.append(len(work))
        return await apply_chunks(work)

    layer.engine.apply_chunks = counted  # type: ignore[method-assign]
    tick(streams, *((s, OPEN) for s in (1, 2, 3)))
    outcomes = tick(streams, *((s, m.Chunk(1, Tokens(1, 2, s))) for s in (1, 2, 3)))
    assert calls == [3]
    for s, outcome in zip((1, 2, 3), outcomes, strict=True):
        requests = [OPEN, m.Chunk(1, Tokens(1, 2, s))]
        alone = asyncio.run(collect(StreamConversation(layer, feed(requests), "Stream").replies()))
        expected = alone[1].body.outcome.result.probs  # type: ignore[union-attr]
        got = body(outcome).outcome.result.probs
        assert got.tobytes() == expected.tobytes() and outcome.error is None


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
    assert new.error is None and not body(new).outcome.duplicate


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
