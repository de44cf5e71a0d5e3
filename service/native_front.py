"""The Python side of the native front (native/): its internal link, on a Unix socket only.

With --native-front-dir DIR the server also listens on DIR/grpc.sock (every public RPC, as on
the gRPC port, authentication included: the native front passes through what it does not serve
itself) and serves `NativeFront.Ticks` on DIR/ticks.sock, a server of its own that the public
port never reaches. DIR is made private (0700): whoever can connect to ticks.sock is trusted
to report the callers' credentials. A tick's messages are translated by the same codec as the
Python front's (service/codec.py), answered by `NativeStreams` (service/protocol/native.py)
and encoded by the same codec.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np

from lstmserve.v1 import native_front_pb2 as npb
from lstmserve.v1 import native_front_pb2_grpc as npb_grpc
from service import codec, metrics
from service.errors import ConfigError
from service.protocol.messages import ChunkDone
from service.protocol.native import NativeEntry, NativeOutcome, NativeStreams
from service.protocol.session import SessionLayer
from service.security.auth import Authenticator, Unauthenticated
from service.status import numeric_code, status_code, status_message

log = logging.getLogger(__name__)

PUBLIC_SOCKET = "grpc.sock"
TICKS_SOCKET = "ticks.sock"
MAX_TICK_BYTES = 256 << 20  # a tick carries many streams' messages (each within 4 MiB)


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


class NativeFrontServicer(npb_grpc.NativeFrontServicer):
    """Answers the native front's ticks: one reply per tick, one outcome per message."""

    def __init__(self, layer: SessionLayer, idle_timeout_s: float,
                 auth: Authenticator | None) -> None:  # fmt: skip
        self.layer = layer
        self.idle_timeout_s = idle_timeout_s
        self.auth = auth

    async def Ticks(
        self, request_iterator: AsyncIterator[npb.Tick], context: grpc.aio.ServicerContext
    ) -> None:
        """Each tick answered in a task of its own (the front keeps a few in flight, never two
        messages of one stream), its reply written as soon as it is ready."""
        streams = NativeStreams(self.layer)
        tasks: set[asyncio.Task[None]] = set()
        failed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # Read here while the link lives; set later (a task cancelled as it ends, a push after
        # the server stopped), nobody is left to read it: marked read, never logged as lost.
        failed.add_done_callback(lambda f: f.cancelled() or f.exception())
        writing = asyncio.Lock()  # one write at a time, in the order asked for

        async def write(reply: npb.TickReply) -> None:
            async with writing:
                await context.write(reply)

        async def push(stream: int, outcome: NativeOutcome) -> None:
            reply = npb.TickReply()  # tick 0: answers no tick
            out = reply.outcomes.add()
            out.stream = stream
            self._fill(out, outcome)
            await write(reply)

        async def answer(tick: npb.Tick) -> None:
            try:
                entries = [self._entry(e) for e in tick.entries]
                closed = list(zip(tick.closed, tick.closed_ok, strict=False))
                reply = self._reply(await streams.answer(entries, closed))
                reply.tick = tick.id
                await write(reply)
                if streams.draining:  # the streams this tick held get their last message now
                    await streams.drain(push)
            except asyncio.CancelledError:
                raise  # the link is ending already
            except BaseException as exc:  # the link ends: the front fails its streams
                if not failed.done():
                    failed.set_exception(exc)

        async def drain() -> None:
            await self.layer.engine.drain_started.wait()
            try:
                await streams.drain(push)
            except Exception as exc:  # the link ended under the drain: as for a tick
                if not failed.done():
                    failed.set_exception(exc)

        async def read() -> None:
            async for tick in request_iterator:
                task = asyncio.create_task(answer(tick))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.wait(set(tasks))

        reader = asyncio.create_task(read())
        drainer = asyncio.create_task(drain())
        log.info("native front connected")
        try:
            await asyncio.wait([reader, failed], return_when=asyncio.FIRST_COMPLETED)
            if failed.done():
                failed.result()  # raises what ended the link
            reader.result()
        finally:
            for task in (reader, drainer, *tasks):
                task.cancel()
            streams.forget_all()
            log.info("native front disconnected")

    def _entry(self, entry: npb.TickEntry) -> NativeEntry:
        if entry.malformed:  # one line, no traceback: a client's problem (as servicer.py)
            error = codec.Malformed("lstmserve.v1.StreamRequest", entry.size).error()
            log.warning(
                "malformed request", extra={"fields": {"rpc": "Stream", "error": str(error)}}
            )
            return NativeEntry(entry.stream, error)
        request = codec.stream_request(entry.request)
        if not entry.first:
            return NativeEntry(entry.stream, request)
        if self.auth is None:
            return NativeEntry(entry.stream, request)
        authorization = entry.authorization if entry.has_authorization else None
        try:
            caller = self.auth.authenticate(authorization, entry.cert_cn or None)
        except Unauthenticated as exc:
            metrics.AUTH_FAILURES.labels(metrics.PROTOCOL_NATIVE, exc.reason).inc()
            return NativeEntry(entry.stream, request, refused=exc)
        metrics.CALLER_REQUESTS.labels(self.auth.label(caller), metrics.PROTOCOL_NATIVE).inc()
        return NativeEntry(entry.stream, request, caller)

    def _reply(self, outcomes: list[NativeOutcome]) -> npb.TickReply:
        """The tick's reply: plain chunk replies packed (`_Packed`), the others as messages."""
        reply = npb.TickReply()
        packed = _Packed(len(outcomes))
        for i, outcome in enumerate(outcomes):
            if not packed.add(i, outcome):
                out = reply.outcomes.add()
                out.index = i
                self._fill(out, outcome)
        packed.write(reply)
        return reply

    def _fill(self, out: npb.TickOutcome, outcome: NativeOutcome) -> None:
        if outcome.reply is not None:
            out.reply.SetInParent()
            codec.fill_stream_response(out.reply, outcome.reply, self.idle_timeout_s)
        if outcome.error is not None:
            out.code, out.message = _status(outcome.error)
        elif outcome.finish:
            out.finish = True


