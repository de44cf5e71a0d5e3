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

from lstmserve.contract import KIND_PROBS
from service import principal
from service.engine.continuity.redis_backend import (
    ENDED,
    WRITTEN,
    Record,
    RedisSessionBackend,
)
from service.engine.continuity.snapshots import (
    SessionSnapshot,
    SnapshotKeys,
    decode_snapshot,
    encode_snapshot,
)
from service.engine.model.registry import ModelRegistry
from service.engine.session.sessions import (
    Checkpoint,
    EndedSession,
    Session,
    SessionStore,
    new_generation,
)
from service.engine.text.inputs import held_text
from service.engine.types import (
    NO_METRICS,
    UNKNOWN_MODEL,
    Decision,
    DecisionRule,
    EngineMetrics,
    StepResult,
    StreamOptions,
)
from service.errors import (
    LstmServeError,
    SessionExpired,
    SessionMoved,
    SessionNotFound,
    SnapshotInvalid,
    SnapshotMismatch,
    SnapshotRefused,
    SnapshotsDisabled,
    Unavailable,
)

log = logging.getLogger(__name__)

STRICT, BEST_EFFORT = "strict", "best-effort"
MAX_UNSURE = 100_000  # sessions remembered as unsure (strict refusals): the oldest forgotten
STORE_MODES = (STRICT, BEST_EFFORT)


def _last_result_fields(result: StepResult | None) -> dict[str, Any]:
    """The last result's probabilities, and the model's outputs as computed where those are
    not the probabilities (logits: a Triton resend gets them back, not their softmax)."""
    if result is None:
        return {}
    fields = {
        "last_probs": tuple(float(p) for p in result.probs), "last_steps": result.steps,
        "last_total_steps": result.total_steps, "last_rewound": result.rewound_steps,
        "last_decided": result.decision is not None,
    }  # fmt: skip
    if result.kind != KIND_PROBS:
        fields["last_values"] = tuple(float(v) for v in result.values)
    return fields


def _decision_fields(session: Session) -> dict[str, Any]:
    """The session's decision rule, its run and its decision, as a snapshot records them."""
    rule, decision = session.options.decide, session.decision
    fields: dict[str, Any] = {"run": session.run}
    if rule is not None:
        fields["decide"] = (rule.probability, rule.margin, rule.steps, rule.end_when_decided)
    if decision is not None:
        fields["decided"] = (decision.label, decision.probability, decision.step)
    return fields


def _snapshot_rule(snap: SessionSnapshot) -> DecisionRule | None:
    probability, margin, steps, end = snap.decide
    if probability <= 0 and margin <= 0:
        return None
    return DecisionRule(probability, margin, steps, end)


