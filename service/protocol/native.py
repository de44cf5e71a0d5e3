"""Streams terminated by the native front (native/), answered a tick at a time.

The native front owns the clients' `Stream` and `StreamMulti` calls; once per batching tick it
hands over every message that arrived (at most one per stream) and the streams that closed
since. Each `Stream` message gets what `StreamConversation` would have answered: the first
attaches the stream's session, later ones go through the same `SessionLayer` calls, and a
chunk's in-band errors stay in-band while what ends a `Stream` with a status ends this one the
same way. The tick's chunks go to the engine as one `Engine.apply_chunks` call, so they share
batches. Each `StreamMulti` stream is a `MultiConversation` (the Python front's rules, the same
code), its messages answered concurrently with the tick's chunks, so the engine's batcher
groups their runs.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Container, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeGuard

import numpy as np

from service import metrics, principal
from service.engine.session.sessions import Session
from service.engine.text.textstream import ids_after_held
from service.engine.types import ChunkOutcome, ChunkWork
from service.errors import InvalidInput, LstmServeError
from service.protocol.messages import (
    Body,
    Chunk,
    Ended,
    InputSource,
    MultiReply,
    Reply,
    Request,
    SessionEntry,
)
from service.protocol.multi import RPC as MULTI_RPC
from service.protocol.multi import MultiConversation
from service.protocol.native_spans import TickSpans, open_spans
from service.protocol.session import (
    FINAL_MESSAGE_GRACE_S,
    IN_BAND,
    SessionLayer,
    chunk_done,
    draining_error,
)

if TYPE_CHECKING:
    from service.engine.core import Engine
    from service.engine.model.worker import ModelWorker

log = logging.getLogger(__name__)

RPC = "Stream"


@dataclass(slots=True)
class NativeEntry:
    """One client stream's message; `caller` is set on its first (who opened it). A StreamMulti
    message (`multi`) has its entries as `request`."""

    stream: int
    request: Request | list[SessionEntry] | LstmServeError  # an error: malformed
    caller: str | None = None
    refused: LstmServeError | Exception | None = None  # the caller was not authenticated
    multi: bool = False
    parent: object = None  # on the first, when traced: the caller's trace context (its metadata)


@dataclass(slots=True)
class NativeOutcome:
    """What the front does: write `reply` (if any), then end the stream with `error`'s status,
    or OK if `finish`."""

    reply: Reply | MultiReply | None = None  # MultiReply: on a StreamMulti stream
    error: BaseException | None = None
    finish: bool = False


@dataclass(slots=True)
class PackedChunks:
    """A tick's plain chunks of one input kind as columns, on streams past their first message:
    chunk j is `seqs[j]` with `values[offsets[j]:offsets[j + 1]]` on stream `streams[j]`: token
    ids (`kind` "tokens", int64), feature frames ("features", float32, row-major, `counts[j]`
    frames as sent: 0 = as many as fit), or UTF-8 text ("text", uint8: the bytes; `inputs(j)` its
    input as the codec reads an entry's, decoded by the entry path's own code). `request(j)` is
    the same chunk as the front's codec reads it, for any chunk this path does not take (the
    answer is then the entry's, exactly)."""

    kind: str
    streams: list[int]
    seqs: list[int]
    offsets: np.ndarray  # (n + 1,) int64, checked to start at 0, never decrease, end at values
    values: np.ndarray
    request: Callable[[int], Request]
    counts: list[int] | None = None  # frames only
    inputs: Callable[[int], InputSource] | None = None  # text only: chunk j's, as the codec's

    def __len__(self) -> int:
        return len(self.streams)


@dataclass(slots=True)
class _Stream:
    """A client stream the front holds: its caller, its session once attached."""

    caller: str
    token: object
    session: Session | None = None
    parent: object = None  # the caller's trace context (its messages' spans' parent)


@dataclass(slots=True)
class _MultiStream:
    """A StreamMulti client stream the front holds: its caller and its conversation."""

    caller: str
    conversation: MultiConversation


