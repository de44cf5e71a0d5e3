"""Session records in Redis, so any replica can continue any session by id.

Each session is one hash `lstm-serve:session:<id>` with fields `seq` (the last chunk sequence
number applied) and `snap` (a signed snapshot, see snapshots.py), expiring after the idle
timeout. Writes are compare-and-set on `seq` (a Lua script), so a replica holding stale state
can never overwrite a newer one. A marker `lstm-serve:issued:<id>` outlives the record, so an
expired id can be told from one that never existed.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis

SESSION_PREFIX = "lstm-serve:session:"
ISSUED_PREFIX = "lstm-serve:issued:"
ISSUED_TTL_S = 24 * 3600

# KEYS[1] record, KEYS[2] issued marker; ARGV: seq, snapshot, ttl ms, issued ttl s, force.
# Writes when forced (reset / restore) or when the stored seq is older; returns 1 if written.
_SAVE = """
local stored = redis.call('HGET', KEYS[1], 'seq')
if ARGV[5] == '1' or not stored or tonumber(stored) < tonumber(ARGV[1]) then
  redis.call('HSET', KEYS[1], 'seq', ARGV[1], 'snap', ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  redis.call('SET', KEYS[2], '1', 'EX', ARGV[4])
  return 1
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 0
"""


class RedisSessionBackend:
    """Write-through storage of session snapshots in one Redis database."""

    def __init__(self, url: str, idle_timeout_s: float) -> None:
        self.url = url
        self.ttl_ms = max(1, int(idle_timeout_s * 1000))
        self._redis: Any = aioredis.from_url(url, decode_responses=False)
        self._save = self._redis.register_script(_SAVE)

    async def ping(self) -> None:
        await self._redis.ping()

    async def save(self, session_id: str, seq: int, snapshot: bytes, force: bool = False) -> bool:
        """Store the session unless Redis already holds a newer sequence number."""
        keys = [SESSION_PREFIX + session_id, ISSUED_PREFIX + session_id]
        args = [seq, snapshot, self.ttl_ms, ISSUED_TTL_S, "1" if force else "0"]
        return bool(await self._save(keys=keys, args=args))

    async def load(self, session_id: str) -> bytes | None:
        """The stored snapshot, refreshing its idle timer; None if absent."""
        key = SESSION_PREFIX + session_id
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hget(key, "snap")
            pipe.pexpire(key, self.ttl_ms)
            snap, _ = await pipe.execute()
        return snap

    async def touch(self, session_id: str) -> None:
        await self._redis.pexpire(SESSION_PREFIX + session_id, self.ttl_ms)

    async def delete(self, session_id: str) -> None:
        """Forget the session (ended): its id then reads as never issued."""
        await self._redis.delete(SESSION_PREFIX + session_id, ISSUED_PREFIX + session_id)

    async def holds(self, session_id: str) -> bool:
        """Whether the record exists, without refreshing its idle timer."""
        return bool(await self._redis.exists(SESSION_PREFIX + session_id))

    async def was_issued(self, session_id: str) -> bool:
        return bool(await self._redis.exists(ISSUED_PREFIX + session_id))

    async def close(self) -> None:
        await self._redis.aclose()
