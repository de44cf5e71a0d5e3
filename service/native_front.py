"""The Python side of the native front (native/): its internal link, on a Unix socket only.

With --native-front-dir DIR the server also listens on DIR/grpc.sock (every public RPC, as on
the gRPC port, authentication included: the native front passes through what it does not serve
itself) and serves the front's ticks on DIR/ticks.sock: length-prefixed `Tick` frames in,
`TickReply` frames out (proto/lstmserve/v1/native_front.proto), read and written by the event
loop itself, without a gRPC stream in between. The public port never reaches it. DIR is made
private (0700): whoever can connect to ticks.sock is trusted to report the callers'
credentials. A tick's messages are translated by the same codec as the Python front's
(service/codec.py), answered by `NativeStreams` (service/protocol/native.py) and encoded by the
same codec.
"""

from __future__ import annotations

import asyncio
import asyncio.base_events
import logging
import os
import struct
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from lstmserve.v1 import lstm_serve_pb2 as pb
from lstmserve.v1 import native_front_pb2 as npb
from service import codec, metrics
from service.engine.types import ChunkOutcome
from service.errors import ConfigError, ProtocolError
from service.protocol.columns import F32, I64, U32, U64
from service.protocol.messages import MultiReply, Request, SessionEntry
from service.protocol.native import (
    NativeEntry,
    NativeOutcome,
    NativeStreams,
    PackedChunks,
    unknown_on_drain,
)
from service.protocol.session import SessionLayer
from service.security.auth import Authenticator, Unauthenticated
from service.status import numeric_code, status_code, status_message

log = logging.getLogger(__name__)

PUBLIC_SOCKET = "grpc.sock"
TICKS_SOCKET = "ticks.sock"
MAX_TICK_BYTES = 256 << 20  # a tick carries many streams' messages (each within 4 MiB)
U8 = np.dtype("u1")  # Tick.text_bytes


def private_dir(path: str) -> Path:
    """The sockets' directory, made if missing, readable by this user only; stale sockets
    removed."""
    folder = Path(path)
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(folder, 0o700)
        for name in (PUBLIC_SOCKET, TICKS_SOCKET):
            (folder / name).unlink(missing_ok=True)
    except OSError as exc:
        raise ConfigError(f"--native-front-dir {path!r}: {exc.strerror or exc}") from None
    return folder


FRAME = struct.Struct("<I")  # a frame's length, then its bytes (a Tick, or a TickReply)


