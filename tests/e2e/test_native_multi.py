"""StreamMulti through the native front (native/, terminated there, answered a tick at a time by
the same MultiConversation as the Python front): every reply and status is the Python front's,
for the same conversation on the same lstm-serve process."""

from __future__ import annotations

import asyncio
import functools
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from lstmserve.v1 import lstm_serve_pb2 as pb
from lstmserve.v1 import lstm_serve_pb2_grpc as pb_grpc
from tests.e2e.conftest import ROOT, ServerProcess, drain_side_by_side, held_open
from tests.native_front import NativeFront, binary

TOKENS = {"alice": "native-multi-alice", "bob": "native-multi-bob"}
ALICE = (("authorization", f"Bearer {TOKENS['alice']}"),)
BOB = (("authorization", f"Bearer {TOKENS['bob']}"),)
MULTI = "/lstmserve.v1.LstmServe/StreamMulti"

# A step: (which of the conversation's calls, what it sends given the session ids seen so far).
Step = tuple[int, Callable[[list[str]], list[pb.StreamMultiRequest]]]


@pytest.fixture(scope="module")
def fronts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, Path]]:
    """(the Python front's address, the native front's, the sockets' folder), one lstm-serve
    process behind both."""
    binary()
    folder = tmp_path_factory.mktemp("native-multi")
    tokens = folder / "tokens"
    tokens.write_text("".join(f"{who}:{token}\n" for who, token in TOKENS.items()))
    server = ServerProcess(
        ROOT / "models", "--native-front-dir", str(folder / "sockets"),
        "--auth-tokens", str(tokens), "--snapshot-key", "k1:" + "A" * 44,
        "--max-multi-entries", "8",
    )  # fmt: skip
    server.wait_event("ready", 60)
    front = NativeFront(folder / "sockets")
    yield server.address, front.address, folder / "sockets"
    front.stop()
    server.stop()


def entry(session_id: str = "", **kind: object) -> pb.SessionRequest:
    return pb.SessionRequest(session_id=session_id, **kind)  # type: ignore[arg-type]


def text(session_id: str, seq: int, value: str) -> pb.SessionRequest:
    return entry(session_id, chunk=pb.Chunk(seq=seq, input=pb.SequenceInput(text=value)))


def ids(session_id: str, seq: int, values: list[int]) -> pb.SessionRequest:
    chunk = pb.Chunk(seq=seq, input=pb.SequenceInput(tokens=pb.TokenIds(ids=values)))
    return entry(session_id, chunk=chunk)


def frames(session_id: str, seq: int, values: np.ndarray) -> pb.SessionRequest:
    flat = pb.SequenceInput(frames=pb.Frames(values=values.ravel().tolist()))
    return entry(session_id, chunk=pb.Chunk(seq=seq, input=flat))


def message(*entries: pb.SessionRequest) -> list[pb.StreamMultiRequest]:
    return [pb.StreamMultiRequest(entries=list(entries))]


LANGID = pb.OpenSession(model="langid-chars", options=pb.StreamOptions(top_k=3))
VOWELS = pb.OpenSession(model="speaker-vowels", options=pb.StreamOptions(every_step=True))
SID = re.compile("[0-9a-f]{32}")


def blanked(reply: pb.StreamMultiResponse) -> pb.StreamMultiResponse:
    """Session ids and snapshot bytes blanked (random per session)."""
    for result in reply.results:
        result.session_id = "S" if result.session_id else ""
        if result.HasField("opened"):
            result.opened.session_id = "S"
        if result.HasField("snapshot"):
            result.snapshot.data = b"D"
        if result.HasField("error"):
            result.error.message = SID.sub("S", result.error.message)
        if result.HasField("chunk") and result.chunk.HasField("error"):
            result.chunk.error.message = SID.sub("S", result.chunk.error.message)
    return reply


