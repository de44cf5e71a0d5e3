"""Sequences (Triton's sequence extension) as sessions of the session layer.

A sequence is named by its client: (caller, model, sequence id). Its session id is derived from
that name with a keyed hash (HMAC-SHA256 under the fleet's snapshot signing key), so every
replica that shares the key computes the same id and finds the session where every session
lives: held here, or in the shared store. Nothing per process is needed to continue a sequence;
the only table here orders the requests of one sequence that arrive at this process (a FIFO
lock each, dropped when no request holds it).

The rules, each applied through the session layer and the engine as for a native session:
- START opens the sequence, or restarts it: a new incarnation under the same id, written over
  whatever the shared store held (a live record or an END's tombstone), so a replica holding an
  older copy sees that it is stale and continues the new one.
- A request without START continues the sequence from wherever it is (looked up in the shared
  store on every request, as a unary request has no stream that would hold it).
- END answers (the reply already covers all the text sent) and ends the session everywhere (a
  tombstone); so does a decision whose rule says end when decided (lstm_serve_end_when_decided).
- `seq` (lstm_serve_seq) resends are duplicates, answered with the kept result.
- While the server drains, a request is refused with UNAVAILABLE and changes nothing: with a
  shared store, the client sends it to another replica, which continues the sequence.
- Errors name the sequence, never its internal session id.

Without a snapshot key the ids are keyed with a secret of this process: sequences then live as
long as this process does (no fleet without a key, as for every session).
"""

from __future__ import annotations

import asyncio
import copy
import functools
import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from service.engine.continuity.snapshots import SnapshotKeys
from service.engine.model.worker import ModelWorker
from service.engine.session.sessions import EndedSession, Session
from service.engine.text.inputs import quoted
from service.engine.text.textstream import NOTHING_HELD
from service.engine.types import DecisionRule, StepResult, StreamOptions
from service.errors import (
    AlreadyApplied,
    Draining,
    InvalidInput,
    LstmServeError,
    NotStreamable,
    SessionExpired,
    SessionNotFound,
)
from service.protocol.messages import InputSource
from service.protocol.session import SessionLayer

SequenceId = int | str
_DOMAIN = b"lstm-serve sequence session id\x00"
ID_CACHE = 65_536  # derived ids kept (bounded: the least recently used go first)


@dataclass(slots=True)  # per request: not frozen (3x the cost)
class SequenceRequest:
    """One request of a sequence, in the front's terms translated."""

    principal: str
    model: str
    version: int  # 0: the latest READY version (START), or whichever the sequence runs on
    key: SequenceId
    start: bool = False
    end: bool = False
    seq: int | None = None  # the client's exactly-once number; None: the next one
    decide: DecisionRule | None = None  # an early decision rule (kept from the START on)

    @property
    def name(self) -> str:
        shown = quoted(self.key) if isinstance(self.key, str) else str(self.key)
        return f"sequence {shown} of model {self.model[:128]!r}"


class SequenceInput(InputSource, Protocol):
    """A sequence request's input for one model version; `label` names it in errors,
    `every_step`: whether the request asks for per-step probabilities."""

    label: str
    every_step: bool


@dataclass(slots=True)  # per request: not frozen
class SequenceReply:
    """What a sequence request did: plain values for the front to encode."""

    model: ModelWorker
    result: StepResult
    seq: int
    total_steps: int
    duplicate: bool
    held_characters: int
    ended: bool = False  # the session's decision ended it (end_when_decided)


class _Lane:
    """One sequence's FIFO lock at this process, and how many requests hold or await it."""

    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0


class SequenceIds:
    """Sequence name -> session id, the same on every replica sharing the signing key."""

    def __init__(self, keys: SnapshotKeys | None) -> None:
        self._secret = keys.keys[keys.signing] if keys is not None else secrets.token_bytes(32)
        # The ids of the sequences seen lately, so a request costs a lookup, not an HMAC.
        self.session_id = functools.lru_cache(maxsize=ID_CACHE)(self._derive)

    def _derive(self, principal: str, model: str, key: SequenceId) -> str:
        kind = "s" if isinstance(key, str) else "i"
        name = "\x00".join((principal, model, f"{kind}:{key}")).encode("utf-8", "surrogatepass")
        return hmac.digest(self._secret, _DOMAIN + name, "sha256").hex()[:32]


