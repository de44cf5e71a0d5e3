"""Streaming sessions: a Session owns its transitions; the SessionStore indexes them by id.

A session's progress (state row, seq, settled steps, last result, held text) is written by its own
methods alone: `apply` (a chunk's result, or a message of text that all waits), `restore` (back
to a checkpoint: a strict-mode rollback, a snapshot's progress, a reset) and `close`. Apply and
restore run while the session's lock is held (its caller holds it while its one chunk is
pending); `close` is terminal and may come from outside the lock (a newer copy restored beside
it, idle expiry, a retired version): the batcher then answers the chunk in flight with the close
reason instead of applying it, so no pending chunk is ever left unanswered.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from service import principal
from service.engine.session.decisions import NO_RUN, Run, judge
from service.engine.session.quotas import PrincipalQuota
from service.engine.text.textstream import NOTHING_HELD, HeldChange, HeldText
from service.engine.types import (
    NO_METRICS,
    ChunkOutcome,
    Decision,
    EngineMetrics,
    StepResult,
    StreamOptions,
    probabilities,
)
from service.errors import (
    AttachedElsewhere,
    LstmServeError,
    NotStreamable,
    Overloaded,
    SequenceGap,
    SessionExpired,
    SessionMoved,
    SessionNotFound,
    SessionReplaced,
)
from service.principal import ANONYMOUS

if TYPE_CHECKING:
    from service.engine.model.worker import ModelWorker

__all__ = ["Checkpoint", "Session", "SessionStore", "StreamOptions"]

log = logging.getLogger(__name__)

NO_VALUES = np.zeros(0, dtype=np.float32)  # a session before its first step has none


def new_generation() -> str:
    return secrets.token_hex(8)


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A session's progress at one point: what `Session.restore` sets it to."""

    state: np.ndarray  # (S, H), a copy: the state at the settled point
    last_seq: int
    settled_steps: int
    held: HeldText
    last_result: StepResult | None
    run: Run = NO_RUN  # the decision rule's run at the settled point (decisions.py)
    decision: Decision | None = None


