"""One single-session stream: attach on the first message, then one reply per message, in
order; on drain, a final snapshot and the stream ends (UNAVAILABLE). Traced (the layer's
tracing on): one span per message, under the caller's trace context of the stream's call (a
stream may live for hours: a span per stream would never end)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing

from service.engine.session.sessions import Session
from service.errors import LstmServeError
from service.protocol.inbox import DRAIN, EOF, Inbox
from service.protocol.messages import ChunkDone, Ended, Reply, Request, request_bytes
from service.protocol.session import (
    FINAL_MESSAGE_GRACE_S,
    SessionLayer,
    draining_error,
    kind_name,
    traced_message,
)
from service.tracing import LSTM_SERVE_SERVICE, NO_REQUEST_SPAN, RequestSpan


class StreamConversation:
    """Drives one stream; `model` names its session's model once attached (for metrics)."""

    def __init__(self, layer: SessionLayer, requests: AsyncIterator[Request], rpc: str,
                 parent: object = None) -> None:  # fmt: skip
        """`parent`: the caller's trace context (Tracing.extract), when traced."""
        self.layer = layer
        self.rpc = rpc
        self.parent = parent
        self._ended = False
        self.session: Session | None = None
        self._requests = requests
        self.token = object()  # what the session is attached to while this stream has it

    @property
    def model(self) -> str:
        return self.session.model.name if self.session is not None else ""

    async def replies(self) -> AsyncIterator[Reply]:
        """Every reply, in order; raises what ends the stream with a status."""
        layer = self.layer
        inbox = layer.open_inbox(self._requests, request_bytes)
        try:
            while True:
                request = await self._next(inbox)
                if request is EOF:
                    return
                if request is DRAIN and self.session is None:
                    continue  # read the first message and refuse it (see _next)
                if request is DRAIN:
                    if self.session is not None and layer.hands_over:
                        final = await layer.snapshot(self.session, True, self.token)
                        yield Reply(self.session.id, final)
                        await inbox.wait_closed(FINAL_MESSAGE_GRACE_S)
                    raise draining_error()
                assert not isinstance(request, BaseException)
                span = self._span(request) if layer.tracing.enabled else NO_REQUEST_SPAN
                if span is NO_REQUEST_SPAN:  # off, or this message is not sampled
                    yield await self._answer(request)  # type: ignore[arg-type]
                else:
                    answer = self._answer(request)  # type: ignore[arg-type]
                    async with aclosing(traced_message(span, answer, _refused)) as traced:
                        async for reply in traced:
                            yield reply
                if self._ended:
                    return
        finally:
            layer.close_inbox(inbox)
            if self.session is not None:
                self.session.detach(self.token)

    async def _answer(self, request: Request) -> Reply:
        """One message's reply: attach (the first message) or the layer's handling."""
        if self.session is None:
            self.session, opened = await self.layer.attach(request, self.token)
            return Reply(opened.session_id, opened)
        body = await self.layer.handle(self.session, request, self.rpc, self.token)
        if isinstance(body, Ended) or (
            isinstance(body, ChunkDone) and body.outcome is not None and body.outcome.ended
        ):
            self._ended = True  # ended: by `end`, or by its decision (end_when_decided)
        return Reply(self.session.id, body)

    def _span(self, request: object) -> RequestSpan:
        kind = {"lstmserve.message": kind_name(request)}
        return self.layer.tracing.rpc(LSTM_SERVE_SERVICE, self.rpc, self.parent, kind)

    async def _next(self, inbox: Inbox[Request]) -> object:
        """The next message, EOF or DRAIN. A stream not attached yet when the drain starts has
        its first message read (up to FINAL_MESSAGE_GRACE_S) and refused by attach, instead of
        being cut off while the client writes it (grpc would report INTERNAL, not the status)."""
        if self.session is not None or not self.layer.engine.drain_started.is_set():
            return await inbox.next()
        try:
            async with asyncio.timeout(FINAL_MESSAGE_GRACE_S):
                return await inbox.next(drain=False)
        except TimeoutError:
            raise draining_error() from None


def _refused(reply: Reply) -> LstmServeError | None:
    """A chunk refused in-band: its message's span ends with that code."""
    return getattr(reply.body, "error", None)