class SessionContinuity:
    """Snapshots (with a key) and the shared session store (with a backend)."""

    def __init__(self, store: SessionStore, keys: SnapshotKeys | None = None,
                 backend: RedisSessionBackend | None = None, max_age_s: float = 86_400.0,
                 mode: str = STRICT, metrics: EngineMetrics = NO_METRICS) -> None:  # fmt: skip
        if backend is not None and keys is None:
            raise ValueError("a shared session store needs snapshot keys")
        self.store = store
        self.keys = keys
        self.backend = backend
        self.max_age_s = max_age_s
        self.mode = mode
        self._snapshots = metrics.snapshots  # (model, event)
        self._store_ops = metrics.store_ops  # (op, outcome)
        self.unsure: dict[str, None] = {}  # strict: refused saves that may have landed (settle)

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
            state=session.read_state(), total_steps=session.settled_steps,
            last_seq=session.last_seq, created_at=time.time(),
            every_step=session.options.every_step, top_k=session.options.top_k,
            held_text=session.held.text, held_cased=session.held.cased,
            held_known=session.held.known,
            owner=session.owner, generation=session.generation,
            **_last_result_fields(session.last_result), **_decision_fields(session),
        )  # fmt: skip
        return encode_snapshot(snap, self._keys())

    async def restore(self, registry: ModelRegistry, blob: bytes) -> tuple[Session, str | None]:
        """The session a snapshot describes, held here under its id, and the incarnation it
        takes over from (None: the copy held here is that snapshot's, nothing to take over).

        Refused (SnapshotRefused, nothing changed) when the snapshot is expired, its session
        ended, or a copy known here or in the shared store is newer or another incarnation of
        the same point; another principal's snapshot reads as an unknown session."""
        try:
            snap = decode_snapshot(blob, self._keys())
        except SnapshotInvalid:
            self._snapshots.labels(UNKNOWN_MODEL, "refused").inc()
            raise
        try:
            same = await check_restorable(self, snap)
        except LstmServeError:
            self._snapshots.labels(UNKNOWN_MODEL, "refused").inc()
            raise
        if same is not None:
            return same, None
        session = self._adopt(registry, snap, None, new_generation())
        self._snapshots.labels(session.model.name, "restored").inc()
        return session, snap.generation

    def _adopt(
        self, registry: ModelRegistry, snap: SessionSnapshot, options: StreamOptions | None,
        generation: str,
    ) -> Session:  # fmt: skip
        """A local copy at least as new as the snapshot, else a fresh session taking it over."""
        try:
            model = registry.find(snap.model, snap.version)
        except LstmServeError as exc:
            self._snapshots.labels(UNKNOWN_MODEL, "refused").inc()
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
        if (local is not None and local.last_seq >= snap.last_seq and local.model is model
                and local.generation == generation):  # fmt: skip
            return local
        kept = StreamOptions(every_step=snap.every_step, top_k=min(snap.top_k, desc.num_classes),
                             decide=_snapshot_rule(snap))  # fmt: skip
        session = self.store.adopt(model, options or kept, snap.session_id, snap.owner, generation)
        take_progress(session, snap)
        return session

    # -- the shared store --------------------------------------------------------------------

    def checkpoint(self, session: Session) -> Checkpoint | None:
        """Strict mode: the session before a change (a row copy, four fields); else None."""
        return session.checkpoint() if self.backend is not None and self.mode == STRICT else None

    async def persist(
        self, session: Session, takeover_from: str | None = None, before: Checkpoint | None = None,
        restart: bool = False,
    ) -> None:  # fmt: skip
        """Write the session through to the shared store (no-op without one), right after a
        state change, before the reply leaves, its lock held. A store that does not answer:
        best-effort logs it (the chunk stays applied, lost if this pod dies before a later save);
        strict rolls the session back to `before` (none: a session just opened or restored
        here is dropped) and raises Unavailable (the client retries). A newer seq or another
        incarnation in the store: this copy was stale, dropped with SessionMoved (the client
        resumes); a refused restore (`takeover_from`) is dropped with SnapshotRefused. A
        `restart` (a new incarnation under a known id) writes over any record, ended or not."""
        if self.backend is None or session.ended:
            return
        blob = self.snapshot(session)  # synchronous: state and seq read together
        try:
            saved = await self.backend.save(
                session.id, session.last_seq, session.generation, blob, takeover_from, restart
            )
        except Exception as exc:  # StoreUnavailable, or anything else redis-py raised
            self._store_ops.labels("save", "error").inc()
            if self.backend.guard.up:  # not an outage (the guard logged that): this save only
                log.warning("session store save failed", extra={"fields": {"error": repr(exc)}})
            if self.mode == STRICT:
                raise _roll_back(self, session, before, exc) from exc
            return
        if saved != WRITTEN:  # ended, or this copy was stale: drop it
            refusal = _refusal(session, saved, takeover_from is not None)
            self._store_ops.labels("save", "ended" if saved == ENDED else "stale").inc()
            log.warning("stale session copy dropped", extra={"fields": {"seq": session.last_seq}})
            self.store.end(session, refusal)
            raise refusal
        self._store_ops.labels("save", "ok").inc()

    async def end(self, session: Session) -> None:
        """The client ended the session (its lock held): freed here, its shared record a
        tombstone holding its final snapshot (which cannot revive it; a resent `end` is answered
        from it), written once the store is back if it does not answer."""
        final = self.snapshot(session) if self.backend is not None and not session.ended else b""
        self.store.end(session)
        try:
            if self.backend is not None:
                await self.backend.end(session.id, final)
                self._store_ops.labels("delete", "ok").inc()
        except Exception as exc:
            self._store_ops.labels("delete", "error").inc()
            log.warning("session store delete failed; written when the store is back",
                        extra={"fields": {"error": repr(exc)}})  # fmt: skip

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
        record = await self.load_record(session_id)
        if record is None or record.snapshot is None:  # the shared store is the truth
            gone: SessionNotFound = SessionNotFound(f"session {session_id[:64]!r} does not exist")
            if record is None and await self.backend.was_issued(session_id):
                gone = SessionExpired(f"session {session_id} expired (idle timeout, shared store)")
            if local is not None:
                self.store.end(local, gone)
            raise gone
        if local is not None and _still_current(self.store, local, record):
            return local
        snap = decode_snapshot(record.snapshot, self._keys())
        if snap.owner != principal.current():
            raise SessionNotFound(f"session {session_id[:64]!r} does not exist")
        options = local.options if local else None
        return self._adopt(registry, snap, options, snap.generation)  # the same incarnation

    async def load_record(self, session_id: str) -> Record | None:
        assert self.backend is not None
        try:
            blob = await self.backend.load(session_id)
        except Exception as exc:
            self._store_ops.labels("load", "error").inc()
            raise Unavailable(f"the shared session store is unreachable: {exc!r}") from exc
        self._store_ops.labels("load", "ok").inc()
        return blob

    async def close(self) -> None:
        if self.backend is not None:
            await self.backend.close()


