"""The Python client: list models, classify, and streaming sessions that survive their replica.

    async with LstmClient(["10.0.0.1:8001", "10.0.0.2:8001"]) as client:
        session = await client.open_session("langid-chars", top_k=3)
        for ch in "bonjour":
            result = await session.step(ch)          # or pipeline: send() ... receive()
        await session.end()

Failover, given several addresses:
  * unary calls, `open_session` and `restore_session` go to the next address when one is
    UNAVAILABLE (unreachable, draining, still loading); the session calls also when the new
    stream breaks under them (CANCELLED, UNKNOWN: a replica stopping), and repeat the round
    for up to `failover_s` seconds while an address may come back;
  * `resume_session` also moves on past NOT_FOUND (without a shared store only the replica that
    holds a session knows it);
  * a session whose stream breaks (`StreamSession`, and every session of a `MultiStream`)
    continues on the first address that takes it: after a draining server's final snapshot by
    restoring the snapshot (any replica started with the same --snapshot-key), otherwise by
    resuming its id (any replica with a shared --session-store redis://...; only the same server
    without one). A dead or draining replica is tried last, the others in order after it;
    while some address is UNAVAILABLE the round is repeated for up to `failover_s` seconds.
Messages sent but not answered are resent; the server answers those it had already applied
with `duplicate=true` (the resend of the last applied chunk with its original probabilities), so
no step is lost or applied twice. A copy of the session older than what the client had seen
applied is refused. If no address takes the session: SessionLost.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from lstmserve.decisions import parse_decide_at
from lstmserve.v1 import lstm_serve_pb2 as pb
from lstmserve.v1 import lstm_serve_pb2_grpc as pb_grpc

# Stream errors after which the session is continued (resumed) rather than given up. ABORTED:
# another replica advanced the session (shared store); resuming fetches its current state.
RETRYABLE = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.ABORTED,
)

Steps = str | Sequence[int] | np.ndarray | pb.SequenceInput


CLOSE_GRACE_S = 1.0  # how long close() lets the server finish the stream before cancelling
FAILOVER_S = 5.0  # how long a broken session keeps trying addresses that are UNAVAILABLE
# A replica that comes back is noticed within 2 s (gRPC's default backoff grows to 120 s).
CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
)
MAX_FAILOVERS_IN_A_ROW = 8  # reconnects with no reply in between before SessionLost
MAX_REATTACH_ENTRIES = 1024  # sessions per message when a MultiStream reattaches them
MAX_CONTINUES = 3  # times a MultiStream resumes and resends one message's refused entries
# A write on a call that has ended (or is ending) raises one of these.
WRITE_ERRORS = (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError)
# What a first write that never left says: the stream ended under it, not the server's answer.
UNSENT = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)


async def _close_call(call: Any) -> None:
    """End a stream cleanly: close the write side and let the server finish (its status OK,
    not CANCELLED, in its metrics); cancel it if it has not within CLOSE_GRACE_S. Replies
    still unread are dropped."""
    try:
        if not call.done():
            async with asyncio.timeout(CLOSE_GRACE_S):
                await call.done_writing()
                while await call.read() is not grpc.aio.EOF:
                    pass
    except (TimeoutError, grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
        pass  # broken or slow: cancelled below
    except asyncio.CancelledError:
        if not _stream_was_cancelled_under_us():
            raise  # this task was cancelled, not just the call
    finally:
        call.cancel()


def _stream_was_cancelled_under_us() -> bool:
    """A read raised CancelledError because the call (not this task) was cancelled."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() == 0


async def _read_reply(call: Any, write_failed: bool) -> tuple[Any, bool]:
    """(the next reply, False), or (None, elsewhere) when the stream broke in a way the session
    continues from (`elsewhere`: UNAVAILABLE, try the other replicas first); raises otherwise.
    INTERNAL after a failed write of ours is the transport's word for a stream the server had
    already ended: continued like any broken stream."""
    try:
        reply = await call.read()
    except grpc.aio.AioRpcError as exc:
        if exc.code() not in RETRYABLE and not write_failed:
            raise
        return None, exc.code() == grpc.StatusCode.UNAVAILABLE
    except asyncio.CancelledError:
        if not _stream_was_cancelled_under_us():
            raise
        return None, False
    if reply is grpc.aio.EOF:
        return None, False
    return reply, False


async def _first_reply(call: Any, request: Any, address: str) -> Any:
    """Write a stream's first message and read its reply; _Refused / AioRpcError if it fails
    (the call is then cancelled). A first message that cannot even be written (the stream
    ended under it: the replica went away as it connected; grpc says INTERNAL "execute_batch")
    is a refusal by that address, not the server's answer."""
    try:
        await call.write(request)
    except WRITE_ERRORS as exc:
        call.cancel()
        if isinstance(exc, grpc.aio.AioRpcError) and exc.code() not in UNSENT:
            raise  # the server's answer (UNAUTHENTICATED, ...), as if read
        raise _Refused(f"{address}: the first message was not sent: {exc!r}"[:300]) from exc
    try:
        reply = await call.read()
    except grpc.aio.AioRpcError:
        call.cancel()
        raise
    except (grpc.aio.UsageError, asyncio.InvalidStateError) as exc:
        call.cancel()
        raise _Refused(f"{address}: {exc!r}") from exc
    if reply is grpc.aio.EOF:
        call.cancel()
        raise _Refused(f"{address} closed the stream before answering")
    return reply


class SessionLost(Exception):
    """The session could not be continued on any address (`gone`: every address that answered
    said it does not know the session)."""

    def __init__(self, message: str, gone: bool = False) -> None:
        super().__init__(message)
        self.gone = gone


class _Refused(Exception):
    """An address could not take a session now (`retry`: it may take it a moment later)."""

    def __init__(self, message: str, retry: bool = True) -> None:
        super().__init__(message)
        self.retry = retry


