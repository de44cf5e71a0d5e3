"""Many sessions over one stream as packed arrays (StreamColumns): a gateway's hot path.

A message opens / resumes sessions (each gets a small per-stream handle), then carries one chunk
for each of any number of them as little-endian arrays (handles, seqs, n + 1 step offsets, the
steps), then ends some. The arrays are read with `numpy.frombuffer` and checked as a whole (a
message whose arrays do not fit together ends the stream, INVALID_ARGUMENT) and per entry with
vectorised checks (seq range, step counts, token ids, finite frames); the valid chunks go to the
engine as one `Engine.apply_chunks` call, so they share batches. A bad entry gets its own error
and leaves the others alone. One model version per stream: the first session attached fixes it,
so the reply's probabilities are one (n, C) array. On drain: the final snapshots of the stream's
live sessions in a last message, then the stream ends (UNAVAILABLE), as StreamMulti does.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field

import numpy as np

from service import metrics
from service.engine.model.worker import ModelWorker
from service.engine.session.sessions import Session
from service.engine.text.textstream import ids_after_held
from service.engine.types import MAX_SEQ, ChunkOutcome, ChunkWork
from service.errors import (
    BudgetExceeded,
    InvalidInput,
    LstmServeError,
    Overloaded,
    ProtocolError,
    SessionNotFound,
)
from service.protocol.inbox import DRAIN, EOF
from service.protocol.messages import SMALL_MESSAGE_BYTES, Ended, Open, Resume, Snapshot
from service.protocol.session import (
    FINAL_MESSAGE_GRACE_S,
    SessionLayer,
    draining_error,
    traced_message,
)
from service.tracing import LSTM_SERVE_SERVICE, NO_REQUEST_SPAN

MAX_HANDLE = 2**32 - 1  # handles are uint32 on the wire; 0 means "none"
RPC = "StreamColumns"
PRUNE_FLOOR = 1024  # the handle table forgets ended / expired sessions once past this size
U32, U64, I64, F32 = np.dtype("<u4"), np.dtype("<u8"), np.dtype("<i8"), np.dtype("<f4")


@dataclass(frozen=True, slots=True)
class ColumnsMessage:
    """One request as the front received it: the packed arrays still bytes."""

    opens: list[Open]
    resumes: list[str]
    handles: bytes = b""
    seqs: bytes = b""
    offsets: bytes = b""
    tokens: bytes = b""
    frames: bytes = b""
    ends: bytes = b""

    def nbytes(self) -> int:
        packed = (self.handles, self.seqs, self.offsets, self.tokens, self.frames, self.ends)
        size = sum(len(b) for b in packed) + sum(len(r) for r in self.resumes)
        return size + SMALL_MESSAGE_BYTES * (1 + len(self.opens))


@dataclass(slots=True)
class ColumnsReply:
    """The answer to one message (or, with `snapshots` alone, a draining server's last)."""

    model: ModelWorker | None  # the stream's model version, once it has one
    fixed: bool = False  # this message fixed the stream's model (its labels go with it)
    attached: list[tuple[int, str] | LstmServeError] = field(default_factory=list)  # handle, id
    probs: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))  # (n, C)
    total_steps: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))  # (n,)
    duplicate: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint8))  # (n,)
    failed: list[tuple[int, LstmServeError]] = field(default_factory=list)  # index order
    ended: list[Ended | LstmServeError] = field(default_factory=list)  # one per end handle
    snapshots: list[tuple[int, Snapshot]] = field(default_factory=list)  # drain only


@dataclass(frozen=True, slots=True)
class Columns:
    """A message's chunk part, decoded: n entries over N steps."""

    handles: np.ndarray  # (n,) uint32
    seqs: np.ndarray  # (n,) uint64
    offsets: np.ndarray  # (n + 1,) int64, from 0 to N, never decreasing
    steps: np.ndarray  # (N,) int64 tokens or (N, F) float32 frames (views of the message)