async def converse(address: str, steps: list[Step], calls: int = 1,
                   metadata: tuple = ALICE) -> list[list[object]]:  # fmt: skip
    """Runs `steps` in order over `calls` concurrent StreamMulti calls (each step's messages
    sent at once, then as many replies awaited); per call: its replies (blanked), then its
    status (code, details)."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.LstmServeStub(channel)
        queues: list[asyncio.Queue[pb.StreamMultiRequest | None]] = [
            asyncio.Queue() for _ in range(calls)
        ]

        def requests(queue: asyncio.Queue) -> object:
            async def gen():  # open until the step list closes it
                while (request := await queue.get()) is not None:
                    yield request

            return gen()

        streams = [stub.StreamMulti(requests(q), metadata=metadata) for q in queues]
        readers = [s.__aiter__() for s in streams]
        got: list[list[object]] = [[] for _ in range(calls)]
        ended = [False] * calls
        seen: list[str] = []
        for which, make in steps:
            sent = make(seen)
            for request in sent:
                queues[which].put_nowait(request)
            for _ in sent:
                if ended[which]:
                    break
                try:
                    reply = await asyncio.wait_for(readers[which].__anext__(), 30)
                except (StopAsyncIteration, grpc.aio.AioRpcError):
                    ended[which] = True
                    break
                for result in reply.results:
                    if result.HasField("opened") and result.session_id not in seen:
                        seen.append(result.session_id)
                got[which].append(blanked(reply))
        for which, queue in enumerate(queues):
            queue.put_nowait(None)
            if not ended[which]:
                try:
                    async for reply in readers[which]:
                        got[which].append(blanked(reply))
                except grpc.aio.AioRpcError:
                    pass
            got[which].append((await streams[which].code(), await streams[which].details()))
        return got


def snapshot(address: str) -> bytes:
    """A langid-chars session's snapshot after one chunk (taken on `Stream`)."""

    async def main() -> bytes:
        async with grpc.aio.insecure_channel(address) as channel:
            requests = [
                pb.StreamRequest(open=pb.OpenSession(model="langid-chars")),
                pb.StreamRequest(chunk=pb.Chunk(seq=1, input=pb.SequenceInput(text="salut"))),
                pb.StreamRequest(snapshot=pb.TakeSnapshot()),
            ]
            call = pb_grpc.LstmServeStub(channel).Stream(iter(requests), metadata=ALICE)
            replies = [r async for r in call]
        return replies[-1].snapshot.data

    return asyncio.run(main())


def both(fronts: tuple[str, str, Path], make: Callable[[], list[Step]], calls: int = 1,
         metadata: tuple = ALICE) -> tuple[list[list[object]], list[list[object]]]:  # fmt: skip
    python, native, _ = fronts
    expected = asyncio.run(converse(python, make(), calls, metadata))
    return expected, asyncio.run(converse(native, make(), calls, metadata))


def full_conversation(blob: bytes) -> list[Step]:
    """Open (two models, a failed open, an empty entry), chunks in rounds (text, frames, token
    ids), an unknown session, no session id, a duplicate, a gap, a bad id, reset, end twice,
    resume, restore, and chunks on the restored session."""
    rng = np.random.default_rng(3)
    one, two = (rng.normal(size=(n, 12)).astype(np.float32) for n in (2, 3))
    return [
        (0, lambda s: message(entry(open=LANGID), entry(open=VOWELS),
                              entry(open=pb.OpenSession(model="nope")), entry())),
        (0, lambda s: message(text(s[0], 1, "hello wor"), text(s[0], 2, "ld, cafe\u0301 e"),
                              frames(s[1], 1, one), frames(s[1], 2, two),
                              text("f" * 32, 1, "x"), text("", 1, "x"))),
        (0, lambda s: message(text(s[0], 2, "again"), text(s[0], 5, "gap"),
                              ids(s[0], 3, [1, 10**9]), entry(s[0], reset=pb.Reset(seq=3)),
                              text(s[0], 4, "bonjour"), entry(s[1], end=pb.End()))),
        (0, lambda s: message(entry(s[1], end=pb.End()),
                              entry(resume=pb.ResumeSession(session_id=s[0])),
                              entry(restore=pb.RestoreSession(snapshot=blob)),
                              ids(s[0], 5, [1, 2, 3]))),
        (0, lambda s: message(text(s[2], 2, " tout le monde"), entry(s[0], end=pb.End()))),
    ]  # fmt: skip