def _still_current(store: SessionStore, local: Session, record: Record) -> bool:
    """Whether the copy held here is the one to continue: the store's incarnation, at least as
    far on (a best-effort save that failed may have left it ahead). A copy of another
    incarnation (the sequence was started again on another replica) is dropped."""
    if local.generation == record.generation:
        return local.last_seq >= record.seq
    store.end(local, SessionMoved(
        f"session {local.id} was started again on another replica: this copy is not continued"
    ))  # fmt: skip
    return False


def _ended(session_id: str) -> SnapshotRefused:
    return SnapshotRefused(
        f"session {session_id} has ended: its snapshots cannot bring it back; open a new session"
    )


def _check_not_older(snap: SessionSnapshot, seq: int, generation: str, where: str) -> None:
    """A snapshot behind a known copy, or of another incarnation at the same point: refused."""
    if seq > snap.last_seq or (seq == snap.last_seq and generation != snap.generation):
        other = " (another copy of it)" if seq == snap.last_seq else ""
        raise SnapshotRefused(
            f"stale snapshot: session {snap.session_id} is {where} as of seq {seq}, the "
            f"snapshot is of seq {snap.last_seq}{other}; resume the session instead"
        )


async def check_restorable(c: SessionContinuity, snap: SessionSnapshot) -> Session | None:
    """Raise why `snap` may not be restored; the copy held here if it is that snapshot."""
    if snap.owner != principal.current():
        raise SessionNotFound(f"session {snap.session_id[:64]!r} does not exist")
    age = time.time() - snap.created_at
    if age > c.max_age_s:
        raise SnapshotRefused(
            f"snapshot of session {snap.session_id} is {age:.0f} s old, older than "
            f"--snapshot-max-age-s {c.max_age_s:g}: continue from a newer one"
        )
    if c.store.was_ended(snap.session_id):
        raise _ended(snap.session_id)
    local = c.store.peek(snap.session_id)
    if local is not None:
        _check_not_older(snap, local.last_seq, local.generation, "held here")
        if local.last_seq == snap.last_seq:
            return local  # the very copy (same point, same incarnation): nothing to restore
    if c.backend is not None:
        record = await c.load_record(snap.session_id)
        if record is not None and record.ended:
            raise _ended(snap.session_id)
        if record is not None:
            _check_not_older(snap, record.seq, record.generation, "in the shared store")
    return None


def _refusal(session: Session, saved: int, takeover: bool) -> LstmServeError:
    """Why the shared store refused this copy's write."""
    if saved == ENDED:
        return _ended(session.id)
    if takeover:
        return SnapshotRefused(
            f"stale snapshot: session {session.id} was continued past it elsewhere (the shared "
            "store holds a newer copy); resume the session instead"
        )
    return SessionMoved(
        f"session {session.id} was continued on another replica since this one last held it; "
        "its chunk was not kept here: resume the session to get its current state and resend"
    )


