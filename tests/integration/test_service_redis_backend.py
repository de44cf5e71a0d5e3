"""The Redis session backend against a real redis-server: CAS writes, expiry, ended ids."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest

from service.engine.continuity.redis_backend import (
    ENDED,
    STALE,
    WRITTEN,
    Record,
    RedisSessionBackend,
)


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
        await backend.end(sid, b"final-1")
        assert await backend.load(sid) == Record(None, 1, "g1", True, b"final-1")
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


def test_keys_are_hash_tagged(redis_url: str) -> None:
    import redis

    async def scenario() -> None:
        backend = RedisSessionBackend(redis_url, idle_timeout_s=60)
        sid = uuid.uuid4().hex
        assert await backend.save(sid, 1, "g1", b"s") == WRITTEN
        plain = redis.Redis.from_url(redis_url)
        assert plain.exists(f"lstm-serve:session:{{{sid}}}", f"lstm-serve:issued:{{{sid}}}") == 2
        assert await backend.holds(sid) and await backend.was_issued(sid)
        plain.close()
        await backend.close()

    _run(scenario())


def test_an_outage_fails_fast_and_a_probe_brings_the_store_back(tmp_path: Path) -> None:
    from bench.redisfleet import RedisNode
    from service import metrics
    from service.engine.continuity.redis_backend import StoreUnavailable
    from service.engine.continuity.store_urls import StoreOptions

    node = RedisNode(tmp_path, "redis").start("--appendonly", "yes", "--appendfsync", "always")

    async def scenario() -> None:
        url = f"redis://127.0.0.1:{node.port}/0"
        backend = RedisSessionBackend(url, 60, StoreOptions(timeout_s=0.3),
                                      metrics=metrics.engine_metrics())  # fmt: skip
        sid = uuid.uuid4().hex
        assert await backend.save(sid, 1, "g1", b"s1") == WRITTEN
        node.kill()
        with pytest.raises(StoreUnavailable, match="did not answer save"):
            await backend.save(sid, 2, "g1", b"s2")
        assert not backend.guard.up and metrics.SESSION_STORE_UP._value.get() == 0
        loop = asyncio.get_running_loop()
        start = loop.time()
        for _ in range(100):  # while down: refused at once, nothing queued
            with pytest.raises(StoreUnavailable, match="down"):
                await backend.save(sid, 2, "g1", b"s2")
        assert loop.time() - start < 0.5
        node.start()
        deadline = loop.time() + 10
        while not backend.guard.up:
            assert loop.time() < deadline, "the probe never saw the store again"
            await asyncio.sleep(0.02)
        assert await backend.save(sid, 2, "g1", b"s2") == WRITTEN
        assert await backend.load(sid) == Record(b"s2", 2, "g1", False)
        await backend.close()

    try:
        _run(scenario())
    finally:
        node.stop()


def test_an_end_during_an_outage_is_written_when_the_store_is_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With its final snapshot, within the bytes held for them (past it: a bare tombstone)."""
    from bench.redisfleet import RedisNode
    from service.engine.continuity import redis_backend
    from service.engine.continuity.redis_backend import StoreUnavailable
    from service.engine.continuity.store_urls import StoreOptions

    monkeypatch.setattr(redis_backend, "MAX_PENDING_FINAL_BYTES", 12)
    node = RedisNode(tmp_path, "redis").start("--appendonly", "yes", "--appendfsync", "always")

    async def scenario() -> None:
        url = f"redis://127.0.0.1:{node.port}/0"
        backend = RedisSessionBackend(url, 60, StoreOptions(timeout_s=0.3))
        other = RedisSessionBackend(url, 60, StoreOptions(timeout_s=0.3))  # another replica
        sid, late = uuid.uuid4().hex, uuid.uuid4().hex
        assert await backend.save(sid, 3, "g1", b"s3") == WRITTEN
        assert await backend.save(late, 1, "g1", b"s1") == WRITTEN
        node.kill()
        with pytest.raises(StoreUnavailable):
            await backend.end(sid, b"final-3")  # 7 bytes: held
        with pytest.raises(StoreUnavailable):
            await backend.end(late, b"final-1")  # 14 bytes in all: over 12, not held
        assert backend.pending_ends == 2
        node.start()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while backend.pending_ends:
            assert loop.time() < deadline, "the held-back end was never written"
            await asyncio.sleep(0.02)
        assert backend.guard.up
        ended = await other.load(sid)
        assert ended == Record(None, 3, "g1", True, b"final-3"), "a tombstone, not a live record"
        assert await other.load(late) == Record(None, 1, "g1", True, None)
        await backend.close()
        await other.close()

    try:
        _run(scenario())
    finally:
        node.stop()


def test_with_min_replicas_a_record_no_replica_has_yet_is_not_taken(tmp_path: Path) -> None:
    """A save refused for want of replicas may still reach the master: strict mode must not
    continue a session from that record (and acknowledge its steps) until a replica has it,
    or a failover to that replica takes acknowledged steps back."""
    from bench.redisfleet import HOST, SYNC_AT_ONCE, RedisNode
    from service.engine.continuity.redis_backend import StoreUnavailable
    from service.engine.continuity.store_urls import StoreOptions

    master = RedisNode(tmp_path, "master").start(*SYNC_AT_ONCE)
    replica = RedisNode(tmp_path, "replica")

    async def scenario() -> None:
        url = f"redis://{HOST}:{master.port}/0"
        landed = RedisSessionBackend(url, 60)  # what reached the master of a refused save
        strict = RedisSessionBackend(url, 60, StoreOptions(timeout_s=0.5), min_replicas=1)
        sid = uuid.uuid4().hex
        assert await landed.save(sid, 1, "g1", b"s1") == WRITTEN
        with pytest.raises(StoreUnavailable, match="record, but 0 of the 1 replicas"):
            await strict.load(sid)
        assert strict.guard.up, "not an outage: the master answered"
        assert await strict.load(uuid.uuid4().hex) is None, "no record: nothing to wait for"
        replica.start("--replicaof", HOST, str(master.port))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while True:
            try:
                assert await strict.load(sid) == Record(b"s1", 1, "g1", False)
                break
            except StoreUnavailable:
                assert loop.time() < deadline, "the replica never acknowledged the record"
                await asyncio.sleep(0.05)
        await landed.close()
        await strict.close()

    try:
        _run(scenario())
    finally:
        replica.stop()
        master.stop()
