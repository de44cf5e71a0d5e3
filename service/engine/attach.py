"""How a caller gets a session: open, resume (by id), restore (from a snapshot), find.

A mixin of the Engine (service/engine/core.py), which provides the store, the continuity,
the registry and admission. Every way in checks the caller (service/principal.py): another
principal's session reads as one that does not exist. A stream that attaches takes the session
over (Session.attach): the stream it was attached to gets ABORTED at its next message.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from service import principal
from service.engine.continuity.continuity import find_ended
from service.engine.session.sessions import EndedSession, Session
from service.engine.types import EngineMetrics, StreamOptions
from service.errors import InvalidInput, SessionNotFound

if TYPE_CHECKING:
    from service.engine.continuity.continuity import SessionContinuity
    from service.engine.model.registry import ModelRegistry
    from service.engine.model.worker import ModelWorker
    from service.engine.session.sessions import SessionStore
    from service.engine.types import EngineTracer


class SessionAttach:
    """open_session, resume_session, find_session, restore_session."""

    store: SessionStore
    continuity: SessionContinuity
    metrics: EngineMetrics
    tracer: EngineTracer

    def check_accepting(self) -> None:
        raise NotImplementedError

    def models(self) -> ModelRegistry:
        raise NotImplementedError

    async def open_session(
        self, name: str, version: int, options: StreamOptions, attach: object | None = None,
        session_id: str | None = None,
    ) -> Session:  # fmt: skip
        """A new session of the caller on a READY version, attached to the stream owning
        `attach` and written to the shared store (if any) at once. With `session_id` (an id
        its caller derives, service/protocol/sequences.py), a new incarnation under that id:
        a copy held here is replaced, and the shared record (live or ended) is written over,
        so no replica continues an older copy."""
        with self.tracer.span("admission", {"lstmserve.admission": "open"}):
            self.check_accepting()  # then the session limits, the caller's quota and rate
            model = self.models().get(name, version)
            session = self.store.open(model, _clamp(model, options), session_id)
        session.attach(attach)
        async with session.lock:  # resumable elsewhere from the start
            if self.continuity.backend is None:
                await self.continuity.persist(session, restart=session_id is not None)
            else:
                with self.tracer.span("store save", {"lstmserve.store.sessions": 1}):
                    await self.continuity.persist(session, restart=session_id is not None)
        return session

    async def resume_session(
        self, session_id: str, options: StreamOptions | None, attach: object | None = None
    ) -> Session:
        """The caller's session by id, taken over by the stream owning `attach` (a stream it
        was attached to gets ABORTED at its next message)."""
        self.check_accepting()
        session = await self.find_session(session_id)
        if options is not None:
            session.options = _clamp(session.model, options)
        session.attach(attach)
        self.store.touch(session)
        self.metrics.session_events.labels(session.model.name, "resumed").inc()
        return session

    async def find_session(self, session_id: str, local_first: bool = False) -> Session:
        """The caller's session held here, or (with a shared store) continued from the store;
        another principal's reads as one that does not exist. With `local_first`, a copy held
        here is used without asking the store (per-chunk lookups)."""
        if local_first:
            session = await self.continuity.find_local_first(self.models(), session_id)
        else:
            session = await self.continuity.find(self.models(), session_id)
        if session.owner != principal.current():
            raise SessionNotFound(f"session {session_id[:64]!r} does not exist")
        return session

    async def ended_session(self, session_id: str) -> EndedSession | None:
        """The caller's session as it ended, while its tombstone lives (here or in the shared
        store): a resent `end` is answered from it. None otherwise."""
        return await find_ended(self.continuity, self.models(), session_id)

    async def restore_session(
        self, blob: bytes, options: StreamOptions | None, attach: object | None = None
    ) -> Session:
        """Continue the caller's session from a snapshot made by any replica sharing the key; a
        copy held here that is older is replaced (its chunk in flight is answered ABORTED). A
        stale, expired or ended session's snapshot is refused and changes nothing."""
        self.check_accepting()
        session, takeover_from = await self.continuity.restore(self.models(), blob)
        async with session.lock:
            session.check_live()
            if options is not None:
                session.options = _clamp(session.model, options)
            session.attach(attach)
            self.store.touch(session)
            if takeover_from is not None:
                await self.continuity.persist(session, takeover_from=takeover_from)
        return session


def _clamp(model: ModelWorker, options: StreamOptions) -> StreamOptions:
    """The options a session of `model` takes: top_k capped; a decision rule checked."""
    top_k = min(max(options.top_k, 1), model.description.num_classes)
    if options.decide is not None and (problem := options.decide.problem()) is not None:
        raise InvalidInput(f"options.decide: {problem}")
    return StreamOptions(every_step=options.every_step, top_k=top_k, decide=options.decide)
