"""Sessions that outlive their replica: signed snapshots, and write-through to a shared store.

`SessionContinuity` is what the engine asks to (a) snapshot a session, (b) continue a session
from a snapshot made by any replica that shares the key, and, with a shared store (Redis),
(c) write each session's state through after every applied chunk and (d) find a session this
process does not hold. No gRPC here.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from service import metrics
from service.engine.redis_backend import RedisSessionBackend
from service.engine.registry import ModelRegistry
from service.engine.sessions import Session, SessionStore
from service.engine.snapshots import (
    SessionSnapshot,
    SnapshotKeys,
    decode_snapshot,
    encode_snapshot,
)
from service.engine.textstream import HeldText
from service.engine.types import StepResult, StreamOptions
from service.errors import (
    LstmServeError,
    SessionExpired,
    SessionMoved,
    SessionNotFound,
    SnapshotInvalid,
    SnapshotMismatch,
    SnapshotsDisabled,
    Unavailable,
)

log = logging.getLogger(__name__)


def _last_result_fields(result: StepResult | None) -> dict[str, Any]:
    if result is None:
        return {}
    return {"last_probs": tuple(float(p) for p in result.probs), "last_steps": result.steps}


class SessionContinuity:
    """Snapshots (with a key) and the shared session store (with a backend)."""

    def __init__(
        self,
        store: SessionStore,
        keys: SnapshotKeys | None = None,
        backend: RedisSessionBackend | None = None,
    ) -> None:
        if backend is not None and keys is None:
            raise ValueError("a shared session store needs snapshot keys")
        self.store = store
        self.keys = keys
        self.backend = backend

    @property
    def enabled(self) -> bool:
        return self.keys is not None

    def _keys(self) -> SnapshotKeys:
        if self.keys is None:
            raise SnapshotsDisabled(
                "snapshots are not configured on this server: start it with --snapshot-key "
                "(LSTM_SERVE_SNAPSHOT_KEY), the same on every replica"
            )
        return self.keys

    # -- snapshots ---------------------------------------------------------------------------

    def snapshot(self, session: Session) -> bytes:
        """The session as of its last applied message, signed. Call with its lock held."""
        snap = SessionSnapshot(
            session_id=session.id, model=session.model.name, version=session.model.version,
            state=session.read_state(), total_steps=session.total_steps,
            last_seq=session.last_seq, created_at=time.time(),
            every_step=session.options.every_step, top_k=session.options.top_k,
            held_text=session.held.text, held_cased=session.held.cased,
            **_last_result_fields(session.last_result),
        )  # fmt: skip
        return encode_snapshot(snap, self._keys())

    def restore(self, registry: ModelRegistry, blob: bytes) -> Session:
        """The session a snapshot describes, held here under its id (a newer local copy wins)."""
        try:
            snap = decode_snapshot(blob, self._keys())
        except SnapshotInvalid:
            metrics.SNAPSHOTS.labels(metrics.UNKNOWN_MODEL, "refused").inc()
            raise
        session = self._adopt(registry, snap, None)
        metrics.SNAPSHOTS.labels(session.model.name, "restored").inc()
        return session

    def _adopt(
        self, registry: ModelRegistry, snap: SessionSnapshot, options: StreamOptions | None
    ) -> Session:
        """A local copy at least as new as the snapshot, else a fresh session taking it over."""
        try:
            model = registry.find(snap.model, snap.version)
        except LstmServeError as exc:
            metrics.SNAPSHOTS.labels(metrics.UNKNOWN_MODEL, "refused").inc()
            served = sorted(m.key for m in registry.all())
            raise SnapshotMismatch(
                f"snapshot is for model {snap.model[:128]!r} version {snap.version}, which this "
                f"server does not serve (it serves {served})"
            ) from exc
        desc = model.description
        if snap.state.shape != (desc.state_rows, desc.hidden_size):
            raise SnapshotMismatch(
                f"snapshot state is {snap.state.shape}, model {model.key} keeps "
                f"({desc.state_rows}, {desc.hidden_size})"
            )
        local = self.store.peek(snap.session_id)
        if local is not None and local.last_seq >= snap.last_seq and local.model is model:
            return local
        kept = StreamOptions(every_step=snap.every_step, top_k=min(snap.top_k, desc.num_classes))
        session = self.store.adopt(model, options or kept, snap.session_id)
        last = None
        if snap.last_steps and len(snap.last_probs) == desc.num_classes:
            probs = np.array(snap.last_probs, dtype=np.float32)  # (C,)
            last = StepResult(probs, None, snap.last_steps, snap.total_steps)
        held = HeldText(snap.held_text, snap.held_cased)
        session.restore(snap.state, snap.last_seq, snap.total_steps, last, held)
        return session

    # -- the shared store --------------------------------------------------------------------

    async def persist(self, session: Session, force: bool = False) -> None:
        """Write the session through to the shared store (no-op without one).

        Called right after a state change, before the reply leaves. A store failure is logged
        and counted, not sent to the client: the chunk was applied here and stays applied. If the
        store holds a newer seq, this copy was stale: it is dropped and SessionMoved raised, so
        the client resumes (and gets the current state) instead of a reply computed from it.
        """
        if self.backend is None or session.ended:
            return
        blob = self.snapshot(session)  # synchronous: state and seq read together
        try:
            saved = await self.backend.save(session.id, session.last_seq, blob, force=force)
        except Exception as exc:  # any store failure is survivable here
            metrics.SESSION_STORE_OPS.labels("save", "error").inc()
            log.warning("session store save failed", extra={"fields": {"error": repr(exc)}})
            return
        if not saved:  # another replica wrote a newer seq: this copy was stale, drop it
            metrics.SESSION_STORE_OPS.labels("save", "stale").inc()
            log.warning("stale session copy dropped", extra={"fields": {"seq": session.last_seq}})
            moved = SessionMoved(
                f"session {session.id} was continued on another replica since this one last "
                "held it; its chunk was not kept here: resume the session to get its current "
                "state and resend"
            )
            self.store.end(session, moved)
            raise moved
        metrics.SESSION_STORE_OPS.labels("save", "ok").inc()

    async def forget(self, session_id: str) -> None:
        """The session ended: remove it from the shared store."""
        if self.backend is None:
            return
        try:
            await self.backend.delete(session_id)
        except Exception as exc:
            metrics.SESSION_STORE_OPS.labels("delete", "error").inc()
            log.warning("session store delete failed", extra={"fields": {"error": repr(exc)}})
            return
        metrics.SESSION_STORE_OPS.labels("delete", "ok").inc()

    async def find_local_first(self, registry: ModelRegistry, session_id: str) -> Session:
        """The copy held here if any (a stale one is caught by `persist`), else `find`."""
        if session_id in self.store:
            return self.store.get(session_id)
        return await self.find(registry, session_id)

    async def find(self, registry: ModelRegistry, session_id: str) -> Session:
        """The session by id: held here (and not older than the shared copy), or loaded from the
        shared store; SessionNotFound / SessionExpired otherwise."""
        try:
            local: Session | None = self.store.get(session_id)
        except SessionNotFound:
            if self.backend is None:
                raise
            local = None
        if self.backend is None:
            assert local is not None
            return local
        blob = await self._load(session_id)
        if blob is None:  # the shared store is the truth: ended or expired elsewhere
            gone: SessionNotFound = SessionNotFound(f"session {session_id[:64]!r} does not exist")
            if await self.backend.was_issued(session_id):
                gone = SessionExpired(f"session {session_id} expired (idle timeout, shared store)")
            if local is not None:
                self.store.end(local, gone)
            raise gone
        snap = decode_snapshot(blob, self._keys())
        if local is not None and local.last_seq >= snap.last_seq:
            return local
        session = self._adopt(registry, snap, local.options if local else None)
        return session

    async def _load(self, session_id: str) -> bytes | None:
        assert self.backend is not None
        try:
            blob = await self.backend.load(session_id)
        except Exception as exc:
            metrics.SESSION_STORE_OPS.labels("load", "error").inc()
            raise Unavailable(f"the shared session store is unreachable: {exc!r}") from exc
        metrics.SESSION_STORE_OPS.labels("load", "ok").inc()
        return blob

    async def close(self) -> None:
        if self.backend is not None:
            await self.backend.close()