class NativeStreams:
    """Every client stream of one native front: their sessions and the ticks' answers."""

    def __init__(self, layer: SessionLayer) -> None:
        self.layer = layer
        self._streams: dict[int, _Stream] = {}
        self._multis: dict[int, _MultiStream] = {}
        self._busy: set[int] = set()  # streams with a message being answered
        self._final: dict[int, asyncio.Future[None]] = {}  # streams whose last message is sent

    def __len__(self) -> int:
        return len(self._streams) + len(self._multis)

    async def answer(
        self, entries: Sequence[NativeEntry], closed: Sequence[tuple[int, bool]] = (),
        packed: Sequence[PackedChunks] = (),
    ) -> list[NativeOutcome | ChunkOutcome]:  # fmt: skip
        """One answer per message, the entries then each group of packed chunks: a plain
        chunk's is its ChunkOutcome (the reply the front writes from it), any other a
        NativeOutcome. The closed streams' sessions are detached first."""
        for stream, ok in closed:
            self._forget(stream, "OK" if ok else "CANCELLED")
        ids = [e.stream for e in entries]
        for chunks in packed:
            ids += chunks.streams
        outcomes: list[NativeOutcome | ChunkOutcome | None] = [None] * len(ids)
        work: list[tuple[int, ChunkWork]] = []
        multis: list[tuple[int, NativeEntry]] = []
        spans = open_spans(self.layer.tracing, RPC, entries, packed, self._streams, self._final,
                           self.draining) if self.layer.tracing.enabled else None  # fmt: skip
        self._busy.update(ids)
        try:
            for i, entry in enumerate(entries):
                if entry.multi:
                    multis.append((i, entry))
                    continue
                outcomes[i] = await self._entry(entry, i, work, spans)
            base, taking, held_back = len(entries), self._taking, self._final.keys()
            if spans is not None and spans.streams:  # a traced chunk is answered as an entry
                taking, held_back = spans.untraced(taking), held_back | spans.streams
            for chunks in packed:
                if chunks.kind == "text":
                    taken = _take_text(chunks, base, outcomes, self._streams, taking,
                                       self._decode_chunk)  # fmt: skip
                else:
                    taken = _take_packed(chunks, base, self._streams, held_back, self.draining,
                                         self.layer.limits.max_chunk_steps)  # fmt: skip
                work += taken.work
                for i, entry in taken.others:
                    outcomes[i] = await self._entry(entry, i, work, spans)
                base += len(chunks)
            await _run_tick(self.layer.engine, work, outcomes, spans, multis, self._multi)
        except BaseException as exc:
            if spans is not None:
                spans.fail(exc)
            raise
        finally:
            self._busy.difference_update(ids)
        if spans is not None:
            spans.end(outcomes)
        done = [o for o in outcomes if o is not None]
        for stream, outcome in zip(ids, done, strict=True):
            if isinstance(outcome, NativeOutcome) and (outcome.error is not None or outcome.finish):
                self._forget(stream, "OK" if outcome.error is None else _code(outcome.error))
        return done

    async def _entry(
        self, entry: NativeEntry, i: int, work: list[tuple[int, ChunkWork]],
        spans: TickSpans | None = None,
    ) -> NativeOutcome | None:  # fmt: skip
        """An entry's outcome, or None for a valid chunk (added to `work`); in its span, if
        traced."""
        if spans is not None:
            return await spans.within(i, self._entry(entry, i, work))
        settled = await _settled(entry, self._final)
        if settled is not None:
            return settled
        request = entry.request
        assert not isinstance(request, LstmServeError | list)
        stream = self._streams.get(entry.stream)
        if stream is not None and stream.session is not None and self.draining:
            return await _last_message(self.layer, stream)  # not applied: resent where it continues
        if stream is None:
            stream = _Stream(entry.caller or principal.ANONYMOUS, object(), parent=entry.parent)
            self._streams[entry.stream] = stream
        return await _as_caller(stream.caller, RPC, self._message(stream, request, i, work))

    async def _message(
        self, stream: _Stream, request: Request, i: int, work: list[tuple[int, ChunkWork]]
    ) -> NativeOutcome | None:
        """A Stream message's outcome: the first attaches, a valid chunk goes to `work`."""
        if stream.session is None:
            stream.session, opened = await self.layer.attach(request, stream.token)
            return NativeOutcome(Reply(opened.session_id, opened))
        session = stream.session
        if isinstance(request, Chunk):
            return self._decode_chunk(session, stream.token, request, i, work)
        body = await self.layer.handle(session, request, RPC, stream.token)
        return NativeOutcome(Reply(session.id, body), finish=_ends(body))

    def _decode_chunk(
        self, session: Session, token: object, chunk: Chunk, i: int,
        work: list[tuple[int, ChunkWork]],
    ) -> NativeOutcome | None:  # fmt: skip
        try:
            steps, held = self.layer.decode(session, chunk.input, "chunk.input")
        except InvalidInput as exc:
            return NativeOutcome(Reply(session.id, chunk_done(session, chunk.seq, exc, RPC)))
        work.append((i, ChunkWork(session, chunk.seq, steps, held, token)))
        return None

    async def _multi(self, entry: NativeEntry) -> NativeOutcome:
        """A StreamMulti message's outcome, from the stream's `MultiConversation`."""
        held = self._multis.get(entry.stream)
        if held is None and entry.refused is None:  # a malformed message's call counts too
            # each message's span is a child of the caller's trace context
            conversation = MultiConversation(self.layer, parent=entry.parent)
            held = _MultiStream(entry.caller or principal.ANONYMOUS, conversation)
            self._multis[entry.stream] = held
        settled = await _settled(entry, self._final)
        if settled is not None:
            return settled
        assert held is not None
        request = entry.request
        if self.draining:  # not applied: resent where its sessions continue
            return await _last_multi(held)
        assert isinstance(request, list)
        outcome = await _as_caller(held.caller, MULTI_RPC, _multi_reply(held.conversation, request))
        assert outcome is not None
        return outcome

    # -- drain: the last message of each stream ------------------------------------------------

    def _taking(self, stream: int) -> bool:
        """Whether a packed chunk of `stream` may be answered on the packed path (not while
        draining, nor once its last message is on its way)."""
        return not self.draining and stream not in self._final

    @property
    def draining(self) -> bool:
        return self.layer.engine.drain_started.is_set()

    async def drain(self, send: Callable[[int, NativeOutcome], Awaitable[None]]) -> None:
        """Send (`send`) the last message of every attached stream with nothing in flight; the
        others get theirs in reply to the message in flight or by the next call."""
        last: list[tuple[int, Callable[[], Awaitable[NativeOutcome]]]] = [
            (sid, functools.partial(_last_message, self.layer, held))
            for sid, held in self._streams.items() if held.session is not None
        ]  # fmt: skip
        last += [(sid, functools.partial(_last_multi, held))
                 for sid, held in self._multis.items()]  # fmt: skip
        for stream_id, message in last:
            if stream_id in self._busy or stream_id in self._final:
                continue
            if stream_id not in self._streams and stream_id not in self._multis:
                continue  # ended meanwhile
            done = asyncio.get_running_loop().create_future()
            self._final[stream_id] = done
            try:
                await send(stream_id, await message())
            finally:
                done.set_result(None)
                del self._final[stream_id]
            self._forget(stream_id, "UNAVAILABLE")

    def _forget(self, stream: int, code: str) -> None:
        """The stream is over: its session detached, the call counted as the Python front
        counts it."""
        multi = self._multis.pop(stream, None)
        if multi is not None:
            metrics.REQUESTS.labels(MULTI_RPC, metrics.UNKNOWN_MODEL, code).inc()
            multi.conversation.close()
            return
        held = self._streams.pop(stream, None)
        if held is None:
            return
        model = held.session.model.name if held.session is not None else metrics.UNKNOWN_MODEL
        metrics.REQUESTS.labels(RPC, model, code).inc()
        if held.session is not None:
            held.session.detach(held.token)

    def forget_all(self) -> None:
        """The front went away: every stream it held is over."""
        for stream in [*self._streams, *self._multis]:
            self._forget(stream, "CANCELLED")