class _Packed:
    """A tick's plain chunk replies (applied or a resend; no per-step probabilities, no
    decision) as little-endian columns: the front writes each ChunkResult itself."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.flags = np.zeros(n, np.uint8)  # 1 packed; 2 duplicate; 4 has probabilities
        self.u64 = np.zeros((2, n), "<u8")  # seq, total_steps
        self.u32 = np.zeros((3, n), "<u4")  # steps, held_characters, rewound_steps
        self.rows: list[np.ndarray] = []

    def add(self, i: int, outcome: NativeOutcome) -> bool:
        """Packs entry i if its reply is a plain chunk reply; False if it is not."""
        done = outcome.reply.body if outcome.reply is not None else None
        if outcome.error is not None or not isinstance(done, ChunkDone) or done.error is not None:
            return False
        applied = done.outcome
        assert applied is not None
        result = applied.result
        if result is not None and (result.step_values is not None or result.decision is not None):
            return False
        flags = 1 | (2 if applied.duplicate else 0)
        self.u64[0, i], self.u64[1, i] = applied.seq, applied.total_steps
        self.u32[1, i] = applied.held_characters
        if result is not None:
            self.u32[0, i], self.u32[2, i] = result.steps, result.rewound_steps
            probs = result.probs
            if probs.size:
                flags |= 4
                self.rows.append(probs.astype("<f4", copy=False))
        self.flags[i] = flags
        return True

    def write(self, reply: npb.TickReply) -> None:
        if not self.flags.any():
            return
        flags, u64, u32 = self.flags, self.u64, self.u32
        columns = npb.TickReply(
            packed=(flags & 1).tobytes(),
            flags=((flags >> 1) & 3).tobytes(),  # bit 0 duplicate, bit 1 probabilities
            seqs=u64[0].tobytes(), total_steps=u64[1].tobytes(), steps=u32[0].tobytes(),
            held_characters=u32[1].tobytes(), rewound_steps=u32[2].tobytes(),
            probabilities=np.concatenate(self.rows).tobytes() if self.rows else b"",
        )  # fmt: skip
        reply.MergeFrom(columns)


def _status(exc: BaseException) -> tuple[int, str]:
    if isinstance(exc, Unauthenticated):
        return numeric_code(grpc.StatusCode.UNAUTHENTICATED), str(exc)
    return numeric_code(status_code(exc)), status_message(exc)


def build_ticks_server(
    layer: SessionLayer, idle_timeout_s: float, auth: Authenticator | None, folder: Path
) -> grpc.aio.Server:
    """The internal server of the native front's ticks, bound to folder/ticks.sock only."""
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", MAX_TICK_BYTES),
        ("grpc.max_send_message_length", MAX_TICK_BYTES),
    ])  # fmt: skip
    npb_grpc.add_NativeFrontServicer_to_server(
        NativeFrontServicer(layer, idle_timeout_s, auth), server
    )
    address = f"unix:{folder / TICKS_SOCKET}"
    if server.add_insecure_port(address) == 0:
        raise ConfigError(f"cannot listen on {address} (--native-front-dir)")
    return server
