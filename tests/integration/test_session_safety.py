"""A session id is not a free-for-all: one attached stream at a time, consecutive sequence
numbers, snapshots that cannot be replayed, per-principal limits, sessions owned by their caller.

Real servers on 127.0.0.1 (and a real redis-server where the shared store is the point)."""

from __future__ import annotations

import asyncio
import base64
import contextvars
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest

from lstmserve.v1 import lstm_serve_pb2 as pb
from lstmserve.v1 import lstm_serve_pb2_grpc as pb_grpc
from service import principal
from service.engine.continuity.snapshots import decode_snapshot, encode_snapshot
from tests.integration.conftest import Reference, ServerThread, make_config
from tests.unit.engines import load_engine

KEY = "k1:" + base64.b64encode(b"safety-key-safety-key-safety-key").decode()
MODEL = "tiny-gru"


@pytest.fixture(scope="module")
def keyed(tiny_repo: Path) -> Iterator[ServerThread]:
    server = ServerThread(make_config(tiny_repo, snapshot_key=KEY)).start()
    yield server
    server.stop()


def chunk(seq: int, *ids: int) -> pb.StreamRequest:
    return pb.StreamRequest(chunk=pb.Chunk(seq=seq, input=pb.SequenceInput(
        tokens=pb.TokenIds(ids=list(ids)))))  # fmt: skip


