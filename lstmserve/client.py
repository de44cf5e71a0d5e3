"""The Python client: list models, classify, and streaming sessions that survive broken streams.

    async with LstmClient(["10.0.0.1:8001", "10.0.0.2:8001"]) as client:
        session = await client.open_session("langid-chars", top_k=3)
        for ch in "bonjour":
            result = await session.step(ch)          # or pipeline: send() ... receive()
        await session.end()

Failover: unary calls go to the next address when one is UNAVAILABLE. A session whose stream
breaks continues on the first address that can take it:
  * after a draining server's final snapshot, by restoring that snapshot on the other addresses
    (any replica started with the same --snapshot-key);
  * otherwise by resuming its id, on the same address first, then the others (any replica, with
    a shared --session-store redis://...; only the same server without one).
Chunks sent but not yet answered are resent; the server answers those it had already applied
with `duplicate=true` (no probabilities), so no step is lost or applied twice. If no address can
take the session: SessionLost.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from typing import Any

import grpc
import numpy as np

from lstmserve.v1 import lstm_serve_pb2 as pb
from lstmserve.v1 import lstm_serve_pb2_grpc as pb_grpc

# Stream errors after which the session is continued (resumed) rather than given up. ABORTED:
# another replica advanced the session (shared store); resuming fetches its current state.
RETRYABLE = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.ABORTED,
)

Steps = str | Sequence[int] | np.ndarray | pb.SequenceInput


CLOSE_GRACE_S = 1.0  # how long close() lets the server finish the stream before cancelling


async def _close_call(call: Any) -> None:
    """End a stream cleanly: close the write side and let the server finish (its status OK,
    not CANCELLED, in its metrics); cancel it if it has not within CLOSE_GRACE_S. Replies
    still unread are dropped."""
    try:
        if not call.done():
            async with asyncio.timeout(CLOSE_GRACE_S):
                await call.done_writing()
                while await call.read() is not grpc.aio.EOF:
                    pass
    except (TimeoutError, grpc.aio.AioRpcError, grpc.aio.UsageError):
        pass  # broken or slow: cancelled below
    except asyncio.CancelledError:
        if not _stream_was_cancelled_under_us():
            raise  # this task was cancelled, not just the call
    finally:
        call.cancel()


def _stream_was_cancelled_under_us() -> bool:
    """A read raised CancelledError because the call (not this task) was cancelled."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() == 0


class SessionLost(Exception):
    """The session could not be resumed on any address."""


def to_input(steps: Steps) -> pb.SequenceInput:
    """Text, token ids, or a (T, F) float array of frames -> SequenceInput."""
    if isinstance(steps, pb.SequenceInput):
        return steps
    if isinstance(steps, str):
        return pb.SequenceInput(text=steps)
    array = np.asarray(steps)
    if array.dtype.kind == "f":
        if array.ndim != 2:
            raise ValueError(f"frames must be (T, F), got shape {array.shape}")
        frames = pb.Frames(values=array.ravel().tolist(), frame_count=array.shape[0])
        return pb.SequenceInput(frames=frames)
    return pb.SequenceInput(tokens=pb.TokenIds(ids=[int(x) for x in array.ravel()]))


class LstmClient:
    """Async client over one or more server addresses."""

    def __init__(self, addresses: Sequence[str] | str, timeout_s: float = 30.0) -> None:
        self.addresses = [addresses] if isinstance(addresses, str) else list(addresses)
        if not self.addresses:
            raise ValueError("give at least one address")
        self.timeout_s = timeout_s
        self._index = 0
        self._channels: dict[str, grpc.aio.Channel] = {}

    async def __aenter__(self) -> LstmClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()

    def stub(self, offset: int = 0) -> pb_grpc.LstmServeStub:
        """A stub on the current address (or `offset` addresses further on)."""
        address = self.addresses[(self._index + offset) % len(self.addresses)]
        if address not in self._channels:
            self._channels[address] = grpc.aio.insecure_channel(address)
        return pb_grpc.LstmServeStub(self._channels[address])

    async def _unary(self, method: str, request: Any) -> Any:
        """Call on the current address; on UNAVAILABLE move on to the next, once round."""
        for attempt in range(len(self.addresses)):
            try:
                return await getattr(self.stub(), method)(request, timeout=self.timeout_s)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or attempt == len(self.addresses) - 1:
                    raise
                self._index += 1
        raise AssertionError("unreachable")

    async def list_models(self) -> list[pb.ModelInfo]:
        reply = await self._unary("ListModels", pb.ListModelsRequest())
        return list(reply.models)

    async def get_model(self, name: str, version: int = 0) -> pb.ModelInfo:
        return await self._unary("GetModel", pb.GetModelRequest(name=name, version=version))

    async def classify(
        self,
        model: str,
        sequences: Sequence[Steps],
        version: int = 0,
        step_probabilities: bool = False,
        top_k: int = 1,
    ) -> pb.ClassifyResponse:
        request = pb.ClassifyRequest(
            model=model, version=version, sequences=[to_input(s) for s in sequences],
            step_probabilities=step_probabilities, top_k=top_k,
        )  # fmt: skip
        return await self._unary("Classify", request)

    async def open_session(
        self, model: str, version: int = 0, every_step: bool = False, top_k: int = 1
    ) -> StreamSession:
        options = pb.StreamOptions(every_step=every_step, top_k=top_k)
        first = pb.StreamRequest(open=pb.OpenSession(model=model, version=version, options=options))
        session = StreamSession(self)
        await session.attach(first)
        return session

    def multi_stream(self) -> MultiStream:
        """A StreamMulti call on the current address: many sessions over one stream."""
        return MultiStream(self.stub().StreamMulti())

    async def resume_session(self, session_id: str) -> StreamSession:
        session = StreamSession(self)
        await session.attach(pb.StreamRequest(resume=pb.ResumeSession(session_id=session_id)))
        return session

    async def restore_session(
        self, snapshot: bytes, every_step: bool = False, top_k: int = 1
    ) -> StreamSession:
        """Continue a session from a snapshot (`StreamSession.snapshot()`), on any replica."""
        options = pb.StreamOptions(every_step=every_step, top_k=top_k)
        session = StreamSession(self)
        await session.attach(pb.StreamRequest(restore=_restore(snapshot, options)))
        return session

    def advance(self, offset: int) -> None:
        """Make the address `offset` places on the current one (after a failover)."""
        self._index = (self._index + offset) % len(self.addresses)