def _code(exc: BaseException) -> grpc.StatusCode | None:
    return exc.code() if isinstance(exc, grpc.aio.AioRpcError) else None


def _may_come_back(exc: BaseException) -> bool:
    """Whether the address that failed this way may take the session if asked again."""
    if isinstance(exc, _Refused):
        return exc.retry
    return _code(exc) in RETRYABLE


class _AllFailed(Exception):
    """Every address of a round failed, each with an error its caller moves on from."""

    def __init__(self, errors: list[BaseException]) -> None:
        super().__init__(errors)
        self.errors = errors

    def telling(self) -> BaseException:
        """The error to show: an answer (NOT_FOUND, ...) over a broken or unavailable stream,
        a server's status (UNAVAILABLE: its store is down, ...) over an unreachable address."""

        def rank(error: BaseException) -> int:
            code = _code(error)
            return 2 if code is None else 1 if code in RETRYABLE else 0

        return min(self.errors, key=rank)

    def gone(self) -> bool:
        """Every address that answered (some did) said it does not know the session."""
        answered = [e for e in self.errors if _code(e) not in (grpc.StatusCode.UNAVAILABLE, None)]
        return bool(answered) and all(_code(e) == grpc.StatusCode.NOT_FOUND for e in answered)


async def _one_round(
    addresses: Sequence[str], attempt: Callable[[str], Awaitable[Any]],
    moves_on: Callable[[BaseException], bool],
) -> tuple[str, Any]:  # fmt: skip
    """(address, result) of the first address `attempt` succeeds on; an error `moves_on`
    rejects is raised at once; _AllFailed if every address fails."""
    errors: list[BaseException] = []
    for address in addresses:
        try:
            return address, await attempt(address)
        except (grpc.aio.AioRpcError, _Refused) as exc:
            if not moves_on(exc):
                raise
            errors.append(exc)
    raise _AllFailed(errors)


async def _fail_over(
    client: LstmClient, current: str, elsewhere: bool, attempt: Callable[[str], Awaitable[Any]],
    what: str,
) -> str:  # fmt: skip
    """Run `attempt` on the addresses in failover order (`_rounds`); the address that took
    it, or SessionLost."""
    order = client.failover_order(current, elsewhere)
    try:
        address, _ = await _rounds(client.failover_s, order, attempt, lambda _: True)
    except _AllFailed as failed:
        message = f"{what} could not be continued on {client.addresses}: {failed.telling()}"
        raise SessionLost(message, failed.gone()) from failed.telling()
    client.moved_to(address)
    return address


async def _rounds(
    failover_s: float, addresses: Sequence[str], attempt: Callable[[str], Awaitable[Any]],
    moves_on: Callable[[BaseException], bool],
) -> tuple[str, Any]:  # fmt: skip
    """`_one_round`, again while some address may come back (a replica restarting, a store
    failing over: short pauses, `failover_s` at most); the last round's _AllFailed after that."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + failover_s
    pause = 0.05
    while True:
        try:
            return await _one_round(addresses, attempt, moves_on)
        except _AllFailed as failed:
            if not any(map(_may_come_back, failed.errors)) or loop.time() + pause >= deadline:
                raise
        await asyncio.sleep(pause)
        pause = min(2 * pause, 0.5)


def to_input(steps: Steps) -> pb.SequenceInput:
    """Text, token ids, or a (T, F) float array of frames -> SequenceInput."""
    if isinstance(steps, pb.SequenceInput):
        return steps
    if isinstance(steps, str):
        return pb.SequenceInput(text=steps)
    array = np.asarray(steps)
    if array.dtype.kind == "f":
        if array.ndim != 2:
            raise ValueError(f"frames must be (T, F), got shape {array.shape}")
        frames = pb.Frames(values=array.ravel().tolist(), frame_count=array.shape[0])
        return pb.SequenceInput(frames=frames)
    return pb.SequenceInput(tokens=pb.TokenIds(ids=[int(x) for x in array.ravel()]))


Pem = str | Path | bytes  # a PEM file's path, or its contents


def _pem(value: Pem | None, what: str) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    try:
        return Path(value).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {what} {str(value)!r}: {exc.strerror or exc}") from None


def _channel_credentials(
    tls: bool, ca: Pem | None, cert: Pem | None, key: Pem | None
) -> grpc.ChannelCredentials | None:
    """TLS channel credentials when any TLS option is given (None: plaintext)."""
    if (cert is None) != (key is None):
        raise ValueError("tls_cert and tls_key go together (a client certificate and its key)")
    if not tls and ca is None and cert is None:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=_pem(ca, "the TLS CA file"),
        private_key=_pem(key, "the TLS key file"),
        certificate_chain=_pem(cert, "the TLS certificate file"),
    )


def _name_override(
    server_name: str | None, credentials: grpc.ChannelCredentials | None
) -> tuple[tuple[str, str], ...]:
    """The channel options that make `server_name` the TLS authority (hostname check, SNI)."""
    if not server_name:
        return ()
    if credentials is None:
        raise ValueError("server_name names the server's TLS certificate: it needs TLS")
    return (("grpc.ssl_target_name_override", server_name),)


def _bearer(token: str | None) -> tuple[tuple[str, str], ...] | None:
    """The call metadata that carries `token` (None: no token)."""
    if not token:
        return None
    token = token.strip()
    if not token or any(c.isspace() for c in token):
        raise ValueError("the token must be one word (no spaces or newlines)")
    return (("authorization", f"Bearer {token}"),)


def _unavailable(exc: BaseException) -> bool:
    """Unary calls, open and restore move on to the next address past these."""
    return isinstance(exc, _Refused) or _code(exc) == grpc.StatusCode.UNAVAILABLE


def _not_taken(exc: BaseException) -> bool:
    """A stream's first message (open, restore) moves on past these too: the stream broke
    under it (a replica stopping cancels its streams), as a session's stream does later."""
    return _unavailable(exc) or _code(exc) in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN)


