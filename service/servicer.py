"""The LstmServe RPCs: validate, convert (codec), call the engine, convert back."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import Any, TypeVar

import grpc

from lstmserve.v1 import lstm_serve_pb2 as pb
from lstmserve.v1 import lstm_serve_pb2_grpc as pb_grpc
from service import codec, metrics
from service.config import ServerConfig
from service.engine.core import ChunkOutcome, ChunkWork, Engine
from service.engine.sessions import Session
from service.errors import Draining, InvalidInput, LstmServeError, ProtocolError, SessionNotFound
from service.inbox import DRAIN, EOF, Inbox
from service.status import status_code, status_message

log = logging.getLogger(__name__)

T = TypeVar("T")


class LstmServeServicer(pb_grpc.LstmServeServicer):
    """gRPC front of the engine. Every error leaves through `_fail` (service/status.py)."""

    def __init__(self, engine: Engine, config: ServerConfig) -> None:
        self.engine = engine
        self.config = config
        self._inboxes: set[Inbox[Any]] = set()

    def _label(self, name: str) -> str:
        """The model metric label: the name if it is served, else a fixed placeholder."""
        registry = self.engine.registry
        return name if registry is not None and name in registry else metrics.UNKNOWN_MODEL

    async def _unary(
        self, rpc: str, model: str, context: grpc.aio.ServicerContext, work: Awaitable[T]
    ) -> T:
        try:
            reply = await work
        except Exception as exc:
            await self._fail(rpc, model, context, exc)
            raise  # not reached: abort raises
        metrics.REQUESTS.labels(rpc, self._label(model), "OK").inc()
        return reply

    async def _fail(
        self, rpc: str, model: str, context: grpc.aio.ServicerContext, exc: BaseException
    ) -> None:
        code = status_code(exc)
        metrics.REQUESTS.labels(rpc, self._label(model), code.name).inc()
        if not isinstance(exc, LstmServeError):
            log.exception("unexpected error in %s", rpc, exc_info=exc)
        await context.abort(code, status_message(exc))

    # -- unary -------------------------------------------------------------------------------

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        return await self._unary("ListModels", "", context, self._list_models())

    async def _list_models(self) -> pb.ListModelsResponse:
        models = self.engine.models().all()
        return pb.ListModelsResponse(models=[codec.model_info(m) for m in models])

    async def GetModel(
        self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfo:
        return await self._unary("GetModel", request.name, context, self._get_model(request))

    async def _get_model(self, request: pb.GetModelRequest) -> pb.ModelInfo:
        return codec.model_info(self.engine.models().get(request.name, request.version))

    async def Classify(
        self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClassifyResponse:
        return await self._unary("Classify", request.model, context, self._classify(request))

    async def _classify(self, request: pb.ClassifyRequest) -> pb.ClassifyResponse:
        self.engine.check_accepting()
        model = self.engine.models().get(request.model, request.version)
        count, limit = len(request.sequences), self.config.max_classify_sequences
        if count == 0:
            raise InvalidInput("sequences is empty: send at least one sequence")
        if count > limit:
            raise InvalidInput(f"sequences has {count} entries, more than the maximum {limit}")
        desc = model.description
        arrays = [
            codec.decode_input(seq, desc, self.config.max_sequence_steps, f"sequences[{i}]")
            for i, seq in enumerate(request.sequences)
        ]
        results = await self.engine.classify(model, arrays, request.step_probabilities)
        return pb.ClassifyResponse(
            model=desc.name,
            version=desc.version,
            results=[codec.encode_sequence_result(r, desc, request.top_k) for r in results],
        )

    # -- stream ------------------------------------------------------------------------------

    async def Stream(
        self, request_iterator: AsyncIterator[pb.StreamRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamResponse]:
        session: Session | None = None
        model = ""
        inbox = self._open_inbox(request_iterator)
        try:
            while True:
                request = await inbox.next()
                if request is EOF:
                    break
                if request is DRAIN:
                    if session is not None and self.engine.continuity.enabled:
                        yield await self._final_snapshot(session)
                        await inbox.wait_closed(FINAL_MESSAGE_GRACE_S)
                    raise _draining()
                assert isinstance(request, pb.StreamRequest)
                if session is None:
                    session, reply = await self._attach(request)
                    model = session.model.name
                    yield reply
                    continue
                reply = await self._handle(session, request)
                yield reply
                if reply.WhichOneof("kind") == "ended":
                    break
        except asyncio.CancelledError:
            metrics.REQUESTS.labels("Stream", self._label(model), "CANCELLED").inc()
            raise
        except Exception as exc:
            await self._fail("Stream", model, context, exc)
            return
        finally:
            self._close_inbox(inbox)
        metrics.REQUESTS.labels("Stream", self._label(model), "OK").inc()

    def _open_inbox(self, requests: AsyncIterator[T]) -> Inbox[T]:
        inbox = Inbox(requests, self.engine.drain_started)
        self._inboxes.add(inbox)
        return inbox

    def _close_inbox(self, inbox: Inbox[T]) -> None:
        inbox.close()
        self._inboxes.discard(inbox)

    def begin_drain(self) -> None:
        """Wake every stream waiting for its next message, so it sends its final snapshots."""
        for inbox in list(self._inboxes):
            inbox.wake()

    async def _final_snapshot(self, session: Session) -> pb.StreamResponse:
        """The draining server's last message on a stream: the session's snapshot."""
        return pb.StreamResponse(session_id=session.id, snapshot=await self._snapshot(session))

    async def _snapshot(self, session: Session, final: bool = True) -> pb.SessionSnapshot:
        blob = await self.engine.take_snapshot(session, final=final)
        return pb.SessionSnapshot(
            data=blob, last_applied_seq=session.last_seq, total_steps=session.total_steps,
            final=final,
        )  # fmt: skip

    async def _attach(self, request: pb.StreamRequest) -> tuple[Session, pb.StreamResponse]:
        """Open, resume or restore the stream's session from its first message."""
        kind = request.WhichOneof("kind")
        resumed = True
        if kind == "open":
            opts = codec.decode_options(request.open.options)
            session = self.engine.open_session(request.open.model, request.open.version, opts)
            await self.engine.continuity.persist(session)  # resumable elsewhere from the start
            resumed = False
        elif kind == "resume":
            msg = request.resume
            opts = codec.decode_options(msg.options) if msg.HasField("options") else None
            session = await self.engine.resume_session(msg.session_id, opts)
        elif kind == "restore":
            msg = request.restore
            opts = codec.decode_options(msg.options) if msg.HasField("options") else None
            session = await self.engine.restore_session(msg.snapshot, opts)
        else:
            raise ProtocolError(
                f"the first Stream message must be open, resume or restore, not {kind}"
            )
        opened = codec.session_opened(session, resumed, self.config.session_idle_timeout_s)
        return session, pb.StreamResponse(session_id=session.id, opened=opened)

    async def _handle(self, session: Session, request: pb.StreamRequest) -> pb.StreamResponse:
        kind = request.WhichOneof("kind")
        if kind == "chunk":
            return pb.StreamResponse(
                session_id=session.id, chunk=await self._chunk(session, request.chunk)
            )
        if kind == "reset":
            duplicate = await self.engine.reset(session, request.reset.seq)
            done = pb.ResetDone(seq=request.reset.seq, duplicate=duplicate)
            return pb.StreamResponse(session_id=session.id, reset=done)
        if kind == "snapshot":
            snap = await self._snapshot(session, final=False)
            return pb.StreamResponse(session_id=session.id, snapshot=snap)
        if kind == "end":
            await self.engine.end(session)
            ended = pb.SessionEnded(
                total_steps=session.total_steps, last_applied_seq=session.last_seq
            )
            return pb.StreamResponse(session_id=session.id, ended=ended)
        raise ProtocolError(f"a Stream already attached to a session cannot take {kind}")

    async def _chunk(self, session: Session, chunk: pb.Chunk) -> pb.ChunkResult:
        """Apply one chunk; a bad chunk is answered in-band and leaves the session unchanged."""
        desc = session.model.description
        try:
            steps = codec.decode_input(
                chunk.input, desc, self.config.max_chunk_steps, "chunk.input"
            )
            outcome = await self.engine.apply_chunk(session, chunk.seq, steps)
        except InvalidInput as exc:
            metrics.requests("Stream.chunk", desc.name, status_code(exc).name).inc()
            return codec.encode_chunk_error(chunk.seq, exc, session)
        metrics.requests("Stream.chunk", desc.name, "OK").inc()
        return codec.encode_chunk_result(outcome, session)

    # -- stream multi ------------------------------------------------------------------------

    async def StreamMulti(
        self,
        request_iterator: AsyncIterator[pb.StreamMultiRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.StreamMultiResponse]:
        inbox = self._open_inbox(request_iterator)
        used: dict[str, Session] = {}  # live sessions this stream has named, for drain
        try:
            while True:
                request = await inbox.next()
                if request is EOF:
                    break
                if request is DRAIN:
                    if used and self.engine.continuity.enabled:
                        yield await self._final_snapshots(used)
                        await inbox.wait_closed(FINAL_MESSAGE_GRACE_S)
                    raise _draining()
                assert isinstance(request, pb.StreamMultiRequest)
                yield await self._multi(request, used)
        except asyncio.CancelledError:
            metrics.REQUESTS.labels("StreamMulti", metrics.UNKNOWN_MODEL, "CANCELLED").inc()
            raise
        except Exception as exc:
            await self._fail("StreamMulti", "", context, exc)
            return
        finally:
            self._close_inbox(inbox)
        metrics.REQUESTS.labels("StreamMulti", metrics.UNKNOWN_MODEL, "OK").inc()

    async def _final_snapshots(self, used: dict[str, Session]) -> pb.StreamMultiResponse:
        """A draining server's last StreamMulti message: a final snapshot per live session."""
        results = []
        for session_id, session in used.items():
            if session.ended:
                continue
            try:
                snap = await self._snapshot(session)
            except LstmServeError:
                continue  # ended or expired meanwhile: nothing to hand over
            results.append(pb.SessionResult(session_id=session_id, snapshot=snap))
        return pb.StreamMultiResponse(results=results)

    async def _multi(
        self, request: pb.StreamMultiRequest, used: dict[str, Session] | None = None
    ) -> pb.StreamMultiResponse:
        """Answer every entry in place; one session's entries in order, rounds across sessions."""
        entries = request.entries
        limit = self.config.max_multi_entries
        if len(entries) > limit:
            raise InvalidInput(f"entries has {len(entries)} entries, more than the maximum {limit}")
        results: list[pb.SessionResult | None] = [None] * len(entries)
        for indices in _rounds(entries):
            work: list[tuple[int, ChunkWork]] = []
            for i in indices:
                reply = await self._entry(entries[i], i, work)
                if reply is not None:
                    results[i] = reply
            if work:
                outcomes = await self.engine.apply_chunks([w for _, w in work])
                for (i, item), outcome in zip(work, outcomes, strict=True):
                    results[i] = _chunk_reply(item, outcome)
        if used is not None:
            self._note_used(results, used)
        return pb.StreamMultiResponse(results=results)

    def _note_used(
        self, results: Sequence[pb.SessionResult | None], used: dict[str, Session]
    ) -> None:
        """Remember the live sessions a StreamMulti stream has named (final snapshots)."""
        for result in results:
            if result is None or not result.session_id:
                continue
            session = self.engine.store.peek(result.session_id)
            if session is None or result.WhichOneof("kind") == "ended":
                used.pop(result.session_id, None)
            else:
                used[result.session_id] = session

    async def _entry(
        self, entry: pb.SessionRequest, i: int, work: list[tuple[int, ChunkWork]]
    ) -> pb.SessionResult | None:
        """One entry's reply, or None for a valid chunk (added to `work`); errors in-band."""
        kind = entry.WhichOneof("kind")
        session_id = entry.resume.session_id if kind == "resume" else entry.session_id
        try:
            if kind in ("open", "resume", "restore"):
                session, reply = await self._attach(_as_stream_request(entry))
                return pb.SessionResult(session_id=session.id, opened=reply.opened)
            if kind is None:
                raise ProtocolError(f"entries[{i}] is empty: set open, resume, chunk, reset or end")
            if not session_id:
                raise SessionNotFound(f"entries[{i}].session_id is empty ({kind} needs a session)")
            session = await self.engine.find_session(session_id, local_first=kind == "chunk")
            if kind == "chunk":
                return self._decode_chunk(session, entry.chunk, i, work)
            reply = await self._handle(session, _as_stream_request(entry))
        except LstmServeError as exc:
            return pb.SessionResult(session_id=session_id, error=codec.encode_error(exc))
        result = pb.SessionResult(session_id=session.id)
        field = reply.WhichOneof("kind")  # "reset" or "ended": the same names in SessionResult
        getattr(result, field).CopyFrom(getattr(reply, field))
        return result

    def _decode_chunk(
        self, session: Session, chunk: pb.Chunk, i: int, work: list[tuple[int, ChunkWork]]
    ) -> pb.SessionResult | None:
        desc = session.model.description
        field = f"entries[{i}].chunk.input"
        try:
            steps = codec.decode_input(chunk.input, desc, self.config.max_chunk_steps, field)
        except InvalidInput as exc:
            metrics.requests("StreamMulti.chunk", desc.name, status_code(exc).name).inc()
            error = codec.encode_chunk_error(chunk.seq, exc, session)
            return pb.SessionResult(session_id=session.id, chunk=error)
        work.append((i, ChunkWork(session, chunk.seq, steps)))
        return None


# After a draining server's final snapshot(s), how long a stream waits for the client to close
# it (the client continues elsewhere at once) before ending it: a client that writes meanwhile
# would otherwise see its write fail and might lose the unread snapshot.
FINAL_MESSAGE_GRACE_S = 2.0


def _draining() -> Draining:
    return Draining(
        "the server is draining (shutting down): continue the session on another replica from "
        "its final snapshot, or by id with a shared store"
    )


def _as_stream_request(entry: pb.SessionRequest) -> pb.StreamRequest:
    """The Stream message an entry stands for (open, resume, reset or end)."""
    kind = entry.WhichOneof("kind")
    request = pb.StreamRequest()
    getattr(request, kind).CopyFrom(getattr(entry, kind))
    return request


def _rounds(entries: Sequence[pb.SessionRequest]) -> list[list[int]]:
    """Entry indices in rounds: round r holds the r-th entry of every session named."""
    seen: dict[str, int] = {}
    rounds: list[list[int]] = []
    for i, entry in enumerate(entries):
        kind = entry.WhichOneof("kind")
        if kind in ("open", "restore"):
            key = f"{kind}#{i}"  # a session of its own (a restore names it inside the snapshot)
        else:
            key = entry.resume.session_id if kind == "resume" else entry.session_id
        r = seen.get(key, 0)
        seen[key] = r + 1
        if r == len(rounds):
            rounds.append([])
        rounds[r].append(i)
    return rounds


def _chunk_reply(item: ChunkWork, outcome: ChunkOutcome | LstmServeError) -> pb.SessionResult:
    """A chunk entry's result: applied, duplicate, rejected in-band, or the session is gone."""
    session = item.session
    name = session.model.name
    if isinstance(outcome, InvalidInput):
        metrics.requests("StreamMulti.chunk", name, status_code(outcome).name).inc()
        chunk = codec.encode_chunk_error(item.seq, outcome, session)
        return pb.SessionResult(session_id=session.id, chunk=chunk)
    if isinstance(outcome, LstmServeError):
        return pb.SessionResult(session_id=session.id, error=codec.encode_error(outcome))
    metrics.requests("StreamMulti.chunk", name, "OK").inc()
    return pb.SessionResult(
        session_id=session.id, chunk=codec.encode_chunk_result(outcome, session)
    )
