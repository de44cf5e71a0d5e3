"""Streaming text == Classify of the whole text, for every way of cutting it, through a server.

Normalisation and lowercasing look at neighbouring characters (a combining mark composes with
the letter before it, Hangul jamo compose, a final capital sigma lowercases to "ς"), so the
server holds back what may still change until the next chunk or the end
(service/engine/text/textstream.py). These tests cut texts at random places, stream the pieces and
compare the session's final answer (SessionEnded) with Classify of the whole text.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from lstmserve.client import LstmClient, MultiStream
from lstmserve.v1 import lstm_serve_pb2 as pb
from lstmserve.v1 import lstm_serve_pb2_grpc as pb_grpc
from service.engine.text.textstream import MAX_HELD_CHARS
from tests.integration.conftest import ServerThread, make_config

MODEL = "tiny-lstm"  # vocabulary: a-z and space; everything else is the unknown token
# Characters whose tokens depend on their neighbours, and plain ones around them.
TRICKY = (
    "aeouxq AEΣσςΑ'.?-"  # letters, a capital sigma, case-ignorable and unknown characters
    "\u0301\u0300\u0308\u0323\u0327\u0316"  # combining marks of several classes
    "ᄀ\u1161\u11a8가"  # Hangul jamo and a syllable
    "éǖİﬁ\u0f73"  # precomposed letters, a ligature, a mark that decomposes to two
)
TEXTS = st.one_of(
    st.text(st.sampled_from(TRICKY), min_size=1, max_size=24),
    st.text(min_size=1, max_size=16),
)
PROFILE = settings(
    max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True
)


def pieces(text: str, cuts: list[int]) -> list[str]:
    points = sorted({c for c in cuts if 0 < c < len(text)})
    return [text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=True)]


def text_input(text: str) -> pb.SequenceInput:
    return pb.SequenceInput(text=text)


@pytest.fixture(scope="module")
def stub(server: ServerThread) -> Iterator[pb_grpc.LstmServeStub]:
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.LstmServeStub(channel)


def classify(
    stub: pb_grpc.LstmServeStub, text: str, steps: bool = False
) -> pb.SequenceResult | None:
    """Classify of the whole text; None for a text Classify refuses (no known character)."""
    request = pb.ClassifyRequest(
        model=MODEL, sequences=[text_input(text)], step_probabilities=steps
    )
    try:
        reply = stub.Classify(request)
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, exc.details()
        return None
    return reply.results[0]


def stream(stub: pb_grpc.LstmServeStub, chunks: list[str]) -> list[pb.StreamResponse]:
    """One Stream: open, every chunk, end; all its replies."""
    requests = [pb.StreamRequest(open=pb.OpenSession(model=MODEL))]
    requests += [
        pb.StreamRequest(chunk=pb.Chunk(seq=i, input=text_input(c)))
        for i, c in enumerate(chunks, start=1)
    ]
    requests.append(pb.StreamRequest(end=pb.End()))
    return list(stub.Stream(iter(requests), timeout=30))


@PROFILE
@given(text=TEXTS, cuts=st.lists(st.integers(1, 23), max_size=8))
def test_streamed_text_ends_exactly_as_classify_of_the_whole_text(
    stub: pb_grpc.LstmServeStub, text: str, cuts: list[int]
) -> None:
    whole = classify(stub, text)
    assume(whole is not None)
    assert whole is not None
    replies = stream(stub, pieces(text, cuts))
    chunks, ended = [r.chunk for r in replies[1:-1]], replies[-1].ended
    assert all(not c.HasField("error") for c in chunks), [c.error.message for c in chunks]
    assert all(c.held_characters <= MAX_HELD_CHARS + len(text) for c in chunks)
    assert ended.total_steps == whole.length
    assert ended.total_steps == sum(c.steps for c in chunks) + ended.flushed_steps
    np.testing.assert_array_equal(np.float32(ended.probabilities), np.float32(whole.probabilities))


@PROFILE
@given(text=st.text(st.sampled_from(TRICKY), min_size=2, max_size=24), cut=st.integers(1, 23))
def test_every_reply_is_classify_of_what_was_fed(
    stub: pb_grpc.LstmServeStub, text: str, cut: int
) -> None:
    """A reply's probabilities are Classify's after the same steps: what was held is not in it."""
    first, rest = text[: min(cut, len(text) - 1)], text[min(cut, len(text) - 1) :]
    replies = stream(stub, [first, rest])
    reply = replies[1].chunk
    assume(reply.steps > 0)
    whole = classify(stub, text, steps=True)
    assume(whole is not None)
    assert whole is not None
    after = whole.steps[reply.total_steps - 1].values
    np.testing.assert_array_equal(np.float32(reply.probabilities), np.float32(after))


def test_a_combining_mark_in_the_next_chunk_composes_with_the_held_letter(
    stub: pb_grpc.LstmServeStub,
) -> None:
    """ "e" then U+0301: one unknown token ("é"), as Classify("é") — not "e" and a mark."""
    replies = stream(stub, ["cafe", "\u0301 ok"])
    first, second, ended = replies[1].chunk, replies[2].chunk, replies[3].ended
    assert first.steps == 3 and first.held_characters == 1  # "caf" fed, "e" waits
    assert second.steps == 3 and second.held_characters == 1  # "é o" fed, "k" waits
    whole = classify(stub, "cafe\u0301 ok")
    assert whole is not None and ended.total_steps == whole.length == 7
    np.testing.assert_array_equal(np.float32(ended.probabilities), np.float32(whole.probabilities))


def test_a_chunk_that_all_waits_feeds_no_step_and_keeps_the_probabilities(
    stub: pb_grpc.LstmServeStub,
) -> None:
    replies = stream(stub, ["a", "b", "c "])
    first, second, third = (r.chunk for r in replies[1:4])
    assert (first.steps, first.held_characters, len(first.probabilities)) == (0, 1, 0)
    assert (second.steps, second.held_characters) == (1, 1)  # "a" fed, "b" waits
    assert (third.steps, third.held_characters, third.total_steps) == (3, 0, 4)
    assert replies[-1].ended.flushed_steps == 0


def test_held_text_survives_a_snapshot_restored_elsewhere(tiny_repo: object) -> None:
    """The held letter is in the snapshot: restored on another server, a mark composes with it."""
    key = "k1:" + "s" * 32
    a = ServerThread(make_config(tiny_repo, snapshot_key=key)).start()  # type: ignore[arg-type]
    b = ServerThread(make_config(tiny_repo, snapshot_key=key)).start()  # type: ignore[arg-type]

    async def main() -> tuple[pb.SessionEnded, pb.SequenceResult]:
        async with LstmClient(a.address) as client_a, LstmClient(b.address) as client_b:
            session = await client_a.open_session(MODEL)
            await session.step("na")  # "n" fed, "a" waits
            await session.step("i")  # "a" fed, "i" waits
            snap = await session.snapshot()
            restored = await client_b.restore_session(snap.data)
            await restored.step("\u0308ve")  # "ï": composes with the held "i"
            ended = await restored.end()
            whole = (await client_b.classify(MODEL, ["nai\u0308ve"])).results[0]
            return ended, whole

    try:
        ended, whole = asyncio.run(main())
    finally:
        a.stop()
        b.stop()
    assert ended.total_steps == whole.length == 5
    np.testing.assert_array_equal(np.float32(ended.probabilities), np.float32(whole.probabilities))


def test_stream_multi_holds_back_text_per_session(server: ServerThread) -> None:
    async def main() -> tuple[list[pb.SessionResult], list[pb.SequenceResult]]:
        async with LstmClient(server.address) as client:
            multi = client.multi_stream()
            ids = [r.session_id for r in await multi.exchange([MultiStream.open(MODEL)] * 2)]
            first = await multi.exchange(
                [MultiStream.chunk(s, 1, c) for s, c in zip(ids, "eq", strict=True)]
            )
            assert [r.chunk.steps for r in first] == [0, 1]  # "e" waits; "q" composes with nothing
            await multi.exchange([MultiStream.chunk(s, 2, "\u0301t") for s in ids])
            ended = await multi.exchange([MultiStream.end(s) for s in ids])
            await multi.close()
            whole = (await client.classify(MODEL, ["e\u0301t", "q\u0301t"])).results
            return ended, list(whole)

    results, whole = asyncio.run(main())
    ended = [r.ended for r in results]
    for e, w in zip(ended, whole, strict=True):
        assert e.total_steps == w.length
        np.testing.assert_array_equal(np.float32(e.probabilities), np.float32(w.probabilities))
