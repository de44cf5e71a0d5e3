"""The native front's Stream messages traced as the Python front traces them
(service/protocol/stream.py): one span per message, a child of the caller's trace context of
the stream's call (its first message's traceparent and tracestate), current while the message
is answered (the engine's admission, queue wait and store save spans go under it), ended with
its outcome: OK, the code of an in-band refusal, or the status that ends the stream.

NativeStreams opens a tick's spans only when tracing is on (one check per tick); a message not
sampled has none, and is answered as if tracing were off. A traced chunk is applied in a task
of its own, with its span current, beside the tick's other chunks (they still share batches:
the batcher takes every chunk submitted in the same loop turn).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, TypeVar

from service.engine.types import ChunkOutcome
from service.errors import LstmServeError
from service.protocol.messages import Chunk
from service.protocol.session import KIND_NAMES, kind_name
from service.tracing import LSTM_SERVE_SERVICE, NO_REQUEST_SPAN, RequestSpan, Tracing

if TYPE_CHECKING:
    import asyncio

    from service.protocol.native import NativeEntry, NativeOutcome, PackedChunks, _Stream

R = TypeVar("R")
W = TypeVar("W")
CHUNK = KIND_NAMES[Chunk]
_UNTRACED: AbstractContextManager[object] = nullcontext()


class TickSpans:
    """The spans of one tick's sampled Stream messages, by message index; `streams`: their
    streams (a packed chunk among them is answered as an entry, in its span)."""

    __slots__ = ("rpc", "spans", "streams", "tracing")

    def __init__(self, tracing: Tracing, rpc: str) -> None:
        self.tracing = tracing
        self.rpc = rpc
        self.spans: dict[int, RequestSpan] = {}
        self.streams: set[int] = set()

    def open(self, i: int, stream: int, parent: object, kind: str) -> None:
        attributes: dict[str, str | int] = {"lstmserve.message": kind}
        span = self.tracing.rpc(LSTM_SERVE_SERVICE, self.rpc, parent, attributes)
        if span is not NO_REQUEST_SPAN:  # sampled
            self.spans[i] = span
            self.streams.add(stream)

    def untraced(self, taking: Callable[[int], bool]) -> Callable[[int], bool]:
        """`taking` (whether a stream's packed chunk takes the packed path), false for the
        traced streams."""
        traced = self.streams
        return lambda stream: stream not in traced and taking(stream)

    def take_traced(self, work: list[tuple[int, W]]) -> list[tuple[int, W]]:
        """The traced chunks of `work` (message index, chunk), taken out of it."""
        if not self.spans:
            return []
        traced = [item for item in work if item[0] in self.spans]
        work[:] = [item for item in work if item[0] not in self.spans]
        return traced

    def active(self, i: int) -> AbstractContextManager[object]:
        """Message i's span made current (nothing when it has none)."""
        span = self.spans.get(i)
        return _UNTRACED if span is None else span.active()

    async def within(self, i: int, answer: Awaitable[R]) -> R:
        """`answer` awaited with message i's span current."""
        with self.active(i):
            return await answer

    def end(self, outcomes: Sequence[NativeOutcome | ChunkOutcome | None]) -> None:
        """Every span ended with its message's outcome: the status that ends the stream, or
        its `reply` span, then OK or the code of an in-band refusal."""
        for i, span in self.spans.items():
            outcome = outcomes[i]
            if isinstance(outcome, ChunkOutcome) or outcome is None:
                refused = None
            elif outcome.error is not None:
                span.fail(outcome.error)
                continue
            else:
                refused = getattr(outcome.reply.body, "error", None) if outcome.reply else None
            with span.reply():
                pass  # the reply is encoded with the tick's, once every message is answered
            if isinstance(refused, LstmServeError):
                span.finish(refused.code, type(refused).__name__)
            else:
                span.finish()
        self.spans.clear()

    def fail(self, exc: BaseException) -> None:
        """The tick failed as a whole (a bug): every span ends with what it ends with."""
        for span in self.spans.values():
            span.fail(exc)
        self.spans.clear()


def open_spans(
    tracing: Tracing, rpc: str, entries: Sequence[NativeEntry], packed: Sequence[PackedChunks],
    streams: Mapping[int, _Stream], final: Mapping[int, asyncio.Future[None]], draining: bool,
) -> TickSpans:  # fmt: skip
    """The spans of a tick's Stream messages, entries and packed chunks (message index as in
    NativeStreams.answer), each under its stream's caller context; none for a message the
    Python front would not read as a request: a StreamMulti one (its conversation traces it),
    a refused caller's, a malformed one, one after the stream's last (drain)."""
    spans = TickSpans(tracing, rpc)

    def traced(stream: int) -> tuple[bool, object]:
        held = streams.get(stream)
        if stream in final or (draining and held is not None and held.session is not None):
            return False, None
        return True, held.parent if held is not None else None

    for i, entry in enumerate(entries):
        if entry.multi or entry.refused is not None or isinstance(entry.request, LstmServeError):
            continue
        ok, parent = traced(entry.stream)
        if ok:
            spans.open(i, entry.stream, parent if entry.parent is None else entry.parent,
                       kind_name(entry.request))  # fmt: skip
    base = len(entries)
    for chunks in packed:
        for j, stream in enumerate(chunks.streams):
            ok, parent = traced(stream)
            if ok:
                spans.open(base + j, stream, parent, CHUNK)
        base += len(chunks)
    return spans
