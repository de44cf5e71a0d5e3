"""The state store of one model version: a row [S, H] of recurrent state per session.

`StateStore` is the interface the worker, the batcher and the sessions use; `HostStateSlab`
keeps every row in one host numpy array, so a batch is gathered / scattered with one vectorised
indexing op. A device-resident store (states kept on the GPU between chunks) would implement
the same interface. Used from the event loop thread only.
"""

from __future__ import annotations

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
    def gather(self, rows: Sequence[int]) -> np.ndarray: ...
    def scatter(self, rows: Sequence[int], states: np.ndarray) -> None: ...
    def close(self) -> None: ...


class HostStateSlab:
    """The float32 states of one version's sessions in one array (N, S, H), grown by doubling
    up to `max_capacity` rows."""

    def __init__(self, rows: int, hidden: int, capacity: int, max_capacity: int) -> None:
        capacity = max(1, min(capacity, max_capacity))
        self.states = np.zeros((capacity, rows, hidden), dtype=np.float32)  # (N, S, H)
        self.max_capacity = max_capacity
        self._free: list[int] = list(range(capacity - 1, -1, -1))
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
        """A zeroed row for a new session."""
        if not self._free:
            self._grow()
        row = self._free.pop()
        self.states[row] = 0.0
        self.used += 1
        return row

    def release(self, row: int) -> None:
        self._free.append(row)
        self.used -= 1

    def read(self, row: int) -> np.ndarray:
        """A copy of one row, (S, H)."""
        return self.states[row].copy()

    def write(self, row: int, state: np.ndarray) -> None:
        self.states[row] = state

    def gather(self, rows: Sequence[int]) -> np.ndarray:
        """A copy of the rows' states, (B, S, H)."""
        return self.states[np.asarray(rows, dtype=np.intp)]

    def scatter(self, rows: Sequence[int], states: np.ndarray) -> None:
        """Write (B, S, H) states back into the rows."""
        self.states[np.asarray(rows, dtype=np.intp)] = states

    def close(self) -> None:
        """Free the memory (the version is retired; no row is in use)."""
        self.states = np.zeros((0, *self.states.shape[1:]), dtype=np.float32)
        self._free.clear()

    def _grow(self) -> None:
        old = self.capacity
        new = min(max(old * 2, 1), self.max_capacity)
        if new <= old:
            raise Overloaded(f"state slab is full ({old} sessions)")
        grown = np.zeros((new, *self.states.shape[1:]), dtype=np.float32)  # (N', S, H)
        grown[:old] = self.states
        self.states = grown
        self._free.extend(range(new - 1, old - 1, -1))
