"""SessionLayer: attach and per-message dispatch for every front, and the drain hand-over.

A front hands it plain requests (service/protocol/messages.py) and encodes the replies. What
ends a stream is raised (the front turns it into a status); what a client can fix and go on
from (a bad chunk) is answered in-band.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from service import metrics
from service.engine.core import Engine
from service.engine.model.worker import ModelWorker
from service.engine.session.sessions import Session
from service.engine.text.inputs import tokens_from_stream
from service.engine.text.textstream import HeldChange, HeldText, held_change, ids_after_held
from service.engine.types import ChunkOutcome
from service.errors import (
    Draining,
    InvalidInput,
    LstmServeError,
    ProtocolError,
    SequenceGap,
    Unavailable,
)
from service.protocol.inbox import Inbox, ReadAhead
from service.protocol.messages import (
    Body,
    Chunk,
    ChunkDone,
    End,
    Ended,
    InputSource,
    Open,
    Opened,
    Request,
    Reset,
    ResetDone,
    Restore,
    Resume,
    Snapshot,
    TakeSnapshot,
)
from service.tracing import NO_TRACING, RequestSpan, Tracing

R = TypeVar("R")

# After a draining server's final snapshot(s), how long a stream waits for the client to close
# it (the client continues elsewhere at once) before ending it: a client that writes meanwhile
# would otherwise see its write fail and might lose the unread snapshot.
FINAL_MESSAGE_GRACE_S = 2.0

KIND_NAMES = {Open: "open", Resume: "resume", Restore: "restore", Chunk: "chunk",
              Reset: "reset", TakeSnapshot: "snapshot", End: "end"}  # fmt: skip


def kind_name(request: object) -> str:
    return KIND_NAMES.get(type(request), type(request).__name__)


@dataclass(frozen=True)
class Limits:
    """The request limits the layer enforces."""

    max_chunk_steps: int = 4096
    max_multi_entries: int = 4096
    max_request_row_steps: int = 1_048_576  # per StreamMulti message, summed over its chunks
    read_ahead_bytes: int = 4 << 20  # read ahead of processing, per stream
    read_ahead_total_bytes: int = 256 << 20  # read ahead of processing, all streams


# A chunk refused with one of these was not applied and leaves its session as it was: answered
# in-band (the client fixes or resends it), on every stream; anything else ends the session's
# part of the conversation (how: the protocol's).
IN_BAND = (InvalidInput, SequenceGap, Unavailable)


def chunk_done(
    session: Session, seq: int, outcome: ChunkOutcome | LstmServeError, rpc: str
) -> ChunkDone:
    """A chunk's in-band reply, counted: applied (or a duplicate), or refused with IN_BAND."""
    if isinstance(outcome, LstmServeError):
        metrics.chunk_requests(rpc, session.model.name, outcome.code).inc()
        return ChunkDone.of(session, seq, None, outcome)
    metrics.chunk_requests(rpc, session.model.name, "OK").inc()
    return ChunkDone.of(session, seq, outcome)


def draining_error() -> Draining:
    return Draining(
        "the server is draining (shutting down): continue the session on another replica from "
        "its final snapshot, or by id with a shared store"
    )