class Sequences:
    """The sequence rules over the session layer; one per server, loop thread only."""

    def __init__(self, layer: SessionLayer, ids: SequenceIds) -> None:
        self.layer = layer
        self.engine = layer.engine
        self.ids = ids
        self._lanes: dict[str, _Lane] = {}

    def __len__(self) -> int:
        """Sequences with a request at this process now."""
        return len(self._lanes)

    async def run(
        self, request: SequenceRequest, source: Callable[[ModelWorker], SequenceInput]
    ) -> SequenceReply:
        """One request, after those of its sequence that arrived here before it. `source`
        gives the request's input for the model version it runs on (decoded by the layer)."""
        session_id = self.ids.session_id(request.principal, request.model, request.key)
        lane = self._lanes.get(session_id)
        if lane is None:
            lane = self._lanes[session_id] = _Lane()
        lane.users += 1  # before any await: arrival order
        try:
            async with lane.lock:
                return await self._apply(request, session_id, source)
        except LstmServeError as exc:
            raise _renamed(exc, session_id, request.name) from exc
        finally:
            lane.users -= 1
            if not lane.users:
                del self._lanes[session_id]

    async def _apply(
        self, request: SequenceRequest, session_id: str,
        source: Callable[[ModelWorker], SequenceInput],
    ) -> SequenceReply:  # fmt: skip
        engine, layer = self.engine, self.layer
        if engine.draining:
            raise Draining(
                f"the server is draining (shutting down): send this request of {request.name} "
                "to another replica, which continues it from the shared session store"
            )
        session = await self._current(request, session_id)
        if isinstance(session, EndedSession):
            return self._end_again(request, session, source)
        if session is not None and request.version and session.model.version != request.version:
            raise InvalidInput(f"{request.name} runs on version {session.model.version}, "
                               f"not {request.version}")  # fmt: skip
        resend = session is not None and request.seq is not None and request.seq <= session.last_seq
        restart = request.start and not resend
        if session is None and not restart:
            raise _not_open(request)
        if restart:
            worker = engine.classify_model(request.model, request.version)
            if not worker.description.streamable:
                raise NotStreamable(
                    f"model {worker.key} is bidirectional: it has no sequence batching (see its "
                    "model configuration); send each whole sequence without a sequence_id"
                )
            # Decoded before anything changes: a bad START leaves the sequence as it was.
            chunk = source(worker)
            steps, held = layer.decode_for(worker, NOTHING_HELD, chunk, chunk.label, chunk.label)
            options = StreamOptions(chunk.every_step, decide=request.decide)
            session = await engine.open_session(
                request.model, worker.version, options, session_id=session_id
            )
        else:
            assert session is not None
            chunk = source(session.model)
            steps, held = layer.decode(session, chunk, chunk.label, chunk.label)
            decide = request.decide or session.options.decide
            if (session.options.every_step, session.options.decide) != (chunk.every_step, decide):
                session.options = StreamOptions(chunk.every_step, session.options.top_k, decide)
        seq = request.seq if request.seq is not None else session.last_seq + 1
        outcome = await engine.apply_chunk(session, seq, steps, held)
        if outcome.result is None:
            raise AlreadyApplied(
                f"lstm_serve_seq {seq} of {request.name} was applied already (last applied: "
                f"{session.last_seq}); only the last one's result is kept"
            )
        reply = SequenceReply(session.model, outcome.result, seq, outcome.total_steps,
                              outcome.duplicate, outcome.held_characters,
                              outcome.ended)  # fmt: skip
        return await self._end(session, reply) if request.end and not outcome.ended else reply

    async def _current(
        self, request: SequenceRequest, session_id: str
    ) -> Session | EndedSession | None:
        """The sequence's session wherever it is; None if it has none and this is a START; as
        it ended, for a resent END (its `seq` the last applied: its reply was lost)."""
        try:
            return await self.engine.find_session(session_id)
        except SessionNotFound as exc:
            if request.start:
                return None
            if request.end and request.seq is not None:
                ended = await self.engine.ended_session(session_id)
                if ended is not None and ended.last is not None and request.seq <= ended.last_seq:
                    return ended
            if isinstance(exc, SessionExpired):
                raise InvalidInput(
                    f"{request.name} expired after its idle timeout: start it again with "
                    "sequence_start=true"
                ) from exc
            raise _not_open(request) from exc

    def _end_again(
        self, request: SequenceRequest, ended: EndedSession,
        source: Callable[[ModelWorker], SequenceInput],
    ) -> SequenceReply:  # fmt: skip
        """A resent END of a sequence that ended: the kept result again, as a duplicate (its
        input read as a first request's would be, not run)."""
        if request.seq != ended.last_seq:
            raise AlreadyApplied(
                f"lstm_serve_seq {request.seq} of {request.name} was applied already (last "
                f"applied: {ended.last_seq}, when it ended); only the last one's result is kept"
            )
        assert ended.last is not None
        worker = self.engine.models().find(request.model, ended.version)
        source(worker)
        return SequenceReply(worker, ended.last, ended.last_seq, ended.total_steps, True, 0)

    async def _end(self, session: Session, reply: SequenceReply) -> SequenceReply:
        """END: the held-back text is fed, the session ends everywhere; the reply covers both."""
        ended = await self.layer.end(session)
        final, result = ended.final, reply.result
        if not ended.flushed_steps or final is None:
            return SequenceReply(reply.model, result, reply.seq, result.total_steps,
                                 reply.duplicate, 0)  # fmt: skip
        every = result.step_values
        if every is not None and final.step_values is not None:
            every = np.concatenate([every, final.step_values])
        merged = StepResult(final.values, every, result.steps + final.steps, final.total_steps,
                            final.kind)  # fmt: skip
        return SequenceReply(reply.model, merged, reply.seq, final.total_steps, reply.duplicate, 0)


def _not_open(request: SequenceRequest) -> InvalidInput:
    return InvalidInput(
        f"{request.name} is not open: its first request must set sequence_start=true"
    )


def _renamed(exc: LstmServeError, session_id: str, name: str) -> LstmServeError:
    """The error with the sequence's name where it named the internal session id."""
    text = str(exc)
    if session_id not in text:
        return exc
    for shown in (f"session {session_id!r}", f"session {session_id}", session_id):
        text = text.replace(shown, name)
    renamed = copy.copy(exc)  # its type and code (a TritonError's code is its own)
    renamed.args = (text,)
    return renamed