def test_a_full_conversation_is_answered_as_by_the_python_front(fronts) -> None:
    python, _, _ = fronts
    expected, got = both(fronts, lambda: full_conversation(snapshot(python)))
    assert got == expected  # every field, probabilities to the bit
    replies = got[0]
    assert len(replies) == 6 and replies[-1] == (grpc.StatusCode.OK, "")
    assert [r.WhichOneof("kind") for r in replies[0].results] == ["opened", "opened", "error",
                                                                  "error"]  # fmt: skip
    assert replies[1].results[4].error.code == "NOT_FOUND"
    assert replies[3].results[2].opened.resumed and replies[4].results[0].chunk.total_steps > 5


def test_many_concurrent_multi_streams_get_the_python_fronts_replies(fronts) -> None:
    """32 StreamMulti calls at once through the front (their messages share ticks and batched
    runs): each gets what one call gets through the Python front."""
    python, native, _ = fronts

    def steps() -> list[Step]:
        return [*full_conversation(b"")[:3], (0, lambda s: message(entry(s[0], end=pb.End())))]

    async def main() -> tuple[list[list[object]], list[list[list[object]]]]:
        expected = await converse(python, steps())
        got = await asyncio.gather(*(converse(native, steps()) for _ in range(32)))
        return expected, got

    expected, got = asyncio.run(main())
    assert len(expected[0]) == 5 and all(g == expected for g in got)


def test_stream_multi_is_terminated_by_the_front_not_passed_through(fronts) -> None:
    """Each StreamMulti message goes to lstm-serve in a tick (the front counts them on exit),
    not through the pass-through."""
    python, _, folder = fronts
    front = NativeFront(folder)
    try:
        steps: list[Step] = [
            (0, lambda s: message(entry(open=LANGID))),
            (0, lambda s: [*message(text(s[0], 1, "a")), *message(text(s[0], 2, "b"))]),
        ]
        got = asyncio.run(converse(front.address, steps))
    finally:
        last = json.loads(front.stop().strip().splitlines()[-1])
    assert got == asyncio.run(converse(python, steps))
    assert last["event"] == "stopped" and last["messages"] == 3 and last["ticks"] >= 2


def test_pipelined_messages_and_streams_naming_one_session(fronts) -> None:
    """A call's messages sent at once are answered in order; a session one call holds is
    refused (ABORTED, in-band) to another call until that call resumes it; the first call then
    reads it attached elsewhere, while its other session goes on."""

    def steps() -> list[Step]:
        return [
            (0, lambda s: message(entry(open=LANGID), entry(open=LANGID))),
            (0, lambda s: [*message(text(s[0], 1, "one")), *message(text(s[0], 2, "two")),
                           *message(text(s[0], 3, "three"), text(s[1], 1, "x")),
                           *message(text(s[0], 3, "three"))]),
            (1, lambda s: message(text(s[0], 4, "taken?"))),
            (1, lambda s: message(entry(resume=pb.ResumeSession(session_id=s[0])),
                                  text(s[0], 4, "taken"))),
            (0, lambda s: message(text(s[0], 5, "mine?"), text(s[1], 2, "y"))),
        ]  # fmt: skip

    expected, got = both(fronts, steps, calls=2)
    assert got == expected
    first, second = got
    assert [r.results[0].chunk.seq for r in first[1:5]] == [1, 2, 3, 3]
    assert first[4].results[0].chunk.duplicate
    assert second[0].results[0].error.code == "ABORTED"  # attached to the other call
    assert second[1].results[0].opened.resumed and second[1].results[1].chunk.seq == 4
    assert first[5].results[0].error.code == "ABORTED"  # taken over by the other call
    assert first[5].results[1].chunk.seq == 2 and not first[5].results[1].chunk.HasField("error")
    assert first[-1] == second[-1] == (grpc.StatusCode.OK, "")