class ColumnsConversation:
    """Drives one columnar stream: its handle table, its model, its sessions' attachment."""

    def __init__(self, layer: SessionLayer, requests: AsyncIterator[ColumnsMessage],
                 parent: object = None) -> None:  # fmt: skip
        self.layer = layer
        self.parent = parent  # the call's trace context (Tracing.extract), when traced
        self._requests = requests
        self.model: ModelWorker | None = None
        self._sessions: dict[int, Session] = {}  # handle -> session
        self._handle_of: dict[str, int] = {}  # session id -> handle
        self._next_handle, self._prune_at = 1, PRUNE_FLOOR  # the next handle, when to prune
        self.token = object()  # what this stream's sessions are attached to (Session.attach)

    async def replies(self) -> AsyncIterator[ColumnsReply]:
        layer = self.layer
        inbox = layer.open_inbox(self._requests, ColumnsMessage.nbytes)
        try:
            while True:
                message = await inbox.next()
                if message is EOF:
                    return
                if message is DRAIN:
                    if self._sessions and layer.hands_over:
                        yield await self._final_snapshots()
                        await inbox.wait_closed(FINAL_MESSAGE_GRACE_S)
                    raise draining_error()
                span = layer.tracing.rpc(LSTM_SERVE_SERVICE, RPC, self.parent)
                if span is NO_REQUEST_SPAN:  # off, or this message is not sampled
                    yield await self.answer(message)  # type: ignore[arg-type]
                    continue
                async with aclosing(traced_message(span, self.answer(message))) as traced:  # type: ignore[arg-type]
                    async for reply in traced:
                        yield reply
        finally:
            layer.close_inbox(inbox)
            for session in self._sessions.values():
                session.detach(self.token)

    async def answer(self, message: ColumnsMessage) -> ColumnsReply:
        """Opens, resumes, the chunks (one engine call), then ends; errors per entry."""
        fixed_before = self.model is not None
        limit = self.layer.limits.max_multi_entries
        n = _entry_count(message, limit)
        _check_attaches(message, limit)  # before anything is opened
        ends = _array(message.ends, U32, "end").tolist()  # checked before anything is applied
        # With the model known, the whole message is checked before anything is applied.
        columns = unpack(message, n, self.model) if n and self.model is not None else None
        attached: list[tuple[int, str] | LstmServeError] = []
        for i, request in enumerate(message.opens):
            attached.append(await self._attach(request, i))
        for j, session_id in enumerate(message.resumes):
            attached.append(await self._attach(Resume(session_id, None), len(message.opens) + j))
        reply = ColumnsReply(self.model, not fixed_before and self.model is not None, attached)
        if n:
            if self.model is None:
                raise InvalidInput(
                    "handles: chunks before the stream has a model: open or resume a session first"
                )
            if columns is None:  # the first message: its arrays are checked once its model is
                try:
                    columns = unpack(message, n, self.model)
                except LstmServeError:
                    await self._unopen(attached[: len(message.opens)])
                    raise
            await self._chunks(columns, reply)
        for k, handle in enumerate(ends):
            reply.ended.append(await self._end(handle, k))
        self._prune()
        return reply

    # -- attach ---------------------------------------------------------------------------

    async def _attach(self, request: Open | Resume, i: int) -> tuple[int, str] | LstmServeError:
        try:
            if isinstance(request, Open):
                _no_decisions(request.options.decide, f"open[{i}].options")
                request = _on_stream_model(self.model, request, i)
            else:
                session = await self.layer.engine.find_session(request.session_id)
                _check_model(self.model, session.model, f"resume[{i}] (session {session.id})")
                _no_decisions(session.options.decide, f"resume[{i}] (session {session.id})")
            session, _ = await self.layer.attach(request, self.token)
        except LstmServeError as exc:
            return exc
        if self.model is None:
            self.model = session.model
        handle = self._handle_of.get(session.id)
        if handle is None or self._sessions.get(handle) is not session:
            handle = self._issue(session)
        return handle, session.id

    async def _unopen(self, opened: list[tuple[int, str] | LstmServeError]) -> None:
        """A refused message's opens are undone: their ids were never sent to the client."""
        for entry in opened:
            session = None if isinstance(entry, LstmServeError) else self._sessions.get(entry[0])
            if session is not None:
                await self.layer.engine.end(session, self.token)
                self._forget(entry[0])
        if not self._sessions:
            self.model = None

    def _issue(self, session: Session) -> int:
        handle = self._next_handle
        if handle > MAX_HANDLE:
            raise Overloaded("this stream has issued 2^32 - 1 handles: open another stream")
        self._next_handle += 1
        self._sessions[handle] = session
        self._handle_of[session.id] = handle
        return handle

    # -- chunks ---------------------------------------------------------------------------

    async def _chunks(self, columns: Columns, reply: ColumnsReply) -> None:
        """Every valid entry in one engine call; the reply's arrays filled in entry order."""
        assert self.model is not None
        n = len(columns.handles)
        bad = check_entries(columns, self.model, self.layer.limits.max_chunk_steps)
        budget = self.layer.limits.max_request_row_steps
        if int(columns.offsets[-1]) > budget:
            error = BudgetExceeded(
                f"the message has {int(columns.offsets[-1])} steps in all, more than the budget "
                f"of {budget} (--max-request-row-steps): nothing in it was applied"
            )
            bad = dict.fromkeys(range(n), error)
        handles, seqs = columns.handles.tolist(), columns.seqs.tolist()
        offsets, steps = columns.offsets.tolist(), columns.steps
        table, token = self._sessions, self.token
        text = self.model.description.tokenizer is not None  # ids settle held text first
        work: list[ChunkWork] = []
        where: list[int] = []
        for i in range(n):
            if bad and i in bad:
                continue
            session = table.get(handles[i])
            if session is None:
                bad[i] = SessionNotFound(f"handles[{i}] = {handles[i]} is not open on this stream")
                continue
            ids, held = steps[offsets[i] : offsets[i + 1]], None
            if text:
                ids, held = ids_after_held(session.held, ids)
            work.append(ChunkWork(session, seqs[i], ids, held, token))
            where.append(i)
        outcomes = await self.layer.engine.apply_chunks(work) if work else []
        _fill(reply, n, self.model.description.num_classes, where, work, outcomes, bad)
        for i, _ in reply.failed:  # refused before the engine: the session's steps as they are
            known = table.get(handles[i])
            if known is not None and not reply.total_steps[i]:
                reply.total_steps[i] = known.total_steps
        for _, exc in reply.failed:
            metrics.chunk_requests(RPC, self.model.name, exc.code).inc()
        metrics.chunk_requests(RPC, self.model.name, "OK").inc(n - len(reply.failed))

    # -- end, drain -----------------------------------------------------------------------

    async def _end(self, handle: int, k: int) -> Ended | LstmServeError:
        session = self._sessions.get(handle)
        if session is None:
            return SessionNotFound(f"end[{k}] = {handle} is not open on this stream")
        try:
            ended = await self.layer.end(session, self.token)
        except LstmServeError as exc:
            if session.ended:
                self._forget(handle)
            return exc
        self._forget(handle)
        return ended

    def _forget(self, handle: int) -> None:
        session = self._sessions.pop(handle, None)
        if session is not None and self._handle_of.get(session.id) == handle:
            del self._handle_of[session.id]
            session.detach(self.token)

    def _prune(self) -> None:
        """Forget ended / expired sessions once the table grows (amortised: halves the work)."""
        if len(self._sessions) <= self._prune_at:
            return
        for handle in [h for h, s in self._sessions.items() if s.ended]:
            self._forget(handle)
        self._prune_at = max(PRUNE_FLOOR, 2 * len(self._sessions))

    async def _final_snapshots(self) -> ColumnsReply:
        """A draining server's last message: a final snapshot per live session."""
        reply = ColumnsReply(self.model)
        for handle, session in self._sessions.items():
            if session.ended:
                continue
            try:
                snap = await self.layer.snapshot(session, True, self.token)
            except LstmServeError:
                continue  # ended, expired or taken over meanwhile: nothing to hand over
            reply.snapshots.append((handle, snap))
        return reply


