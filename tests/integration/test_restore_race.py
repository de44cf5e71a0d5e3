"""Failing over twice: a newer snapshot restored beside an older copy with a chunk in flight.

Replica B restores an older snapshot of a session, a chunk goes in flight on it (B's model runs
are slowed: ServerThread's run_delay_s), then a newer snapshot of the same session is restored
on B. The chunk in flight must be answered at once (ABORTED: replaced by a newer copy), on
Stream and on StreamMulti, and the newer copy goes on exactly.
"""

from __future__ import annotations

import asyncio
import base64
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from lstmserve.client import LstmClient
from lstmserve.v1 import lstm_serve_pb2 as pb
from lstmserve.v1 import lstm_serve_pb2_grpc as pb_grpc
from tests.integration.conftest import ServerThread, make_config

KEY = "k1:" + base64.b64encode(b"restore-race-key-shared-by-both").decode()
DELAY_MS = 1500


@pytest.fixture(scope="module")
def replicas(
    tiny_repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerThread, ServerThread]]:
    repo = tmp_path_factory.mktemp("race-models")
    shutil.copytree(tiny_repo / "tiny-gru", repo / "tiny-gru")  # one model: one slow warm-up
    a = ServerThread(make_config(repo, snapshot_key=KEY)).start()
    b = ServerThread(make_config(repo, snapshot_key=KEY), run_delay_s=DELAY_MS / 1000).start()
    yield a, b
    a.stop()
    b.stop()


async def two_snapshots(address: str) -> tuple[bytes, bytes]:
    """Snapshots of one session on replica A after 1 and after 3 chunks."""
    async with LstmClient(address) as client:
        session = await client.open_session("tiny-gru")
        await session.step([1])
        older = (await session.snapshot()).data
        await session.step([2])
        await session.step([3])
        newer = (await session.snapshot()).data
        await session.close()
        return older, newer


def chunk(seq: int, token: int) -> pb.Chunk:
    return pb.Chunk(seq=seq, input=pb.SequenceInput(tokens=pb.TokenIds(ids=[token])))


async def restore(stub: pb_grpc.LstmServeStub, blob: bytes) -> tuple[object, pb.SessionOpened]:
    call = stub.Stream()
    await call.write(pb.StreamRequest(restore=pb.RestoreSession(snapshot=blob)))
    return call, (await call.read()).opened


def test_a_stream_chunk_in_flight_is_answered_when_a_newer_copy_is_restored(
    replicas: tuple[ServerThread, ServerThread],
) -> None:
    a, b = replicas

    async def scenario() -> None:
        older, newer = await two_snapshots(a.address)
        async with grpc.aio.insecure_channel(b.address) as channel:
            stub = pb_grpc.LstmServeStub(channel)
            old_call, opened = await restore(stub, older)
            assert opened.last_applied_seq == 1
            await old_call.write(pb.StreamRequest(chunk=chunk(2, 2)))  # in flight on B
            await asyncio.sleep(DELAY_MS / 4000)
            new_call, reopened = await restore(stub, newer)
            assert reopened.last_applied_seq == 3
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                async with asyncio.timeout(DELAY_MS / 1000 + 1):
                    await old_call.read()
            assert time.monotonic() - started < DELAY_MS / 1000 + 1
            assert raised.value.code() == grpc.StatusCode.ABORTED
            assert "replaced by a newer copy" in (raised.value.details() or "")
            await new_call.write(pb.StreamRequest(chunk=chunk(4, 4)))
            reply = (await new_call.read()).chunk
            assert reply.seq == 4 and reply.total_steps == 4 and not reply.HasField("error")
            new_call.cancel()

    asyncio.run(scenario())


def test_a_multi_entry_in_flight_is_answered_and_does_not_stall_its_message(
    replicas: tuple[ServerThread, ServerThread],
) -> None:
    a, b = replicas

    async def scenario() -> None:
        older, newer = await two_snapshots(a.address)
        _, other_newer = await two_snapshots(a.address)
        async with grpc.aio.insecure_channel(b.address) as channel:
            stub = pb_grpc.LstmServeStub(channel)
            multi = stub.StreamMulti()
            await multi.write(pb.StreamMultiRequest(entries=[
                pb.SessionRequest(restore=pb.RestoreSession(snapshot=older)),
                pb.SessionRequest(restore=pb.RestoreSession(snapshot=other_newer)),
            ]))  # fmt: skip
            restored = (await multi.read()).results
            sid, other = restored[0].session_id, restored[1].session_id
            await multi.write(pb.StreamMultiRequest(entries=[
                pb.SessionRequest(session_id=sid, chunk=chunk(2, 2)),
                pb.SessionRequest(session_id=other, chunk=chunk(4, 4)),
            ]))  # fmt: skip
            await asyncio.sleep(DELAY_MS / 4000)
            new_call, _ = await restore(stub, newer)
            async with asyncio.timeout(DELAY_MS / 1000 + 1):
                replaced, fine = (await multi.read()).results
            assert replaced.session_id == sid and replaced.WhichOneof("kind") == "error"
            assert replaced.error.code == "ABORTED" and "newer copy" in replaced.error.message
            assert fine.session_id == other and fine.chunk.total_steps == 4
            new_call.cancel()
            await multi.done_writing()

    asyncio.run(scenario())