def _not_taken_or_unknown(exc: BaseException) -> bool:
    """A resume by id also moves on past NOT_FOUND: another replica may hold the session."""
    return _not_taken(exc) or _code(exc) == grpc.StatusCode.NOT_FOUND


class LstmClient:
    """Async client over one or more server addresses.

    TLS: `tls_ca` (PEM path or bytes) trusts the server's CA (None with `tls` = the system's);
    `tls_cert` + `tls_key` present a client certificate (mTLS); `server_name` is the name the
    server's certificate is checked against (and sent as SNI) instead of the address's host:
    through a port-forward (`localhost:8001`) to a server whose certificate names its service.
    `token` goes as `authorization: Bearer TOKEN` on every call, streams and failover
    reconnects included."""

    def __init__(
        self, addresses: Sequence[str] | str, timeout_s: float = 30.0,
        failover_s: float = FAILOVER_S, *, tls: bool = False, tls_ca: Pem | None = None,
        tls_cert: Pem | None = None, tls_key: Pem | None = None, token: str | None = None,
        server_name: str | None = None,
    ) -> None:  # fmt: skip
        self.addresses = [addresses] if isinstance(addresses, str) else list(addresses)
        if not self.addresses:
            raise ValueError("give at least one address")
        self.timeout_s = timeout_s
        self.failover_s = failover_s
        self._index = 0
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._credentials = _channel_credentials(tls, tls_ca, tls_cert, tls_key)
        self._options = CHANNEL_OPTIONS + _name_override(server_name, self._credentials)
        self.metadata = _bearer(token)

    async def __aenter__(self) -> LstmClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()

    @property
    def address(self) -> str:
        """The current address: where new sessions and unary calls go first."""
        return self.addresses[self._index]

    def stub(self, offset: int = 0) -> pb_grpc.LstmServeStub:
        """A stub on the current address (or `offset` addresses further on)."""
        return self.stub_at(self.addresses[(self._index + offset) % len(self.addresses)])

    def stub_at(self, address: str) -> pb_grpc.LstmServeStub:
        """A stub on `address` (one channel per address, made on first use)."""
        if address not in self._channels:
            self._channels[address] = (
                grpc.aio.insecure_channel(address, options=self._options)
                if self._credentials is None
                else grpc.aio.secure_channel(address, self._credentials, options=self._options)
            )
        return pb_grpc.LstmServeStub(self._channels[address])

    def failover_order(self, current: str, elsewhere: bool = False) -> list[str]:
        """Every address once: `current` first (last when `elsewhere`), then those after it."""
        start = self.addresses.index(current) if current in self.addresses else self._index
        ring = self.addresses[start:] + self.addresses[:start]
        return [*ring[1:], ring[0]] if elsewhere else ring

    def moved_to(self, address: str) -> None:
        """Make `address` the current one (it just took a session)."""
        if address in self.addresses:
            self._index = self.addresses.index(address)

    def advance(self, offset: int) -> None:
        """Make the address `offset` places on the current one (after a failover)."""
        self._index = (self._index + offset) % len(self.addresses)

    async def _unary(self, method: str, request: Any) -> Any:
        """Call on the current address; on UNAVAILABLE move on to the next, once round."""

        async def call(address: str) -> Any:
            stub = self.stub_at(address)
            return await getattr(stub, method)(
                request, timeout=self.timeout_s, metadata=self.metadata
            )

        try:
            address, reply = await _one_round(self.failover_order(self.address), call, _unavailable)
        except _AllFailed as failed:
            raise failed.telling() from None
        self.moved_to(address)
        return reply

    async def list_models(self) -> list[pb.ModelInfo]:
        reply = await self._unary("ListModels", pb.ListModelsRequest())
        return list(reply.models)

    async def get_model(self, name: str, version: int = 0) -> pb.ModelInfo:
        return await self._unary("GetModel", pb.GetModelRequest(name=name, version=version))

    async def classify(
        self,
        model: str,
        sequences: Sequence[Steps],
        version: int = 0,
        step_probabilities: bool = False,
        top_k: int = 1,
    ) -> pb.ClassifyResponse:
        request = pb.ClassifyRequest(
            model=model, version=version, sequences=[to_input(s) for s in sequences],
            step_probabilities=step_probabilities, top_k=top_k,
        )  # fmt: skip
        return await self._unary("Classify", request)

    async def open_session(
        self, model: str, version: int = 0, every_step: bool = False, top_k: int = 1,
        decide: pb.DecisionRule | None = None,
    ) -> StreamSession:  # fmt: skip
        """A new session on the first address that takes it (UNAVAILABLE: the next one);
        `decide`: an early decision rule (`decision_rule`)."""
        options = pb.StreamOptions(every_step=every_step, top_k=top_k, decide=decide)
        first = pb.StreamRequest(open=pb.OpenSession(model=model, version=version, options=options))
        return await self._attach(first, _not_taken)

    def multi_stream(self) -> MultiStream:
        """A StreamMulti call on the current address: many sessions over one stream."""
        return MultiStream(self)

    async def resume_session(self, session_id: str) -> StreamSession:
        """Reattach to a session by id, on the first address that has it (UNAVAILABLE or
        NOT_FOUND: the next one); the most telling error if none has."""
        first = pb.StreamRequest(resume=pb.ResumeSession(session_id=session_id))
        return await self._attach(first, _not_taken_or_unknown)

    async def restore_session(
        self, snapshot: bytes, every_step: bool = False, top_k: int = 1
    ) -> StreamSession:
        """Continue a session from a snapshot (`StreamSession.snapshot()`), on any replica."""
        options = pb.StreamOptions(every_step=every_step, top_k=top_k)
        first = pb.StreamRequest(restore=_restore(snapshot, options))
        return await self._attach(first, _not_taken)

    async def _attach(
        self, first: pb.StreamRequest, moves_on: Callable[[BaseException], bool]
    ) -> StreamSession:
        session = StreamSession(self)
        order = self.failover_order(self.address)
        try:
            address, _ = await _rounds(
                self.failover_s, order, lambda a: session.attach(first, a), moves_on
            )
        except _AllFailed as failed:
            error = failed.telling()
            if isinstance(error, _Refused):
                raise SessionLost(str(error)) from error
            raise error from None
        self.moved_to(address)
        return session