@dataclass(eq=False, slots=True)
class Session:
    """One streaming session: its state row in its version's store and its progress.

    Slotted: 100k idle sessions must cost little beyond their state rows.
    """

    id: str
    model: ModelWorker
    row: int
    options: StreamOptions
    last_used: float
    last_seq: int = 0
    # Steps in the state row: everything fed but the held text's tail, which each reply runs
    # after it as a probe (service/engine/text/textstream.py); `total_steps` counts both.
    settled_steps: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # The reply to the last applied chunk, so a resend of it (a reply lost with a broken
    # connection) can be answered with the original probabilities.
    last_result: StepResult | None = None
    # Why the session is gone (ended, expired, replaced, retired); None while it lives.
    closed: LstmServeError | None = None
    # Streamed text not settled: it may still combine with the next chunk (textstream.py).
    held: HeldText = NOTHING_HELD
    # The principal that opened it: only it can resume, restore or name it (service/principal.py).
    owner: str = ANONYMOUS
    # The stream it is attached to (a token the stream's conversation owns); None: none is.
    attached: object | None = None
    # Which incarnation this is: a new one at open and at every restore from a snapshot, so two
    # copies restored from one snapshot on two replicas are told apart in the shared store.
    generation: str = ""
    # Its decision rule's run at the settled point, and its decision once taken (decisions.py).
    run: Run = NO_RUN
    decision: Decision | None = None

    @property
    def total_steps(self) -> int:
        """Steps the last reply covered: the settled ones and the held text's tail."""
        return self.settled_steps + len(self.held.tail)

    @property
    def ended(self) -> bool:
        return self.closed is not None

    @property
    def expired(self) -> bool:
        return isinstance(self.closed, SessionExpired)

    def check_live(self) -> None:
        """Raise why the session is gone, if it is."""
        if self.closed is not None:
            raise self.closed_error()

    def closed_error(self) -> LstmServeError:
        """A fresh copy of the close reason (each waiter raises its own)."""
        assert self.closed is not None
        return type(self.closed)(*self.closed.args)

    def admit(self, seq: int, attached: object | None, what: str = "chunk") -> ChunkOutcome | None:
        """Whether message `seq` of a stream (`attached`: its token; None for a caller that does
        not attach, such as a unary Triton request) applies: None if it does; the duplicate's
        outcome for a resend; AttachedElsewhere / SequenceGap otherwise. Under the lock."""
        self.check_live()
        self.check_attached(attached)
        if seq <= self.last_seq:
            return self.duplicate(seq)
        if seq != self.last_seq + 1:
            raise SequenceGap(
                f"{what}.seq = {seq}: session {self.id} takes seq {self.last_seq + 1} next "
                f"(the last applied is {self.last_seq}; seqs are consecutive): not applied"
            )
        return None

    def check_attached(self, attached: object | None) -> None:
        """AttachedElsewhere if the stream owning `attached` lost the session to another."""
        if attached is not None and self.attached is not attached:
            raise AttachedElsewhere(
                f"session {self.id} is attached to another stream (resumed or restored there): "
                "this stream's messages are not applied; resume it to take it back"
            )

    def attach(self, token: object | None) -> None:
        """Take the session over for the stream owning `token` (a later attach wins)."""
        if token is not None:
            self.attached = token

    def detach(self, token: object) -> None:
        """The stream owning `token` closed: the session is free to attach."""
        if self.attached is token:
            self.attached = None

    def duplicate(self, seq: int) -> ChunkOutcome:
        """A resend (seq <= last applied): not applied again; the last applied chunk's resend
        gets its original result."""
        result = self.last_result if seq == self.last_seq else None
        return ChunkOutcome(seq, result, True, self.total_steps, len(self.held.text))

    def check_held(self, change: HeldChange) -> None:
        """A text chunk decoded against held text another stream has changed since cannot be
        applied: the client resumes and resends it."""
        if self.held is not change.before:
            raise SessionMoved(
                f"session {self.id} took another chunk of text while this one was decoded "
                "(two streams on one session): resume it and resend"
            )

    def read_state(self) -> np.ndarray:
        """A copy of the state, (S, H)."""
        return self.model.state.read(self.row)

    def apply(
        self, seq: int, change: HeldChange | None, steps: int = 0,
        values: np.ndarray | None = None, rows: np.ndarray | None = None,
    ) -> StepResult:  # fmt: skip
        """Message `seq` is applied: `steps` settled steps (their new state is already in the
        row: the batcher scatters a batch's rows in one write, then applies each session), the
        held text after it (`change`; None: not text, nothing held changes), the reply's
        `values` (C,), the model's outputs as computed (after the held text's tail, if any)
        and, if fetched, `rows`: the outputs after every step run, settled then tail (T, C),
        for the decision rule and the reply's per-step outputs (one per step the reply adds).
        With no outputs (nothing run) the reply carries them as they were (none before the
        first step). The reply owns copies of its rows; only the final outputs are kept for a
        resend (as the contract says: a resend carries no per-step probabilities), so a
        session keeps (C,) floats."""
        kind = self.model.description.output_kind  # what the model's outputs are
        if values is not None:
            final = values.copy()  # (C,)
        else:
            final = self.last_result.values if self.last_result is not None else NO_VALUES
        base = self.settled_steps
        self.settled_steps = total = base + steps
        self.last_seq = seq
        if change is None:  # tokens or frames: nothing held (or held text left as it was)
            added, rewound = steps, 0
            total += len(self.held.tail)
        else:  # the previous reply's tail is taken back but for what this chunk repeats
            self.held, tail = change.after, len(change.after.tail)
            rewound = len(change.before.tail) - change.kept
            total += tail
            added = steps + tail - change.kept
        decision = None
        if rows is not None and self.decision is None and (rule := self.options.decide):
            self.run, decision = judge(rule, self.run, probabilities(rows, kind), steps, base)
            self.decision = decision
        self.last_result = kept = StepResult(final, None, added, total, kind, rewound, decision)
        if rows is None or not self.options.every_step:
            return kept  # the reply and the resend record are the same values
        every = rows[len(rows) - added :].copy()  # (added, C): the steps the reply adds
        return StepResult(final, every, added, total, kind, rewound, decision)

    def checkpoint(self) -> Checkpoint:
        """The session as it is now (a copy of its row): what `restore` brings it back to."""
        return Checkpoint(self.read_state(), self.last_seq, self.settled_steps, self.held,
                          self.last_result, self.run, self.decision)  # fmt: skip

    def restore(self, point: Checkpoint) -> None:
        """The session as of `point`: back to its checkpoint (a save the shared store refused,
        strict mode), or a continued session's progress (a snapshot, the store's newer copy)."""
        self.model.state.write(self.row, point.state)
        self.last_seq, self.settled_steps = point.last_seq, point.settled_steps
        self.held, self.last_result = point.held, point.last_result
        self.run, self.decision = point.run, point.decision

    def reset(self, seq: int) -> None:
        """Zero the state and the step count, as message `seq`."""
        zeros = np.zeros_like(self.model.state.read(self.row))  # (S, H)
        self.restore(Checkpoint(zeros, seq, 0, NOTHING_HELD, None))

    def close(self, reason: LstmServeError) -> bool:
        """Terminal: free the row; every later use (and a chunk in flight) gets `reason`."""
        if self.closed is not None:
            return False
        self.closed = reason
        self.last_result = None
        self.model.release_row(self.row)
        return True


