"""Streaming sessions: ids, per-model-version state slabs [capacity, S, H], idle expiry, limits."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from service import metrics
from service.engine.registry import LoadedModel
from service.errors import NotStreamable, Overloaded, SessionExpired, SessionNotFound

if TYPE_CHECKING:
    from service.engine.batcher import StepResult

log = logging.getLogger(__name__)


class StateSlab:
    """The float32 states of one model version's sessions, one row [S, H] per session.

    One array for all sessions, so a batch of sessions is gathered / scattered with one
    vectorised numpy indexing op. Grows by doubling up to `max_capacity` rows.
    """

    def __init__(self, rows: int, hidden: int, capacity: int, max_capacity: int) -> None:
        capacity = max(1, min(capacity, max_capacity))
        self.states = np.zeros((capacity, rows, hidden), dtype=np.float32)  # (N, S, H)
        self.max_capacity = max_capacity
        self._free: list[int] = list(range(capacity - 1, -1, -1))
        self.used = 0

    @property
    def capacity(self) -> int:
        return int(self.states.shape[0])

    @property
    def allocated_bytes(self) -> int:
        return int(self.states.nbytes)

    @property
    def used_bytes(self) -> int:
        return self.used * int(self.states[0].nbytes)

    def allocate(self) -> int:
        """A zeroed row for a new session."""
        if not self._free:
            self._grow()
        row = self._free.pop()
        self.states[row] = 0.0
        self.used += 1
        return row

    def release(self, row: int) -> None:
        self._free.append(row)
        self.used -= 1

    def gather(self, rows: Sequence[int]) -> np.ndarray:
        """A copy of the rows' states, (B, S, H)."""
        return self.states[np.asarray(rows, dtype=np.intp)]

    def scatter(self, rows: Sequence[int], states: np.ndarray) -> None:
        """Write (B, S, H) states back into the rows."""
        self.states[np.asarray(rows, dtype=np.intp)] = states

    def _grow(self) -> None:
        old = self.capacity
        new = min(old * 2, self.max_capacity)
        if new <= old:
            raise Overloaded(f"state slab is full ({old} sessions)")
        grown = np.zeros((new, *self.states.shape[1:]), dtype=np.float32)  # (N', S, H)
        grown[:old] = self.states
        self.states = grown
        self._free.extend(range(new - 1, old - 1, -1))


@dataclass(frozen=True)
class StreamOptions:
    """Per-session reply options."""

    every_step: bool = False
    top_k: int = 1


@dataclass(eq=False, slots=True)
class Session:
    """One streaming session: its state row in its model version's slab and its progress.

    Slotted: 100k idle sessions must cost little beyond their state rows.
    """

    id: str
    model: LoadedModel
    slab: StateSlab
    row: int
    options: StreamOptions
    last_used: float
    last_seq: int = 0
    total_steps: int = 0
    ended: bool = False
    expired: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # The reply to the last applied chunk, so a resend of it (a reply lost with a broken
    # connection) can be answered with the original probabilities.
    last_result: StepResult | None = None

    def read_state(self) -> np.ndarray:
        """A copy of the state, (S, H)."""
        return self.slab.states[self.row].copy()

    def write_state(self, state: np.ndarray) -> None:
        self.slab.states[self.row] = state


class SessionStore:
    """Every live session, by id. Used from the event loop thread only."""

    def __init__(
        self,
        max_sessions: int,
        idle_timeout_s: float,
        expired_memory: int = 10_000,
        initial_capacity: int = 64,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_sessions = max_sessions
        self.idle_timeout_s = idle_timeout_s
        self.expired_memory = expired_memory
        self.initial_capacity = initial_capacity
        self.clock = clock
        self._sessions: dict[str, Session] = {}
        self._expired: OrderedDict[str, None] = OrderedDict()
        self._slabs: dict[str, StateSlab] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, session_id: object) -> bool:
        """Whether the id is held now (without touching or expiring it)."""
        return session_id in self._sessions

    def open(self, model: LoadedModel, options: StreamOptions) -> Session:
        """A new session from a zero state; NotStreamable / Overloaded when it cannot be."""
        session = self._new_session(model, options, secrets.token_hex(16))
        metrics.SESSION_EVENTS.labels(model.name, "opened").inc()
        return session

    def adopt(
        self, model: LoadedModel, options: StreamOptions, session_id: str, state: np.ndarray,
        last_seq: int, total_steps: int,
    ) -> Session:  # fmt: skip
        """A session continued from elsewhere (a snapshot, the shared store), under its own id."""
        existing = self._sessions.get(session_id)
        if existing is not None:
            self._remove(existing)
        self._expired.pop(session_id, None)
        session = self._new_session(model, options, session_id)
        session.write_state(state)
        session.last_seq, session.total_steps = last_seq, total_steps
        metrics.SESSION_EVENTS.labels(model.name, "restored").inc()
        return session

    def _new_session(self, model: LoadedModel, options: StreamOptions, session_id: str) -> Session:
        if not model.description.streamable:
            metrics.SESSION_EVENTS.labels(model.name, "rejected").inc()
            raise NotStreamable(
                f"model {model.key} is bidirectional (streamable=false): use Classify"
            )
        if len(self._sessions) >= self.max_sessions:
            metrics.SESSION_EVENTS.labels(model.name, "rejected").inc()
            raise Overloaded(f"the server holds its maximum of {self.max_sessions} sessions")
        slab = self._slab_for(model)
        session = Session(
            id=session_id, model=model, slab=slab, row=slab.allocate(),
            options=options, last_used=self.clock(),
        )  # fmt: skip
        self._sessions[session.id] = session
        self._update_gauges(model)
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

    def end(self, session: Session) -> None:
        """Free the session now."""
        if self._remove(session):
            metrics.SESSION_EVENTS.labels(session.model.name, "ended").inc()

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

    def memory_bytes(self) -> dict[str, int]:
        """Allocated and used state bytes over every slab."""
        slabs = self._slabs.values()
        return {
            "allocated": sum(s.allocated_bytes for s in slabs),
            "used": sum(s.used_bytes for s in slabs),
        }

    def _is_idle(self, session: Session, now: float) -> bool:
        return not session.lock.locked() and now - session.last_used > self.idle_timeout_s

    def _expire(self, session: Session) -> None:
        if self._remove(session):
            session.expired = True
            metrics.SESSION_EVENTS.labels(session.model.name, "expired").inc()
            self._expired[session.id] = None
            while len(self._expired) > self.expired_memory:
                self._expired.popitem(last=False)

    def _remove(self, session: Session) -> bool:
        if self._sessions.pop(session.id, None) is None:
            return False
        session.ended = True
        session.slab.release(session.row)
        self._update_gauges(session.model)
        return True

    def _slab_for(self, model: LoadedModel) -> StateSlab:
        slab = self._slabs.get(model.key)
        if slab is None:
            desc = model.description
            slab = StateSlab(
                desc.state_rows, desc.hidden_size, self.initial_capacity, self.max_sessions
            )
            self._slabs[model.key] = slab
        return slab

    def _update_gauges(self, model: LoadedModel) -> None:
        slab = self._slabs[model.key]
        version = str(model.version)
        metrics.ACTIVE_SESSIONS.labels(model.name, version).set(slab.used)
        metrics.STATE_BYTES.labels(model.name, version, "allocated").set(slab.allocated_bytes)
        metrics.STATE_BYTES.labels(model.name, version, "used").set(slab.used_bytes)
