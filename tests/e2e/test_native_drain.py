"""SIGTERM through the native front (native/) ends every Stream and StreamMulti call as the
Python front does, status and message word for word: a call that has sent no message yet (the
server does not know it: the front ends it on the server's drain notice), one opened during
the drain, and one with a message in flight (answered, then its final snapshot, then
UNAVAILABLE). Each front is driven against a server of its own, so that nothing the other
front's calls hold up keeps the server's drain going."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from lstmserve.v1 import lstm_serve_pb2 as pb
from lstmserve.v1 import lstm_serve_pb2_grpc as pb_grpc
from tests.e2e.conftest import ROOT, ServerProcess
from tests.e2e.test_native_front import _blanked
from tests.e2e.test_native_multi import blanked
from tests.integration.conftest import metric, scrape, wait_for
from tests.native_front import NativeFront, binary

DRAINING = (
    grpc.StatusCode.UNAVAILABLE,
    "the server is draining (shutting down): continue the session on another replica from its "
    "final snapshot, or by id with a shared store",
)
FIRST_MESSAGE_GRACE_S = 2.0  # service/protocol/session.py FINAL_MESSAGE_GRACE_S
LANGID = pb.OpenSession(model="langid-chars")
OPEN = pb.StreamRequest(open=LANGID)


@dataclass
class Call:
    """One Stream or StreamMulti call held open until the server ends it: its replies
    (blanked), its status (code, details), and when that came (monotonic seconds)."""

    multi: bool
    replies: list[object] = field(default_factory=list)
    session_ids: list[str] = field(default_factory=list)  # as they came (replies: blanked)
    status: tuple[grpc.StatusCode, str] | None = None
    ended_at: float = 0.0
    more: asyncio.Queue = field(default_factory=asyncio.Queue)
    got: asyncio.Event = field(default_factory=asyncio.Event)  # a reply came

    def send(self, request: object) -> None:
        self.more.put_nowait(request)

    async def run(self, channel: grpc.aio.Channel) -> None:
        async def requests() -> AsyncIterator[object]:  # open until the server ends the call
            while (request := await self.more.get()) is not None:
                yield request

        stub = pb_grpc.LstmServeStub(channel)
        call = (stub.StreamMulti if self.multi else stub.Stream)(requests())
        try:
            async for reply in call:
                ids = [r.session_id for r in reply.results] if self.multi else [reply.session_id]
                self.session_ids += [i for i in ids if i and i not in self.session_ids]
                self.replies.append(blanked(reply) if self.multi else _blanked(reply))
                self.got.set()
        except grpc.aio.AioRpcError as exc:
            self.status = (exc.code(), exc.details())
        else:
            self.status = (await call.code(), await call.details())
        self.ended_at = time.monotonic()

    async def next_reply(self, count: int) -> object:
        """Waits until the call has `count` replies; the last."""
        while len(self.replies) < count:
            self.got.clear()
            await asyncio.wait_for(self.got.wait(), 30)
        return self.replies[count - 1]

    def outcome(self) -> tuple[list[object], tuple[grpc.StatusCode, str] | None]:
        return self.replies, self.status


Scenario = Callable[[str, ServerProcess], Awaitable[dict[str, object]]]


def through(native: bool, tmp_path: Path, scenario: Scenario, run_delay_ms: int = 0) -> dict:
    """`scenario(address, server)` through the Python front or the native front (started by
    hand in front of the server's sockets), against a server of its own."""
    sockets = tmp_path / ("native" if native else "python") / "sockets"
    server = ServerProcess(
        ROOT / "models", "--native-front-dir", str(sockets), "--snapshot-key", "k1:" + "A" * 44,
        "--drain-grace-s", "10", run_delay_ms=run_delay_ms,
    )  # fmt: skip
    front = None
    try:
        server.wait_event("ready", 60)
        address = server.address
        if native:
            front = NativeFront(sockets)
            address = front.address
            url = f"http://127.0.0.1:{server.metrics_port}/metrics"
            # The front links to the server as it starts, before any call sends a message:
            # else a drain could not reach calls that have sent nothing.
            wait_for(lambda: metric(scrape(url), "lstm_serve_native_front_links") == 1,
                     timeout=10, what="the front's link")  # fmt: skip
        return asyncio.run(scenario(address, server))
    finally:
        if front is not None:
            front.stop()
        server.stop()


async def _established(calls: list[Call], channel: grpc.aio.Channel) -> list[asyncio.Task]:
    tasks = [asyncio.create_task(c.run(channel)) for c in calls]
    await asyncio.sleep(0.5)  # the calls reach the server (or the front) before SIGTERM
    return tasks


async def calls_with_no_message(address: str, server: ServerProcess) -> dict[str, object]:
    """A Stream and a StreamMulti call that send nothing; SIGTERM."""
    stream, multi = Call(multi=False), Call(multi=True)
    async with grpc.aio.insecure_channel(address) as channel:
        tasks = await _established([stream, multi], channel)
        signalled = time.monotonic()
        server.terminate()
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
    return {
        "stream": stream.outcome(), "multi": multi.outcome(),
        "stream_after_s": stream.ended_at - signalled, "multi_after_s": multi.ended_at - signalled,
    }  # fmt: skip


def test_calls_with_no_message_end_on_drain_as_on_the_python_front(tmp_path: Path) -> None:
    """Before, such calls got nothing through the front until the front itself stopped. Now
    a StreamMulti call ends UNAVAILABLE with the draining message at once, a Stream call after
    the 2 s it is given to send its first message, through either front."""
    binary()
    python = through(False, tmp_path, calls_with_no_message)
    native = through(True, tmp_path, calls_with_no_message)
    for got in (python, native):
        assert got["stream"] == ([], DRAINING) and got["multi"] == ([], DRAINING)
        assert got["stream_after_s"] >= FIRST_MESSAGE_GRACE_S - 0.1  # from the drain's start
        assert got["multi_after_s"] < got["stream_after_s"]


def message_in_flight(multi: bool) -> Scenario:
    """A Stream (or a StreamMulti) call with a chunk in flight (model runs take 2 s more) when
    SIGTERM comes, and its next chunk sent too; then, while the drain waits for that chunk,
    new calls: a Stream and a StreamMulti that send nothing, a Stream that sends `open` at
    once. (One call with a message in flight: through the front, a second call's message would
    wait for the tick in flight, see docs/NATIVE_FRONT.md "Drain".)"""

    async def scenario(address: str, server: ServerProcess) -> dict[str, object]:
        held = Call(multi=multi)
        idle_stream, idle_multi, opening = Call(multi=False), Call(multi=True), Call(multi=False)
        async with grpc.aio.insecure_channel(address) as channel:
            tasks = [asyncio.create_task(held.run(channel))]
            held.send(_entries(pb.SessionRequest(open=LANGID)) if multi else OPEN)
            await held.next_reply(1)
            for seq, text in ((1, "hello"), (2, "world")):  # 2: read ahead, never applied
                chunk = _chunk(seq, text)
                if multi:
                    held.send(
                        _entries(pb.SessionRequest(session_id=held.session_ids[0], chunk=chunk))
                    )
                else:
                    held.send(pb.StreamRequest(chunk=chunk))
            await asyncio.sleep(0.7)  # the first chunk is in its model run
            server.terminate()
            await asyncio.sleep(0.3)  # the drain has started: it waits for the run
            new = (idle_stream, idle_multi, opening)
            tasks += [asyncio.create_task(c.run(channel)) for c in new]
            opening.send(OPEN)
            await asyncio.wait_for(asyncio.gather(*tasks), 30)
        return {
            "held": held.outcome(), "idle stream": idle_stream.outcome(),
            "idle multi": idle_multi.outcome(), "opening": opening.outcome(),
        }  # fmt: skip

    return scenario


def _entries(*entries: pb.SessionRequest) -> pb.StreamMultiRequest:
    return pb.StreamMultiRequest(entries=list(entries))


def _chunk(seq: int, text: str) -> pb.Chunk:
    return pb.Chunk(seq=seq, input=pb.SequenceInput(text=text))


def _text(seq: int, text: str) -> pb.StreamRequest:
    return pb.StreamRequest(chunk=_chunk(seq, text))


@pytest.mark.parametrize("multi", [False, True], ids=["Stream", "StreamMulti"])
def test_a_message_in_flight_on_drain_is_answered_as_on_the_python_front(
    tmp_path: Path, multi: bool
) -> None:
    """The chunk in flight is answered, then the final snapshot (the chunk read ahead is not
    applied), then UNAVAILABLE; the calls opened during the drain end as those that had sent
    nothing, and a first message then is refused: the same, through either front."""
    binary()
    python = through(False, tmp_path, message_in_flight(multi), run_delay_ms=2000)
    native = through(True, tmp_path, message_in_flight(multi), run_delay_ms=2000)
    assert native == python
    replies, status = python["held"]
    assert len(replies) == 3 and status == DRAINING, replies
    if multi:
        (chunk,), (final,) = replies[1].results, replies[2].results
        chunk, final = chunk.chunk, final.snapshot
    else:
        chunk, final = replies[1].chunk, replies[2].snapshot
    assert chunk.seq == 1 and chunk.steps > 0
    assert final.final and final.last_applied_seq == 1
    assert python["idle stream"] == python["idle multi"] == ([], DRAINING)
    opening = python["opening"]
    assert opening[0] == [] and opening[1][0] == grpc.StatusCode.UNAVAILABLE, opening


def test_the_supervised_front_ends_calls_with_no_message_on_drain(tmp_path: Path) -> None:
    """lstm-serve --native-front: the same as the Python front (the test above) while
    lstm-serve drains, before it stops the front."""
    server = ServerProcess(
        ROOT / "models", "--native-front", "--native-front-bin", str(binary()),
        "--snapshot-key", "k1:" + "A" * 44, "--drain-grace-s", "10",
    )  # fmt: skip
    try:
        server.wait_event("ready", 60)
        got = asyncio.run(calls_with_no_message(server.address, server))
        assert server.proc.wait(30) == 0
    finally:
        server.stop()
    assert got["stream"] == ([], DRAINING) and got["multi"] == ([], DRAINING)
    assert got["stream_after_s"] >= FIRST_MESSAGE_GRACE_S - 0.1
    assert got["multi_after_s"] < got["stream_after_s"]


async def two_calls_in_flight(address: str, server: ServerProcess) -> dict[str, object]:
    """A Stream with a chunk in its model run (2 s more) and a StreamMulti whose chunk comes
    meanwhile; SIGTERM."""
    stream, multi = Call(multi=False), Call(multi=True)
    async with grpc.aio.insecure_channel(address) as channel:
        tasks = [asyncio.create_task(c.run(channel)) for c in (stream, multi)]
        stream.send(OPEN)
        multi.send(_entries(pb.SessionRequest(open=LANGID)))
        await stream.next_reply(1)
        await multi.next_reply(1)
        stream.send(_text(1, "hello"))
        await asyncio.sleep(0.3)  # in its model run: the front's tick is in flight
        chunk = _chunk(1, "bonjour")
        multi.send(_entries(pb.SessionRequest(session_id=multi.session_ids[0], chunk=chunk)))
        await asyncio.sleep(0.4)
        server.terminate()
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
    return {"stream": stream.outcome(), "multi": multi.outcome()}


def test_a_message_waiting_in_the_front_on_drain_is_not_applied(tmp_path: Path) -> None:
    """Through the front, the StreamMulti's chunk waits for the tick in flight (the Stream's):
    the drain starts before lstm-serve has it, so it is not applied and the final snapshot says
    so (last applied 0; the Python front, where each call reads on its own, applies it). The
    Stream's chunk in flight is answered, then its final snapshot."""
    binary()
    got = through(True, tmp_path, two_calls_in_flight, run_delay_ms=2000)
    replies, status = got["stream"]
    assert [r.WhichOneof("kind") for r in replies] == ["opened", "chunk", "snapshot"]
    assert replies[2].snapshot.last_applied_seq == 1 and status == DRAINING
    replies, status = got["multi"]
    assert len(replies) == 2 and status == DRAINING, replies
    (final,) = replies[1].results
    assert final.snapshot.final and final.snapshot.last_applied_seq == 0
    python = through(False, tmp_path, two_calls_in_flight, run_delay_ms=2000)
    (applied,) = python["multi"][0][1].results
    assert (
        applied.chunk.seq == 1 and python["multi"][0][2].results[0].snapshot.last_applied_seq == 1
    )
