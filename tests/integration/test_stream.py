"""Streaming sessions over a real server: chunked == whole sequence, resume, order, controls."""

from __future__ import annotations

import asyncio
import random

import grpc
import numpy as np
import pytest

from lstmserve.client import LstmClient
from lstmserve.v1 import lstm_serve_pb2 as pb
from lstmserve.v1 import lstm_serve_pb2_grpc as pb_grpc
from tests.integration.conftest import Reference, ServerThread


def tokens(ids: list[int]) -> pb.SequenceInput:
    return pb.SequenceInput(tokens=pb.TokenIds(ids=ids))


STREAMABLE = {
    "tiny-lstm": ("tokens", 0),
    "tiny-gru": ("tokens", 0),
    "tiny-rnn-frames": ("features", 5),
    "tiny-peephole-frames": ("features", 5),
    "tiny-cifg-frames": ("features", 5),
}


def random_sequence(rng: np.random.Generator, model: str, length: int) -> np.ndarray:
    kind, dim = STREAMABLE[model]
    if kind == "tokens":
        return rng.integers(0, 28, size=length).astype(np.int64)  # (T,)
    return rng.normal(size=(length, dim)).astype(np.float32)  # (T, F)


def random_chunks(rng: random.Random, length: int) -> list[tuple[int, int]]:
    bounds, start = [], 0
    while start < length:
        end = min(length, start + rng.randint(1, 9))
        bounds.append((start, end))
        start = end
    return bounds


async def stream_one(address: str, model: str, seq: np.ndarray, seed: int) -> list[np.ndarray]:
    """Stream `seq` in random chunks, pipelining up to 3 at a time; every_step probabilities."""
    rng = random.Random(seed)
    async with LstmClient(address) as client:
        session = await client.open_session(model, version=1, every_step=True)
        bounds = random_chunks(rng, len(seq))
        steps: list[np.ndarray] = []
        i = 0
        while i < len(bounds):
            batch = bounds[i : i + rng.randint(1, 3)]
            seqs = [await session.send(seq[a:b]) for a, b in batch]
            for expected, (a, b) in zip(seqs, batch, strict=True):
                reply = (await session.receive()).chunk
                assert reply.seq == expected and not reply.HasField("error")
                assert reply.steps == b - a and reply.total_steps == b
                steps.extend(np.array(p.values) for p in reply.step_probabilities)
                last = np.array(reply.probabilities)
            i += len(batch)
        await session.end()
    steps.append(last)
    return steps


def test_concurrent_random_chunkings_match_offline_whole_sequence(
    stream_server: ServerThread, reference: Reference
) -> None:
    rng = np.random.default_rng(0)
    jobs = []
    for i in range(16):
        model = sorted(STREAMABLE)[i % len(STREAMABLE)]
        jobs.append((model, random_sequence(rng, model, int(rng.integers(5, 40)))))

    async def main() -> list[list[np.ndarray]]:
        return await asyncio.gather(
            *(stream_one(stream_server.address, m, s, seed) for seed, (m, s) in enumerate(jobs))
        )

    for (model, seq), got in zip(jobs, asyncio.run(main()), strict=True):
        probs, step_probs = reference.run(model, seq)
        np.testing.assert_allclose(np.stack(got[:-1]), step_probs, atol=1e-5)
        np.testing.assert_allclose(got[-1], probs, atol=1e-5)


def test_dropped_stream_resumes_with_same_state_and_no_double_apply(
    stream_server: ServerThread, reference: Reference
) -> None:
    text = "hello world"
    ids = np.array([ord(c) - 96 if c != " " else 27 for c in text], dtype=np.int64)

    async def main() -> tuple[pb.SessionOpened, pb.ChunkResult, pb.ChunkResult, pb.SessionEnded]:
        async with grpc.aio.insecure_channel(stream_server.address) as channel:
            stub = pb_grpc.LstmServeStub(channel)
            call = stub.Stream()
            await call.write(pb.StreamRequest(open=pb.OpenSession(model="tiny-lstm", version=1)))
            session_id = (await call.read()).session_id
            for seq, (a, b) in enumerate([(0, 3), (3, 6)], start=1):
                chunk = pb.Chunk(seq=seq, input=pb.SequenceInput(text=text[a:b]))
                await call.write(pb.StreamRequest(chunk=chunk))
                assert (await call.read()).chunk.seq == seq
            call.cancel()  # the stream breaks

            call = stub.Stream()
            await call.write(pb.StreamRequest(resume=pb.ResumeSession(session_id=session_id)))
            opened = (await call.read()).opened
            resent = pb.Chunk(seq=2, input=pb.SequenceInput(text=text[3:6]))
            await call.write(pb.StreamRequest(chunk=resent))
            duplicate = (await call.read()).chunk
            rest = pb.Chunk(seq=3, input=pb.SequenceInput(text=text[6:]))
            await call.write(pb.StreamRequest(chunk=rest))
            final = (await call.read()).chunk
            await call.write(pb.StreamRequest(end=pb.End()))
            ended = (await call.read()).ended
            return opened, duplicate, final, ended

    opened, duplicate, final, ended = asyncio.run(main())
    assert opened.resumed and opened.last_applied_seq == 2 and opened.total_steps == 6
    assert duplicate.duplicate and duplicate.seq == 2 and duplicate.total_steps == 6
    # the resend of the last applied chunk carries its original answer (a lost reply recovered)
    _, step_probs = reference.run("tiny-lstm", ids)
    np.testing.assert_allclose(duplicate.probabilities, step_probs[5], atol=1e-5)
    # "world": the "d" is held (a combining mark may still follow it) but answered
    assert final.total_steps == len(text) and final.held_characters == 1
    assert not final.duplicate
    np.testing.assert_allclose(final.probabilities, step_probs[-1], atol=1e-5)
    assert ended.total_steps == len(text) and ended.flushed_steps == 0
    np.testing.assert_allclose(ended.probabilities, reference.run("tiny-lstm", ids)[0], atol=1e-5)