async def _as_caller(
    caller: str, rpc: str, answer: Awaitable[NativeOutcome | None]
) -> NativeOutcome | None:
    """`answer` awaited as `caller` (principal.CALLER); what it raises ends the stream, as on
    the Python front: an LstmServeError with its status (StreamMulti: too many entries), any
    other exception (a bug, logged) INTERNAL."""
    scope = principal.CALLER.set(caller)
    try:
        return await answer
    except LstmServeError as exc:
        return NativeOutcome(error=exc)
    except Exception as exc:
        log.exception("unexpected error in %s (native front)", rpc, exc_info=exc)
        return NativeOutcome(error=exc)
    finally:
        principal.CALLER.reset(scope)


async def _multi_reply(
    conversation: MultiConversation, entries: list[SessionEntry]
) -> NativeOutcome:
    """A StreamMulti message's reply, in its span when traced."""
    return NativeOutcome(await conversation.answer_traced(entries))


def unknown_on_drain() -> tuple[LstmServeError, float]:
    """What a draining server's front does with the calls the server does not know (none
    of their messages sent yet), and those opened during the drain: it ends them with this
    error, a StreamMulti call at once (`MultiConversation.replies`), a Stream call if no
    first message comes within these seconds (`StreamConversation._next`: a first message
    is read, and refused by attach, not cut off while the client writes it)."""
    return draining_error(), FINAL_MESSAGE_GRACE_S