def decision_rule(spec: str, end_when_decided: bool = False) -> pb.DecisionRule:
    """A DecisionRule from its written form (lstmserve/decisions.py: "P[,N]" or
    "margin:M[,N]"); ValueError if the form is wrong."""
    probability, margin, steps = parse_decide_at(spec)
    return pb.DecisionRule(probability=probability, margin=margin, steps=steps,
                           end_when_decided=end_when_decided)  # fmt: skip


class StreamSession:
    """One streaming session: pipelined chunks, in-order replies, continued on another replica
    when its stream breaks (module docstring)."""

    def __init__(self, client: LstmClient) -> None:
        self.client = client
        self.opened = pb.SessionOpened()
        self.address = client.address  # the replica the session is attached to
        self._call: Any = None
        self._pending: deque[pb.StreamRequest] = deque()  # sent, not yet answered
        self._next_seq = 1
        self._applied_seq = 0  # the highest seq answered as applied (or as already applied)
        self._total_steps = 0  # as of the last reply
        self.final_snapshot: bytes | None = None  # from a draining server, until restored
        self._write_failed = False  # a write on the current call failed
        self.failovers = 0  # times the session was continued on a new stream
        self.resent = 0  # messages sent again after a failover
        self._in_a_row = 0  # reconnects since the last reply
        # The reply in which the session's decision rule held (ChunkResult.decision), if any.
        self.decided: pb.ChunkResult | None = None

    @property
    def session_id(self) -> str:
        return self.opened.session_id

    @property
    def labels(self) -> list[str]:
        return list(self.opened.labels)

    async def attach(self, first: pb.StreamRequest, address: str | None = None) -> pb.SessionOpened:
        """Start a stream on `address` (default: the current one) with `first` (open, resume or
        restore) and read the `opened` reply; _Refused if that copy is older than what this
        client saw applied."""
        address = address or self.client.address
        call = self.client.stub_at(address).Stream(metadata=self.client.metadata)
        reply = await _first_reply(call, first, address)
        if reply.WhichOneof("kind") != "opened":
            call.cancel()
            raise _Refused(f"{address} answered {reply.WhichOneof('kind')} instead of opened")
        if self.opened.session_id and reply.opened.last_applied_seq < self._applied_seq:
            call.cancel()
            raise _Refused(
                f"{address} holds session {self.session_id} as of seq "
                f"{reply.opened.last_applied_seq}, older than seq {self._applied_seq}",
                retry=False,
            )
        self._call, self.address, self.opened = call, address, reply.opened
        self._next_seq = max(self._next_seq, self.opened.last_applied_seq + 1)
        self._applied_seq = max(self._applied_seq, self.opened.last_applied_seq)
        self._total_steps = self.opened.total_steps
        return self.opened

    async def send(self, steps: Steps) -> int:
        """Send one chunk without waiting for its reply; returns its seq."""
        seq = self._next_seq
        self._next_seq += 1
        await self._write(pb.StreamRequest(chunk=pb.Chunk(seq=seq, input=to_input(steps))))
        return seq

    async def receive(self) -> pb.StreamResponse:
        """The reply to the oldest unanswered message (continuing the session if needed)."""
        while True:
            if self._call is None:
                await self.reconnect()
                continue
            reply, elsewhere = await _read_reply(self._call, self._write_failed)
            if reply is None:
                await self.reconnect(elsewhere)
                continue
            if reply.WhichOneof("kind") == "snapshot" and reply.snapshot.final:
                self.final_snapshot = reply.snapshot.data  # unasked: the server is draining
                await self.reconnect(True)  # at once: the draining server waits for us to go
                continue
            self._in_a_row = 0
            self._answered(self._pending.popleft(), reply)
            return reply

    def _answered(self, request: pb.StreamRequest, reply: pb.StreamResponse) -> None:
        """Note what the server has applied, from the reply to `request`."""
        kind = reply.WhichOneof("kind")
        if kind == "chunk" and not reply.chunk.HasField("error"):
            self._applied_seq = max(self._applied_seq, reply.chunk.seq)
            self._total_steps = reply.chunk.total_steps
            if reply.chunk.HasField("decision") and self.decided is None:
                self.decided = reply.chunk
        elif kind == "chunk":  # refused, not applied: the server takes this seq next again
            self._next_seq = min(self._next_seq, max(reply.chunk.seq, self._applied_seq + 1))
        elif kind == "reset":
            self._applied_seq = max(self._applied_seq, reply.reset.seq)
            self._total_steps = 0 if not reply.reset.duplicate else self._total_steps

    async def step(self, steps: Steps) -> pb.ChunkResult:
        """Send one chunk and wait for its result."""
        await self.send(steps)
        return (await self.receive()).chunk

    async def reset(self) -> pb.ResetDone:
        seq = self._next_seq
        self._next_seq += 1
        await self._write(pb.StreamRequest(reset=pb.Reset(seq=seq)))
        return (await self.receive()).reset

    async def snapshot(self) -> pb.SessionSnapshot:
        """A signed snapshot of the session after every message sent so far."""
        await self._write(pb.StreamRequest(snapshot=pb.TakeSnapshot()))
        return (await self.receive()).snapshot

    @property
    def ended_by_decision(self) -> bool:
        """Whether the server ended the session when its decision rule held."""
        return self.decided is not None and self.decided.decision.ended

    async def end(self) -> pb.SessionEnded:
        """Free the session. An `end` whose reply was lost with its replica, after which no
        replica knows the session, did end it: answered from what the client last saw; so is
        the end of a session its decision ended (nothing is sent)."""
        if self.ended_by_decision:
            decided = self.decided
            assert decided is not None
            await self.close()
            return pb.SessionEnded(
                total_steps=self._total_steps, last_applied_seq=self._applied_seq,
                probabilities=decided.probabilities, top=decided.top,
            )  # fmt: skip
        await self._write(pb.StreamRequest(end=pb.End()))
        try:
            ended = (await self.receive()).ended
        except SessionLost as exc:
            if not (exc.gone and len(self._pending) == 1):
                raise
            self._pending.clear()
            ended = pb.SessionEnded(
                total_steps=self._total_steps, last_applied_seq=self._applied_seq
            )
        await self.close()
        return ended

    async def close(self) -> None:
        """Close this stream; the session stays on the server (resumable) unless ended."""
        call, self._call = self._call, None
        if call is not None:
            await _close_call(call)

    async def _write(self, request: pb.StreamRequest) -> None:
        if self.ended_by_decision:
            raise SessionLost(f"session {self.session_id} ended when its decision rule held")
        self._pending.append(request)
        if self._call is None:
            await self.reconnect()  # resends every pending message, this one included
            return
        try:
            await self._call.write(request)
        except WRITE_ERRORS:
            self._write_failed = True
            # The stream is broken, but replies may still be buffered on it (and a draining
            # server's final snapshot): receive() reads them first, then continues elsewhere
            # and resends what is still unanswered, this message included.
            return

    async def reconnect(self, elsewhere: bool = False) -> None:
        """Continue the session on a new stream (module docstring), then resend what is
        unanswered. `elsewhere`: the current replica is unavailable, try it last."""
        await self.close()
        _count_failover(self, f"session {self.session_id}")
        # The options too: a replica resuming from the shared store would not know them.
        resume = pb.ResumeSession(session_id=self.session_id, options=self.opened.options)
        by_id = pb.StreamRequest(resume=resume)
        first = by_id
        if self.final_snapshot is not None:  # the current server is draining: others first
            first = pb.StreamRequest(restore=_restore(self.final_snapshot, self.opened.options))
            elsewhere = True

        async def attempt(address: str) -> pb.SessionOpened:
            try:
                return await self.attach(first, address)
            except grpc.aio.AioRpcError as exc:
                # The shared store holds a newer copy than the final snapshot: continue that.
                stale = "stale snapshot" in (exc.details() or "")
                if first is by_id or exc.code() != grpc.StatusCode.FAILED_PRECONDITION or not stale:
                    raise
                return await self.attach(by_id, address)

        await _fail_over(self.client, self.address, elsewhere, attempt,
                         f"session {self.session_id}")  # fmt: skip
        self.final_snapshot = None
        self._write_failed = False
        self.failovers += 1
        for request in list(self._pending):
            self.resent += 1
            try:
                await self._call.write(request)
            except WRITE_ERRORS:
                self._write_failed = True  # broken again: receive() continues once more
                return


