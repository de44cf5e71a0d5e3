"""One single-session stream: attach on the first message, then one reply per message, in
order; on drain, a final snapshot and the stream ends (UNAVAILABLE)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from service.engine.session.sessions import Session
from service.protocol.inbox import DRAIN, EOF, Inbox
from service.protocol.messages import ChunkDone, Ended, Reply, Request, request_bytes
from service.protocol.session import FINAL_MESSAGE_GRACE_S, SessionLayer, draining_error


class StreamConversation:
    """Drives one stream; `model` names its session's model once attached (for metrics)."""

    def __init__(self, layer: SessionLayer, requests: AsyncIterator[Request], rpc: str) -> None:
        self.layer = layer
        self.rpc = rpc
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
                if self.session is None:
                    attached = await layer.attach(request, self.token)  # type: ignore[arg-type]
                    self.session, opened = attached
                    yield Reply(opened.session_id, opened)
                    continue
                body = await layer.handle(
                    self.session,
                    request,
                    self.rpc,
                    self.token,  # type: ignore[arg-type]
                )
                yield Reply(self.session.id, body)
                if isinstance(body, Ended) or (
                    isinstance(body, ChunkDone) and body.outcome is not None and body.outcome.ended
                ):
                    return  # ended: by `end`, or by its decision (end_when_decided)
        finally:
            layer.close_inbox(inbox)
            if self.session is not None:
                self.session.detach(self.token)

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