async def _last_message(layer: SessionLayer, stream: _Stream) -> NativeOutcome:
    """A draining server's last message on a stream: its session's final snapshot (with
    --snapshot-key), then UNAVAILABLE, as the Python front ends a stream on drain."""
    session, reply = stream.session, None
    assert session is not None
    if layer.hands_over and not session.ended:
        try:
            snap = await layer.snapshot(session, True, stream.token)
            reply = Reply(session.id, snap)
        except LstmServeError:
            pass  # ended, expired or taken over meanwhile: nothing to hand over
    return NativeOutcome(reply, draining_error())


async def _last_multi(held: _MultiStream) -> NativeOutcome:
    """The same for a StreamMulti stream: the final snapshots of the live sessions it named
    (MultiConversation.last_message), then UNAVAILABLE."""
    return NativeOutcome(await held.conversation.last_message(), draining_error())


async def _run_tick(
    engine: Engine, work: list[tuple[int, ChunkWork]],
    outcomes: list[NativeOutcome | ChunkOutcome | None], spans: TickSpans | None,
    multis: list[tuple[int, NativeEntry]], multi: Callable[[NativeEntry], Awaitable[NativeOutcome]],
) -> None:  # fmt: skip
    """The tick's chunks in one engine call, concurrently with its StreamMulti messages
    (`multi` answers one) and its traced chunks (each in its span): the engine's batcher
    groups their runs."""
    alone = spans.take_traced(work) if spans is not None else []
    if not multis and not alone:
        await _run_chunks(engine, work, outcomes)
        return
    answers = await asyncio.gather(
        _run_chunks(engine, work, outcomes),
        *(multi(e) for _, e in multis),
        *(spans.within(i, _run_chunks(engine, [(i, w)], outcomes))  # type: ignore[union-attr]
          for i, w in alone),
    )  # fmt: skip
    for (i, _), answer in zip(multis, answers[1 : 1 + len(multis)], strict=True):
        outcomes[i] = answer


