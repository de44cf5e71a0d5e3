"""A stream whose requests run concurrently (Triton's ModelStreamInfer: many sequences on one
stream), read through the session layer's inbox like every other stream.

Each request runs as it arrives (those of one sequence are ordered by the sequence rules,
service/protocol/sequences.py) and its reply leaves when it is done. A request's bytes count
against the stream's and the server's one read-ahead budget until its reply is out; at most
`max_running` run at once. When the server drains, the stream stops reading, lets the
requests it took finish (their sessions are then in the shared store), and ends with
UNAVAILABLE: the client sends what follows to another replica, which continues its sequences.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Generic, TypeVar

from service.errors import Draining
from service.protocol.inbox import DRAIN, EOF, Inbox
from service.protocol.session import SessionLayer

R = TypeVar("R")
T = TypeVar("T")


class ConcurrentStream(Generic[R, T]):
    """Runs `handle` on every request of one stream; replies in completion order. `handle`
    answers a request's own errors in its reply (the stream goes on)."""

    def __init__(
        self, layer: SessionLayer, requests: AsyncIterator[R], size: Callable[[R], int],
        handle: Callable[[R], Awaitable[T]], max_running: int,
    ) -> None:  # fmt: skip
        self.layer = layer
        self._requests = requests
        self._size = size
        self._handle = handle
        self._max_running = max_running
        self._running: set[asyncio.Task[None]] = set()
        self._out: asyncio.Queue[T | None] = asyncio.Queue()
        self._drained = False

    async def replies(self) -> AsyncIterator[T]:
        """Every reply; raises what ends the stream (a broken request stream, a drain)."""
        inbox = self.layer.open_inbox(self._requests, self._size)
        reader = asyncio.create_task(self._read(inbox), name="concurrent-stream-read")
        try:
            while (reply := await self._out.get()) is not None:
                yield reply
            await reader  # a broken request stream ends the call with its error
        finally:
            reader.cancel()
            for task in list(self._running):
                task.cancel()
            self.layer.close_inbox(inbox)
        if self._drained:
            raise Draining(
                "the server is draining (shutting down): send this stream's next requests to "
                "another replica; with a shared session store it continues their sequences"
            )

    async def _read(self, inbox: Inbox[R]) -> None:
        try:
            while True:
                while len(self._running) >= self._max_running:
                    await asyncio.wait(self._running, return_when=asyncio.FIRST_COMPLETED)
                request, size = await inbox.take()
                if request is EOF:
                    break
                if request is DRAIN:
                    self._drained = True
                    break
                task = asyncio.create_task(self._one(inbox, request, size))  # type: ignore[arg-type]
                self._running.add(task)
                task.add_done_callback(self._running.discard)
            while self._running:
                await asyncio.wait(list(self._running))
        finally:
            self._out.put_nowait(None)

    async def _one(self, inbox: Inbox[R], request: R, size: int) -> None:
        try:
            reply = await self._handle(request)
            self._out.put_nowait(reply)  # no await between the reply and here: in order
        finally:
            inbox.release(size)