def _count_failover(stream: StreamSession | MultiStream, what: str) -> None:
    """One more reconnect; SessionLost after MAX_FAILOVERS_IN_A_ROW with no reply between."""
    stream._in_a_row += 1
    if stream._in_a_row > MAX_FAILOVERS_IN_A_ROW:
        raise SessionLost(f"{what}: {MAX_FAILOVERS_IN_A_ROW} failovers without a reply")


def _restore(snapshot: bytes, options: pb.StreamOptions | None) -> pb.RestoreSession:
    return pb.RestoreSession(snapshot=snapshot, options=options)


def _final_snapshots(results: Sequence[pb.SessionResult]) -> dict[str, bytes]:
    """A draining server's last StreamMulti message (final snapshots), else {}."""
    if results and all(r.WhichOneof("kind") == "snapshot" for r in results):
        return {r.session_id: r.snapshot.data for r in results}
    return {}


def _moved(entry: pb.SessionRequest, result: pb.SessionResult) -> bool:
    """A chunk or reset refused in band because its session moved (continued on another
    replica, or taken over by another stream): resuming it here fetches its current state."""
    return (
        entry.WhichOneof("kind") in ("chunk", "reset")
        and result.WhichOneof("kind") == "error"
        and result.error.code == "ABORTED"
    )


class _Message:
    """One StreamMulti message sent: its entries, then its results. A continuation (`redoes`:
    a message and entry indices) is the client's own: it resumes those entries' sessions and
    sends the entries again, and its answers to them replace theirs."""

    __slots__ = ("continued", "entries", "redoes", "results", "waiting")

    def __init__(
        self, entries: list[pb.SessionRequest], redoes: tuple[_Message, list[int]] | None = None
    ) -> None:
        self.entries = entries
        self.redoes = redoes
        self.results: list[pb.SessionResult] | None = None  # once answered
        self.waiting = 0  # its continuations not answered yet
        self.continued = 0  # its continuations sent

    @property
    def ready(self) -> bool:
        return self.results is not None and self.waiting == 0

    def answer(self, results: list[pb.SessionResult]) -> tuple[_Message, list[int]] | None:
        """Take this message's results; (a message, its entries) to continue, if any (a few
        times at most: then the in-band ABORTED stands)."""
        self.results = results
        target, indices = self.redoes or (self, list(range(min(len(results), len(self.entries)))))
        if self.redoes is not None:
            target.take_again(indices, results[len(results) - len(indices) :])
        assert target.results is not None
        moved = [i for i in indices if _moved(target.entries[i], target.results[i])]
        if not moved or target.continued >= MAX_CONTINUES:
            return None
        target.continued += 1
        target.waiting += 1
        return target, moved

    def take_again(self, indices: list[int], results: list[pb.SessionResult]) -> None:
        """A continuation's answers to entries `indices`, in their place."""
        assert self.results is not None
        for i, result in zip(indices, results, strict=False):
            self.results[i] = result
        self.waiting -= 1