class Stream:
    """One Stream call driven message by message."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.call = pb_grpc.LstmServeStub(channel).Stream()

    async def send(self, request: pb.StreamRequest) -> pb.StreamResponse:
        await self.call.write(request)
        return await self.call.read()

    async def status(self, request: pb.StreamRequest) -> tuple[grpc.StatusCode, str]:
        """The status that ends the stream when it is sent `request`."""
        await self.call.write(request)
        try:
            reply = await self.call.read()
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details() or ""
        raise AssertionError(f"the stream went on: {reply}")


async def opened(channel: grpc.aio.Channel, first: pb.StreamRequest) -> tuple[Stream, str]:
    stream = Stream(channel)
    reply = await stream.send(first)
    return stream, reply.session_id


def open_request() -> pb.StreamRequest:
    return pb.StreamRequest(open=pb.OpenSession(model=MODEL))


def resume_request(session_id: str) -> pb.StreamRequest:
    return pb.StreamRequest(resume=pb.ResumeSession(session_id=session_id))


def restore_request(blob: bytes) -> pb.StreamRequest:
    return pb.StreamRequest(restore=pb.RestoreSession(snapshot=blob))


# -- exclusive attach and consecutive sequence numbers ------------------------------------------


def test_a_second_stream_takes_the_session_over_and_the_first_applies_nothing(
    server: ServerThread, reference: Reference
) -> None:
    async def main() -> tuple[tuple[grpc.StatusCode, str], pb.ChunkResult, pb.ChunkResult]:
        async with grpc.aio.insecure_channel(server.address) as channel:
            first, sid = await opened(channel, open_request())
            await first.send(chunk(1, 1, 2))
            second, _ = await opened(channel, resume_request(sid))
            refused = await first.status(chunk(2, 9, 9))  # the first stream's next message
            applied = (await second.send(chunk(2, 3))).chunk
            again = (await second.send(chunk(3, 4))).chunk
            await second.send(pb.StreamRequest(end=pb.End()))
            return refused, applied, again

    (code, details), applied, again = asyncio.run(main())
    assert code == grpc.StatusCode.ABORTED and "attached to another stream" in details
    assert applied.seq == 2 and not applied.duplicate and not applied.HasField("error")
    assert again.total_steps == 4  # 1, 2 from the first stream, 3, 4 from the second
    expected = reference.run(MODEL, np.array([1, 2, 3, 4]))[0]
    np.testing.assert_allclose(again.probabilities, expected, atol=1e-5)


def test_two_interleaved_writers_lose_nothing_silently(server: ServerThread) -> None:
    """Each writer's chunks are applied or refused with a status, never dropped as
    "duplicates": the steps applied are exactly the chunks answered as applied."""

    async def main() -> tuple[int, int]:
        async with grpc.aio.insecure_channel(server.address) as channel:
            a, sid = await opened(channel, open_request())
            b, _ = await opened(channel, resume_request(sid))
            applied = 0
            for seq in range(1, 21):  # b holds the session: a's writes are all refused
                reply = (await b.send(chunk(seq, 1))).chunk
                applied += 0 if reply.duplicate or reply.HasField("error") else reply.steps
            code, _ = await a.status(chunk(1, 1))
            final = await b.send(pb.StreamRequest(end=pb.End()))
            assert code == grpc.StatusCode.ABORTED
            return applied, final.ended.total_steps

    applied, total = asyncio.run(main())
    assert applied == total == 20


def test_sequence_numbers_must_be_consecutive(server: ServerThread) -> None:
    async def main() -> list[pb.ChunkResult]:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stream, _ = await opened(channel, open_request())
            replies = [(await stream.send(chunk(1, 1))).chunk]
            replies.append((await stream.send(chunk(3, 2))).chunk)  # a gap
            replies.append((await stream.send(chunk(2, 3))).chunk)  # the one that was missing
            replies.append((await stream.send(chunk(1, 4))).chunk)  # below: a duplicate
            await stream.call.write(chunk(2**64 - 1, 5))  # the largest uint64
            replies.append((await stream.call.read()).chunk)
            await stream.send(pb.StreamRequest(end=pb.End()))
            return replies

    first, gap, missing, lower, huge = asyncio.run(main())
    assert first.total_steps == 1
    assert gap.error.code == "FAILED_PRECONDITION" and "takes seq 2 next" in gap.error.message
    assert gap.total_steps == 1, "the gap was not applied"
    assert not missing.HasField("error") and missing.total_steps == 2
    assert lower.duplicate and lower.total_steps == 2 and not lower.probabilities
    assert huge.error.code == "INVALID_ARGUMENT" and "2^63" in huge.error.message


def test_the_client_reuses_a_refused_seq(server: ServerThread) -> None:
    """lstmserve.client: after a chunk refused in-band, the next chunk takes its seq."""
    from lstmserve.client import LstmClient

    async def main() -> pb.ChunkResult:
        async with LstmClient(server.address) as client:
            session = await client.open_session(MODEL)
            await session.step([1])
            assert (await session.step([99])).HasField("error")  # out of the vocabulary
            reply = await session.step([2])
            await session.end()
            return reply

    reply = asyncio.run(main())
    assert reply.seq == 2 and not reply.HasField("error") and reply.total_steps == 2


# -- snapshots that cannot be replayed ---------------------------------------------------------


async def _snapshot_then(address: str, end: bool) -> tuple[str, bytes]:
    async with grpc.aio.insecure_channel(address) as channel:
        stream, sid = await opened(channel, open_request())
        await stream.send(chunk(1, 1, 2))
        snap = (await stream.send(pb.StreamRequest(snapshot=pb.TakeSnapshot()))).snapshot.data
        if end:
            await stream.send(pb.StreamRequest(end=pb.End()))
        else:
            await stream.send(chunk(2, 3))
            await stream.call.done_writing()
        return sid, snap


async def _restore(address: str, blob: bytes) -> tuple[grpc.StatusCode, str]:
    async with grpc.aio.insecure_channel(address) as channel:
        stream = Stream(channel)
        await stream.call.write(restore_request(blob))
        try:
            await stream.call.read()
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details() or ""
        return grpc.StatusCode.OK, ""


def test_a_snapshot_cannot_revive_an_ended_session(keyed: ServerThread) -> None:
    async def main() -> tuple[grpc.StatusCode, str]:
        _, snap = await _snapshot_then(keyed.address, end=True)
        return await _restore(keyed.address, snap)

    code, details = asyncio.run(main())
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "has ended" in details


def test_an_expired_snapshot_is_refused(keyed: ServerThread) -> None:
    async def main() -> tuple[grpc.StatusCode, str]:
        _, snap = await _snapshot_then(keyed.address, end=False)
        keys = keyed.config.snapshot_keys
        assert keys is not None
        old = replace(decode_snapshot(snap, keys), created_at=time.time() - 2 * 86_400)
        return await _restore(keyed.address, encode_snapshot(old, keys))

    code, details = asyncio.run(main())
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "--snapshot-max-age-s" in details


def test_one_snapshot_restored_twice_forks_nothing_with_a_shared_store(
    tiny_repo: Path, redis_url: str
) -> None:
    """With Redis, a snapshot taken over on replica B cannot also be taken over on C."""
    config = make_config(tiny_repo, snapshot_key=KEY, session_store=redis_url)
    a, b, c = (ServerThread(config).start() for _ in range(3))
    try:

        async def main() -> tuple[grpc.StatusCode, grpc.StatusCode, str]:
            _, snap = await _snapshot_then(a.address, end=False)  # a went on to seq 2
            older, _ = await _restore(b.address, snap)  # behind the shared record
            async with grpc.aio.insecure_channel(a.address) as channel:
                stream, _ = await opened(channel, open_request())
                await stream.send(chunk(1, 1))
                now = (await stream.send(pb.StreamRequest(snapshot=pb.TakeSnapshot()))).snapshot
                await stream.call.done_writing()
            first, _ = await _restore(b.address, now.data)  # the latest: taken over on b
            second, details = await _restore(c.address, now.data)  # ... and not again on c
            assert first == grpc.StatusCode.OK
            return older, second, details

        older, second, details = asyncio.run(main())
    finally:
        for server in (a, b, c):
            server.stop()
    assert older == grpc.StatusCode.FAILED_PRECONDITION
    assert second == grpc.StatusCode.FAILED_PRECONDITION and "stale snapshot" in details


def test_an_ended_session_stays_ended_across_replicas_with_a_shared_store(
    tiny_repo: Path, redis_url: str
) -> None:
    config = make_config(tiny_repo, snapshot_key=KEY, session_store=redis_url)
    a, b = (ServerThread(config).start() for _ in range(2))
    try:

        async def main() -> tuple[grpc.StatusCode, str]:
            _, snap = await _snapshot_then(a.address, end=True)
            return await _restore(b.address, snap)

        code, details = asyncio.run(main())
    finally:
        a.stop()
        b.stop()
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "has ended" in details


# -- per-principal limits and ownership --------------------------------------------------------


def test_max_sessions_per_principal_refuses_only_beyond_it(tiny_repo: Path) -> None:
    """Without authentication every caller is one principal: its limit is then global."""
    server = ServerThread(make_config(tiny_repo, max_sessions_per_principal=3)).start()
    try:

        async def main() -> tuple[grpc.StatusCode, str]:
            async with grpc.aio.insecure_channel(server.address) as channel:
                held = [await opened(channel, open_request()) for _ in range(3)]
                fourth = Stream(channel)
                code = await fourth.status(open_request())
                await held[0][0].send(pb.StreamRequest(end=pb.End()))
                _, sid = await opened(channel, open_request())  # one freed: one more
                assert sid
                return code

        code, details = asyncio.run(main())
    finally:
        server.stop()
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "--max-sessions-per-principal" in details and "'anonymous'" in details


def test_a_session_belongs_to_the_principal_that_opened_it(tiny_repo: Path) -> None:
    """The engine under two callers: bob cannot find, resume or restore alice's session (it
    reads as unknown), alice can; alice's limit does not stop bob."""
    from service.engine.continuity.snapshots import SnapshotKeys
    from service.engine.types import StreamOptions
    from service.errors import Overloaded, SessionNotFound

    engine = load_engine(tiny_repo)
    engine.store.quota.max_sessions = 1
    engine.continuity.keys = SnapshotKeys.parse(KEY)

    async def as_(who: str, coro_fn):  # type: ignore[no-untyped-def]
        ctx = contextvars.copy_context()
        ctx.run(principal.CALLER.set, who)
        return await asyncio.get_running_loop().create_task(coro_fn(), context=ctx)

    async def main() -> None:
        mine = await as_("alice", lambda: engine.open_session(MODEL, 0, StreamOptions()))
        assert mine.owner == "alice"
        blob = await as_("alice", lambda: engine.take_snapshot(mine))
        for attempt in (
            lambda: engine.resume_session(mine.id, None),
            lambda: engine.find_session(mine.id, local_first=True),
            lambda: engine.restore_session(blob, None),
        ):
            with pytest.raises(SessionNotFound) as info:
                await as_("bob", attempt)
            assert str(info.value) == f"session {mine.id!r} does not exist"
        assert await as_("alice", lambda: engine.resume_session(mine.id, None)) is mine
        with pytest.raises(Overloaded):
            await as_("alice", lambda: engine.open_session(MODEL, 0, StreamOptions()))
        theirs = await as_("bob", lambda: engine.open_session(MODEL, 0, StreamOptions()))
        assert theirs.owner == "bob"

    try:
        asyncio.run(main())
    finally:
        engine.close()