class StreamSession:
    """One streaming session: pipelined chunks, in-order replies, resume after a broken stream."""

    def __init__(self, client: LstmClient) -> None:
        self.client = client
        self.opened = pb.SessionOpened()
        self._call: Any = None
        self._pending: deque[pb.StreamRequest] = deque()  # sent, not yet answered
        self._next_seq = 1
        self.final_snapshot: bytes | None = None  # from a draining server, until restored
        self._write_failed = False  # a write on the current call failed

    @property
    def session_id(self) -> str:
        return self.opened.session_id

    @property
    def labels(self) -> list[str]:
        return list(self.opened.labels)

    async def attach(self, first: pb.StreamRequest, offset: int = 0) -> pb.SessionOpened:
        """Start a stream with `first` (open or resume) and read the `opened` reply."""
        self._call = self.client.stub(offset).Stream()
        await self._call.write(first)
        reply = await self._call.read()
        if reply is grpc.aio.EOF:
            raise SessionLost("the server closed the stream before opening the session")
        self.opened = reply.opened
        self._next_seq = max(self._next_seq, self.opened.last_applied_seq + 1)
        return self.opened

    async def send(self, steps: Steps) -> int:
        """Send one chunk without waiting for its reply; returns its seq."""
        seq = self._next_seq
        self._next_seq += 1
        await self._write(pb.StreamRequest(chunk=pb.Chunk(seq=seq, input=to_input(steps))))
        return seq

    async def receive(self) -> pb.StreamResponse:
        """The reply to the oldest unanswered message (resuming the session if needed)."""
        while True:
            if self._call is None:
                await self.reconnect()
                continue
            try:
                reply = await self._call.read()
            except grpc.aio.AioRpcError as exc:
                # INTERNAL after our own write failed is the transport's word for a stream the
                # server had already ended: continue elsewhere like any broken stream.
                if exc.code() not in RETRYABLE and not self._write_failed:
                    raise
                reply = None
            except asyncio.CancelledError:
                if not _stream_was_cancelled_under_us():
                    raise
                reply = None
            if reply is None or reply is grpc.aio.EOF:
                await self.reconnect()
                continue
            if reply.WhichOneof("kind") == "snapshot" and reply.snapshot.final:
                self.final_snapshot = reply.snapshot.data  # unasked: the server is draining
                await self.reconnect()  # at once: the draining server waits for us to go
                continue
            self._pending.popleft()
            return reply

    async def step(self, steps: Steps) -> pb.ChunkResult:
        """Send one chunk and wait for its result."""
        await self.send(steps)
        return (await self.receive()).chunk

    async def reset(self) -> pb.ResetDone:
        seq = self._next_seq
        self._next_seq += 1
        await self._write(pb.StreamRequest(reset=pb.Reset(seq=seq)))
        return (await self.receive()).reset

    async def snapshot(self) -> pb.SessionSnapshot:
        """A signed snapshot of the session after every message sent so far."""
        await self._write(pb.StreamRequest(snapshot=pb.TakeSnapshot()))
        return (await self.receive()).snapshot

    async def end(self) -> pb.SessionEnded:
        await self._write(pb.StreamRequest(end=pb.End()))
        ended = (await self.receive()).ended
        await self.close()
        return ended

    async def close(self) -> None:
        """Close this stream; the session stays on the server (resumable) unless ended."""
        call, self._call = self._call, None
        if call is not None:
            await _close_call(call)

    async def _write(self, request: pb.StreamRequest) -> None:
        self._pending.append(request)
        if self._call is None:
            await self.reconnect()  # resends every pending message, this one included
            return
        try:
            await self._call.write(request)
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
            self._write_failed = True
            # The stream is broken, but replies may still be buffered on it (and a draining
            # server's final snapshot): receive() reads them first, then continues elsewhere
            # and resends what is still unanswered, this message included.
            return

    async def reconnect(self) -> None:
        """Continue the session elsewhere (module docstring), then resend unanswered messages."""
        await self.close()
        addresses = len(self.client.addresses)
        if self.final_snapshot is not None:  # the current server is draining: others first
            first = pb.StreamRequest(restore=_restore(self.final_snapshot, self.opened.options))
            offsets = [*range(1, addresses), 0]
        else:
            first = pb.StreamRequest(resume=pb.ResumeSession(session_id=self.session_id))
            offsets = list(range(addresses))
        last_error: Exception | None = None
        for offset in offsets:
            try:
                await self.attach(first, offset)
            except (grpc.aio.AioRpcError, SessionLost) as exc:
                last_error = exc
                continue
            self.client.advance(offset)
            self.final_snapshot = None
            self._write_failed = False
            for request in self._pending:
                await self._call.write(request)
            return
        raise SessionLost(f"session {self.session_id} could not be continued: {last_error}")