async def _run_chunks(
    engine: Engine, work: list[tuple[int, ChunkWork]],
    outcomes: list[NativeOutcome | ChunkOutcome | None],
) -> None:  # fmt: skip
    """The tick's chunks in one engine call (a session two streams name: in turn); the
    plain ones counted once per model."""
    counted: dict[ModelWorker, int] = {}
    while work:  # a session named by two streams in one tick: its chunks in turn
        now, later = work, []
        if len({id(w.session) for _, w in work}) != len(work):
            now, seen = [], set()
            for item in work:
                (later if id(item[1].session) in seen else now).append(item)
                seen.add(id(item[1].session))
        results = await _apply(engine, [w for _, w in now])
        for (i, item), result in zip(now, results, strict=True):
            if _plain(result):
                model = item.session.model
                counted[model] = counted.get(model, 0) + 1
                outcomes[i] = result
            else:
                outcomes[i] = _chunk_outcome(item, result)
        work = later
    for model, count in counted.items():
        metrics.chunk_requests(RPC, model.name, "OK").inc(count)


async def _apply(engine: Engine, work: list[ChunkWork]) -> list[ChunkOutcome | BaseException]:
    """One engine call (a lone chunk: apply_chunk, as the Python front applies it); a
    failure of the call as a whole fails each of its chunks."""
    try:
        if len(work) == 1:
            w = work[0]
            try:
                return [await engine.apply_chunk(w.session, w.seq, w.chunk, w.held, w.attached)]
            except LstmServeError as exc:
                return [exc]
        return list(await engine.apply_chunks(work))
    except Exception as exc:
        log.exception("unexpected error in Stream (native front)", exc_info=exc)
        return [exc] * len(work)


def _chunk_outcome(item: ChunkWork, result: ChunkOutcome | BaseException) -> NativeOutcome:
    """As `SessionLayer.chunk` answers on Stream: bad input, a gap or a store that did not
    take it in-band; anything else ends the stream."""
    session = item.session
    if isinstance(result, BaseException) and not isinstance(result, IN_BAND):
        return NativeOutcome(error=result)
    done = chunk_done(session, item.seq, result, RPC)  # type: ignore[arg-type]
    finish = isinstance(result, ChunkOutcome) and result.ended
    return NativeOutcome(Reply(session.id, done), finish=finish)


async def _settled(
    entry: NativeEntry, final: dict[int, asyncio.Future[None]]
) -> NativeOutcome | None:
    """The outcome of a message answered without looking at it: its caller refused, a
    message that did not translate, or one on a stream whose last message is on its way;
    None for any other."""
    if entry.refused is not None:
        return NativeOutcome(error=entry.refused)
    if isinstance(entry.request, LstmServeError):
        return NativeOutcome(error=entry.request)
    last = final.get(entry.stream)
    if last is not None:  # nothing more is answered on it
        await last
        return NativeOutcome(error=draining_error())
    return None


@dataclass(slots=True)
class _Taken:
    work: list[tuple[int, ChunkWork]]  # (message index, the chunk) for the engine
    others: list[tuple[int, NativeEntry]]  # (message index, the entry) for the common path


# NativeStreams._decode_chunk: a chunk's steps into `work`, or its in-band refusal
Decode = Callable[[Session, object, Chunk, int, list[tuple[int, ChunkWork]]], NativeOutcome | None]


def _take_text(
    chunks: PackedChunks, base: int, outcomes: list[NativeOutcome | ChunkOutcome | None],
    streams: dict[int, _Stream], taking: Callable[[int], bool], decode: Decode,
) -> _Taken:  # fmt: skip
    """Packed text chunks (message index base + j), each decoded by the entry path's own
    `_decode_chunk` (`decode`: SessionLayer.decode: the model's tokenizer after the session's held
    text; a refusal in-band, as the entry's); a stream without a session, a draining
    server's (`taking` False), or a chunk whose decoding fails otherwise, as entries."""
    taken = _Taken([], [])
    for j, stream_id in enumerate(chunks.streams):
        i, held = base + j, streams.get(stream_id)
        if held is not None and held.session is not None and taking(stream_id) and \
                chunks.inputs is not None:  # fmt: skip
            chunk = Chunk(chunks.seqs[j], chunks.inputs(j))
            try:
                outcomes[i] = decode(held.session, held.token, chunk, i, taken.work)
                continue
            except Exception:  # a bug: the entry path answers it (INTERNAL, logged)
                pass
        taken.others.append((i, NativeEntry(stream_id, chunks.request(j))))
    return taken


