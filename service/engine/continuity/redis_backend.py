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

Key names carry the session id as a hash tag, `lstm-serve:session:{<id>}` and
`lstm-serve:issued:{<id>}`, so a session's keys share one Redis Cluster slot and the scripts run
on a cluster too.

Every operation runs under a deadline through `StoreGuard` (store_urls.py builds the client: one
Redis, Sentinel or Cluster, TLS): timed per op, and after a failure the store counts as down, so
operations fail fast (StoreUnavailable) while a background probe pings it (0.1 s doubling to
2 s) until it answers. Nothing is queued while it is down.

With `min_replicas` (strict mode with Sentinel: 1), a save counts only once that many replicas
have it (WAIT on the save's connection), so a master killed right after a reply cannot take an
acknowledged chunk with it: the replica Sentinel promotes has it. A load too: a record is taken
only once that many replicas have it, since a save refused for want of replicas may have
reached the master all the same, and continuing from it would acknowledge what a failover can
still take back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from service.engine.continuity.store_urls import StoreOptions, connect, parse_store_url
from service.engine.types import NO_METRICS, EngineMetrics

log = logging.getLogger(__name__)
T = TypeVar("T")

SESSION_PREFIX = "lstm-serve:session:"
ISSUED_PREFIX = "lstm-serve:issued:"
MIN_BACKOFF_S, MAX_BACKOFF_S = 0.1, 2.0
MAX_PENDING_ENDS = 100_000  # ends held back by an outage, written when the store is back
# Their final snapshots held meanwhile, all together; past it an end's tombstone is written
# without one (a resent `end` of that session is then answered NOT_FOUND).
MAX_PENDING_FINAL_BYTES = 16 << 20


def session_key(session_id: str) -> str:
    return SESSION_PREFIX + "{" + session_id + "}"


def issued_key(session_id: str) -> str:
    return ISSUED_PREFIX + "{" + session_id + "}"


ISSUED_TTL_S = 24 * 3600

WRITTEN, STALE, ENDED = 1, 0, 2

# KEYS[1] record, KEYS[2] issued marker; ARGV: seq, gen, snapshot, ttl ms, issued ttl s, mode
# ("advance", "takeover" or "restart": a new incarnation under a known id, written over any
# record, an ended one included), the snapshot's own gen (takeover). Returns WRITTEN, STALE or
# ENDED.
_SAVE = """
local rec = redis.call('HMGET', KEYS[1], 'seq', 'gen', 'ended')
local restart = ARGV[6] == 'restart'
if rec[3] and not restart then
  return 2
end
local ok = restart or not rec[1]
if rec[3] then
  redis.call('HDEL', KEYS[1], 'ended')
end
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

# KEYS[1] record; ARGV: ttl ms, the final snapshot (empty: none). The session ended: a
# tombstone for the idle timeout, holding the session as it ended (a resent `end` is answered
# from it; a snapshot of it cannot revive the session: the tombstone is what `save` checks).
_END = """
redis.call('HDEL', KEYS[1], 'snap')
redis.call('HSET', KEYS[1], 'ended', '1')
if ARGV[2] ~= '' then
  redis.call('HSET', KEYS[1], 'final', ARGV[2])
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
"""

# KEYS[1] record; ARGV: ttl ms. The record's fields, its idle timer refreshed.
_LOAD = """
local rec = redis.call('HMGET', KEYS[1], 'snap', 'seq', 'gen', 'ended', 'final')
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return rec
"""


class StoreUnavailable(Exception):
    """The shared store did not answer in time, or is down (failing fast until its backoff)."""


class StoreGuard:
    """Runs store operations under a deadline, timed per op; tracks whether the store is up.

    The first failure marks it down (a metric, one log line): operations then fail fast, and
    one background probe pings it after 0.1 s, doubling to 2 s, until it answers (up again,
    one log line). Nothing waits on a dead store but the operation that found it dead."""

    def __init__(self, timeout_s: float, where: str, ping: Callable[[], Awaitable[Any]],
                 on_up: Callable[[], Awaitable[None]] | None = None,
                 metrics: EngineMetrics = NO_METRICS) -> None:  # fmt: skip
        self.timeout_s = timeout_s
        self.where = where  # the redacted URL, for the log
        self.up = True
        self._ping = ping
        self._on_up = on_up  # run by the probe once the store answers again
        self._probe: asyncio.Task[None] | None = None
        self._m_up = metrics.store_up
        self._m_seconds = metrics.store_seconds  # (op)
        self._m_up.set(1)

    async def run(self, op: str, call: Callable[[], Awaitable[T]]) -> T:
        if not self.up:
            raise StoreUnavailable("the session store is down (probed in the background)")
        start = time.perf_counter()
        try:
            result = await asyncio.wait_for(call(), self.timeout_s)
        except Exception as exc:
            self._m_seconds.labels(op).observe(time.perf_counter() - start)
            self._failed(exc)
            raise StoreUnavailable(f"the session store did not answer {op}: {exc!r}") from exc
        self._m_seconds.labels(op).observe(time.perf_counter() - start)
        return result

    def _failed(self, exc: BaseException) -> None:
        if not self.up:
            return
        self.up = False
        self._m_up.set(0)
        log.error(
            "session store down",
            extra={"fields": {"store": self.where, "error": repr(exc)[:300]}},
        )
        self._probe = asyncio.get_running_loop().create_task(self._probe_until_up())

    async def _probe_until_up(self) -> None:
        backoff = MIN_BACKOFF_S
        while True:
            await asyncio.sleep(backoff)
            try:
                await asyncio.wait_for(self._ping(), self.timeout_s)
                break
            except Exception:
                backoff = min(MAX_BACKOFF_S, backoff * 2)
        self.up = True
        self._m_up.set(1)
        log.warning("session store back", extra={"fields": {"store": self.where}})
        if self._on_up is not None:
            await self._on_up()

    def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()


@dataclass(frozen=True)
class Record:
    """A session's record: its snapshot (None once ended), seq, incarnation, whether it
    ended, and (ended) its snapshot as it ended."""

    snapshot: bytes | None
    seq: int
    generation: str
    ended: bool
    final: bytes | None = None


class RedisSessionBackend:
    """Write-through storage of session snapshots in Redis (one, Sentinel or Cluster)."""

    def __init__(
        self, url: str, idle_timeout_s: float, options: StoreOptions | None = None,
        where: str = "", min_replicas: int = 0, metrics: EngineMetrics = NO_METRICS,
    ) -> None:  # fmt: skip
        self.url = url
        self.min_replicas = min_replicas
        self.options = options or StoreOptions()
        self.ttl_ms = max(1, int(idle_timeout_s * 1000))
        self.target = parse_store_url(url)
        self._redis: Any = connect(self.target, self.options)
        self.guard = StoreGuard(self.options.timeout_s, where or self.target.kind, self._redis.ping,
                                self._write_pending_ends, metrics)  # fmt: skip
        self._store_ops = metrics.store_ops  # (op, outcome)
        # Ends the store did not take (an outage): written once it answers again, so another
        # replica cannot resume an ended session from its last live record. Bounded.
        self._pending_ends: dict[str, bytes] = {}  # session id -> final snapshot
        self._pending_final_bytes = 0
        self._save = self._redis.register_script(_SAVE)
        self._end = self._redis.register_script(_END)
        self._load = self._redis.register_script(_LOAD)

    async def ping(self) -> None:
        await self.guard.run("ping", self._redis.ping)

    async def save(
        self, session_id: str, seq: int, generation: str, snapshot: bytes,
        takeover_from: str | None = None, restart: bool = False,
    ) -> int:  # fmt: skip
        """Advance the record (this incarnation, a newer seq), or with `takeover_from` (the
        restored snapshot's incarnation) take it over, or with `restart` write over it (a new
        incarnation under a known id); WRITTEN, STALE or ENDED."""
        keys = [session_key(session_id), issued_key(session_id)]
        mode = "restart" if restart else "advance" if takeover_from is None else "takeover"
        args = [seq, generation, snapshot, self.ttl_ms, ISSUED_TTL_S, mode, takeover_from or ""]
        if self.min_replicas <= 0:
            return int(await self.guard.run("save", lambda: self._save(keys=keys, args=args)))
        saved, acked = await self.guard.run(
            "save", lambda: self._replicated(self._save, keys, args)
        )
        if int(saved) == WRITTEN:  # the master is up
            self._check_replicated(int(acked), "saved on the master")
        return int(saved)

    async def _replicated(self, script: Any, keys: list[str], args: list[Any]) -> list[Any]:
        """`script`, then WAIT for `min_replicas` on the same connection (one pipeline)."""
        async with self._redis.pipeline(transaction=False) as pipe:
            await script(keys=keys, args=args, client=pipe)
            pipe.execute_command("WAIT", self.min_replicas, self._wait_ms)
            return list(await pipe.execute())

    @property
    def _wait_ms(self) -> int:
        return max(1, int(self.options.timeout_s * 500))  # half the deadline

    def _check_replicated(self, acked: int, what: str) -> None:
        if acked < self.min_replicas:
            raise StoreUnavailable(
                f"{what}, but {acked} of the {self.min_replicas} replicas needed acknowledged "
                f"it within {self._wait_ms} ms"
            )

    async def load(self, session_id: str) -> Record | None:
        """The stored record, refreshing its idle timer; None if absent. With `min_replicas`,
        a record is only taken once that many replicas have it (the idle timer's refresh is
        a write: WAIT for it covers the record read): a save refused for want of replicas may
        still have reached the master, and a copy continued from it would otherwise answer
        steps that a failover then takes back."""
        keys, args = [session_key(session_id)], [self.ttl_ms]
        acked = self.min_replicas
        if self.min_replicas <= 0:
            rec = await self.guard.run("load", lambda: self._load(keys=keys, args=args))
        else:
            rec, acked = await self.guard.run(
                "load", lambda: self._replicated(self._load, keys, args)
            )
        snap, seq, gen, ended, final = rec
        if seq is None and ended is None:
            return None
        self._check_replicated(int(acked), f"read session {session_id}'s record")
        return Record(snap, int(seq or 0), (gen or b"").decode(), ended is not None, final)

    async def end(self, session_id: str, final: bytes = b"") -> None:
        """The session ended: its record becomes a tombstone for the idle timeout, holding
        `final` (its snapshot as it ended). If the store does not take it, it is kept and
        written when the store answers again (then raised)."""
        keys, args = [session_key(session_id)], [self.ttl_ms, final]
        try:
            await self.guard.run("end", lambda: self._end(keys=keys, args=args))
        except StoreUnavailable:
            self._remember_end(session_id, final)
            raise

    def _remember_end(self, session_id: str, final: bytes) -> None:
        pending = self._pending_ends
        if self._pending_final_bytes + len(final) > MAX_PENDING_FINAL_BYTES:
            final = b""
        self._pending_final_bytes += len(final) - len(pending.get(session_id, b""))
        pending[session_id] = final
        if len(pending) > MAX_PENDING_ENDS:  # the oldest goes: its record expires on its own
            self._pending_final_bytes -= len(pending.pop(next(iter(pending))))
            self._store_ops.labels("delete", "dropped").inc()

    @property
    def pending_ends(self) -> int:
        """Ends waiting for the store to answer again."""
        return len(self._pending_ends)

    async def _write_pending_ends(self) -> None:
        """Write the tombstones an outage held back, oldest first; stop at the first failure
        (the guard is down again and its probe will call this once more)."""
        while self._pending_ends:
            session_id, final = next(iter(self._pending_ends.items()))
            keys, args = [session_key(session_id)], [self.ttl_ms, final]
            try:
                await self.guard.run("end", lambda k=keys, a=args: self._end(keys=k, args=a))
            except StoreUnavailable:
                return
            self._pending_final_bytes -= len(self._pending_ends.pop(session_id, b""))
            self._store_ops.labels("delete", "ok").inc()

    async def holds(self, session_id: str) -> bool:
        """Whether a live record exists, without refreshing its idle timer."""
        key = session_key(session_id)
        return bool(await self.guard.run("holds", lambda: self._redis.hexists(key, "snap")))

    async def was_issued(self, session_id: str) -> bool:
        key = issued_key(session_id)
        return bool(await self.guard.run("issued", lambda: self._redis.exists(key)))

    async def close(self) -> None:
        self.guard.close()
        await self._redis.aclose()
