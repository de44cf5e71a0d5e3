"""Session records in Redis, so any replica can continue any session by id.

Each session is one hash `lstm-serve:session:<id>` with fields `seq` (the last message applied),
`gen` (the incarnation that wrote it: a new one at open and at each restore from a snapshot) and
`snap` (a signed snapshot, see snapshots.py), expiring after the idle timeout. Writes are
compare-and-set (a Lua script): a copy advances the record only if it is the incarnation that
wrote it and is newer, so a replica holding stale state, or a copy forked from an old snapshot,
can never overwrite it. A restore takes the record over only if its snapshot is at least as new
as the record (equal: the same incarnation). An ended session leaves a tombstone (`ended`, no
snapshot) for the idle timeout, so its snapshots cannot revive it. A marker
`lstm-serve:issued:<id>` outlives the record, so an expired id can be told from one that never
existed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

SESSION_PREFIX = "lstm-serve:session:"
ISSUED_PREFIX = "lstm-serve:issued:"
ISSUED_TTL_S = 24 * 3600

WRITTEN, STALE, ENDED = 1, 0, 2

# KEYS[1] record, KEYS[2] issued marker; ARGV: seq, gen, snapshot, ttl ms, issued ttl s, mode
# ("advance" or "takeover"), the snapshot's own gen (takeover). Returns WRITTEN, STALE or ENDED.
_SAVE = """
local rec = redis.call('HMGET', KEYS[1], 'seq', 'gen', 'ended')
if rec[3] then
  return 2
end
local ok = not rec[1]
if not ok then
  local stored, mine = tonumber(rec[1]), tonumber(ARGV[1])
  local gen = rec[2] or ''
  if ARGV[6] == 'takeover' then
    ok = stored < mine or (stored == mine and gen == ARGV[7])
  else
    ok = gen == ARGV[2] and stored < mine
  end
end
if ok then
  redis.call('HSET', KEYS[1], 'seq', ARGV[1], 'gen', ARGV[2], 'snap', ARGV[3])
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
  redis.call('SET', KEYS[2], '1', 'EX', ARGV[5])
  return 1
end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 0
"""

# KEYS[1] record; ARGV: ttl ms. The session ended: a tombstone for the idle timeout.
_END = """
redis.call('HDEL', KEYS[1], 'snap')
redis.call('HSET', KEYS[1], 'ended', '1')
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
"""


@dataclass(frozen=True)
class Record:
    """A session's record: its snapshot (None once ended), seq, incarnation, and whether it
    ended."""

    snapshot: bytes | None
    seq: int
    generation: str
    ended: bool


class RedisSessionBackend:
    """Write-through storage of session snapshots in one Redis database."""

    def __init__(self, url: str, idle_timeout_s: float) -> None:
        self.url = url
        self.ttl_ms = max(1, int(idle_timeout_s * 1000))
        self._redis: Any = aioredis.from_url(url, decode_responses=False)
        self._save = self._redis.register_script(_SAVE)
        self._end = self._redis.register_script(_END)

    async def ping(self) -> None:
        await self._redis.ping()

    async def save(
        self, session_id: str, seq: int, generation: str, snapshot: bytes,
        takeover_from: str | None = None,
    ) -> int:  # fmt: skip
        """Advance the record (this incarnation, a newer seq), or with `takeover_from` (the
        restored snapshot's incarnation) take it over; WRITTEN, STALE or ENDED."""
        keys = [SESSION_PREFIX + session_id, ISSUED_PREFIX + session_id]
        mode = "advance" if takeover_from is None else "takeover"
        args = [seq, generation, snapshot, self.ttl_ms, ISSUED_TTL_S, mode, takeover_from or ""]
        return int(await self._save(keys=keys, args=args))

    async def load(self, session_id: str) -> Record | None:
        """The stored record, refreshing its idle timer; None if absent."""
        key = SESSION_PREFIX + session_id
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hmget(key, "snap", "seq", "gen", "ended")
            pipe.pexpire(key, self.ttl_ms)
            (snap, seq, gen, ended), _ = await pipe.execute()
        if seq is None and ended is None:
            return None
        return Record(snap, int(seq or 0), (gen or b"").decode(), ended is not None)

    async def touch(self, session_id: str) -> None:
        await self._redis.pexpire(SESSION_PREFIX + session_id, self.ttl_ms)

    async def end(self, session_id: str) -> None:
        """The session ended: its record becomes a tombstone for the idle timeout."""
        await self._end(keys=[SESSION_PREFIX + session_id], args=[self.ttl_ms])

    async def holds(self, session_id: str) -> bool:
        """Whether a live record exists, without refreshing its idle timer."""
        key = SESSION_PREFIX + session_id
        return bool(await self._redis.hexists(key, "snap"))

    async def was_issued(self, session_id: str) -> bool:
        return bool(await self._redis.exists(ISSUED_PREFIX + session_id))

    async def close(self) -> None:
        await self._redis.aclose()
