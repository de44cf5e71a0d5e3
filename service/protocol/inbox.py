"""A stream's requests, read ahead into a bounded queue, so that a draining server can wake a
stream that is waiting for its next message (to send its final snapshots and close it).

Read-ahead is bounded in messages and in bytes, per stream and across all streams
(`ReadAhead`): beyond the bounds a stream simply stops reading, and gRPC's flow control holds
the client back; a stream with nothing buffered may always read one message, so every stream
makes progress. The same server-wide total also bounds what whole requests hold while they run
(HTTP bodies: `ReadAhead.hold`; requests of a stream that run concurrently: `Inbox.take`, whose
bytes count until `release`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Generic, TypeVar

R = TypeVar("R")

READ_AHEAD = 64  # messages read ahead of processing per stream
EOF = object()  # the client closed its side
DRAIN = object()  # the server is draining: stop after the message in progress


class ReadAhead:
    """Bytes read ahead of processing: at most `per_stream` in one stream, `total` in all."""

    def __init__(self, per_stream: int = 4 << 20, total: int = 256 << 20) -> None:
        self.per_stream = per_stream
        self.total = total
        self.used = 0
        self._freed = asyncio.Condition()

    def fits(self, buffered: int, size: int) -> bool:
        """Whether a stream holding `buffered` bytes may read `size` more now."""
        if buffered == 0:
            return True  # one message always: every stream makes progress
        return buffered + size <= self.per_stream and self.used + size <= self.total

    async def wait_until_fits(self, buffered: Callable[[], int], size: int) -> None:
        async with self._freed:
            await self._freed.wait_for(lambda: self.fits(buffered(), size))

    def take(self, size: int) -> None:
        self.used += size

    @contextlib.asynccontextmanager
    async def hold(self, size: int) -> AsyncIterator[None]:
        """Hold `size` bytes of the total for a request read whole (an HTTP body): it waits
        until they fit beside everything else held or read ahead; one request always fits."""
        size = min(size, self.total)
        if self.used + size > self.total:
            async with self._freed:
                await self._freed.wait_for(lambda: self.used + size <= self.total)
        self.take(size)
        try:
            yield
        finally:
            self.give_back(size)

    def give_back(self, size: int) -> None:
        self.used -= size
        if self._freed._waiters:  # type: ignore[attr-defined]  # no loop hop when none wait
            asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self._freed:
            self._freed.notify_all()


class Inbox(Generic[R]):
    """Requests of one stream, in order, or EOF / DRAIN."""

    def __init__(self, requests: AsyncIterator[R], draining: asyncio.Event,
                 read_ahead: ReadAhead, size: Callable[[R], int]) -> None:  # fmt: skip
        self._draining = draining
        self._budget = read_ahead
        self._size = size
        self._bytes = 0  # read ahead and not yet taken by next() (or released after take())
        self._closed = False
        self._queue: asyncio.Queue[tuple[object, int]] = asyncio.Queue(maxsize=READ_AHEAD)
        self._reader = asyncio.create_task(self._read(requests))

    async def _read(self, requests: AsyncIterator[R]) -> None:
        try:
            async for request in requests:
                await self._put(request, self._size(request))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the stream broke: handed to next() to raise
            await self._put(exc, 0)
            return
        await self._put(EOF, 0)

    async def _put(self, item: object, size: int) -> None:
        if not self._budget.fits(self._bytes, size):
            await self._budget.wait_until_fits(lambda: self._bytes, size)
        self._bytes += size
        self._budget.take(size)
        await self._queue.put((item, size))

    def _taken(self, item: tuple[object, int]) -> object:
        """A queued item, its bytes given back to the read-ahead budget."""
        request, size = item
        if size:
            self._bytes -= size
            self._budget.give_back(size)
        return request

    async def next(self, drain: bool = True) -> R | object:
        """The next request, EOF or (with `drain`) DRAIN; raises what broke the stream.
        `drain=False` reads on through a drain (the wake-up is skipped)."""
        if drain and self._draining.is_set():
            return DRAIN
        while True:
            item = self._taken(await self._queue.get())
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
                    item = self._taken(await self._queue.get())
                    if item is EOF or isinstance(item, BaseException):
                        return
        except TimeoutError:
            return

    async def take(self) -> tuple[object, int]:
        """The next request (or EOF / DRAIN) and its bytes, which keep counting against the
        bounds until `release` (a request that runs while the stream reads on)."""
        if self._draining.is_set():
            return DRAIN, 0
        item, size = await self._queue.get()
        if isinstance(item, BaseException):
            self.release(size)
            raise item
        return item, size

    def release(self, size: int) -> None:
        """A request `take` gave is done: its bytes are given back (nothing once closed)."""
        if size and not self._closed:
            self._bytes -= size
            self._budget.give_back(size)

    def wake(self) -> None:
        """Wake a stream waiting for its next message (a busy one checks between messages)."""
        with contextlib.suppress(asyncio.QueueFull):
            self._queue.put_nowait((DRAIN, 0))

    def close(self) -> None:
        """Stop reading; what was read ahead and not given back yet is given back."""
        self._closed = True
        self._reader.cancel()
        if self._bytes:
            self._budget.give_back(self._bytes)
            self._bytes = 0
