"""Sessions that outlive their replica: snapshots restored anywhere, and the Redis store."""

from __future__ import annotations

import asyncio
import base64
import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from lstmserve.client import LstmClient, MultiStream, SessionLost, StreamSession
from lstmserve.v1 import lstm_serve_pb2 as pb
from tests.integration.conftest import Reference, ServerThread, make_config

KEY = "k1:" + base64.b64encode(b"shared-secret-for-all-replicas!!").decode()
OTHER_KEY = "k9:" + base64.b64encode(b"a-key-no-replica-here-knows-of!!").decode()
WORD = np.array([8, 5, 12, 12, 15, 23, 15, 18, 12, 4, 19], dtype=np.int64)  # "helloworlds"


@pytest.fixture(scope="module")
def keyed(tiny_repo: Path) -> Iterator[tuple[ServerThread, ServerThread]]:
    """Two replicas of the tiny repository that share a snapshot key."""
    a = ServerThread(make_config(tiny_repo, snapshot_key=KEY)).start()
    b = ServerThread(make_config(tiny_repo, snapshot_key=KEY)).start()
    yield a, b
    a.stop()
    b.stop()


async def _steps(session: StreamSession, ids: np.ndarray) -> list[np.ndarray]:
    """Send one token per chunk; the probabilities after each."""
    out = []
    for token in ids:
        result = await session.step([int(token)])
        assert not result.duplicate and not result.HasField("error")
        out.append(np.array(result.probabilities))
    return out


def _assert_offline(reference: Reference, model: str, ids: np.ndarray, got: list[np.ndarray],
                    version: int = 1) -> None:  # fmt: skip
    _, step_probs = reference.run(model, ids, version)
    np.testing.assert_allclose(np.stack(got), step_probs, atol=1e-5)


def test_a_snapshot_continues_on_another_replica_exactly(
    keyed: tuple[ServerThread, ServerThread], reference: Reference
) -> None:
    a, b = keyed

    async def scenario() -> list[np.ndarray]:
        async with LstmClient(a.address) as ca, LstmClient(b.address) as cb:
            first = await ca.open_session("tiny-lstm", version=2)
            probs = await _steps(first, WORD[:5])
            snap = await first.snapshot()
            assert snap.last_applied_seq == 5 and snap.total_steps == 5 and not snap.final
            await first.end()
            second = await cb.restore_session(snap.data)
            assert second.session_id == first.session_id
            assert second.opened.last_applied_seq == 5 and second.opened.version == 2
            probs += await _steps(second, WORD[5:])
            await second.end()
            return probs

    _assert_offline(reference, "tiny-lstm", WORD, asyncio.run(scenario()), version=2)


def test_restoring_an_older_snapshot_is_refused_and_keeps_the_newer_session_held_here(
    keyed: tuple[ServerThread, ServerThread],
) -> None:
    a, _ = keyed

    async def scenario() -> tuple[grpc.StatusCode, str, pb.SessionOpened]:
        async with LstmClient(a.address) as client:
            session = await client.open_session("tiny-gru", top_k=2)
            await _steps(session, WORD[:2])
            old = (await session.snapshot()).data
            await _steps(session, WORD[2:4])
            await session.close()
            code, details = await _restore_status(a.address, old)
            again = await client.resume_session(session.session_id)
            await again.end()
            return code, details, again.opened

    code, details, opened = asyncio.run(scenario())
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "stale snapshot" in details
    assert opened.last_applied_seq == 4 and opened.total_steps == 4, "the live copy unchanged"
    assert opened.options.top_k == 2, "and its options too"


async def _restore_status(address: str, blob: bytes) -> tuple[grpc.StatusCode, str]:
    async with grpc.aio.insecure_channel(address) as channel:
        from lstmserve.v1 import lstm_serve_pb2_grpc as pb_grpc

        call = pb_grpc.LstmServeStub(channel).Stream()
        await call.write(pb.StreamRequest(restore=pb.RestoreSession(snapshot=blob)))
        try:
            await call.read()
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details() or ""
        raise AssertionError("the restore was accepted")


