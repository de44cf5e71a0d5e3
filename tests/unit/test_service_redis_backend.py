"""The Redis session backend against a real redis-server: CAS writes, expiry, ended ids."""

from __future__ import annotations

import asyncio
import uuid

from service.engine.redis_backend import RedisSessionBackend


def _run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_save_load_and_delete(redis_url: str) -> None:
    async def scenario() -> None:
        backend = RedisSessionBackend(redis_url, idle_timeout_s=60)
        sid = uuid.uuid4().hex
        assert await backend.load(sid) is None and not await backend.was_issued(sid)
        assert await backend.save(sid, 1, b"snap-1")
        assert await backend.load(sid) == b"snap-1" and await backend.was_issued(sid)
        await backend.delete(sid)
        assert await backend.load(sid) is None and not await backend.was_issued(sid)
        await backend.close()

    _run(scenario())


def test_a_stale_write_never_overwrites_a_newer_one(redis_url: str) -> None:
    async def scenario() -> None:
        backend = RedisSessionBackend(redis_url, idle_timeout_s=60)
        sid = uuid.uuid4().hex
        assert await backend.save(sid, 5, b"seq-5")
        assert not await backend.save(sid, 4, b"seq-4"), "older seq refused"
        assert not await backend.save(sid, 5, b"seq-5-again"), "same seq refused"
        assert await backend.load(sid) == b"seq-5"
        assert await backend.save(sid, 2, b"restored", force=True), "force (reset/restore) wins"
        assert await backend.load(sid) == b"restored"
        await backend.close()

    _run(scenario())


def test_an_idle_record_expires_but_its_id_is_remembered(redis_url: str) -> None:
    async def scenario() -> None:
        backend = RedisSessionBackend(redis_url, idle_timeout_s=0.05)
        sid = uuid.uuid4().hex
        await backend.save(sid, 1, b"x")
        deadline = asyncio.get_running_loop().time() + 5
        while await backend.holds(sid):
            assert asyncio.get_running_loop().time() < deadline, "record never expired"
            await asyncio.sleep(0.02)
        assert await backend.was_issued(sid), "an expired id is told from an unknown one"
        await backend.close()

    _run(scenario())