class _Entries:
    """The StreamMulti entries, built (as MultiStream.open(...), MultiStream.chunk(...), ...)."""

    @staticmethod
    def open(
        model: str, version: int = 0, every_step: bool = False, top_k: int = 1,
        decide: pb.DecisionRule | None = None,
    ) -> pb.SessionRequest:  # fmt: skip
        options = pb.StreamOptions(every_step=every_step, top_k=top_k, decide=decide)
        return pb.SessionRequest(open=pb.OpenSession(model=model, version=version, options=options))

    @staticmethod
    def restore(snapshot: bytes, every_step: bool = False, top_k: int = 1) -> pb.SessionRequest:
        options = pb.StreamOptions(every_step=every_step, top_k=top_k)
        return pb.SessionRequest(restore=_restore(snapshot, options))

    @staticmethod
    def resume(session_id: str, options: pb.StreamOptions | None = None) -> pb.SessionRequest:
        return pb.SessionRequest(resume=pb.ResumeSession(session_id=session_id, options=options))

    @staticmethod
    def chunk(session_id: str, seq: int, steps: Steps) -> pb.SessionRequest:
        return pb.SessionRequest(
            session_id=session_id, chunk=pb.Chunk(seq=seq, input=to_input(steps))
        )

    @staticmethod
    def reset(session_id: str, seq: int) -> pb.SessionRequest:
        return pb.SessionRequest(session_id=session_id, reset=pb.Reset(seq=seq))

    @staticmethod
    def end(session_id: str) -> pb.SessionRequest:
        return pb.SessionRequest(session_id=session_id, end=pb.End())


class MultiStream(_Entries):
    """One StreamMulti call (a gateway's many sessions over one stream): each message carries
    entries for any number of sessions and is answered by one result per entry, in order.

    Failover: when the stream breaks, or a draining server sends its final snapshots, the
    stream is reopened on the next address that takes it (module docstring); its first message
    restores (from the final snapshots) or resumes every session this stream has named and not
    ended, then every unanswered message is resent, so each entry is answered once, in order.
    A session no replica knows any more is dropped (its entries are then answered NOT_FOUND, in
    band). An `open` entry whose reply was lost is sent again (a second session: the first idles
    out). A chunk or reset answered ABORTED in band (its session was continued on another
    replica, or taken by another stream, since this replica last held it) is continued on the
    stream: a message of the client's own resumes the session (its current state) and sends
    the entry again, and the answer to that (applied, or `duplicate`: a seq is never applied
    twice) stands in the ABORTED's place; after MAX_CONTINUES tries the ABORTED is returned.
    SessionLost if no address takes the stream; `final_snapshots` keeps the snapshots not
    restored yet. Build entries with the static helpers.

        multi = client.multi_stream()
        opened = await multi.exchange([MultiStream.open("langid-chars") for _ in range(100)])
        ids = [r.session_id for r in opened]
        results = await multi.exchange([MultiStream.chunk(i, 1, "bonjour") for i in ids])
    """

    def __init__(self, client: LstmClient, address: str | None = None) -> None:
        self.client = client
        self.address = address or client.address
        self._call: Any = client.stub_at(self.address).StreamMulti(metadata=client.metadata)
        self._pending: deque[_Message] = deque()  # sent, not yet returned
        self._held: dict[str, pb.StreamOptions | None] = {}  # live sessions named, and options
        self.final_snapshots: dict[str, bytes] = {}  # session id -> snapshot, from a drain
        self._write_failed = False
        self.failovers = 0  # times the stream was reopened
        self.resent = 0  # messages sent again after a failover
        self._in_a_row = 0  # reconnects since the last reply

    @property
    def sessions(self) -> list[str]:
        """The sessions this stream holds (named, not ended), which a failover carries over."""
        return list(self._held)

    async def send(self, entries: Sequence[pb.SessionRequest]) -> None:
        """Send one message without waiting for its results (pipelining)."""
        message = _Message(list(entries))
        self._pending.append(message)
        if self._call is None:
            await self.reconnect()  # resends every pending message, this one included
            return
        await self._write(message.entries)

    async def _write(self, message: list[pb.SessionRequest]) -> bool:
        try:
            await self._call.write(pb.StreamMultiRequest(entries=message))
        except WRITE_ERRORS:
            self._write_failed = True  # receive() reads what is buffered, then reconnects
            return False
        return True

    async def receive(self) -> list[pb.SessionResult]:
        """The results of the oldest message not returned yet, one per entry, in entry order
        (entries continued after an in-band ABORTED: once their continuation is answered)."""
        while True:
            head = self._pending[0] if self._pending else None
            if head is not None and head.ready:
                self._pending.popleft()
                if head.redoes is None:
                    assert head.results is not None
                    return head.results
                continue  # a continuation of ours: its answers are in their message
            results = await self._next_reply()  # (a drain's final snapshots, with none sent)
            message = next((m for m in self._pending if m.results is None), None)
            if message is None:
                raise IndexError("a StreamMulti reply to no message sent")
            self._note(message.entries, results)
            again = message.answer(results)
            if again is not None:
                await self._continue(*again)

    async def _next_reply(self) -> list[pb.SessionResult]:
        """The results of the next message answered, continuing the stream if it breaks."""
        while True:
            if self._call is None:
                await self.reconnect()
                continue
            reply, elsewhere = await _read_reply(self._call, self._write_failed)
            if reply is None:
                await self.reconnect(elsewhere)
                continue
            results = list(reply.results)
            finals = _final_snapshots(results)
            if finals:  # unasked: the server is draining and waits for us to go
                self.final_snapshots.update(finals)
                await self.reconnect(True)
                continue
            self._in_a_row = 0
            return results

    async def _continue(self, message: _Message, indices: list[int]) -> None:
        """Resume the sessions of `message`'s entries `indices` here, then send those again."""
        entries = [message.entries[i] for i in indices]
        ids = dict.fromkeys(e.session_id for e in entries)
        resumes = [self.resume(i, self._held.get(i)) for i in ids]  # by id: the current state
        continuation = _Message([*resumes, *entries], (message, indices))
        self._pending.append(continuation)
        await self._write(continuation.entries)

    def _note(
        self, entries: Sequence[pb.SessionRequest], results: Sequence[pb.SessionResult]
    ) -> None:
        """Track the sessions held from one message's results (opened, ended, unknown)."""
        for entry, result in zip(entries, results, strict=False):
            kind = result.WhichOneof("kind")
            session_id = result.session_id or entry.session_id
            if kind == "opened":
                self._held[session_id] = result.opened.options
            elif kind == "ended" or (kind == "error" and result.error.code == "NOT_FOUND"):
                self._held.pop(session_id, None)
                self.final_snapshots.pop(session_id, None)
            elif session_id and kind != "error":
                self._held.setdefault(session_id, None)

    async def exchange(self, entries: Sequence[pb.SessionRequest]) -> list[pb.SessionResult]:
        await self.send(entries)
        return await self.receive()

    async def close(self) -> None:
        """Close the stream; its sessions stay on the server until `end` or the idle timeout."""
        call, self._call = self._call, None
        if call is not None:
            await _close_call(call)

    async def reconnect(self, elsewhere: bool = False) -> None:
        """Reopen the stream on the next address that takes it, reattach every session held
        and resend what is unanswered. `elsewhere`: the current replica is unavailable."""
        await self.close()
        _count_failover(self, "StreamMulti")
        elsewhere = elsewhere or bool(self.final_snapshots)
        await _fail_over(self.client, self.address, elsewhere, self._reopen, "StreamMulti")
        self._write_failed = False
        self.failovers += 1
        for message in [m for m in self._pending if m.results is None]:
            self.resent += 1
            if not await self._write(message.entries):
                return  # broken again: receive() continues once more

    async def _reopen(self, address: str) -> None:
        """A new stream on `address` with every held session reattached; _Refused if the
        address is draining or loading (UNAVAILABLE in band)."""
        call = self.client.stub_at(address).StreamMulti(metadata=self.client.metadata)
        ids = list(self._held)
        batches = [
            ids[i : i + MAX_REATTACH_ENTRIES] for i in range(0, len(ids), MAX_REATTACH_ENTRIES)
        ]
        for batch in batches or [[]]:  # with no session held, an empty message probes the address
            message = pb.StreamMultiRequest(entries=[self._reattach(i) for i in batch])
            results = list((await _first_reply(call, message, address)).results)
            finals = _final_snapshots(results)
            refused = [r for r in results if r.error.code == "UNAVAILABLE"]
            if finals or refused or len(results) != len(batch):
                call.cancel()
                self.final_snapshots.update(finals)
                raise _Refused(f"{address} did not take the sessions: {refused[:1]}")
            for session_id, result in zip(batch, results, strict=True):
                self._reattached(session_id, result)
        self._call, self.address = call, address

    def _reattach(self, session_id: str) -> pb.SessionRequest:
        options = self._held.get(session_id)
        snapshot = self.final_snapshots.get(session_id)
        if snapshot is not None:
            return pb.SessionRequest(restore=_restore(snapshot, options))
        return pb.SessionRequest(resume=pb.ResumeSession(session_id=session_id, options=options))

    def _reattached(self, session_id: str, result: pb.SessionResult) -> None:
        """A session is carried over, or dropped when the new replica cannot take it (its
        final snapshot, if any, stays in `final_snapshots`)."""
        if result.WhichOneof("kind") == "opened":
            self._held[session_id] = result.opened.options
            self.final_snapshots.pop(session_id, None)
        else:
            self._held.pop(session_id, None)


