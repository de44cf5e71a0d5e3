"""The protocol-neutral session layer without a network: attach, dispatch, duplicates,
in-band versus stream-level errors, StreamMulti rounds and the drain hand-over."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lstmserve.contract import ModelDescription
from service.engine.continuity.continuity import SessionContinuity
from service.engine.continuity.snapshots import SnapshotKeys
from service.engine.session.sessions import Session
from service.engine.types import StreamOptions
from service.errors import Draining, ProtocolError, SessionNotFound
from service.protocol import messages as m
from service.protocol.multi import MultiConversation, rounds
from service.protocol.session import Limits, SessionLayer
from service.protocol.stream import StreamConversation
from tests.unit.engines import load_engine


class Tokens:
    """A chunk input already in token ids."""

    def __init__(self, *ids: int) -> None:
        self.ids = ids

    def decode(self, desc: ModelDescription, max_steps: int, field: str) -> np.ndarray:
        from service.engine.text.inputs import tokens_from_ids

        return tokens_from_ids(desc, list(self.ids), max_steps, field)

    def text(self) -> str | None:
        return None

    def steps_hint(self) -> int:
        return len(self.ids)

    def nbytes(self) -> int:
        return 8 * len(self.ids)


async def feed(items: Iterable[Any]) -> AsyncIterator[Any]:
    for item in items:
        yield item


async def collect(replies: AsyncIterator[Any]) -> list[Any]:
    return [r async for r in replies]


@pytest.fixture
def layer(tiny_repo: Path) -> SessionLayer:
    engine = load_engine(tiny_repo)
    yield SessionLayer(engine, Limits(max_chunk_steps=8, max_multi_entries=4))
    engine.close()


OPEN = m.Open("tiny-gru", 0, StreamOptions())


def test_stream_attaches_answers_in_order_and_flags_resends(layer: SessionLayer) -> None:
    requests = [OPEN, m.Chunk(1, Tokens(1, 2)), m.Chunk(1, Tokens(1, 2)), m.Reset(2), m.End()]
    replies = asyncio.run(collect(StreamConversation(layer, feed(requests), "Stream").replies()))
    opened, chunk, resend, reset, ended = (r.body for r in replies)
    assert isinstance(opened, m.Opened) and not opened.resumed
    assert isinstance(chunk, m.ChunkDone) and chunk.outcome and not chunk.outcome.duplicate
    assert isinstance(resend, m.ChunkDone) and resend.outcome and resend.outcome.duplicate
    assert resend.outcome.result is not None  # the last applied chunk's resend: its result
    assert reset == m.ResetDone(2, False) and ended == m.Ended(0, 2)
    assert {r.session_id for r in replies} == {opened.session_id}
    assert opened.session_id not in layer.engine.store  # ended


def test_replies_carry_values_not_live_sessions(layer: SessionLayer) -> None:
    """What the codec reads is copied into the reply when it is made: a later change to the
    session (here its end) does not change a reply already made."""
    requests = [OPEN, m.Chunk(1, Tokens(1, 2)), m.Chunk(3, Tokens(1)), m.End()]
    replies = asyncio.run(collect(StreamConversation(layer, feed(requests), "Stream").replies()))
    opened, chunk, gap, ended = (r.body for r in replies)
    for body in (opened, chunk, gap, ended):
        values = [getattr(body, f) for f in body.__slots__]  # type: ignore[union-attr]
        assert not [v for v in values if isinstance(v, Session)], body
    labels = layer.engine.registry.get("tiny-gru", 1).description.labels
    assert isinstance(opened, m.Opened) and (opened.model, opened.labels) == ("tiny-gru", labels)
    assert (opened.last_seq, opened.total_steps) == (0, 0)  # as it was when it attached
    assert isinstance(chunk, m.ChunkDone) and (chunk.labels, chunk.top_k) == (labels, 1)
    assert isinstance(gap, m.ChunkDone) and gap.error is not None and gap.total_steps == 2
    assert isinstance(ended, m.Ended) and ended.labels == labels and ended.total_steps == 2


def test_a_bad_chunk_is_answered_in_band_and_the_stream_goes_on(layer: SessionLayer) -> None:
    requests = [OPEN, m.Chunk(1, Tokens(99)), m.Chunk(1, Tokens(1))]
    replies = asyncio.run(collect(StreamConversation(layer, feed(requests), "Stream").replies()))
    bad, good = replies[1].body, replies[2].body
    assert isinstance(bad, m.ChunkDone) and bad.error is not None and bad.outcome is None
    assert "chunk.input" in str(bad.error) and "99" in str(bad.error)
    assert isinstance(good, m.ChunkDone) and good.outcome and good.outcome.total_steps == 1


@pytest.mark.parametrize(
    ("requests", "error"),
    [([m.Chunk(1, Tokens(1))], ProtocolError), ([OPEN, OPEN], ProtocolError),
     ([m.Resume("0" * 32, None)], SessionNotFound)],
)  # fmt: skip
def test_stream_level_problems_are_raised(
    layer: SessionLayer, requests: list[m.Request], error: type[Exception]
) -> None:
    with pytest.raises(error):
        asyncio.run(collect(StreamConversation(layer, feed(requests), "Stream").replies()))


def test_multi_rounds_keep_each_sessions_order() -> None:
    entries = [m.SessionEntry("a", m.Chunk(1, Tokens(1))), m.SessionEntry("b", m.End()),
               m.SessionEntry("a", m.Chunk(2, Tokens(1))), m.SessionEntry("", OPEN),
               m.SessionEntry("", OPEN)]  # fmt: skip
    assert rounds(entries) == [[0, 1, 3, 4], [2]]


def test_multi_answers_every_entry_in_place(layer: SessionLayer) -> None:
    async def main() -> list[m.Reply]:
        conversation = MultiConversation(layer, feed([]))
        [opened] = (await conversation.answer([m.SessionEntry("", OPEN)])).replies
        sid = opened.session_id
        reply = await conversation.answer([
            m.SessionEntry(sid, m.Chunk(1, Tokens(1, 2))),
            m.SessionEntry(sid, m.Chunk(2, Tokens(3))),  # the next round
            m.SessionEntry("", m.Unset("open, resume, chunk, reset or end")),
            m.SessionEntry("f" * 32, m.Chunk(1, Tokens(1))),
        ])  # fmt: skip
        return reply.replies

    first, second, empty, unknown = asyncio.run(main())
    assert isinstance(first.body, m.ChunkDone) and first.body.outcome.total_steps == 2  # type: ignore[union-attr]
    assert isinstance(second.body, m.ChunkDone) and second.body.outcome.total_steps == 3  # type: ignore[union-attr]
    assert isinstance(empty.body, m.Failed) and "entries[2] is empty" in str(empty.body.error)
    assert isinstance(unknown.body, m.Failed) and isinstance(unknown.body.error, SessionNotFound)


def test_drain_hands_over_a_final_snapshot_then_ends_the_stream(tiny_repo: Path) -> None:
    keys = SnapshotKeys.parse("k1:" + base64.b64encode(b"x" * 32).decode())
    engine = load_engine(tiny_repo)
    engine.continuity = SessionContinuity(engine.store, keys=keys)
    layer = SessionLayer(engine, Limits())

    async def main() -> list[m.Reply]:
        queue: asyncio.Queue[Any] = asyncio.Queue()

        async def requests() -> AsyncIterator[Any]:
            while (item := await queue.get()) is not None:  # None: the client closes
                yield item

        replies: list[m.Reply] = []
        conversation = StreamConversation(layer, requests(), "Stream")
        await queue.put(OPEN)
        await queue.put(m.Chunk(1, Tokens(1, 2)))
        with pytest.raises(Draining):
            async for reply in conversation.replies():
                replies.append(reply)
                if len(replies) == 2:  # the server starts draining while the client is idle
                    engine.drain_started.set()
                    layer.begin_drain()
                    asyncio.get_running_loop().call_later(0.05, queue.put_nowait, None)  # leaves
        return replies

    replies = asyncio.run(main())
    final = replies[-1].body
    assert isinstance(final, m.Snapshot) and final.final and final.last_seq == 1
    engine.close()


def test_a_multi_stream_forgets_the_sessions_that_are_gone(
    layer: SessionLayer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import service.protocol.multi as multi

    monkeypatch.setattr(multi, "PRUNE_FLOOR", 4)

    async def main() -> MultiConversation:
        conversation = MultiConversation(layer, feed([]))
        for _ in range(6):
            reply = await conversation.answer([m.SessionEntry("", OPEN)])
            session = layer.engine.store.get(reply.replies[0].session_id)
            layer.engine.store.end(session)  # e.g. expired while the stream lives on
        return conversation

    conversation = asyncio.run(main())
    assert len(conversation._used) <= 4  # not one entry per session ever named