def test_client_resends_unanswered_chunks_after_a_broken_stream(
    stream_server: ServerThread, reference: Reference
) -> None:
    seq = np.random.default_rng(3).normal(size=(12, 5)).astype(np.float32)

    async def main() -> pb.ChunkResult:
        async with LstmClient(stream_server.address) as client:
            session = await client.open_session("tiny-rnn-frames")
            await session.step(seq[:4])
            await session.send(seq[4:8])  # pipelined, not yet answered
            session._call.cancel()  # break the stream under the client
            reply = (await session.receive()).chunk  # resumes, resends seq 2
            assert reply.seq == 2
            final = await session.step(seq[8:])
            await session.end()
            return final

    final = asyncio.run(main())
    assert final.total_steps == 12
    np.testing.assert_allclose(
        final.probabilities, reference.run("tiny-rnn-frames", seq)[0], atol=1e-5
    )


def test_reset_zeroes_state_and_is_not_applied_twice(
    stream_server: ServerThread, reference: Reference
) -> None:
    async def main() -> tuple[pb.ResetDone, pb.ChunkResult, pb.ResetDone]:
        async with grpc.aio.insecure_channel(stream_server.address) as channel:
            call = pb_grpc.LstmServeStub(channel).Stream()
            await call.write(pb.StreamRequest(open=pb.OpenSession(model="tiny-gru")))
            await call.read()
            for req in (
                pb.StreamRequest(chunk=pb.Chunk(seq=1, input=pb.SequenceInput(text="abc"))),
                pb.StreamRequest(reset=pb.Reset(seq=2)),
                pb.StreamRequest(chunk=pb.Chunk(seq=3, input=tokens([24, 25]))),
                pb.StreamRequest(reset=pb.Reset(seq=2)),  # resent: must not zero again
            ):
                await call.write(req)  # pipelined: four messages before any read
            replies = [await call.read() for _ in range(4)]
            await call.done_writing()
            return replies[1].reset, replies[2].chunk, replies[3].reset

    reset, after, resent = asyncio.run(main())
    assert not reset.duplicate and resent.duplicate
    assert after.total_steps == 2
    expected = reference.run("tiny-gru", np.array([24, 25], dtype=np.int64))[0]
    np.testing.assert_allclose(after.probabilities, expected, atol=1e-5)


def test_end_frees_the_session(stream_server: ServerThread) -> None:
    async def main() -> grpc.StatusCode:
        async with LstmClient(stream_server.address) as client:
            session = await client.open_session("tiny-lstm")
            await session.step("ab")
            ended = await session.end()
            assert ended.total_steps == 2 and ended.last_applied_seq == 1
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await client.resume_session(session.session_id)
            assert "expired" not in (info.value.details() or "")
            return info.value.code()

    assert asyncio.run(main()) == grpc.StatusCode.NOT_FOUND


def test_bidirectional_model_cannot_stream_but_classifies(
    stream_server: ServerThread, reference: Reference
) -> None:
    async def main() -> tuple[grpc.StatusCode, pb.ClassifyResponse]:
        async with LstmClient(stream_server.address) as client:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await client.open_session("tiny-bilstm")
            reply = await client.classify("tiny-bilstm", ["hello", "hi"], step_probabilities=True)
            return info.value.code(), reply

    code, reply = asyncio.run(main())
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    for text, result in zip(["hello", "hi"], reply.results, strict=True):
        ids = np.array([ord(c) - 96 for c in text], dtype=np.int64)
        probs, steps = reference.run("tiny-bilstm", ids)
        np.testing.assert_allclose(result.probabilities, probs, atol=1e-5)
        np.testing.assert_allclose([s.values for s in result.steps], steps, atol=1e-5)
        assert result.length == len(text)


def test_sessions_stay_pinned_to_their_version(
    stream_server: ServerThread, reference: Reference
) -> None:
    async def main() -> tuple[pb.ChunkResult, pb.ChunkResult]:
        async with LstmClient(stream_server.address) as client:
            latest = await client.open_session("tiny-lstm")
            first = await client.open_session("tiny-lstm", version=1)
            assert latest.opened.version == 2 and first.opened.version == 1
            return await latest.step([1, 2, 3]), await first.step([1, 2, 3])

    v2, v1 = asyncio.run(main())
    ids = np.array([1, 2, 3], dtype=np.int64)
    np.testing.assert_allclose(v2.probabilities, reference.run("tiny-lstm", ids, 2)[0], atol=1e-5)
    np.testing.assert_allclose(v1.probabilities, reference.run("tiny-lstm", ids, 1)[0], atol=1e-5)


def test_a_chunk_of_unknown_characters_is_fed_as_classify_feeds_them(
    stream_server: ServerThread,
) -> None:
    text = "ab? c?d"  # '?' and ' ' are outside the tiny models' vocabulary

    async def main() -> tuple[list[float], list[float], int]:
        async with LstmClient(stream_server.address) as client:
            session = await client.open_session("tiny-gru", version=1)
            for piece in ("ab", "?", " ", "c", "?", "d"):  # two chunks of unknowns only
                reply = await session.step(piece)
                assert not reply.HasField("error"), reply.error.message
            ended = await session.end()
            [whole] = (await client.classify("tiny-gru", [text], version=1)).results
            return list(ended.probabilities), list(whole.probabilities), ended.total_steps

    streamed, whole, steps = asyncio.run(main())
    assert steps == len(text)
    np.testing.assert_allclose(streamed, whole, atol=1e-6)