def _check_model(mine: ModelWorker | None, model: ModelWorker, what: str) -> None:
    """A session of another version than the stream's (`mine`) is refused."""
    if mine is not None and model is not mine:
        raise ProtocolError(
            f"{what} is on {model.name} v{model.version}: this stream serves {mine.name} "
            f"v{mine.version} (one model version per stream)"
        )


# -- decoding and checks (vectorised; protocol-neutral) ---------------------------------------


def _array(data: bytes, dtype: np.dtype, name: str, count: int | None = None) -> np.ndarray:
    """A packed little-endian field as a read-only array; InvalidInput if its length is off."""
    size = dtype.itemsize
    if len(data) % size:
        raise InvalidInput(
            f"{name} has {len(data)} bytes, not a multiple of {size} ({dtype.name} little-endian)"
        )
    values = np.frombuffer(data, dtype=dtype)
    if count is not None and len(values) != count:
        raise InvalidInput(
            f"{name} has {len(values)} values ({len(data)} bytes), not {count} (handles has "
            f"{count if name != 'offsets' else count - 1} entries)"
        )
    return values


def _no_decisions(rule: object, what: str) -> None:
    """StreamColumns has no field to report a decision in: a session with a rule is refused."""
    if rule is not None:
        raise InvalidInput(
            f"{what}: a session with a decision rule (decide) cannot be on StreamColumns, which "
            "does not report decisions; use Stream or StreamMulti"
        )