async def _snapshot_of(address: str, model: str, version: int = 1) -> bytes:
    async with LstmClient(address) as client:
        session = await client.open_session(model, version=version)
        await _steps(session, WORD[:3])
        data = (await session.snapshot()).data
        await session.end()
        return data


def test_a_tampered_snapshot_is_refused(keyed: tuple[ServerThread, ServerThread]) -> None:
    a, b = keyed
    blob = bytearray(asyncio.run(_snapshot_of(a.address, "tiny-gru")))
    blob[-40] ^= 0x10  # a bit of the state
    code, details = asyncio.run(_restore_status(b.address, bytes(blob)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "signature check failed" in details


def test_a_snapshot_signed_with_an_unknown_key_is_refused(
    keyed: tuple[ServerThread, ServerThread], tiny_repo: Path
) -> None:
    _, b = keyed
    stranger = ServerThread(make_config(tiny_repo, snapshot_key=OTHER_KEY)).start()
    try:
        blob = asyncio.run(_snapshot_of(stranger.address, "tiny-gru"))
    finally:
        stranger.stop()
    code, details = asyncio.run(_restore_status(b.address, blob))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "key id 'k9'" in details


def test_a_snapshot_for_a_version_this_replica_does_not_serve_is_refused(
    keyed: tuple[ServerThread, ServerThread], tiny_repo: Path, tmp_path: Path
) -> None:
    a, _ = keyed
    only_v1 = tmp_path / "models"
    shutil.copytree(tiny_repo / "tiny-lstm" / "1", only_v1 / "tiny-lstm" / "1")
    old_fleet = ServerThread(make_config(only_v1, snapshot_key=KEY)).start()
    try:
        blob = asyncio.run(_snapshot_of(a.address, "tiny-lstm", version=2))
        code, details = asyncio.run(_restore_status(old_fleet.address, blob))
    finally:
        old_fleet.stop()
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "'tiny-lstm' version 2" in details and "tiny-lstm@1" in details


def test_snapshots_need_a_configured_key(server: ServerThread) -> None:
    async def scenario() -> grpc.StatusCode:
        async with LstmClient(server.address) as client:
            session = await client.open_session("tiny-gru")
            try:
                await session.snapshot()
            except grpc.aio.AioRpcError as exc:
                assert "--snapshot-key" in (exc.details() or "")
                return exc.code()
            raise AssertionError("a snapshot without a key")

    assert asyncio.run(scenario()) == grpc.StatusCode.FAILED_PRECONDITION


@pytest.fixture(scope="module")
def shared(tiny_repo: Path, redis_url: str) -> Iterator[tuple[ServerThread, ServerThread]]:
    """Two replicas that keep sessions in the same Redis."""
    config = make_config(tiny_repo, snapshot_key=KEY, session_store=redis_url)
    a = ServerThread(config).start()
    b = ServerThread(config).start()
    yield a, b
    a.stop()
    b.stop()


def test_with_a_shared_store_any_replica_resumes_any_session_by_id(
    shared: tuple[ServerThread, ServerThread], reference: Reference
) -> None:
    a, b = shared

    async def scenario() -> list[np.ndarray]:
        async with LstmClient(a.address) as ca, LstmClient(b.address) as cb:
            first = await ca.open_session("tiny-rnn-frames")
            frames = np.random.default_rng(0).normal(size=(7, 5)).astype(np.float32)
            probs = []
            for frame in frames[:4]:
                probs.append(np.array((await first.step(frame[None])).probabilities))
            await first.close()  # the stream breaks; the session lives on in Redis
            second = await cb.resume_session(first.session_id)
            assert second.opened.last_applied_seq == 4 and second.opened.total_steps == 4
            for frame in frames[4:]:
                probs.append(np.array((await second.step(frame[None])).probabilities))
            await second.end()
            _, step_probs = reference.run("tiny-rnn-frames", frames)
            np.testing.assert_allclose(np.stack(probs), step_probs, atol=1e-5)
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                await ca.resume_session(first.session_id)
            assert ended.value.code() == grpc.StatusCode.NOT_FOUND
            return probs

    asyncio.run(scenario())


def test_a_resent_chunk_on_the_other_replica_is_not_applied_twice(
    shared: tuple[ServerThread, ServerThread],
) -> None:
    a, b = shared

    async def scenario() -> None:
        async with LstmClient(a.address) as ca, LstmClient(b.address) as cb:
            first = await ca.open_session("tiny-gru")
            lost = (await _steps(first, WORD[:3]))[-1]  # as if this reply had been lost
            await first.close()
            second = await cb.resume_session(first.session_id)
            call = second._call
            await call.write(pb.StreamRequest(chunk=pb.Chunk(seq=3, input=pb.SequenceInput(
                tokens=pb.TokenIds(ids=[1])))))  # fmt: skip
            reply = await call.read()
            assert reply.chunk.duplicate and reply.chunk.total_steps == 3
            # the last applied chunk's resend carries its original answer, from the other replica
            np.testing.assert_allclose(reply.chunk.probabilities, lost, atol=1e-6)
            await second.close()

    asyncio.run(scenario())


def test_a_stale_copy_never_answers_and_the_client_resumes_the_current_state(
    shared: tuple[ServerThread, ServerThread], reference: Reference
) -> None:
    """A holds the session at seq 2 while B advances it to 3: A must not answer from its copy."""
    a, b = shared

    async def scenario() -> tuple[grpc.StatusCode, list[np.ndarray]]:
        async with LstmClient(a.address) as ca, LstmClient(b.address) as cb:
            on_a = await ca.open_session("tiny-gru")
            probs = await _steps(on_a, WORD[:2])
            on_b = await cb.resume_session(on_a.session_id)
            probs += await _steps(on_b, WORD[2:3])
            await on_b.close()
            call = on_a._call  # A's stream is still attached to its (now stale) copy
            await call.write(pb.StreamRequest(chunk=pb.Chunk(seq=3, input=pb.SequenceInput(
                tokens=pb.TokenIds(ids=[int(WORD[3])])))))  # fmt: skip
            try:
                await call.read()
                raise AssertionError("a stale copy answered")
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
            again = await ca.resume_session(on_a.session_id)  # A fetches the current state
            assert again.opened.last_applied_seq == 3
            probs += await _steps(again, WORD[3:6])
            await again.end()
            return code, probs

    code, probs = asyncio.run(scenario())
    assert code == grpc.StatusCode.ABORTED
    _assert_offline(reference, "tiny-gru", WORD[:6], probs)


def test_a_draining_server_hands_every_multi_session_over_by_final_snapshots(
    keyed: tuple[ServerThread, ServerThread], tiny_repo: Path, reference: Reference
) -> None:
    _, b = keyed
    doomed = ServerThread(make_config(tiny_repo, snapshot_key=KEY)).start()
    words = [WORD[:5], WORD[3:9], WORD[1:4]]

    async def scenario() -> dict[str, list[np.ndarray]]:
        async with LstmClient(doomed.address) as ca, LstmClient(b.address) as cb:
            multi = ca.multi_stream()
            opened = await multi.exchange([MultiStream.open("tiny-gru") for _ in words])
            ids = [r.session_id for r in opened]
            probs: dict[str, list[np.ndarray]] = {i: [] for i in ids}
            for seq in (1, 2):
                entries = [
                    MultiStream.chunk(i, seq, [int(w[seq - 1])])
                    for i, w in zip(ids, words, strict=True)
                ]
                for r in await multi.exchange(entries):
                    probs[r.session_id].append(np.array(r.chunk.probabilities))
            loop = asyncio.get_running_loop()
            stopping = loop.run_in_executor(None, doomed.call, doomed.app.shutdown(5.0))
            with pytest.raises(SessionLost):
                await multi.receive()
            await stopping
            assert set(multi.final_snapshots) == set(ids)
            other = cb.multi_stream()
            back = await other.exchange(
                [MultiStream.restore(multi.final_snapshots[i]) for i in ids]
            )
            assert [r.session_id for r in back] == ids
            assert all(r.opened.last_applied_seq == 2 for r in back)
            for seq in range(3, 6):
                entries = [
                    MultiStream.chunk(i, seq, [int(w[seq - 1])])
                    for i, w in zip(ids, words, strict=True)
                    if len(w) >= seq
                ]
                for r in await other.exchange(entries):
                    probs[r.session_id].append(np.array(r.chunk.probabilities))
            await other.close()
            return {i: probs[i] for i in ids}

    try:
        got = asyncio.run(scenario())
    finally:
        doomed.stop()
    for (session_id, steps), word in zip(got.items(), words, strict=True):
        _assert_offline(reference, "tiny-gru", word[: len(steps)], steps)
        assert session_id


def test_a_session_resumed_on_another_replica_keeps_its_reply_options(
    shared: tuple[ServerThread, ServerThread],
) -> None:
    a, b = shared

    async def scenario() -> pb.SessionOpened:
        async with LstmClient(a.address) as client:
            session = await client.open_session("tiny-gru", top_k=3, every_step=True)
            await session.step([1, 2])
            await session.close()
        async with grpc.aio.insecure_channel(b.address) as channel:
            from lstmserve.v1 import lstm_serve_pb2_grpc as pb_grpc

            call = pb_grpc.LstmServeStub(channel).Stream()
            await call.write(
                pb.StreamRequest(resume=pb.ResumeSession(session_id=session.session_id))
            )
            opened = (await call.read()).opened  # no options sent: the session's own
            call.cancel()
            return opened

    opened = asyncio.run(scenario())
    assert opened.options.top_k == 3 and opened.options.every_step


async def _end_twice(first: str, second: str) -> tuple[pb.SessionResult, pb.SessionResult]:
    """A multi session on `first`: three chunks, `end`; then `end` again on `second` (its
    reply lost with `first`); both results."""
    async with LstmClient(first) as c1, LstmClient(second) as c2:
        m1, m2 = c1.multi_stream(), c2.multi_stream()
        sid = (await m1.exchange([MultiStream.open("tiny-gru", top_k=2)]))[0].session_id
        for seq in (1, 2, 3):
            await m1.exchange([MultiStream.chunk(sid, seq, WORD[seq - 1 : seq])])
        ended = (await m1.exchange([MultiStream.end(sid)]))[0]
        again = (await m2.exchange([MultiStream.end(sid)]))[0]
        chunk = (await m2.exchange([MultiStream.chunk(sid, 4, WORD[3:4])]))[0]
        assert chunk.error.code == "NOT_FOUND", "an ended session takes no chunk"
        await m1.close()
        await m2.close()
        return ended, again


def _assert_answered_again(ended: pb.SessionResult, again: pb.SessionResult) -> None:
    assert ended.WhichOneof("kind") == "ended" and not ended.ended.duplicate
    assert again.WhichOneof("kind") == "ended", again
    assert again.session_id == ended.session_id and again.ended.duplicate
    assert again.ended.total_steps == ended.ended.total_steps == 3
    assert again.ended.last_applied_seq == 3 and again.ended.flushed_steps == 0
    assert list(again.ended.probabilities) == list(ended.ended.probabilities)
    assert len(ended.ended.probabilities) > 0
    assert [t.label for t in again.ended.top] == [t.label for t in ended.ended.top]
    assert len(again.ended.top) == 2


def test_an_end_resent_on_another_replica_is_answered_as_it_ended(
    shared: tuple[ServerThread, ServerThread],
) -> None:
    """The end applied on A, its reply lost with A: B answers the resend from the tombstone
    (the session as it ended), marked duplicate, instead of NOT_FOUND."""
    a, b = shared
    _assert_answered_again(*asyncio.run(_end_twice(a.address, b.address)))


def test_an_end_resent_to_the_same_server_is_answered_as_it_ended(server: ServerThread) -> None:
    """Without a shared store: the server that ended the session answers a resend of its end."""
    _assert_answered_again(*asyncio.run(_end_twice(server.address, server.address)))


def test_an_end_for_a_session_that_never_existed_is_still_not_found(server: ServerThread) -> None:
    async def scenario() -> pb.SessionResult:
        async with LstmClient(server.address) as client:
            multi = client.multi_stream()
            result = (await multi.exchange([MultiStream.end("0" * 32)]))[0]
            await multi.close()
            return result

    assert asyncio.run(scenario()).error.code == "NOT_FOUND"