def take_progress(session: Session, snap: SessionSnapshot) -> None:
    """The snapshot's state and progress into `session` (its model's)."""
    desc = session.model.description
    decision = _decision_of(snap, desc.num_classes)
    last = _last_result(snap, desc.num_classes, desc.output_kind, decision)
    held = held_text(desc, snap.held_text, snap.held_cased, snap.held_known)  # with its tail
    session.restore(Checkpoint(snap.state, snap.last_seq, snap.total_steps, held, last,
                               snap.run, decision))  # fmt: skip


def _decision_of(snap: SessionSnapshot, classes: int) -> Decision | None:
    label, probability, step = snap.decided
    return Decision(label, probability, step) if 0 <= label < classes else None


def _last_result(
    snap: SessionSnapshot, classes: int, kind: str, decision: Decision | None
) -> StepResult | None:
    """The snapshot's last reply (answered again to a resend), as its model computed it."""
    if len(snap.last_values) == classes:
        values = np.array(snap.last_values, dtype=np.float32)  # (C,) as the model computed them
    elif len(snap.last_probs) == classes:
        values, kind = np.array(snap.last_probs, dtype=np.float32), KIND_PROBS  # (C,)
    else:
        return None
    covered = snap.last_total_steps if snap.last_total_steps >= 0 else snap.total_steps
    decided = decision if snap.last_decided else None
    return StepResult(values, None, snap.last_steps, covered, kind, snap.last_rewound, decided)


async def find_ended(
    c: SessionContinuity, registry: ModelRegistry, session_id: str
) -> EndedSession | None:
    """The caller's session as it ended, while its tombstone lives (here, or in the shared
    store); None if it did not end (or is another principal's)."""
    ended = c.store.ended(session_id)
    if ended is None and c.backend is not None:
        record = await c.load_record(session_id)
        if record is not None and record.ended and record.final:
            ended = _ended_from(registry, decode_snapshot(record.final, c._keys()))
    if ended is None or ended.owner != principal.current():
        return None
    return ended


def _ended_from(registry: ModelRegistry, snap: SessionSnapshot) -> EndedSession:
    """A session as its final snapshot says it ended; its top labels named by its model when
    this server serves that version (else by index)."""
    try:
        desc = registry.find(snap.model, snap.version).description
        classes, kind, labels = desc.num_classes, desc.output_kind, desc.labels
    except LstmServeError:
        classes, kind, labels = len(snap.last_probs), KIND_PROBS, ()
    last = _last_result(snap, classes, kind, _decision_of(snap, classes))
    total = last.total_steps if last is not None else snap.total_steps  # held text's tail too
    return EndedSession(snap.owner, snap.version, total, snap.last_seq, last, snap.top_k, labels)


async def settle(c: SessionContinuity, session: Session) -> None:
    """Strict mode, under the session's lock, before its next change: a refused save of this
    copy may have reached the store all the same (a timeout after the write, a master with too
    few replicas); if the store holds this incarnation further on, take that, so the resent
    chunk is answered as the duplicate it is (not refused as a stale copy). Unavailable while
    the store does not answer (the chunk is refused again)."""
    record = await c.load_record(session.id)
    c.unsure.pop(session.id, None)
    if record is None or record.snapshot is None or record.generation != session.generation:
        return
    if record.seq > session.last_seq and not session.ended:
        take_progress(session, decode_snapshot(record.snapshot, c._keys()))


def _roll_back(
    c: SessionContinuity, session: Session, before: Checkpoint | None, exc: BaseException
) -> Unavailable:
    """Strict mode, the save failed: the session as it was before the change, and why."""
    if session.ended:
        pass
    elif before is None:  # opened or restored here, never acknowledged: not kept
        c.store.end(session, Unavailable(f"session {session.id} was not stored"))
    else:
        c.unsure[session.id] = None
        while len(c.unsure) > MAX_UNSURE:
            c.unsure.pop(next(iter(c.unsure)))
        session.restore(before)
    return Unavailable(
        f"the shared session store did not take the new state of session {session.id} "
        f"(--session-store-mode strict): not acknowledged, retry it (a seq is never applied "
        f"twice) ({str(exc)[:120]})"
    )