def _take_packed(
    chunks: PackedChunks, base: int, streams: dict[int, _Stream], held_back: Container[int],
    draining: bool, max_steps: int,
) -> _Taken:  # fmt: skip
    """The packed chunks this path takes (message index base + j), after the checks
    `SessionLayer.decode` makes, vectorised; the others as entries for the common path: a
    stream `held_back` (its last message on its way, or traced), a stream without a session,
    a draining server, a model of the other input kind, a chunk with
    no step or too many, an id out of range, a value not finite, floats that are not whole
    frames."""
    frames = chunks.kind == "features"
    ranges = _token_ranges(chunks, max_steps) if not frames else []
    finite = _finite(chunks) if frames else []
    starts, seqs, values = chunks.offsets.tolist(), chunks.seqs, chunks.values
    taken = _Taken([], [])
    for j, stream_id in enumerate(chunks.streams):
        held = streams.get(stream_id)
        session = held.session if held is not None else None
        desc = session.model.description if session is not None else None
        steps = None
        if desc is not None and not draining and stream_id not in held_back and \
                desc.input_kind == chunks.kind:  # fmt: skip
            a, b = starts[j], starts[j + 1]
            if frames:
                assert chunks.counts is not None
                count, dim = chunks.counts[j], desc.feature_dim
                count = count or (b - a) // dim
                if finite[j] and b - a == count * dim and 1 <= count <= max_steps:
                    steps = values[a:b].reshape(count, dim)
            elif (span := ranges[j]) is not None and span[0] >= 0 and span[1] < desc.vocab_size:
                steps = values[a:b]
        if steps is None:
            taken.others.append((base + j, NativeEntry(stream_id, chunks.request(j))))
            continue
        assert session is not None and held is not None and desc is not None
        change = None
        if desc.tokenizer is not None:  # ids settle held text first, as decode_for does
            steps, change = ids_after_held(session.held, steps)
        taken.work.append((base + j, ChunkWork(session, seqs[j], steps, change, held.token)))
    return taken


def _token_ranges(chunks: PackedChunks, max_steps: int) -> list[tuple[int, int] | None]:
    """Each token chunk's (lowest, highest) id, or None if it has no step or too many."""
    offsets, ids = chunks.offsets, chunks.values
    lengths = np.diff(offsets)
    fits = (lengths >= 1) & (lengths <= max_steps)
    if fits.all() and ids.size:
        low = np.minimum.reduceat(ids, offsets[:-1]).tolist()
        high = np.maximum.reduceat(ids, offsets[:-1]).tolist()
        return list(zip(low, high, strict=True))
    return [(int(ids[a:b].min()), int(ids[a:b].max())) if ok else None
            for a, b, ok in zip(offsets[:-1], offsets[1:], fits.tolist(), strict=True)]  # fmt: skip


def _finite(chunks: PackedChunks) -> list[bool]:
    """Whether each frame chunk's values are all finite (the step counts are checked per
    chunk, against its session's feature_dim)."""
    bad = ~np.isfinite(chunks.values)
    if not bad.any():
        return [True] * len(chunks)
    seen = np.concatenate(([0], np.cumsum(bad)))
    return (seen[chunks.offsets[1:]] == seen[chunks.offsets[:-1]]).tolist()


def _plain(result: ChunkOutcome | BaseException) -> TypeGuard[ChunkOutcome]:
    """A chunk applied or resent whose reply is only the columns the front packs: no per-step
    probabilities, no decision, the session not ended by it."""
    if not isinstance(result, ChunkOutcome) or result.ended:
        return False
    step = result.result
    return step is None or (step.step_values is None and step.decision is None)


def _ends(body: Body) -> bool:
    return isinstance(body, Ended)


def _code(exc: BaseException) -> str:
    return exc.code if isinstance(exc, LstmServeError) else "INTERNAL"
