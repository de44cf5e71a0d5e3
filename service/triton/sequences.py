"""Triton's sequence extension over our sessions: sequence ids, START / END, per-sequence order.

A sequence (model, sequence_id) is one native session of the engine: the same object with the
same gauges, limits, snapshots, shared store and drain; this table only maps the client's id
to the session it opened. START opens the sequence (or restarts it: the old session is ended,
a new one opened); END frees it after its reply; a request for an unknown sequence without
START is refused naming the sequence. Requests of one sequence run one at a time in arrival
order (a FIFO lock per sequence, taken before any other wait), so its replies come in order;
requests of many sequences go to the engine together and share its batches.

Each chunk is applied with a seq number: the request's `lstm_serve_seq` (exactly-once resends,
as on the native API: a resend of an applied seq is not applied again), else the next one.
Text (`text` BYTES) streams as on the native Stream: what may still change with the next chunk
is held back (service/engine/textstream.py) and fed with it, or at END; a request whose text
is all held answers zero probabilities (no step yet) with lstm_serve_held_characters > 0.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from service.engine.inputs import quoted
from service.errors import SessionExpired, SessionNotFound
from service.triton.types import ParamValue, invalid

MAX_STRING_ID = 256  # characters of a string sequence_id
SWEEP_EVERY = 1024  # STARTs between sweeps of entries whose session is gone


@dataclass(frozen=True)
class SequenceParams:
    """A request's sequence parameters; `key` None: not a sequence request."""

    key: int | str | None
    start: bool = False
    end: bool = False
    seq: int | None = None  # lstm_serve_seq

    def name(self, model: str) -> str:
        shown = quoted(self.key) if isinstance(self.key, str) else str(self.key)
        return f"sequence {shown} of model {model[:128]!r}"


def _flag(params: dict[str, ParamValue], key: str) -> bool:
    value = params.get(key, False)
    if not isinstance(value, bool):
        raise invalid(f"parameter {key} = {quoted(str(value))} is not a bool")
    return value


def sequence_params(params: dict[str, ParamValue]) -> SequenceParams:
    """Check and read sequence_id, sequence_start, sequence_end and lstm_serve_seq."""
    raw = params.get("sequence_id", 0)
    key: int | str | None
    if isinstance(raw, bool) or not isinstance(raw, int | str):
        raise invalid(f"parameter sequence_id = {quoted(str(raw))} is not an integer or string")
    if isinstance(raw, int) and (raw < 0 or raw >= 1 << 64):
        raise invalid(f"parameter sequence_id = {raw} is not a uint64")
    if isinstance(raw, str) and len(raw) > MAX_STRING_ID:
        raise invalid(f"parameter sequence_id = {quoted(raw)} is longer than {MAX_STRING_ID}")
    key = raw if raw not in (0, "") else None
    start, end = _flag(params, "sequence_start"), _flag(params, "sequence_end")
    seq = params.get("lstm_serve_seq")
    if seq is not None and (isinstance(seq, bool) or not isinstance(seq, int) or seq < 1):
        raise invalid(f"parameter lstm_serve_seq = {quoted(str(seq))} is not an integer >= 1")
    if key is None and (start or end or seq is not None):
        raise invalid("sequence_start, sequence_end and lstm_serve_seq need a sequence_id")
    return SequenceParams(key, start, end, seq)


@dataclass(eq=False)
class Entry:
    """One sequence: its FIFO lock and the id of the session it runs on (None: not open)."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    session_id: str | None = None
    users: int = 0  # requests holding or waiting for the lock


Key = tuple[str, str, int | str]  # (principal, model, sequence_id)


class SequenceTable:
    """(principal, model, sequence_id) -> Entry; loop thread only. Scoped by the caller as
    sessions are (service/principal.py): two callers' sequence 42 are two sequences."""

    def __init__(self) -> None:
        self._entries: dict[Key, Entry] = {}
        self._starts = 0

    def __len__(self) -> int:
        return sum(1 for e in self._entries.values() if e.session_id is not None)

    def enter(self, key: Key) -> Entry:
        """The entry (created if new), counted as used until `leave`. Synchronous: a caller
        that then awaits its lock queues in arrival order."""
        entry = self._entries.setdefault(key, Entry())
        entry.users += 1
        return entry

    def leave(self, key: Key, entry: Entry) -> None:
        entry.users -= 1
        idle = entry.users == 0 and entry.session_id is None
        if idle and self._entries.get(key) is entry:
            del self._entries[key]

    def started(self, held: Callable[[str], bool]) -> None:
        """Count a START; every SWEEP_EVERY, forget idle entries whose session is no longer
        `held` (expired sessions the clients never came back for)."""
        self._starts += 1
        if self._starts % SWEEP_EVERY:
            return
        for key, entry in list(self._entries.items()):
            if entry.users == 0 and (entry.session_id is None or not held(entry.session_id)):
                del self._entries[key]


def not_started(params: SequenceParams, model: str) -> Exception:
    return invalid(
        f"{params.name(model)} is not open: its first request must set sequence_start=true"
    )


def gone(params: SequenceParams, model: str, exc: SessionNotFound) -> Exception:
    """A sequence whose session is gone (idle expiry, ended elsewhere), named for the client."""
    if isinstance(exc, SessionExpired):
        return invalid(
            f"{params.name(model)} expired after its idle timeout: start it again with "
            "sequence_start=true"
        )
    return not_started(params, model)
