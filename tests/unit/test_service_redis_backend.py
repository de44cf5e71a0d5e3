"""The Redis session backend against a real redis-server: CAS writes, expiry, ended ids."""

from __future__ import annotations

import asyncio
import uuid

from service.engine.redis_backend import ENDED, STALE, WRITTEN, Record, RedisSessionBackend


def _run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_save_load_and_end_leaves_a_tombstone(redis_url: str) -> None:
    async def scenario() -> None:
        backend = RedisSessionBackend(redis_url, idle_timeout_s=60)
        sid = uuid.uuid4().hex
        assert await backend.load(sid) is None and not await backend.was_issued(sid)
        assert await backend.save(sid, 1, "g1", b"snap-1") == WRITTEN
        assert await backend.load(sid) == Record(b"snap-1", 1, "g1", False)
        assert await backend.was_issued(sid)
        await backend.end(sid)
        assert await backend.load(sid) == Record(None, 1, "g1", True)
        assert await backend.save(sid, 2, "g1", b"snap-2") == ENDED, "an ended session stays so"
        assert await backend.save(sid, 9, "g2", b"x", takeover_from="g1") == ENDED
        await backend.close()

    _run(scenario())


def test_a_stale_write_never_overwrites_a_newer_one(redis_url: str) -> None:
    async def scenario() -> None:
        backend = RedisSessionBackend(redis_url, idle_timeout_s=60)
        sid = uuid.uuid4().hex
        assert await backend.save(sid, 5, "g1", b"seq-5") == WRITTEN
        assert await backend.save(sid, 4, "g1", b"seq-4") == STALE, "older seq refused"
        assert await backend.save(sid, 5, "g1", b"seq-5-again") == STALE, "same seq refused"
        assert await backend.save(sid, 6, "g2", b"fork") == STALE, "another incarnation refused"
        assert (await backend.load(sid)).snapshot == b"seq-5"  # type: ignore[union-attr]
        await backend.close()

    _run(scenario())


def test_a_restore_takes_over_only_from_a_snapshot_at_least_as_new(redis_url: str) -> None:
    async def scenario() -> None:
        backend = RedisSessionBackend(redis_url, idle_timeout_s=60)
        sid = uuid.uuid4().hex
        assert await backend.save(sid, 5, "g1", b"seq-5") == WRITTEN
        older = await backend.save(sid, 4, "g2", b"old", takeover_from="g1")
        assert older == STALE, "a snapshot behind the record"
        fork = await backend.save(sid, 5, "g3", b"fork", takeover_from="g0")
        assert fork == STALE, "the same seq of another incarnation"
        assert await backend.save(sid, 5, "g4", b"taken", takeover_from="g1") == WRITTEN
        assert await backend.load(sid) == Record(b"taken", 5, "g4", False)
        assert await backend.save(sid, 6, "g1", b"old copy") == STALE, "the old copy lost it"
        await backend.close()

    _run(scenario())


def test_an_idle_record_expires_but_its_id_is_remembered(redis_url: str) -> None:
    async def scenario() -> None:
        backend = RedisSessionBackend(redis_url, idle_timeout_s=0.05)
        sid = uuid.uuid4().hex
        await backend.save(sid, 1, "g1", b"x")
        deadline = asyncio.get_running_loop().time() + 5
        while await backend.holds(sid):
            assert asyncio.get_running_loop().time() < deadline, "record never expired"
            await asyncio.sleep(0.02)
        assert await backend.was_issued(sid), "an expired id is told from an unknown one"
        await backend.close()

    _run(scenario())