# -- StreamColumns -------------------------------------------------------------------------------

Columns = np.ndarray | Sequence[np.ndarray] | Sequence[Sequence[int]]


class ColumnsRefused(Exception):
    """Some `open` / `resume` / `end` entries of a ColumnStream message failed: {index: (code,
    message)} (the others went through: see `handles`)."""

    def __init__(self, what: str, errors: dict[int, tuple[int, str]], handles: list[int]) -> None:
        first = next(iter(errors.items()))
        super().__init__(f"{what}: {len(errors)} failed, e.g. entry {first[0]}: {first[1][1]}")
        self.errors = errors
        self.handles = handles


class ColumnsResult:
    """One chunk message's results, as arrays: `probs` (n, C) float32 (NaN rows where there is
    none), `total_steps` (n,) uint64, `duplicate` (n,) bool, `status` (n,) gRPC codes (0 = OK)
    and `errors` {entry index: (code, message)} for the failed entries only."""

    __slots__ = ("duplicate", "errors", "probs", "status", "total_steps")

    def __init__(self, reply: pb.ColumnsResponse) -> None:
        n = len(reply.status) // 4
        self.status = np.frombuffer(reply.status, dtype="<u4")
        self.probs = np.frombuffer(reply.probabilities, dtype="<f4").reshape(n, -1)
        self.total_steps = np.frombuffer(reply.total_steps, dtype="<u8")
        self.duplicate = np.frombuffer(reply.duplicate, dtype=np.uint8).astype(bool)
        self.errors = {e.index: (e.code, e.message) for e in reply.errors}


def pack_steps(steps: Columns) -> tuple[np.ndarray, np.ndarray]:
    """(offsets (n + 1,) uint32, flat steps): int64 token ids (N,) or float32 frames (N, F), from
    a 2-D (n, T) / 3-D (n, T, F) array or a ragged sequence of per-session arrays."""
    if isinstance(steps, np.ndarray) and steps.ndim >= 2:
        n, t = steps.shape[:2]
        offsets = np.arange(n + 1, dtype="<u4") * t
        flat = steps.reshape(n * t, *steps.shape[2:])
    else:
        parts = [np.asarray(s) for s in steps]
        lengths = [len(p) for p in parts]
        offsets = np.zeros(len(parts) + 1, dtype="<u4")
        np.cumsum(lengths, out=offsets[1:])
        flat = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    if np.issubdtype(flat.dtype, np.floating):
        return offsets, flat.astype("<f4", copy=False)
    return offsets, flat.astype("<i8", copy=False)