class SessionLayer:
    """The protocol-neutral session operations over one engine; `tracing` is the fronts' (and
    the engine's) tracer (NO_TRACING: off)."""

    def __init__(self, engine: Engine, limits: Limits, tracing: Tracing = NO_TRACING) -> None:
        self.engine = engine
        self.limits = limits
        self.tracing = tracing
        self._inboxes: set[Inbox[Any]] = set()
        self.read_ahead = ReadAhead(limits.read_ahead_bytes, limits.read_ahead_total_bytes)

    # -- attach and dispatch -------------------------------------------------------------------

    async def attach(self, request: Request, token: object | None = None) -> tuple[Session, Opened]:
        """Open, resume or restore a session (a stream's first message, or a multi entry),
        attached to the stream owning `token` (a later attach elsewhere takes it over); the
        session, and the reply."""
        engine = self.engine
        if isinstance(request, Open):
            session = await engine.open_session(
                request.model, request.version, request.options, token
            )
            return session, Opened.of(session, resumed=False)
        if isinstance(request, Resume):
            resumed = await engine.resume_session(request.session_id, request.options, token)
            return resumed, Opened.of(resumed, True)
        if isinstance(request, Restore):
            restored = await engine.restore_session(request.snapshot, request.options, token)
            return restored, Opened.of(restored, True)
        raise ProtocolError(
            f"the first Stream message must be open, resume or restore, not {kind_name(request)}"
        )

    async def handle(
        self, session: Session, request: Request, rpc: str, token: object | None = None
    ) -> Body:
        """One message for a session attached to the stream owning `token`."""
        if isinstance(request, Chunk):
            return await self.chunk(session, request, rpc, "chunk.input", token)
        if isinstance(request, Reset):
            return ResetDone(request.seq, await self.engine.reset(session, request.seq, token))
        if isinstance(request, TakeSnapshot):
            return await self.snapshot(session, False, token)
        if isinstance(request, End):
            return await self.end(session, token)
        raise ProtocolError(
            f"a Stream already attached to a session cannot take {kind_name(request)}"
        )

    async def chunk(
        self, session: Session, chunk: Chunk, rpc: str, field: str, token: object | None = None
    ) -> ChunkDone:
        """Apply one chunk; a bad chunk (bad input, a seq out of order) or one the shared store
        did not take (strict mode: UNAVAILABLE, retry it) is answered in-band and leaves the
        session unchanged."""
        try:
            steps, held = self.decode(session, chunk.input, field)
            outcome = await self.engine.apply_chunk(session, chunk.seq, steps, held, token)
        except IN_BAND as exc:
            return chunk_done(session, chunk.seq, exc, rpc)
        return chunk_done(session, chunk.seq, outcome, rpc)

    def decode(
        self, session: Session, source: InputSource, field: str, text_field: str | None = None
    ) -> tuple[np.ndarray, HeldChange | None]:
        """A chunk's steps; text is tokenized after the session's held text: what can no longer
        change is settled, the rest held (its tail run as a probe, so the reply answers all the
        text sent), the change applied with the chunk."""
        return self.decode_for(session.model, session.held, source, field, text_field)

    def decode_for(
        self, model: ModelWorker, before: HeldText, source: InputSource, field: str,
        text_field: str | None = None,
    ) -> tuple[np.ndarray, HeldChange | None]:  # fmt: skip
        """`decode` for a chunk of `model` after the text `before` (a session about to open:
        nothing). Errors name `field`, and text errors `text_field` (field.text). Token ids,
        after held text, settle it first (nothing may combine with it any more), and count as
        known (text after them is not refused)."""
        desc, max_steps = model.description, self.limits.max_chunk_steps
        text = source.text()
        if text is None:
            steps = source.decode(desc, max_steps, field)
            if desc.tokenizer is None:
                return steps, None  # frames, or a model without text
            return ids_after_held(before, steps)
        label = text_field or f"{field}.text"
        ids, after = tokens_from_stream(desc, before, text, max_steps, label)
        return ids, held_change(before, ids, after)

    async def end(self, session: Session, token: object | None = None) -> Ended:
        """End the session: its last reply already answered all the text sent (nothing runs,
        unless that reply did not: Engine.end)."""
        final, flushed = await self.engine.end(session, token)
        labels, top_k = session.model.description.labels, session.options.top_k
        return Ended(session.total_steps, session.last_seq, final, flushed, labels, top_k)

    async def end_again(self, session_id: str, gone: LstmServeError) -> Ended:
        """A resent `end` of the caller's session that ended already (its reply lost with a
        replica): answered as it was, marked duplicate; `gone` if it did not end."""
        ended = await self.engine.ended_session(session_id)
        if ended is None:
            raise gone
        return Ended(ended.total_steps, ended.last_seq, ended.last, 0, ended.labels, ended.top_k,
                     duplicate=True)  # fmt: skip

    async def snapshot(
        self, session: Session, final: bool, token: object | None = None
    ) -> Snapshot:
        blob = await self.engine.take_snapshot(session, final, token)
        return Snapshot(blob, session.last_seq, session.total_steps, final)

    # -- streams and the drain hand-over -------------------------------------------------------

    def open_inbox(self, requests: AsyncIterator[R], size: Callable[[R], int]) -> Inbox[R]:
        """A stream's inbox; `size` says how many bytes a request holds (read-ahead bounds)."""
        inbox = Inbox(requests, self.engine.drain_started, self.read_ahead, size)
        self._inboxes.add(inbox)
        return inbox

    def close_inbox(self, inbox: Inbox[Any]) -> None:
        inbox.close()
        self._inboxes.discard(inbox)

    def begin_drain(self) -> None:
        """Wake every stream waiting for its next message, so it sends its final snapshots."""
        for inbox in list(self._inboxes):
            inbox.wake()

    @property
    def hands_over(self) -> bool:
        """Whether a draining server sends final snapshots (snapshots are configured)."""
        return self.engine.continuity.enabled


def _accepted(reply: object) -> LstmServeError | None:
    return None


async def traced_message(
    span: RequestSpan, answer: Awaitable[R],
    refusal: Callable[[R], LstmServeError | None] = _accepted,
) -> AsyncIterator[R]:  # fmt: skip
    """One message of a stream in its sampled `span` (Tracing.rpc; an unsampled message gets
    NO_REQUEST_SPAN and is answered as if tracing were off): `answer` runs with the span
    current, the reply is handed over in its `reply` span, and the span ends OK or with the
    code of an in-band `refusal`. Run it under `aclosing`."""
    try:
        with span.active():
            reply = await answer
        with span.reply():
            yield reply
    except BaseException as exc:
        span.fail(exc)
        raise
    error = refusal(reply)
    if error is None:
        span.finish()
    else:
        span.finish(error.code, type(error).__name__)
