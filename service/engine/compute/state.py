"""The state store of one model version: a row [S, H] of recurrent state per session.

`StateStore` is the interface the worker, the batcher and the sessions use; `HostStateSlab`
keeps every row in one host numpy array, so a batch is gathered / scattered with one vectorised
indexing op. A device-resident store (states kept on the GPU between chunks) would implement
the same interface. Used from the event loop thread only.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from service.errors import Overloaded


class StateStore(Protocol):
    """Rows of recurrent state, allocated per session."""

    @property
    def used(self) -> int: ...
    @property
    def allocated_bytes(self) -> int: ...
    @property
    def used_bytes(self) -> int: ...
    def allocate(self) -> int: ...
    def release(self, row: int) -> None: ...
    def read(self, row: int) -> np.ndarray: ...
    def write(self, row: int, state: np.ndarray) -> None: ...
    def gather(self, rows: Sequence[int], out: np.ndarray | None = None) -> np.ndarray: ...
    def scatter(self, rows: Sequence[int], states: np.ndarray) -> None: ...
    def close(self) -> None: ...


class HostStateSlab:
    """The float32 states of one version's sessions in one array (N, S, H), grown by doubling
    up to `max_capacity` rows."""

    def __init__(self, rows: int, hidden: int, capacity: int, max_capacity: int) -> None:
        capacity = max(1, min(capacity, max_capacity))
        self.states = np.zeros((capacity, rows, hidden), dtype=np.float32)  # (N, S, H)
        self.max_capacity = max_capacity
        self.min_capacity = capacity
        self._free: list[int] = list(range(capacity))  # a heap: the lowest free row first
        self._in_use = np.zeros(capacity, dtype=bool)  # (N,)
        self.used = 0

    @property
    def capacity(self) -> int:
        return int(self.states.shape[0])

    @property
    def allocated_bytes(self) -> int:
        return int(self.states.nbytes)

    @property
    def used_bytes(self) -> int:
        return self.used * int(self.states[0].nbytes)

    def allocate(self) -> int:
        """A zeroed row for a new session (the lowest free one, so that high rows empty out
        and the slab can shrink after a peak)."""
        if not self._free:
            self._grow()
        row = heapq.heappop(self._free)
        self.states[row] = 0.0
        self._in_use[row] = True
        self.used += 1
        return row

    def release(self, row: int) -> None:
        heapq.heappush(self._free, row)
        self._in_use[row] = False
        self.used -= 1
        if self.used <= self.capacity // 4 and (self.used < 64 or self.used % 64 == 0):
            self.shrink()  # checked now and then: it scans the rows in use

    def shrink(self) -> None:
        """Halve the slab (repeatedly) while its upper half holds no session and the rest
        would still be at most half full; never below the initial capacity."""
        capacity = self.capacity
        top = int(np.flatnonzero(self._in_use)[-1]) + 1 if self.used else 0
        while capacity // 2 >= max(self.min_capacity, top, 2 * self.used, 1):
            capacity //= 2
        if capacity == self.capacity:
            return
        self.states = self.states[:capacity].copy()  # (N', S, H): the old array is freed
        self._in_use = self._in_use[:capacity].copy()
        self._free = [r for r in self._free if r < capacity]
        heapq.heapify(self._free)

    def read(self, row: int) -> np.ndarray:
        """A copy of one row, (S, H)."""
        return self.states[row].copy()

    def write(self, row: int, state: np.ndarray) -> None:
        self.states[row] = state

    def gather(self, rows: Sequence[int], out: np.ndarray | None = None) -> np.ndarray:
        """A copy of the rows' states, (B, S, H): into `out` (B, S, H) if given (a buffer the
        caller reuses), else a new array."""
        if out is not None:  # mode "clip": the rows are valid, and "raise" buffers `out`
            return np.take(self.states, np.asarray(rows, dtype=np.intp), 0, out, "clip")
        if len(rows) == 1:  # a lone row: a slice copy, no index array
            return self.states[rows[0] : rows[0] + 1].copy()
        return self.states[np.asarray(rows, dtype=np.intp)]

    def scatter(self, rows: Sequence[int], states: np.ndarray) -> None:
        """Write (B, S, H) states back into the rows."""
        if len(rows) == 1:
            self.states[rows[0]] = states[0]
            return
        self.states[np.asarray(rows, dtype=np.intp)] = states

    def close(self) -> None:
        """Free the memory (the version is retired; no row is in use)."""
        self.states = np.zeros((0, *self.states.shape[1:]), dtype=np.float32)
        self._in_use = np.zeros(0, dtype=bool)
        self._free.clear()

    def _grow(self) -> None:
        old = self.capacity
        new = min(max(old * 2, 1), self.max_capacity)
        if new <= old:
            raise Overloaded(f"state slab is full ({old} sessions)")
        grown = np.zeros((new, *self.states.shape[1:]), dtype=np.float32)  # (N', S, H)
        grown[:old] = self.states
        self.states = grown
        self._in_use = np.concatenate([self._in_use, np.zeros(new - old, dtype=bool)])
        self._free.extend(range(old, new))
        heapq.heapify(self._free)