class NativeFrontServicer:
    """Answers the native front's ticks: one reply per tick, one outcome per message."""

    def __init__(self, layer: SessionLayer, idle_timeout_s: float,
                 auth: Authenticator | None) -> None:  # fmt: skip
        self.layer = layer
        self.idle_timeout_s = idle_timeout_s
        self.auth = auth

    async def answer(self, streams: NativeStreams, tick: npb.Tick) -> npb.TickReply:
        """The tick's reply; ProtocolError if its columns do not fit together (the front's bug:
        the link ends)."""
        entries = [self._entry(e) for e in tick.entries]
        closed = list(zip(tick.closed, tick.closed_ok, strict=False))
        packed = read_chunks(tick)
        if entries:
            metrics.NATIVE_PACKINGS["entry"].inc(len(entries))
        for chunks in packed:
            metrics.NATIVE_PACKINGS[chunks.kind].inc(len(chunks))
        reply = self._reply(await streams.answer(entries, closed, packed))
        reply.tick = tick.id
        return reply

    def push(self, stream: int, outcome: NativeOutcome) -> npb.TickReply:
        """A message no tick asked for (tick 0): a draining server's last one on a stream."""
        reply = npb.TickReply()
        out = reply.outcomes.add()
        out.stream = stream
        self._fill(out, outcome)
        return reply

    @staticmethod
    def drain_notice() -> npb.TickReply:
        """A push (tick 0) when the server starts draining: how the front ends the calls the
        server does not know (TickReply.drain, native_front.proto)."""
        error, first_message_s = unknown_on_drain()
        reply = npb.TickReply(drain_first_message_ms=round(first_message_s * 1000))
        reply.drain.code, reply.drain.message = _status(error)
        return reply

    def _entry(self, entry: npb.TickEntry) -> NativeEntry:
        multi = entry.multi_stream
        if entry.malformed:  # one line, no traceback: a client's problem (as servicer.py)
            rpc, message = ("StreamMulti", "StreamMultiRequest") if multi else \
                ("Stream", "StreamRequest")  # fmt: skip
            error = codec.Malformed(f"lstmserve.v1.{message}", entry.size).error()
            log.warning("malformed request", extra={"fields": {"rpc": rpc, "error": str(error)}})
            return NativeEntry(entry.stream, error, multi=multi)
        request: Request | list[SessionEntry]
        if multi:
            request = [codec.session_entry(e) for e in entry.multi.entries]
        else:
            request = codec.stream_request(entry.request)
        parent = self._parent(entry) if entry.first else None
        if not entry.first or self.auth is None:
            return NativeEntry(entry.stream, request, multi=multi, parent=parent)
        authorization = entry.authorization if entry.has_authorization else None
        try:
            caller = self.auth.authenticate(authorization, entry.cert_cn or None)
        except Unauthenticated as exc:
            metrics.AUTH_FAILURES.labels(metrics.PROTOCOL_NATIVE, exc.reason).inc()
            return NativeEntry(entry.stream, request, refused=exc, multi=multi)
        metrics.CALLER_REQUESTS.labels(self.auth.label(caller), metrics.PROTOCOL_NATIVE).inc()
        return NativeEntry(entry.stream, request, caller, multi=multi, parent=parent)

    def _parent(self, entry: npb.TickEntry) -> object:
        """A stream's first message: the caller's trace context (its `traceparent` and
        `tracestate` metadata), its messages' spans' parent; None when tracing is off."""
        tracing = self.layer.tracing
        if not tracing.enabled or not entry.traceparent:
            return None
        return tracing.extract([("traceparent", entry.traceparent),
                                ("tracestate", entry.tracestate)])  # fmt: skip

    def _reply(self, outcomes: list[NativeOutcome | ChunkOutcome]) -> npb.TickReply:
        """The tick's reply: plain chunk replies packed (`_write_packed`), the others as
        messages."""
        reply = npb.TickReply()
        where: list[int] = []
        applied: list[ChunkOutcome] = []
        for i, outcome in enumerate(outcomes):
            if isinstance(outcome, ChunkOutcome):
                where.append(i)
                applied.append(outcome)
            else:
                out = reply.outcomes.add()
                out.index = i
                self._fill(out, outcome)
        if applied:
            _write_packed(reply, len(outcomes), where, applied)
        return reply

    def _fill(self, out: npb.TickOutcome, outcome: NativeOutcome) -> None:
        if isinstance(outcome.reply, MultiReply):
            response = codec.multi_response(outcome.reply, self.idle_timeout_s)
            out.multi_reply = response.SerializeToString()  # written by the front as it is
        elif outcome.reply is not None:
            out.reply.SetInParent()
            codec.fill_stream_response(out.reply, outcome.reply, self.idle_timeout_s)
        if outcome.error is not None:
            out.code, out.message = _status(outcome.error)
        elif outcome.finish:
            out.finish = True


def _write_packed(
    reply: npb.TickReply, n: int, where: list[int], applied: list[ChunkOutcome]
) -> None:
    """Messages `where` of a tick of n, plain chunk replies (`applied`: applied or a resend;
    no per-step probabilities, no decision), as little-endian columns: the front writes each
    ChunkResult itself. Flags: 1 duplicate, 2 has probabilities."""
    results = [a.result for a in applied]
    rows = [r.probs for r in results if r is not None and r.values.size]

    def column(values: list[int], dtype: str) -> bytes:
        out = np.zeros(n, dtype)
        out[where] = values
        return out.tobytes()

    flags = [(1 if a.duplicate else 0) | (2 if r is not None and r.values.size else 0)
             for a, r in zip(applied, results, strict=True)]  # fmt: skip
    packed = np.zeros(n, np.uint8)
    packed[where] = 1
    probabilities = np.concatenate(rows).astype("<f4", copy=False).tobytes() if rows else b""
    columns = npb.TickReply(
        packed=packed.tobytes(), flags=column(flags, "<u1"),
        seqs=column([a.seq for a in applied], "<u8"),
        total_steps=column([a.total_steps for a in applied], "<u8"),
        steps=column([0 if r is None else r.steps for r in results], "<u4"),
        held_characters=column([a.held_characters for a in applied], "<u4"),
        rewound_steps=column([0 if r is None else r.rewound_steps for r in results], "<u4"),
        probabilities=probabilities,
    )  # fmt: skip
    reply.MergeFrom(columns)


def tick_messages(tick: npb.Tick) -> int:
    """The client messages a tick carries: its entries and its packed chunks."""
    packed = len(tick.chunk_streams) + len(tick.frame_streams) + len(tick.text_streams)
    return len(tick.entries) + packed // 8