def _on_stream_model(model: ModelWorker | None, request: Open, i: int) -> Open:
    """The open on the stream's version (version 0 = the stream's, once it has one)."""
    if model is None:
        return request
    if request.model != model.name or request.version not in (0, model.version):
        raise ProtocolError(
            f"open[{i}] asks for model {request.model[:64]!r} version {request.version}: "
            f"this stream serves {model.name} v{model.version} (one model version per "
            "stream; open other models on another stream)"
        )
    return Open(model.name, model.version, request.options)


def _check_attaches(message: ColumnsMessage, limit: int) -> None:
    attaches = len(message.opens) + len(message.resumes)
    if attaches > limit:
        raise InvalidInput(
            f"opens and resumes name {attaches} sessions, more than the maximum {limit} per "
            "message: nothing in it was applied"
        )


def _entry_count(message: ColumnsMessage, limit: int) -> int:
    n = len(message.handles) // 4
    if len(message.handles) % 4:
        _array(message.handles, U32, "handles")  # raises
    if n > limit:
        raise InvalidInput(f"handles has {n} entries, more than the maximum {limit}")
    if not n and (message.seqs or message.tokens or message.frames or message.offsets.strip(b"\0")):
        raise InvalidInput("handles is empty but seqs, offsets, tokens or frames are set")
    return n


def unpack(message: ColumnsMessage, n: int, model: ModelWorker) -> Columns:
    """The chunk part's arrays, checked to fit together; InvalidInput naming the field."""
    handles = _array(message.handles, U32, "handles", n)
    seqs = _array(message.seqs, U64, "seqs", n)
    offsets = _array(message.offsets, U32, "offsets", n + 1).astype(np.int64)
    if offsets[0] != 0:
        raise InvalidInput(f"offsets[0] = {int(offsets[0])}: the first offset must be 0")
    drops = np.flatnonzero(np.diff(offsets) < 0)
    if drops.size:
        i = int(drops[0])
        raise InvalidInput(
            f"offsets[{i + 1}] = {int(offsets[i + 1])} is less than offsets[{i}] = "
            f"{int(offsets[i])}: offsets never decrease"
        )
    total, desc = int(offsets[-1]), model.description
    if desc.input_kind == "tokens":
        if message.frames:
            raise InvalidInput(f"frames is set: model {desc.name} v{desc.version} takes tokens")
        steps = _array(message.tokens, I64, "tokens")
        if len(steps) != total:
            raise InvalidInput(f"tokens has {len(steps)} ids, offsets[{n}] says {total}")
        return Columns(handles, seqs, offsets, steps)
    if message.tokens:
        raise InvalidInput(f"tokens is set: model {desc.name} v{desc.version} takes frames")
    flat, dim = _array(message.frames, F32, "frames"), desc.feature_dim
    if len(flat) != total * dim:
        raise InvalidInput(
            f"frames has {len(flat)} floats, not offsets[{n}] {total} x feature_dim {dim} = "
            f"{total * dim}"
        )
    return Columns(handles, seqs, offsets, flat.reshape(total, dim))


