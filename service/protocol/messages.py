"""Plain messages between a protocol front and the session layer.

Requests are what a client asked for; replies carry values for the front to encode (the
ChunkOutcome, the session's id, labels, options and counts as they were when the reply was
made), never a live Session. A chunk's input stays in the front's own form behind `InputSource`
until the session (and so the model's description) is known: it is decoded once, by the layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

from lstmserve.contract import ModelDescription
from service.engine.types import ChunkOutcome, StepResult, StreamOptions
from service.errors import LstmServeError

if TYPE_CHECKING:
    from service.engine.session.sessions import Session


class InputSource(Protocol):
    """A chunk's input in the front's form; decoded against the session's model."""

    def decode(self, desc: ModelDescription, max_steps: int, field: str) -> np.ndarray:
        """(T,) int64 tokens or (T, F) float32 frames; InvalidInput naming `field`."""
        ...

    def text(self) -> str | None:
        """The chunk's text, if it is text (streamed text is held back where it may still
        change: the layer tokenizes it against the session's held text)."""
        ...

    def steps_hint(self) -> int:
        """At most how many steps this decodes to, found without decoding (budgets)."""
        ...

    def nbytes(self) -> int:
        """The input's size on the wire (read-ahead bounds)."""
        ...


@dataclass(frozen=True, slots=True)
class Open:
    model: str
    version: int
    options: StreamOptions


@dataclass(frozen=True, slots=True)
class Resume:
    session_id: str
    options: StreamOptions | None


@dataclass(frozen=True, slots=True)
class Restore:
    snapshot: bytes
    options: StreamOptions | None


@dataclass(slots=True)  # per chunk: not frozen (3x the cost)
class Chunk:
    seq: int
    input: InputSource


@dataclass(frozen=True, slots=True)
class Reset:
    seq: int


@dataclass(frozen=True, slots=True)
class TakeSnapshot:
    pass


@dataclass(frozen=True, slots=True)
class End:
    pass


@dataclass(frozen=True, slots=True)
class Unset:
    """A message with no kind set (the front names what was expected)."""

    expected: str


Attach = Open | Resume | Restore
Request = Open | Resume | Restore | Chunk | Reset | TakeSnapshot | End | Unset


@dataclass(frozen=True, slots=True)
class SessionEntry:
    """One entry of a multi-session message: a request for the session it names."""

    session_id: str  # empty for open / restore
    request: Request


SMALL_MESSAGE_BYTES = 64  # what a message without an input or a snapshot counts as


def request_bytes(request: Request) -> int:
    """About how many bytes a request holds (read-ahead bounds)."""
    if isinstance(request, Chunk):
        return request.input.nbytes() + SMALL_MESSAGE_BYTES
    if isinstance(request, Restore):
        return len(request.snapshot) + SMALL_MESSAGE_BYTES
    return SMALL_MESSAGE_BYTES


def entries_bytes(entries: list[SessionEntry]) -> int:
    """About how many bytes a multi-session message holds."""
    return sum(request_bytes(e.request) for e in entries) + SMALL_MESSAGE_BYTES


# -- replies --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Opened:
    """A session attached (opened, resumed or restored), as it was then."""

    session_id: str
    model: str
    version: int
    resumed: bool
    last_seq: int
    total_steps: int
    options: StreamOptions
    labels: tuple[str, ...]

    @staticmethod
    def of(session: Session, resumed: bool) -> Opened:
        model = session.model
        return Opened(session.id, model.name, model.version, resumed, session.last_seq,
                      session.total_steps, session.options, model.description.labels)  # fmt: skip


@dataclass(slots=True)  # per chunk: not frozen (3x the cost)
class ChunkDone:
    """A chunk's reply: applied or duplicate (`outcome`), or rejected in-band (`error`; the
    session's `total_steps`, unchanged). `labels` and `top_k` name its top labels."""

    seq: int
    outcome: ChunkOutcome | None
    error: LstmServeError | None
    total_steps: int
    labels: tuple[str, ...]
    top_k: int

    @staticmethod
    def of(session: Session, seq: int, outcome: ChunkOutcome | None,
           error: LstmServeError | None = None) -> ChunkDone:  # fmt: skip
        labels = session.model.description.labels
        total = outcome.total_steps if outcome is not None else session.total_steps
        return ChunkDone(seq, outcome, error, total, labels, session.options.top_k)


@dataclass(frozen=True, slots=True)
class ResetDone:
    seq: int
    duplicate: bool


@dataclass(frozen=True, slots=True)
class Snapshot:
    data: bytes
    last_seq: int
    total_steps: int
    final: bool


@dataclass(frozen=True, slots=True)
class Ended:
    total_steps: int
    last_seq: int
    # The classification at the end (after the held-back text was fed), if there was a step.
    final: StepResult | None = None
    flushed_steps: int = 0  # steps of held-back text fed at the end
    # How `final`'s top labels are named (the model's labels, the session's top_k).
    labels: tuple[str, ...] = field(default=(), compare=False)
    top_k: int = field(default=1, compare=False)
    duplicate: bool = False  # the session had already ended: a resent `end`, answered again


@dataclass(frozen=True, slots=True)
class Failed:
    """A multi-session entry's session-level error, answered in-band."""

    error: LstmServeError


Body = Opened | ChunkDone | ResetDone | Snapshot | Ended | Failed


@dataclass(slots=True)  # per chunk: not frozen (3x the cost)
class Reply:
    """A reply for one session (`session_id` empty when an entry failed before naming one)."""

    session_id: str
    body: Body


@dataclass(frozen=True, slots=True)
class MultiReply:
    """The reply to one multi-session message: one per entry, in entry order."""

    replies: list[Reply]