def test_callers_through_a_server_with_tokens(tiny_repo: Path, tmp_path: Path) -> None:
    """With --auth-tokens: alice's 4th open is refused while bob still opens; bob resuming,
    restoring or naming (StreamMulti) alice's session gets NOT_FOUND, as for an unknown id."""
    from lstmserve.client import LstmClient, MultiStream

    alice_token, bob_token = "alice-" + "a" * 24, "bob-" + "b" * 24
    tokens = tmp_path / "tokens"
    tokens.write_text(f"alice:{alice_token}\nbob:{bob_token}\n")
    config = make_config(tiny_repo, auth_tokens=str(tokens), snapshot_key=KEY,
                         max_sessions_per_principal=3)  # fmt: skip
    server = ServerThread(config).start()

    async def main() -> dict[str, object]:
        seen: dict[str, object] = {}
        async with (
            LstmClient(server.address, token=alice_token, failover_s=0) as alice,
            LstmClient(server.address, token=bob_token, failover_s=0) as bob,
        ):
            mine = [await alice.open_session(MODEL) for _ in range(3)]
            await mine[0].step([1, 2])
            snap = (await mine[0].snapshot()).data
            with pytest.raises(grpc.aio.AioRpcError) as over:
                await alice.open_session(MODEL)
            seen["alice_4th"] = over.value.code()
            theirs = await bob.open_session(MODEL)  # bob's limit is his own
            for name, attempt in (
                ("resume", lambda: bob.resume_session(mine[0].session_id)),
                ("restore", lambda: bob.restore_session(snap)),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await attempt()
                seen[name] = (info.value.code(), info.value.details())
            multi = bob.multi_stream()
            [named] = await multi.exchange([MultiStream.chunk(mine[0].session_id, 2, [3])])
            seen["multi"] = named.error.code
            await multi.close()
            await theirs.end()
            for session in mine:
                await session.end()
        return seen

    try:
        seen = asyncio.run(main())
    finally:
        server.stop()
    assert seen["alice_4th"] == grpc.StatusCode.RESOURCE_EXHAUSTED
    for name in ("resume", "restore"):
        code, details = seen[name]  # type: ignore[misc]
        assert code == grpc.StatusCode.NOT_FOUND and details.endswith("does not exist"), name
    assert seen["multi"] == "NOT_FOUND"


# -- the per-principal quota on every way a session comes to be held here -------------------------


def test_restoring_expired_sessions_counts_against_the_quota(tiny_repo: Path) -> None:
    """Two sessions idle out, two new ones open: their snapshots cannot bring the total to 4."""
    from service.engine.continuity.snapshots import SnapshotKeys
    from service.engine.types import StreamOptions
    from service.errors import Overloaded

    engine = load_engine(tiny_repo)
    engine.store.quota.max_sessions = 2
    engine.continuity.keys = SnapshotKeys.parse(KEY)

    async def main() -> None:
        old = [await engine.open_session(MODEL, 0, StreamOptions()) for _ in range(2)]
        blobs = [await engine.take_snapshot(s) for s in old]
        engine.store.idle_timeout_s = 0.0
        time.sleep(0.01)
        assert len(engine.store.evict_idle()) == 2
        engine.store.idle_timeout_s = 60.0
        for _ in range(2):
            await engine.open_session(MODEL, 0, StreamOptions())
        with pytest.raises(Overloaded, match="--max-sessions-per-principal"):
            await engine.restore_session(blobs[0], None)
        assert len(engine.store) == 2

    try:
        asyncio.run(main())
    finally:
        engine.close()


@pytest.fixture
def fleet_of_two(tiny_repo: Path, redis_url: str) -> Iterator[tuple[ServerThread, ServerThread]]:
    config = make_config(tiny_repo, snapshot_key=KEY, session_store=redis_url,
                         max_sessions_per_principal=1)  # fmt: skip
    a, b = ServerThread(config).start(), ServerThread(config).start()
    yield a, b
    a.stop()
    b.stop()


def test_continuing_another_replica_s_sessions_counts_against_the_quota(
    fleet_of_two: tuple[ServerThread, ServerThread],
) -> None:
    """A resume from the shared store, a Triton START and a Triton request of a sequence started
    elsewhere bring a session to this replica: a principal at its limit here is refused each."""
    import tritonclient.grpc as tc
    from tritonclient.utils import InferenceServerException

    a, b = fleet_of_two
    on_a, on_b = tc.InferenceServerClient(a.address), tc.InferenceServerClient(b.address)

    def tokens(ids: list[int]) -> tc.InferInput:
        inp = tc.InferInput("tokens", [1, len(ids)], "INT64")
        inp.set_data_from_numpy(np.array([ids], dtype=np.int64))
        return inp

    def refused(client: tc.InferenceServerClient, **flags: bool) -> str:
        with pytest.raises(InferenceServerException, match="max-sessions-per-principal") as info:
            client.infer(MODEL, [tokens([3])], sequence_id=70, **flags)
        return str(info.value.status())

    async def main() -> dict[str, object]:
        seen: dict[str, object] = {}
        async with (grpc.aio.insecure_channel(a.address) as chan_a,
                    grpc.aio.insecure_channel(b.address) as chan_b):  # fmt: skip
            first, sid = await opened(chan_a, open_request())  # A: 1 of 1
            on_b_stream, _ = await opened(chan_b, open_request())  # B: 1 of 1
            await first.send(chunk(1, 1, 2))
            seen["resume"] = await Stream(chan_b).status(resume_request(sid))
            seen["start"] = refused(on_a, sequence_start=True)  # A is full
            await first.send(pb.StreamRequest(end=pb.End()))  # A: 0 of 1
            on_a.infer(MODEL, [tokens([1, 2])], sequence_id=70, sequence_start=True)  # A: 1
            seen["continue"] = refused(on_b)  # B still holds its native session
            await on_b_stream.send(pb.StreamRequest(end=pb.End()))  # B: 0 of 1
            seen["after"] = on_b.infer(MODEL, [tokens([3])], sequence_id=70).as_numpy("probs")
        return seen

    try:
        seen = asyncio.run(main())
    finally:
        on_a.close()
        on_b.close()
    code, details = seen["resume"]  # type: ignore[misc]
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-sessions-per-principal" in details
    assert seen["start"] == seen["continue"] == "StatusCode.RESOURCE_EXHAUSTED"
    assert seen["after"].shape == (1, 3)  # type: ignore[union-attr]


def test_stream_columns_opens_count_against_the_quota(tiny_repo: Path) -> None:
    from lstmserve.client import ColumnsRefused, ColumnStream, LstmClient

    server = ServerThread(make_config(tiny_repo, max_sessions_per_principal=3)).start()

    async def main() -> str:
        async with LstmClient(server.address, failover_s=0) as client:
            columns = ColumnStream(client)
            with pytest.raises(ColumnsRefused) as refused:
                await columns.open(MODEL, 5)
            await columns.close()
            return str(refused.value)

    try:
        message = asyncio.run(main())
        assert server.app is not None and len(server.app.engine.store) == 3
    finally:
        server.stop()
    assert "--max-sessions-per-principal" in message