def check_entries(
    columns: Columns, model: ModelWorker, max_steps: int
) -> dict[int, LstmServeError]:
    """Per-entry problems found without a loop over the entries: seq out of range, no step or
    too many, a handle named twice, a token id out of range, a frame value not finite."""
    desc, bad = model.description, {}
    seqs, offsets, handles = columns.seqs, columns.offsets, columns.handles
    for i in np.flatnonzero((seqs == 0) | (seqs > MAX_SEQ)).tolist():
        bad[i] = InvalidInput(f"seqs[{i}] = {int(seqs[i])}: sequence numbers run from 1 to 2^63")
    lengths = np.diff(offsets)
    for i in np.flatnonzero((lengths == 0) | (lengths > max_steps)).tolist():
        count = int(lengths[i])
        bad.setdefault(i, InvalidInput(
            f"entry {i} (offsets[{i}]..offsets[{i + 1}]) has {count} steps: a chunk has 1 to "
            f"{max_steps}"
        ))  # fmt: skip
    if len(handles) > 1:
        _, first = np.unique(handles, return_index=True)
        if len(first) != len(handles):
            repeated = np.ones(len(handles), dtype=bool)
            repeated[first] = False
            for i in np.flatnonzero(repeated).tolist():
                bad.setdefault(i, InvalidInput(
                    f"handles[{i}] = {int(handles[i])} is named earlier in this message: one "
                    "chunk per session per message"
                ))  # fmt: skip
    steps = columns.steps
    if desc.input_kind == "tokens":
        wrong = np.flatnonzero((steps < 0) | (steps >= desc.vocab_size))
    else:
        wrong = np.flatnonzero(~np.isfinite(steps).all(axis=1))
    if wrong.size:
        entries = np.searchsorted(offsets, wrong, side="right") - 1
        for pos, i in zip(wrong.tolist(), entries.tolist(), strict=True):
            if i not in bad:
                bad[i] = _bad_step(steps, pos, i, int(offsets[i]), desc.vocab_size)
    return bad


def _bad_step(steps: np.ndarray, pos: int, i: int, start: int, vocab: int) -> InvalidInput:
    if steps.ndim == 1:
        return InvalidInput(
            f"tokens[{pos}] = {int(steps[pos])} (entry {i}, step {pos - start}) is out of range "
            f"[0, {vocab})"
        )
    f = int(np.flatnonzero(~np.isfinite(steps[pos]))[0])
    return InvalidInput(
        f"frames: entry {i} step {pos - start} value {f} is {steps[pos, f]} (must be finite)"
    )


def _fill(
    reply: ColumnsReply, n: int, classes: int, where: list[int], work: list[ChunkWork],
    outcomes: list[ChunkOutcome | LstmServeError], bad: dict[int, LstmServeError],
) -> None:  # fmt: skip
    """The reply's (n, C) probabilities, total steps, duplicates and failed entries."""
    probs = np.full((n, classes), np.nan, dtype=np.float32)
    total = np.zeros(n, dtype=np.uint64)
    duplicate = np.zeros(n, dtype=np.uint8)
    rows, values, totals, dups = [], [], [], []
    for i, item, outcome in zip(where, work, outcomes, strict=True):
        if isinstance(outcome, LstmServeError):
            bad[i] = outcome
            totals.append(item.session.total_steps)
            continue
        totals.append(outcome.total_steps)
        if outcome.duplicate:
            dups.append(i)
        result = outcome.result
        if result is not None and result.probs.size:
            rows.append(i)
            values.append(result.probs)
    if where:
        total[where] = totals
    if rows:
        probs[rows] = np.stack(values)
    duplicate[dups] = 1
    reply.probs, reply.total_steps, reply.duplicate = probs, total, duplicate
    reply.failed = sorted(bad.items())
