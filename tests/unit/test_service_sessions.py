"""The state slab and the session store, without a network (fake clock, tiny models)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from service.engine.compute.state import HostStateSlab as StateSlab
from service.engine.model.registry import ModelRegistry
from service.engine.model.worker import ModelWorker
from service.engine.session.sessions import SessionStore
from service.engine.types import StreamOptions
from service.errors import NotStreamable, Overloaded, SessionExpired, SessionNotFound
from tests.unit.engines import load_engine


@pytest.fixture(scope="module")
def registry(tiny_repo: Path) -> ModelRegistry:
    return load_engine(tiny_repo).registry


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_slab_grows_by_doubling_and_keeps_rows() -> None:
    slab = StateSlab(rows=2, hidden=3, capacity=2, max_capacity=5)
    rows = [slab.allocate() for _ in range(2)]
    slab.scatter(rows, np.arange(12, dtype=np.float32).reshape(2, 2, 3))
    rows += [slab.allocate(), slab.allocate()]
    assert slab.capacity == 4 and slab.used == 4
    np.testing.assert_array_equal(slab.gather(rows[:2]).ravel(), np.arange(12))
    rows.append(slab.allocate())
    assert slab.capacity == 5
    with pytest.raises(Overloaded):
        slab.allocate()
    assert slab.allocated_bytes == 5 * 2 * 3 * 4 and slab.used_bytes == 5 * 2 * 3 * 4


def test_slab_gives_released_rows_back_zeroed() -> None:
    slab = StateSlab(rows=1, hidden=2, capacity=1, max_capacity=1)
    row = slab.allocate()
    slab.scatter([row], np.ones((1, 1, 2), np.float32))
    slab.release(row)
    again = slab.allocate()
    assert again == row and not slab.gather([again]).any()


def test_gather_scatter_are_vectorised_copies() -> None:
    slab = StateSlab(rows=1, hidden=2, capacity=4, max_capacity=4)
    rows = [slab.allocate() for _ in range(3)]
    got = slab.gather(rows)
    got += 1.0  # a copy: the slab is untouched
    assert not slab.states.any()
    slab.scatter(rows[::2], np.full((2, 1, 2), 7.0, np.float32))
    assert slab.gather(rows)[:, 0, 0].tolist() == [7.0, 0.0, 7.0]


def test_store_opens_limits_and_ends(registry: ModelRegistry) -> None:
    store = SessionStore(max_sessions=2, idle_timeout_s=10, initial_capacity=1)
    model = registry.get("tiny-gru")
    a = store.open(model, StreamOptions())
    b = store.open(model, StreamOptions())
    assert a.id != b.id and len(a.id) == 32 and a.row != b.row
    with pytest.raises(Overloaded):
        store.open(model, StreamOptions())
    store.end(a)
    with pytest.raises(SessionNotFound) as info:
        store.get(a.id)
    assert not isinstance(info.value, SessionExpired)
    assert store.get(b.id) is b
    assert model.state.used_bytes == model.description.state_bytes


def test_store_refuses_bidirectional_models(registry: ModelRegistry) -> None:
    store = SessionStore(max_sessions=2, idle_timeout_s=10)
    with pytest.raises(NotStreamable):
        store.open(registry.get("tiny-bilstm"), StreamOptions())


def test_idle_sessions_expire_and_are_remembered_bounded(registry: ModelRegistry) -> None:
    clock = Clock()
    store = SessionStore(max_sessions=10, idle_timeout_s=5, expired_memory=2, clock=clock)
    model: ModelWorker = registry.get("tiny-lstm", 1)
    sessions = [store.open(model, StreamOptions()) for _ in range(3)]
    clock.now += 3
    store.touch(sessions[2])
    clock.now += 3
    assert store.evict_idle() == sessions[:2]
    with pytest.raises(SessionExpired, match="expired"):
        store.get(sessions[0].id)
    assert store.get(sessions[2].id) is sessions[2]
    clock.now += 6  # lazily expired on get, without a sweep
    with pytest.raises(SessionExpired):
        store.get(sessions[2].id)
    # only the 2 most recent expired ids are remembered
    with pytest.raises(SessionNotFound) as info:
        store.get(sessions[0].id)
    assert not isinstance(info.value, SessionExpired)
    assert len(store) == 0


def test_a_session_mid_chunk_is_not_expired(registry: ModelRegistry) -> None:
    import asyncio

    clock = Clock()
    store = SessionStore(max_sessions=10, idle_timeout_s=1, clock=clock)
    session = store.open(registry.get("tiny-gru"), StreamOptions())

    async def main() -> list[object]:
        async with session.lock:
            clock.now += 5
            return store.evict_idle()

    assert asyncio.run(main()) == []
    assert store.evict_idle() == [session]


def test_slab_shrinks_after_a_peak_keeping_live_rows() -> None:
    slab = StateSlab(rows=1, hidden=2, capacity=4, max_capacity=4096)
    rows = [slab.allocate() for _ in range(1024)]
    assert slab.capacity == 1024
    keep = rows[:10]  # the lowest rows: allocated first
    slab.scatter(keep, np.arange(20, dtype=np.float32).reshape(10, 1, 2))
    for row in rows[10:]:
        slab.release(row)
    assert slab.capacity <= 32 and slab.used == 10
    np.testing.assert_array_equal(slab.gather(keep).ravel(), np.arange(20))
    assert slab.allocated_bytes == slab.capacity * 1 * 2 * 4
    assert slab.allocate() == 10  # the lowest free row again


def test_a_high_live_row_keeps_the_slab_from_shrinking_below_it() -> None:
    slab = StateSlab(rows=1, hidden=1, capacity=4, max_capacity=4096)
    rows = [slab.allocate() for _ in range(256)]
    for row in rows[:-1]:
        slab.release(row)
    assert slab.capacity == 256 and slab.used == 1  # row 255 still lives
