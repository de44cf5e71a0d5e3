"""Many sessions over one stream: each message's entries in rounds, answered in entry order.

Round r holds the r-th entry of every session named, so one session's entries apply in order
while different sessions' chunks share batched runs. Session-level problems are answered
in-band per entry; the stream goes on. On drain: a final snapshot of every live session the
stream has named, then the stream ends (UNAVAILABLE).

Both fronts run the same rules here: the grpc.aio front drives `replies` over the stream's
requests; the native front's ticks (service/protocol/native.py) call `answer_traced` per
message, `last_message` on drain and `close` when the client stream ends.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing

from service.engine.session.sessions import Session
from service.engine.types import ChunkOutcome, ChunkWork
from service.errors import (
    BudgetExceeded,
    InvalidInput,
    LstmServeError,
    ProtocolError,
    SessionNotFound,
)
from service.protocol.inbox import DRAIN, EOF
from service.protocol.messages import (
    Chunk,
    End,
    Ended,
    Failed,
    MultiReply,
    Open,
    Reply,
    Restore,
    Resume,
    SessionEntry,
    Unset,
    entries_bytes,
)
from service.protocol.session import (
    FINAL_MESSAGE_GRACE_S,
    IN_BAND,
    SessionLayer,
    chunk_done,
    draining_error,
    kind_name,
    traced_message,
)
from service.tracing import LSTM_SERVE_SERVICE, NO_REQUEST_SPAN

RPC = "StreamMulti"
PRUNE_FLOOR = 1024  # a stream remembers this many sessions before it forgets the gone ones


class MultiConversation:
    """Drives one multi-session stream."""

    def __init__(self, layer: SessionLayer,
                 requests: AsyncIterator[list[SessionEntry]] | None = None,
                 parent: object = None) -> None:  # fmt: skip
        self.layer = layer
        self.parent = parent  # the call's trace context (Tracing.extract), when traced
        self._requests = requests
        self._used: dict[str, Session] = {}  # live sessions this stream named, for drain
        self._prune_at = PRUNE_FLOOR  # forget ended / expired ones once it grows past this
        # What the sessions it opens, resumes or names are attached to (Session.attach).
        self.token = object()

    async def replies(self) -> AsyncIterator[MultiReply]:
        """The replies to the stream's requests (the grpc.aio front)."""
        layer = self.layer
        assert self._requests is not None
        inbox = layer.open_inbox(self._requests, entries_bytes)
        try:
            while True:
                entries = await inbox.next()
                if entries is EOF:
                    return
                if entries is DRAIN:
                    last = await self.last_message()
                    if last is not None:
                        yield last
                        await inbox.wait_closed(FINAL_MESSAGE_GRACE_S)
                    raise draining_error()
                span = layer.tracing.rpc(LSTM_SERVE_SERVICE, RPC, self.parent)
                if span is NO_REQUEST_SPAN:  # off, or this message is not sampled
                    yield await self.answer(entries)  # type: ignore[arg-type]
                    continue
                async with aclosing(traced_message(span, self.answer(entries))) as traced:  # type: ignore[arg-type]
                    async for reply in traced:
                        yield reply
        finally:
            layer.close_inbox(inbox)
            self.close()

    async def answer_traced(self, entries: Sequence[SessionEntry]) -> MultiReply:
        """`answer`, in the message's span when tracing samples it (the native front)."""
        span = self.layer.tracing.rpc(LSTM_SERVE_SERVICE, RPC, self.parent)
        if span is NO_REQUEST_SPAN:
            return await self.answer(entries)
        async with aclosing(traced_message(span, self.answer(entries))) as traced:
            (reply,) = [reply async for reply in traced]  # run whole: the span ends OK
        return reply

    async def last_message(self) -> MultiReply | None:
        """A draining server's last message on the stream: the final snapshots of the live
        sessions it named (with --snapshot-key), or None when there is nothing to hand over."""
        if self._used and self.layer.hands_over:
            return await self._final_snapshots()
        return None

    def close(self) -> None:
        """The stream is over: the sessions it named are detached from it."""
        for session in self._used.values():
            session.detach(self.token)

    async def answer(self, entries: Sequence[SessionEntry]) -> MultiReply:
        """One reply per entry, in entry order."""
        limit = self.layer.limits.max_multi_entries
        if len(entries) > limit:
            raise InvalidInput(f"entries has {len(entries)} entries, more than the maximum {limit}")
        refused = self._over_budget(entries)
        if refused is not None:
            return MultiReply([Reply(e.session_id, Failed(refused)) for e in entries])
        replies: list[Reply | None] = [None] * len(entries)
        for indices in rounds(entries):
            work: list[tuple[int, ChunkWork]] = []
            for i in indices:
                replies[i] = await self._entry(entries[i], i, work)
            if work:
                outcomes = await self.layer.engine.apply_chunks([w for _, w in work])
                for (i, item), outcome in zip(work, outcomes, strict=True):
                    replies[i] = _chunk_reply(item, outcome)
        done = [r for r in replies if r is not None]
        self._note_used(done)
        return MultiReply(done)

    def _over_budget(self, entries: Sequence[SessionEntry]) -> BudgetExceeded | None:
        """The message's chunks, summed, against --max-request-row-steps (before any work)."""
        total = sum(e.request.input.steps_hint() for e in entries if isinstance(e.request, Chunk))
        budget = self.layer.limits.max_request_row_steps
        if total <= budget:
            return None
        return BudgetExceeded(
            f"the message's chunks have {total} steps in all, more than the budget of {budget} "
            "(--max-request-row-steps): nothing in it was applied; send its chunks in several "
            "messages"
        )

    async def _entry(
        self, entry: SessionEntry, i: int, work: list[tuple[int, ChunkWork]]
    ) -> Reply | None:
        """One entry's reply, or None for a valid chunk (added to `work`); errors in-band."""
        request, session_id = entry.request, entry.session_id
        layer = self.layer
        try:
            if isinstance(request, Open | Resume | Restore):
                _, opened = await layer.attach(request, self.token)
                return Reply(opened.session_id, opened)
            if isinstance(request, Unset):
                raise ProtocolError(f"entries[{i}] is empty: set {request.expected}")
            if not session_id:
                raise SessionNotFound(
                    f"entries[{i}].session_id is empty ({kind_name(request)} needs a session)"
                )
            chunk = isinstance(request, Chunk)
            try:
                session = await layer.engine.find_session(session_id, local_first=chunk)
            except SessionNotFound as gone:
                if not isinstance(request, End):
                    raise
                return Reply(session_id, await layer.end_again(session_id, gone))
            if isinstance(request, Chunk):
                return self._decode_chunk(session, request, i, work)
            if session.attached is None:
                session.attach(self.token)  # naming a free session attaches it
            body = await layer.handle(session, request, RPC, self.token)
        except LstmServeError as exc:
            return Reply(session_id, Failed(exc))
        return Reply(session.id, body)

    def _decode_chunk(
        self, session: Session, chunk: Chunk, i: int, work: list[tuple[int, ChunkWork]]
    ) -> Reply | None:
        field = f"entries[{i}].chunk.input"
        try:
            steps, held = self.layer.decode(session, chunk.input, field)
        except InvalidInput as exc:
            return Reply(session.id, chunk_done(session, chunk.seq, exc, RPC))
        if session.attached is None:
            session.attach(self.token)  # naming a free session attaches it
        work.append((i, ChunkWork(session, chunk.seq, steps, held, self.token)))
        return None

    def _note_used(self, replies: Sequence[Reply]) -> None:
        """Remember the live sessions this stream has named (for final snapshots)."""
        store = self.layer.engine.store
        for reply in replies:
            if not reply.session_id:
                continue
            session = store.peek(reply.session_id)
            if session is None or isinstance(reply.body, Ended):
                self._used.pop(reply.session_id, None)
            else:
                self._used[reply.session_id] = session
        if len(self._used) > self._prune_at:  # amortised: each prune at least halves the work
            self._used = {sid: s for sid, s in self._used.items() if not s.ended}
            self._prune_at = max(PRUNE_FLOOR, 2 * len(self._used))

    async def _final_snapshots(self) -> MultiReply:
        """A draining server's last message: a final snapshot per live session."""
        replies = []
        for session_id, session in self._used.items():
            if session.ended:
                continue
            try:
                snap = await self.layer.snapshot(session, True, self.token)
            except LstmServeError:
                continue  # ended or expired meanwhile: nothing to hand over
            replies.append(Reply(session_id, snap))
        return MultiReply(replies)


def rounds(entries: Sequence[SessionEntry]) -> list[list[int]]:
    """Entry indices in rounds: round r holds the r-th entry of every session named."""
    seen: dict[str, int] = {}
    result: list[list[int]] = []
    for i, entry in enumerate(entries):
        request = entry.request
        if isinstance(request, Open | Restore):
            key = f"{kind_name(request)}#{i}"  # a session of its own
        elif isinstance(request, Resume):
            key = request.session_id
        else:
            key = entry.session_id
        r = seen.get(key, 0)
        seen[key] = r + 1
        if r == len(result):
            result.append([])
        result[r].append(i)
    return result


def _chunk_reply(item: ChunkWork, outcome: ChunkOutcome | LstmServeError) -> Reply:
    """A chunk entry's reply: applied, duplicate, rejected in-band, or the session is gone."""
    session = item.session
    if isinstance(outcome, LstmServeError) and not isinstance(outcome, IN_BAND):
        return Reply(session.id, Failed(outcome))
    return Reply(session.id, chunk_done(session, item.seq, outcome, RPC))