def _restore(snapshot: bytes, options: pb.StreamOptions) -> pb.RestoreSession:
    return pb.RestoreSession(snapshot=snapshot, options=options)


class MultiStream:
    """One StreamMulti call (a gateway's many sessions over one stream): each message carries
    entries for any number of sessions and is answered by one result per entry, in order.

    No automatic resume: the sessions outlive the stream, so after a broken stream open another
    `MultiStream` and resend what was not answered; chunks already applied come back as
    duplicates (by seq). A draining server's last message carries a final snapshot per live
    session (`final_snapshots`): restore them on another replica with `MultiStream.restore`.
    Build entries with the static helpers.

        multi = client.multi_stream()
        opened = await multi.exchange([MultiStream.open("langid-chars") for _ in range(100)])
        ids = [r.session_id for r in opened]
        results = await multi.exchange([MultiStream.chunk(i, 1, "bonjour") for i in ids])
    """

    def __init__(self, call: Any) -> None:
        self._call = call
        self.final_snapshots: dict[str, bytes] = {}  # session id -> snapshot, from a drain

    async def send(self, entries: Sequence[pb.SessionRequest]) -> None:
        """Send one message without waiting for its results (pipelining)."""
        await self._call.write(pb.StreamMultiRequest(entries=entries))

    async def receive(self) -> list[pb.SessionResult]:
        """The results of the oldest unanswered message, one per entry, in entry order."""
        reply = await self._call.read()
        if reply is grpc.aio.EOF:
            raise SessionLost("the server closed the StreamMulti stream")
        results = list(reply.results)
        if results and all(r.WhichOneof("kind") == "snapshot" for r in results):
            self.final_snapshots = {r.session_id: r.snapshot.data for r in results}
            raise SessionLost("the server is draining; restore from final_snapshots elsewhere")
        return results

    async def exchange(self, entries: Sequence[pb.SessionRequest]) -> list[pb.SessionResult]:
        await self.send(entries)
        return await self.receive()

    async def close(self) -> None:
        """Close the stream; its sessions stay on the server until `end` or the idle timeout."""
        await _close_call(self._call)

    @staticmethod
    def open(
        model: str, version: int = 0, every_step: bool = False, top_k: int = 1
    ) -> pb.SessionRequest:
        options = pb.StreamOptions(every_step=every_step, top_k=top_k)
        return pb.SessionRequest(open=pb.OpenSession(model=model, version=version, options=options))

    @staticmethod
    def restore(snapshot: bytes, every_step: bool = False, top_k: int = 1) -> pb.SessionRequest:
        options = pb.StreamOptions(every_step=every_step, top_k=top_k)
        return pb.SessionRequest(restore=_restore(snapshot, options))

    @staticmethod
    def resume(session_id: str) -> pb.SessionRequest:
        return pb.SessionRequest(resume=pb.ResumeSession(session_id=session_id))

    @staticmethod
    def chunk(session_id: str, seq: int, steps: Steps) -> pb.SessionRequest:
        return pb.SessionRequest(
            session_id=session_id, chunk=pb.Chunk(seq=seq, input=to_input(steps))
        )

    @staticmethod
    def reset(session_id: str, seq: int) -> pb.SessionRequest:
        return pb.SessionRequest(session_id=session_id, reset=pb.Reset(seq=seq))

    @staticmethod
    def end(session_id: str) -> pb.SessionRequest:
        return pb.SessionRequest(session_id=session_id, end=pb.End())
