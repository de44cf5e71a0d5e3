"""Per-principal limits on sessions: how many one principal holds, how fast it opens them.

Counted per replica (a fleet of R replicas lets a principal hold R x the limit). Without
authentication every caller is one principal (service/principal.py), so these limits are then
global ones, beside --max-sessions.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable

from service.errors import Overloaded

MAX_BUCKETS = 10_000  # principals with a rate bucket kept (the oldest full ones go first)


class PrincipalQuota:
    """Sessions held per principal (`max_sessions`, 0 = no limit) and a token bucket of session
    opens per principal (`opens_per_s` per second, bursts of `burst`; 0 = no limit)."""

    def __init__(
        self,
        max_sessions: int = 0,
        opens_per_s: float = 0.0,
        burst: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_sessions = max_sessions
        self.opens_per_s = opens_per_s
        self.burst = float(burst or max(1, int(opens_per_s)))
        self.clock = clock
        self._held: Counter[str] = Counter()
        self._buckets: dict[str, tuple[float, float]] = {}  # principal -> (tokens, when)

    def held(self, principal: str) -> int:
        return self._held[principal]

    def check_open(self, principal: str) -> None:
        """Overloaded (RESOURCE_EXHAUSTED) if `principal` may not open one more session now."""
        if self.max_sessions and self._held[principal] >= self.max_sessions:
            raise Overloaded(
                f"principal {principal[:64]!r} holds its maximum of {self.max_sessions} "
                "sessions on this replica (--max-sessions-per-principal): end one first"
            )
        if self.opens_per_s:
            self._take_token(principal)

    def _take_token(self, principal: str) -> None:
        now = self.clock()
        tokens, when = self._buckets.pop(principal, (self.burst, now))
        tokens = min(self.burst, tokens + (now - when) * self.opens_per_s)
        if tokens < 1.0:
            self._buckets[principal] = (tokens, now)
            raise Overloaded(
                f"principal {principal[:64]!r} opens sessions faster than "
                f"{self.opens_per_s:g} per second (--session-opens-per-s): retry shortly"
            )
        self._buckets[principal] = (tokens - 1.0, now)  # re-inserted: most recent last
        if len(self._buckets) > MAX_BUCKETS:
            del self._buckets[next(iter(self._buckets))]

    def added(self, principal: str) -> None:
        self._held[principal] += 1

    def removed(self, principal: str) -> None:
        self._held[principal] -= 1
        if self._held[principal] <= 0:
            del self._held[principal]
