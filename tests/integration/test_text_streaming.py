"""Streamed text, case by case: what is held, answered and taken back.

Normalisation and lowercasing look at neighbouring characters (a combining mark composes with
the letter before it, Hangul jamo compose, a final capital sigma lowercases to "ς"), so the
server holds what may still change, runs it as if final for the reply and takes it back when
the next chunk changes it (service/engine/text/textstream.py). The property over random texts
and cuts, on every path, is tests/integration/test_live_text.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from lstmserve.client import LstmClient, MultiStream
from lstmserve.v1 import lstm_serve_pb2 as pb
from lstmserve.v1 import lstm_serve_pb2_grpc as pb_grpc
from tests.integration.conftest import ServerThread, make_config

MODEL = "tiny-lstm"  # vocabulary: a-z and space; everything else is the unknown token


def text_input(text: str) -> pb.SequenceInput:
    return pb.SequenceInput(text=text)


@pytest.fixture
def stub(stream_server: ServerThread) -> Iterator[pb_grpc.LstmServeStub]:
    """Through each front: the Python one and the native one (where built)."""
    with grpc.insecure_channel(stream_server.address) as channel:
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


def test_a_combining_mark_in_the_next_chunk_composes_with_the_held_letter(
    stub: pb_grpc.LstmServeStub,
) -> None:
    """ "e" then U+0301: one unknown token ("é"), as Classify("é") — not "e" and a mark. The
    first reply ran the held "e" as if final; the second takes that step back."""
    replies = stream(stub, ["cafe", "\u0301 ok"])
    first, second, ended = replies[1].chunk, replies[2].chunk, replies[3].ended
    assert (first.steps, first.held_characters, first.total_steps) == (4, 1, 4)  # "e" held
    assert (second.rewound_steps, second.steps, second.total_steps) == (1, 4, 7)  # "é ok"
    assert second.held_characters == 1  # "k"
    for reply, text in ((first, "cafe"), (second, "cafe\u0301 ok")):
        whole = classify(stub, text)
        assert whole is not None and reply.total_steps == whole.length
        np.testing.assert_array_equal(
            np.float32(reply.probabilities), np.float32(whole.probabilities)
        )
    assert ended.total_steps == 7 and ended.flushed_steps == 0
    np.testing.assert_array_equal(np.float32(ended.probabilities), np.float32(second.probabilities))


def test_a_held_letter_is_answered_at_once_and_not_taken_back_when_it_settles(
    stub: pb_grpc.LstmServeStub,
) -> None:
    replies = stream(stub, ["a", "b", "c "])
    first, second, third = (r.chunk for r in replies[1:4])
    assert (first.steps, first.held_characters, first.total_steps) == (1, 1, 1)
    assert len(first.probabilities) == 3  # "a" answered although it may still change
    assert (second.steps, second.rewound_steps, second.held_characters) == (1, 0, 1)
    assert (third.steps, third.rewound_steps, third.held_characters, third.total_steps) == (
        2,
        0,
        0,
        4,
    )
    assert replies[-1].ended.flushed_steps == 0


def test_text_with_no_known_character_is_refused_until_the_session_has_one(
    stub: pb_grpc.LstmServeStub,
) -> None:
    """As Classify refuses it: in-band, naming the field, not applied (its seq is used next);
    after known text, a chunk of unknowns is taken (Classify takes "ab☃")."""
    requests = [pb.StreamRequest(open=pb.OpenSession(model=MODEL))]
    for seq, piece in ((1, "☃"), (1, "שלום"), (1, "ab"), (2, "☃")):
        requests.append(pb.StreamRequest(chunk=pb.Chunk(seq=seq, input=text_input(piece))))
    replies = [r.chunk for r in stub.Stream(iter(requests), timeout=30)][1:]
    for refused in replies[:2]:
        assert refused.error.code == "INVALID_ARGUMENT" and refused.total_steps == 0
        assert "chunk.input.text" in refused.error.message and "vocabulary" in refused.error.message
    assert not replies[2].HasField("error") and not replies[3].HasField("error")
    whole = classify(stub, "ab☃")
    assert whole is not None and replies[3].total_steps == whole.length == 3
    np.testing.assert_array_equal(
        np.float32(replies[3].probabilities), np.float32(whole.probabilities)
    )


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


def test_stream_multi_answers_held_text_per_session(server: ServerThread) -> None:
    async def main() -> tuple[
        list[pb.SessionResult], list[pb.SessionResult], list[pb.SequenceResult]
    ]:
        async with LstmClient(server.address) as client:
            multi = client.multi_stream()
            ids = [r.session_id for r in await multi.exchange([MultiStream.open(MODEL)] * 2)]
            first = await multi.exchange(
                [MultiStream.chunk(s, 1, c) for s, c in zip(ids, "eq", strict=True)]
            )
            second = await multi.exchange([MultiStream.chunk(s, 2, "\u0301t") for s in ids])
            await multi.exchange([MultiStream.end(s) for s in ids])
            await multi.close()
            whole = (await client.classify(MODEL, ["e", "q", "e\u0301t", "q\u0301t"])).results
            return first, second, list(whole)

    first, second, whole = asyncio.run(main())
    assert [r.chunk.held_characters for r in first] == [1, 0]  # "e" held; "q" composes with nothing
    assert [r.chunk.rewound_steps for r in second] == [1, 0]  # "e" became "é"
    for reply, w in zip([*first, *second], whole, strict=True):
        assert reply.chunk.total_steps == w.length
        np.testing.assert_array_equal(
            np.float32(reply.chunk.probabilities), np.float32(w.probabilities)
        )


def test_a_resend_replays_the_reply_with_the_held_letter_in_it(stub: pb_grpc.LstmServeStub) -> None:
    chunk = pb.StreamRequest(chunk=pb.Chunk(seq=1, input=text_input("cafe")))
    requests = [pb.StreamRequest(open=pb.OpenSession(model=MODEL)), chunk, chunk]
    first, again = (r.chunk for r in list(stub.Stream(iter(requests), timeout=30))[1:])
    assert again.duplicate and (again.total_steps, again.held_characters) == (4, 1)
    assert list(again.probabilities) == list(first.probabilities)  # "cafe", the "e" included
