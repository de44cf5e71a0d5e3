"""Decoding whose cost grows with the request, off the event loop.

One pool per server, shared by the Triton fronts (HTTP and gRPC): a request whose decode would
cost more than INLINE_BYTES' worth runs on one of DECODE_THREADS threads while the loop serves
everyone else; small ones (nearly all) are decoded inline, where a thread hop would cost more
than the work. The pool's threads still take the GIL, but in the interpreter's switch interval
(5 ms) slices, so no stream waits for a whole large decode.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

INLINE_BYTES = 64 << 10  # requests up to this size are parsed and decoded on the loop
DECODE_THREADS = 2
T = TypeVar("T")


class DecodePool:
    """Runs decodes inline when small, else on a small pool made on first use."""

    def __init__(self, inline_bytes: int = INLINE_BYTES, threads: int = DECODE_THREADS) -> None:
        self.inline_bytes = inline_bytes
        self.threads = threads
        self._pool: ThreadPoolExecutor | None = None

    async def run(self, size: int, work: Callable[..., T], *args: Any) -> T:
        """`work(*args)`: on the loop when `size` (bytes, or a comparable cost) is small, else
        on the pool."""
        if size <= self.inline_bytes:
            return work(*args)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="triton-decode")
        return await asyncio.get_running_loop().run_in_executor(self._pool, work, *args)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
