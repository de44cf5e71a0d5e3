"""The Triton fronts' decode pool: small decodes inline, large ones off the event loop."""

from __future__ import annotations

import asyncio
import threading

from service.triton.offload import DecodePool


def test_small_decodes_run_on_the_loop_and_large_ones_on_the_pool() -> None:
    pool = DecodePool(inline_bytes=100, threads=1)

    async def main() -> tuple[str, str, str]:
        loop_thread = threading.current_thread().name
        small = await pool.run(100, lambda: threading.current_thread().name)
        large = await pool.run(101, lambda: threading.current_thread().name)
        return loop_thread, small, large

    try:
        loop_thread, small, large = asyncio.run(main())
    finally:
        pool.close()
    assert small == loop_thread
    assert large.startswith("triton-decode") and large != loop_thread


def test_the_loop_serves_others_while_a_large_decode_runs() -> None:
    pool = DecodePool(inline_bytes=0, threads=1)
    release = threading.Event()

    async def main() -> int:
        ticks = 0
        decode = asyncio.ensure_future(pool.run(1, release.wait, 10))
        while not decode.done():
            ticks += 1
            if ticks == 20:
                release.set()
            await asyncio.sleep(0.001)
        assert await decode
        return ticks

    try:
        assert asyncio.run(main()) >= 20
    finally:
        pool.close()