@pytest.mark.parametrize("case", ["too-many-entries", "no-token", "malformed"])
def test_statuses_that_end_the_stream_are_the_python_fronts(fronts, case: str) -> None:
    if case == "malformed":
        python, native, _ = fronts
        assert malformed(native) == malformed(python)
        assert malformed(native)[0] == grpc.StatusCode.INVALID_ARGUMENT
        return
    too_many = [entry(open=LANGID)] * 9  # --max-multi-entries 8
    steps: list[Step] = [
        (0, lambda s: message(entry(open=LANGID))),
        (0, lambda s: message(*too_many)),
    ]
    metadata = () if case == "no-token" else ALICE
    expected, got = both(fronts, lambda: steps, metadata=metadata)
    assert got == expected
    code = (
        grpc.StatusCode.UNAUTHENTICATED if case == "no-token" else grpc.StatusCode.INVALID_ARGUMENT
    )
    assert got[0][-1][0] == code


def malformed(address: str) -> tuple[object, ...]:
    """A StreamMulti message whose bytes do not parse."""

    async def main() -> tuple[object, ...]:
        async with grpc.aio.insecure_channel(address) as channel:
            method = channel.stream_stream(MULTI, request_serializer=lambda b: b,
                                           response_deserializer=lambda b: b)  # fmt: skip
            call = method(iter([b"\x0a\xff\xff"]), metadata=ALICE)
            try:
                replies = [r async for r in call]
            except grpc.aio.AioRpcError as exc:
                return exc.code(), exc.details()
            return "replies", replies

    return asyncio.run(main())


def test_another_principals_session_reads_unknown(fronts) -> None:
    """bob names alice's session: NOT_FOUND in-band, as on the Python front; alice resumes it."""
    python, native, _ = fronts

    async def main(address: str) -> list[object]:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.LstmServeStub(channel)
            call = stub.StreamMulti(iter(message(entry(open=LANGID))), metadata=ALICE)
            (reply,) = [r async for r in call]
        session_id = reply.results[0].session_id
        outcomes: list[object] = []
        for who in (BOB, ALICE):
            steps: list[Step] = [
                (0, lambda s: message(text(session_id, 1, "hi"),
                                      entry(resume=pb.ResumeSession(session_id=session_id))))
            ]  # fmt: skip
            outcomes.append(await converse(address, steps, metadata=who))
        return outcomes

    expected, got = asyncio.run(main(python)), asyncio.run(main(native))
    assert got == expected
    bob, alice = got
    assert [r.error.code for r in bob[0][0].results] == ["NOT_FOUND", "NOT_FOUND"]
    assert alice[0][0].results[1].opened.resumed


def test_drain_sends_the_final_snapshots_as_the_python_front_does(tmp_path: Path) -> None:
    """SIGTERM: each multi stream, through either front, gets after the replies to what it
    sent one last message with the final snapshot of each live session it named, then
    UNAVAILABLE; a stream whose sessions all ended gets none, only UNAVAILABLE."""

    async def hold(which: int, address: str, ready: asyncio.Event, got: list[object]) -> None:
        send, requests = held_open(message(*[entry(open=LANGID)] * (2 if which == 0 else 1)))
        async with grpc.aio.insecure_channel(address) as channel:
            call = pb_grpc.LstmServeStub(channel).StreamMulti(requests)
            try:
                async for reply in call:
                    sids = [r.session_id for r in reply.results]
                    got.append(blanked(reply))
                    if len(got) == 1 and which == 0:
                        send(message(text(sids[0], 1, "abc"), text(sids[1], 1, "d"),
                                     text(sids[1], 2, "ef"))[0])  # fmt: skip
                    elif len(got) == 1:
                        send(message(entry(sids[0], end=pb.End()))[0])
                    elif len(got) == 2:
                        ready.set()
            except grpc.aio.AioRpcError as exc:
                got.append(exc.code())

    plan = [("python", 0), ("native", 0), ("python", 1), ("native", 1)]
    calls = [(front, functools.partial(hold, which)) for front, which in plan]
    python, native, python_ended, native_ended = drain_side_by_side(tmp_path, calls)
    assert native == python and native_ended == python_ended
    snaps = [r.snapshot for r in python[2].results]
    assert [(s.final, s.last_applied_seq) for s in snaps] == [(True, 1), (True, 2)]
    assert python[-1] == grpc.StatusCode.UNAVAILABLE and len(python) == 4
    assert len(python_ended) == 3 and python_ended[-1] == grpc.StatusCode.UNAVAILABLE