def read_chunks(tick: npb.Tick) -> list[PackedChunks]:
    """The tick's packed chunks (native_front.proto's Tick.chunk_*, frame_* and text_*), each
    group checked to fit together: ProtocolError if not (the front's bug: the link ends)."""
    packed = []
    if tick.chunk_streams:
        streams, seqs, offsets, ids = _columns(
            tick.id, "chunk", tick.chunk_streams, tick.chunk_seqs, tick.chunk_offsets,
            tick.chunk_tokens, I64,
        )  # fmt: skip
        request = _as_sent(seqs, lambda j: pb.SequenceInput(tokens=pb.TokenIds(
            ids=ids[offsets[j] : offsets[j + 1]].tolist())))  # fmt: skip
        packed.append(PackedChunks("tokens", streams, seqs, offsets, ids, request))
    if tick.frame_streams:
        streams, seqs, at, values = _columns(
            tick.id, "frame", tick.frame_streams, tick.frame_seqs, tick.frame_offsets,
            tick.frame_values, F32,
        )  # fmt: skip
        if len(tick.frame_counts) != 4 * len(streams):
            raise ProtocolError(f"tick {tick.id}: frame columns of different lengths")
        counts = np.frombuffer(tick.frame_counts, U32).tolist()
        request = _as_sent(seqs, lambda j: pb.SequenceInput(frames=pb.Frames(
            values=values[at[j] : at[j + 1]].tolist(), frame_count=counts[j])))  # fmt: skip
        packed.append(PackedChunks("features", streams, seqs, at, values, request, counts))
    if tick.text_streams:  # (a function of its own: the lambdas above read this scope's names)
        packed.append(_text_chunks(tick))
    return packed


def _text_chunks(tick: npb.Tick) -> PackedChunks:
    """The tick's packed text chunks (Tick.text_*), each text a str; ProtocolError if the
    columns do not fit or a text is not UTF-8 (the front parsed it as a protobuf string: it
    cannot be, but for a bug)."""
    streams, seqs, at, raw = _columns(
        tick.id, "text", tick.text_streams, tick.text_seqs, tick.text_offsets, tick.text_bytes,
        U8,
    )  # fmt: skip
    data, bounds, texts = tick.text_bytes, at.tolist(), []
    for j in range(len(streams)):
        try:
            texts.append(data[bounds[j] : bounds[j + 1]].decode())
        except UnicodeDecodeError as exc:
            raise ProtocolError(f"tick {tick.id}: text {j} is not UTF-8 ({exc.reason})") from None
    request = _as_sent(seqs, lambda j: pb.SequenceInput(text=texts[j]))

    def inputs(j: int) -> codec.PbInput:
        return codec.PbInput(pb.SequenceInput(text=texts[j]))

    return PackedChunks("text", streams, seqs, at, raw, request, inputs=inputs)


def _as_sent(
    seqs: list[int], source: Callable[[int], pb.SequenceInput]
) -> Callable[[int], Request]:
    """Packed chunk j as the codec reads the message the client sent."""

    def request(j: int) -> Request:
        chunk = pb.Chunk(seq=seqs[j], input=source(j))
        return codec.stream_request(pb.StreamRequest(chunk=chunk))

    return request


def _columns(
    tick: int, name: str, streams: bytes, seqs: bytes, offsets: bytes, values: bytes,
    dtype: np.dtype,
) -> tuple[list[int], list[int], np.ndarray, np.ndarray]:  # fmt: skip
    """One packed group's streams, seqs, offsets (int64) and values, checked to fit together."""
    n = len(streams) // 8
    if len(streams) % 8 or len(seqs) != 8 * n or len(offsets) != 4 * (n + 1):
        raise ProtocolError(f"tick {tick}: {name} columns of different lengths")
    if len(values) % dtype.itemsize:
        raise ProtocolError(f"tick {tick}: {name} values of {len(values)} bytes")
    at = np.frombuffer(offsets, U32).astype(np.int64)
    flat = np.frombuffer(values, dtype)
    if at[0] != 0 or at[-1] != len(flat) or (np.diff(at) < 0).any():
        raise ProtocolError(f"tick {tick}: {name} offsets do not fit their values")
    return np.frombuffer(streams, U64).tolist(), np.frombuffer(seqs, U64).tolist(), at, flat


def _status(exc: BaseException) -> tuple[int, str]:
    if isinstance(exc, Unauthenticated):
        return numeric_code(grpc.StatusCode.UNAUTHENTICATED), str(exc)
    return numeric_code(status_code(exc)), status_message(exc)