def columns_request(
    handles: Sequence[int] | np.ndarray, seqs: Sequence[int] | np.ndarray, steps: Columns
) -> pb.ColumnsRequest:
    """One StreamColumns chunk message: chunk i is for session `handles[i]`, seq `seqs[i]`."""
    offsets, flat = pack_steps(steps)
    request = pb.ColumnsRequest(
        handles=np.asarray(handles, dtype="<u4").tobytes(),
        seqs=np.asarray(seqs, dtype="<u8").tobytes(), offsets=offsets.tobytes(),
    )  # fmt: skip
    if flat.dtype.kind == "f":
        request.frames = flat.tobytes()
    else:
        request.tokens = flat.tobytes()
    return request


class ColumnStream:
    """One StreamColumns call: many sessions of one model version, their chunks as arrays.

        columns = ColumnStream(client)
        handles = await columns.open("langid-chars", 256)
        result = await columns.step(handles, tokens)       # tokens (256, T) int, or ragged
        result.probs                                       # (256, C) float32

    `step` numbers each session's chunks itself (the next seq per handle, advanced for the
    entries that went through); `send(columns_request(handles, seqs, steps))` + `receive()`
    pipeline with explicit seqs. No failover: when the stream breaks the call's error is raised;
    the sessions live on (resume them by `session_ids` on a new ColumnStream), and a draining
    server's final snapshots are kept in `final_snapshots` {handle: snapshot} before its
    UNAVAILABLE is raised."""

    def __init__(self, client: LstmClient, address: str | None = None) -> None:
        self.address = address or client.address
        self._call: Any = client.stub_at(self.address).StreamColumns(metadata=client.metadata)
        self.model = ""
        self.version = 0
        self.labels: list[str] = []
        self.session_ids: dict[int, str] = {}  # handle -> session id
        self.next_seq: dict[int, int] = {}  # handle -> the seq its next chunk takes
        self.final_snapshots: dict[int, bytes] = {}

    async def send(self, request: pb.ColumnsRequest) -> None:
        """Send one message without waiting for its reply (pipelining)."""
        await self._call.write(request)

    async def receive(self) -> pb.ColumnsResponse:
        """The reply to the oldest unanswered message."""
        reply = await self._call.read()
        if reply is grpc.aio.EOF:
            await self._call  # the status: raises what ended the stream
            raise SessionLost("the StreamColumns stream ended without a reply")
        if reply.snapshot_handles:  # a draining server's last message; its status follows
            handles = np.frombuffer(reply.snapshot_handles, dtype="<u4").tolist()
            snaps = [s.data for s in reply.snapshots]
            self.final_snapshots.update(zip(handles, snaps, strict=True))
            return await self.receive()
        if reply.model:
            self.model, self.version = reply.model, reply.version
        if reply.labels:
            self.labels = list(reply.labels)
        return reply

    async def exchange(self, request: pb.ColumnsRequest) -> pb.ColumnsResponse:
        await self.send(request)
        return await self.receive()

    async def open(self, model: str, count: int = 1, version: int = 0, top_k: int = 1) -> list[int]:
        """Open `count` sessions of `model`; their handles (ColumnsRefused if any failed)."""
        options = pb.StreamOptions(top_k=top_k)
        opens = [pb.OpenSession(model=model, version=version, options=options)] * count
        return self._attached(await self.exchange(pb.ColumnsRequest(open=opens)), "open")

    async def resume(self, session_ids: Sequence[str]) -> list[int]:
        """Attach existing sessions by id to this stream; their handles."""
        reply = await self.exchange(pb.ColumnsRequest(resume=list(session_ids)))
        return self._attached(reply, "resume")

    def _attached(self, reply: pb.ColumnsResponse, what: str) -> list[int]:
        handles = np.frombuffer(reply.attached, dtype="<u4").tolist()
        for handle, session_id in zip(handles, reply.session_ids, strict=True):
            if handle:
                self.session_ids[handle] = session_id
                self.next_seq.setdefault(handle, 1)
        errors = {e.index: (e.code, e.message) for e in reply.attach_errors}
        if errors:
            raise ColumnsRefused(what, errors, handles)
        return handles

    async def step(self, handles: Sequence[int] | np.ndarray, steps: Columns) -> ColumnsResult:
        """One chunk per handle (2-D / 3-D array or ragged), each at its session's next seq."""
        listed = np.asarray(handles, dtype=np.int64).tolist()
        seqs = [self.next_seq.get(h, 1) for h in listed]
        result = ColumnsResult(await self.exchange(columns_request(listed, seqs, steps)))
        for i in np.flatnonzero(result.status == 0).tolist():
            self.next_seq[listed[i]] = seqs[i] + 1
        return result

    async def end(self, handles: Sequence[int]) -> np.ndarray:
        """End sessions; their total steps (ColumnsRefused if any failed)."""
        listed = list(handles)
        reply = await self.exchange(pb.ColumnsRequest(end=np.asarray(listed, "<u4").tobytes()))
        errors = {e.index: (e.code, e.message) for e in reply.end_errors}
        for i, handle in enumerate(listed):
            if i not in errors:
                self.session_ids.pop(handle, None)
                self.next_seq.pop(handle, None)
        if errors:
            raise ColumnsRefused("end", errors, listed)
        return np.frombuffer(reply.end_total_steps, dtype="<u8")

    async def close(self) -> None:
        """Close the stream (its sessions stay until they end or idle out)."""
        await _close_call(self._call)