@dataclass(frozen=True, slots=True)
class EndedSession:
    """What a session answered when it ended, kept while its tombstone lives: a resent `end`
    (its reply lost with a replica) is answered from it, not refused as an unknown session."""

    owner: str
    version: int  # its model's version (the model is named by whoever asks)
    total_steps: int
    last_seq: int
    last: StepResult | None  # the classification at the end (none: it never took a step)
    top_k: int
    labels: tuple[str, ...]  # the model's, to name the top labels
    when: float = 0.0  # SessionStore.clock() at the end

    @classmethod
    def of(cls, session: Session, when: float = 0.0) -> EndedSession:
        return cls(session.owner, session.model.version, session.total_steps, session.last_seq,
                   session.last_result, session.options.top_k, session.model.description.labels,
                   when)  # fmt: skip


class SessionStore:
    """Every live session, by id; ids, idle expiry and the session limit. Loop thread only."""

    def __init__(
        self,
        max_sessions: int,
        idle_timeout_s: float,
        expired_memory: int = 10_000,
        initial_capacity: int = 64,
        clock: Callable[[], float] = time.monotonic,
        quota: PrincipalQuota | None = None,
        metrics: EngineMetrics = NO_METRICS,
    ) -> None:
        self.max_sessions = max_sessions
        self.idle_timeout_s = idle_timeout_s
        self.expired_memory = expired_memory
        self.initial_capacity = initial_capacity
        self.clock = clock
        self.quota = quota or PrincipalQuota()
        self._events = metrics.session_events  # (model, event)
        self._sessions: dict[str, Session] = {}
        self._expired: OrderedDict[str, None] = OrderedDict()
        # Ended sessions, for the idle timeout: their snapshots cannot revive them here, and a
        # resent `end` is answered from what they answered.
        self._ended: OrderedDict[str, EndedSession] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, session_id: object) -> bool:
        """Whether the id is held now (without touching or expiring it)."""
        return session_id in self._sessions

    def open(
        self, model: ModelWorker, options: StreamOptions, session_id: str | None = None
    ) -> Session:
        """A new session from a zero state, owned by the caller; NotStreamable / Overloaded
        (the server's or the caller's limit) when it cannot be. Under a given id (a restart
        of a derived id), a copy held here is replaced (its chunk in flight answered ABORTED)
        and the id's expiry and end are forgotten."""
        owner = principal.current()
        existing = self._sessions.get(session_id) if session_id is not None else None
        if existing is None or existing.owner != owner:
            self.quota.check_open(owner)
        if existing is not None:
            self._remove(existing, SessionReplaced(
                f"session {existing.id} was started again: this copy is not continued"
            ))  # fmt: skip
        if session_id is None:
            session_id = secrets.token_hex(16)
        else:
            self._expired.pop(session_id, None)
            self._ended.pop(session_id, None)
        session = self._new_session(model, options, session_id, owner, new_generation())
        self._events.labels(model.name, "opened").inc()
        return session

    def adopt(
        self, model: ModelWorker, options: StreamOptions, session_id: str, owner: str,
        generation: str,
    ) -> Session:  # fmt: skip
        """A fresh session under an id continued from elsewhere (a snapshot, the shared store);
        a copy held here is replaced (its chunk in flight, if any, is answered ABORTED). A
        session new to this replica counts as an open: the owner's quota and open rate."""
        existing = self._sessions.get(session_id)
        if existing is None or existing.owner != owner:
            self.quota.check_open(owner)
        if existing is not None:
            self._remove(existing, SessionReplaced(
                f"session {session_id} was replaced by a newer copy (restored on this server); "
                "resume it to continue from that copy"
            ))  # fmt: skip
        self._expired.pop(session_id, None)
        session = self._new_session(model, options, session_id, owner, generation)
        self._events.labels(model.name, "restored").inc()
        return session

    def _new_session(self, model: ModelWorker, options: StreamOptions, session_id: str,
                     owner: str, generation: str) -> Session:  # fmt: skip
        if not model.description.streamable:
            self._events.labels(model.name, "rejected").inc()
            raise NotStreamable(
                f"model {model.key} is bidirectional (streamable=false): use Classify"
            )
        if len(self._sessions) >= self.max_sessions:
            self._events.labels(model.name, "rejected").inc()
            raise Overloaded(f"the server holds its maximum of {self.max_sessions} sessions")
        session = Session(
            id=session_id, model=model, row=model.allocate_row(), options=options,
            last_used=self.clock(), owner=owner, generation=generation,
        )  # fmt: skip
        self._sessions[session.id] = session
        self.quota.added(owner)
        return session

    def get(self, session_id: str) -> Session:
        """The live session; SessionExpired / SessionNotFound otherwise. Expires lazily."""
        session = self._sessions.get(session_id)
        if session is not None and self._is_idle(session, self.clock()):
            self._expire(session)
            session = None
        if session is None:
            if session_id in self._expired:
                raise SessionExpired(
                    f"session {session_id} expired after {self.idle_timeout_s:g} s idle"
                )  # only ids the server issued are remembered, so this one is short
            raise SessionNotFound(f"session {session_id[:64]!r} does not exist")
        return session

    def peek(self, session_id: str) -> Session | None:
        """The session if held here, without touching or expiring it."""
        return self._sessions.get(session_id)

    def touch(self, session: Session) -> None:
        session.last_used = self.clock()

    def end(self, session: Session, reason: LstmServeError | None = None) -> None:
        """Free the session now (the client ended it, or `reason`)."""
        ended = EndedSession.of(session, self.clock()) if reason is None else None
        if self._remove(session, reason or SessionNotFound(f"session {session.id} has ended")):
            self._events.labels(session.model.name, "ended").inc()
            if ended is not None:  # the client ended it: a tombstone for the idle timeout
                self._ended[session.id] = ended
                self._ended.move_to_end(session.id)
                while len(self._ended) > self.expired_memory:
                    self._ended.popitem(last=False)

    def was_ended(self, session_id: str) -> bool:
        """Whether the session ended here less than the idle timeout ago."""
        return self.ended(session_id) is not None

    def ended(self, session_id: str) -> EndedSession | None:
        """The session as it ended here, less than the idle timeout ago; None otherwise."""
        ended = self._ended.get(session_id)
        if ended is not None and self.clock() - ended.when > self.idle_timeout_s:
            del self._ended[session_id]
            return None
        return ended

    def close_all(self, model: ModelWorker, reason: LstmServeError) -> int:
        """Close every session of one model version (it is being retired); how many."""
        doomed = [s for s in self._sessions.values() if s.model is model]
        for session in doomed:
            self._remove(session, reason)
        return len(doomed)

    def evict_idle(self) -> list[Session]:
        """Free every session idle longer than the timeout (not those mid-chunk)."""
        now = self.clock()
        idle = [s for s in self._sessions.values() if self._is_idle(s, now)]
        for session in idle:
            self._expire(session)
        return idle

    async def run_evictor(self, interval_s: float) -> None:
        """Sweep idle sessions every `interval_s` seconds, forever (cancel to stop)."""
        while True:
            await asyncio.sleep(interval_s)
            for session in self.evict_idle():
                log.info("session expired", extra={"fields": {"model": session.model.key}})

    def _timeout(self, session: Session) -> float:
        """The model's own idle timeout (config.pbtxt's max_sequence_idle_microseconds), else
        the server's."""
        own = session.model.idle_timeout_s
        return self.idle_timeout_s if own is None else own

    def _is_idle(self, session: Session, now: float) -> bool:
        return not session.lock.locked() and now - session.last_used > self._timeout(session)

    def _expire(self, session: Session) -> None:
        reason = SessionExpired(
            f"session {session.id} expired after {self._timeout(session):g} s idle"
        )
        if self._remove(session, reason):
            self._events.labels(session.model.name, "expired").inc()
            self._expired[session.id] = None
            while len(self._expired) > self.expired_memory:
                self._expired.popitem(last=False)

    def _remove(self, session: Session, reason: LstmServeError) -> bool:
        if self._sessions.get(session.id) is not session:
            return False
        del self._sessions[session.id]
        self.quota.removed(session.owner)
        return session.close(reason)