class TickLink(asyncio.Protocol):
    """One native front's connection: ticks read as they come (up to the front's
    --max-ticks-in-flight at once, never two messages of one stream), each answered in a task
    of its own and its reply written as soon as it is ready. Whatever breaks the link (a frame
    that does not parse, a reply that cannot be made) closes it: the front fails the streams it
    held, and they resume elsewhere."""

    def __init__(self, servicer: NativeFrontServicer, links: set[TickLink]) -> None:
        self.servicer = servicer
        self.links = links
        self.streams = NativeStreams(servicer.layer)
        self.buffer = bytearray()
        self.tasks: set[asyncio.Task[None]] = set()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.links.add(self)
        metrics.NATIVE_FRONT_LINKS.inc()
        self._spawn(self._drain())
        log.info("native front connected")

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        start = 0
        while len(buffer) - start >= FRAME.size:
            (size,) = FRAME.unpack_from(buffer, start)
            if size > MAX_TICK_BYTES:
                self._fail(f"a tick of {size} bytes (at most {MAX_TICK_BYTES})")
                return
            end = start + FRAME.size + size
            if len(buffer) < end:
                break
            try:
                tick = npb.Tick.FromString(bytes(buffer[start + FRAME.size : end]))
            except DecodeError:
                self._fail("a tick that does not parse")
                return
            start = end
            self._spawn(self._answer(tick))
        if start:
            del buffer[:start]

    def connection_lost(self, exc: Exception | None) -> None:
        self.links.discard(self)
        metrics.NATIVE_FRONT_LINKS.dec()
        for task in list(self.tasks):
            task.cancel()
        self.streams.forget_all()
        log.info("native front disconnected")

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _write(self, reply: npb.TickReply) -> None:
        assert self.transport is not None
        data = reply.SerializeToString()
        self.transport.write(FRAME.pack(len(data)) + data)  # whole: frames never interleave

    def _fail(self, why: str) -> None:
        log.error("native front link closed: %s", why)
        self.close()

    async def _push(self, stream: int, outcome: NativeOutcome) -> None:
        self._write(self.servicer.push(stream, outcome))

    async def _answer(self, tick: npb.Tick) -> None:
        start = time.perf_counter()
        try:
            self._write(await self.servicer.answer(self.streams, tick))
            metrics.NATIVE_TICK_MESSAGES.observe(tick_messages(tick))
            metrics.NATIVE_TICK_SECONDS.observe(time.perf_counter() - start)
            if self.streams.draining:  # the streams this tick held get their last message now
                await self.streams.drain(self._push)
        except asyncio.CancelledError:
            raise  # the link is ending already
        except Exception as exc:  # the front fails the streams it held; they resume elsewhere
            log.exception("native front link closed: a tick failed", exc_info=exc)
            self.close()

    async def _drain(self) -> None:
        await self.servicer.layer.engine.drain_started.wait()
        try:
            self._write(self.servicer.drain_notice())  # the calls it has sent nothing of
            await self.streams.drain(self._push)
        except Exception as exc:
            log.exception("native front link closed: the drain failed", exc_info=exc)
            self.close()


class TicksServer:
    """The native front's ticks, served on folder/ticks.sock only (a Unix socket in a private
    directory; never a public port). The same shape as a grpc.aio server for App's start/stop."""

    def __init__(self, servicer: NativeFrontServicer, path: Path) -> None:
        self.servicer = servicer
        self.path = path
        self.links: set[TickLink] = set()
        self._server: asyncio.base_events.Server | None = None
        metrics.NATIVE_STREAMS_HELD.track(self)

    def streams_held(self) -> int:
        """The client streams every connected front holds here (read from the scrape thread:
        list() copies the set in one step under the GIL)."""
        return sum(len(link.streams) for link in list(self.links))

    async def start(self) -> None:
        try:
            self._server = await asyncio.get_running_loop().create_unix_server(
                lambda: TickLink(self.servicer, self.links), str(self.path)
            )
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {self.path} (--native-front-dir): {exc.strerror or exc}"
            ) from None

    async def stop(self, grace: float | None = None) -> None:
        """Stops listening and closes every front's link (their streams end UNAVAILABLE)."""
        if self._server is not None:
            self._server.close()
        for link in list(self.links):
            link.close()
        if self._server is not None:
            await self._server.wait_closed()


def build_ticks_server(
    layer: SessionLayer, idle_timeout_s: float, auth: Authenticator | None, folder: Path
) -> TicksServer:
    """The internal server of the native front's ticks, bound to folder/ticks.sock only."""
    return TicksServer(NativeFrontServicer(layer, idle_timeout_s, auth), folder / TICKS_SOCKET)
