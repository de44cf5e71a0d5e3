"""The engine and input checks without a network: chunked steps == one whole-sequence run."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.engine.core import Engine
from service.engine.model.registry import ModelRegistry
from service.engine.session.sessions import SessionStore
from service.engine.text.inputs import (
    QUOTE_CHARS,
    frames_from_flat,
    quoted,
    tokens_from_ids,
    tokens_from_text,
)
from service.engine.types import StreamOptions
from service.errors import Draining, InvalidInput, ModelNotFound, Unavailable
from tests.unit.engines import load_engine


@pytest.fixture(scope="module")
def shared(tiny_repo: Path) -> Engine:
    return load_engine(tiny_repo)


@pytest.fixture(scope="module")
def registry(shared: Engine) -> ModelRegistry:
    return shared.registry


@pytest.fixture
def engine(tiny_repo: Path) -> Engine:
    fresh = load_engine(tiny_repo)
    yield fresh
    fresh.close()


def test_registry_versions_and_latest(registry: ModelRegistry) -> None:
    assert registry.get("tiny-lstm").version == 2
    older = registry.get("tiny-lstm", 1)
    assert older.version == 1 and not registry.is_latest(older)
    assert registry.is_latest(registry.get("tiny-lstm"))
    with pytest.raises(ModelNotFound, match="no version 3"):
        registry.get("tiny-lstm", 3)
    with pytest.raises(ModelNotFound, match="'nope'"):
        registry.get("nope")


@settings(max_examples=15, deadline=None)
@given(
    tokens=st.lists(st.integers(0, 27), min_size=1, max_size=30),
    cuts=st.lists(st.integers(1, 29), max_size=6),
)
def test_chunked_steps_equal_classify_on_the_whole_sequence(
    shared: Engine, tokens: list[int], cuts: list[int]
) -> None:
    engine = shared
    model = engine.registry.get("tiny-lstm", 1)
    seq = np.array(tokens, dtype=np.int64)
    bounds = sorted({c for c in cuts if c < len(seq)} | {0, len(seq)})

    async def main() -> tuple[np.ndarray, np.ndarray]:
        session = await engine.open_session("tiny-lstm", 1, StreamOptions())
        for seq_no, (a, b) in enumerate(itertools.pairwise(bounds), start=1):
            outcome = await engine.apply_chunk(session, seq_no, seq[a:b])
        [whole] = await engine.classify(model, [seq], with_steps=False)
        return outcome.result.probs, whole.probs  # type: ignore[union-attr]

    chunked, whole = asyncio.run(main())
    np.testing.assert_allclose(chunked, whole, atol=1e-5)


def test_resent_chunk_is_not_applied_twice(engine: Engine) -> None:

    async def main() -> None:
        session = await engine.open_session("tiny-gru", 0, StreamOptions())
        first = await engine.apply_chunk(session, 1, np.array([1, 2], dtype=np.int64))
        second = await engine.apply_chunk(session, 2, np.array([3], dtype=np.int64))
        state = session.read_state()
        old = await engine.apply_chunk(session, 1, np.array([1, 2], dtype=np.int64))
        assert old.duplicate and old.result is None and old.total_steps == 3
        last = await engine.apply_chunk(session, 2, np.array([3], dtype=np.int64))
        assert last.duplicate and last.total_steps == 3
        assert last.result is not None and second.result is not None
        np.testing.assert_array_equal(last.result.probs, second.result.probs)  # the lost reply
        np.testing.assert_array_equal(session.read_state(), state)
        assert not first.duplicate and not second.duplicate

    asyncio.run(main())


def test_loading_and_draining_refuse_new_work(tiny_repo: Path, engine: Engine) -> None:
    loading = Engine(SessionStore(max_sessions=1, idle_timeout_s=60), repository=tiny_repo)
    with pytest.raises(Unavailable, match="loading"):
        asyncio.run(loading.open_session("tiny-gru", 0, StreamOptions()))
    engine.draining = True
    with pytest.raises(Draining):
        asyncio.run(engine.open_session("tiny-gru", 0, StreamOptions()))
    loading.close()


def test_input_checks_name_field_and_value(registry: ModelRegistry) -> None:
    tokens = registry.get("tiny-gru").description
    frames = registry.get("tiny-rnn-frames").description
    with pytest.raises(InvalidInput, match=r"x\[2\] = 40 is out of range \[0, 28\)"):
        tokens_from_ids(tokens, [1, 2, 40], 10, "x")
    with pytest.raises(InvalidInput, match="more than the maximum 2"):
        tokens_from_ids(tokens, [1, 2, 3], 2, "x")
    with pytest.raises(InvalidInput, match="no character"):
        tokens_from_text(tokens, "42", 10, "t")
    assert tokens_from_text(tokens, "Ab?", 10, "t").tolist() == [1, 2, 0]
    got = frames_from_flat(frames, list(range(10)), 2, 10, "f")
    assert got.shape == (2, 5) and got.dtype == np.float32
    with pytest.raises(InvalidInput, match="frame 0 value 1 is nan"):
        frames_from_flat(frames, [0.0, float("nan"), 0.0, 0.0, 0.0], 0, 10, "f")


def test_quoted_client_values_are_cut_to_a_few_characters() -> None:
    assert quoted("abc") == "'abc'"
    long = quoted("\U0001f600" * 2000)
    assert long.startswith(repr("\U0001f600" * QUOTE_CHARS)) and "(2000 characters)" in long
    assert len(long) < QUOTE_CHARS + 40


def test_text_errors_quote_at_most_a_few_characters_of_the_text(registry: ModelRegistry) -> None:
    tokens = registry.get("tiny-gru").description
    with pytest.raises(InvalidInput) as info:
        tokens_from_text(tokens, "\U0001f600" * 2000, 4096, "t")
    message = str(info.value)
    assert "no character" in message and "(2000 characters)" in message
    assert message.count("\U0001f600") == QUOTE_CHARS and len(message.encode()) < 512
