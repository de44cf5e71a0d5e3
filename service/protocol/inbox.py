"""A stream's requests, read ahead into a bounded queue, so that a draining server can wake a
stream that is waiting for its next message (to send its final snapshots and close it)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Generic, TypeVar

R = TypeVar("R")

READ_AHEAD = 64  # messages read ahead of processing per stream (gRPC flow control beyond)
EOF = object()  # the client closed its side
DRAIN = object()  # the server is draining: stop after the message in progress


class Inbox(Generic[R]):
    """Requests of one stream, in order, or EOF / DRAIN."""

    def __init__(self, requests: AsyncIterator[R], draining: asyncio.Event) -> None:
        self._draining = draining
        self._queue: asyncio.Queue[object] = asyncio.Queue(maxsize=READ_AHEAD)
        self._reader = asyncio.create_task(self._read(requests))

    async def _read(self, requests: AsyncIterator[R]) -> None:
        try:
            async for request in requests:
                await self._queue.put(request)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the stream broke: handed to next() to raise
            await self._queue.put(exc)
            return
        await self._queue.put(EOF)

    async def next(self, drain: bool = True) -> R | object:
        """The next request, EOF or (with `drain`) DRAIN; raises what broke the stream.
        `drain=False` reads on through a drain (the wake-up is skipped)."""
        if drain and self._draining.is_set():
            return DRAIN
        while True:
            item = await self._queue.get()
            if isinstance(item, BaseException):
                raise item
            if item is not DRAIN or drain:
                return item

    async def wait_closed(self, timeout_s: float) -> None:
        """After a stream's final message: give the client up to `timeout_s` to close its side
        (dropping whatever it still sends), so it reads that message before the stream ends."""
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    item = await self._queue.get()
                    if item is EOF or isinstance(item, BaseException):
                        return
        except TimeoutError:
            return

    def wake(self) -> None:
        """Wake a stream waiting for its next message (a busy one checks between messages)."""
        with contextlib.suppress(asyncio.QueueFull):
            self._queue.put_nowait(DRAIN)

    def close(self) -> None:
        self._reader.cancel()
