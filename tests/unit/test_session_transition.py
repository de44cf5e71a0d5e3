"""A chunk's transition has one owner, the Session: `apply` (seq, steps, result and held text
together, in the batcher, with no await in between), `restore` (exactly to a checkpoint); and
`Engine.apply_chunk` / `apply_chunks` are two forms of the same steps, with the same outcomes."""

from __future__ import annotations

import asyncio
import base64
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.engine.continuity.continuity import STRICT, SessionContinuity
from service.engine.continuity.redis_backend import WRITTEN
from service.engine.continuity.snapshots import SnapshotKeys
from service.engine.core import Engine
from service.engine.session.sessions import Checkpoint, Session
from service.engine.text.inputs import tokens_from_stream
from service.engine.text.textstream import HeldChange, HeldText, held_change
from service.engine.types import ChunkOutcome, ChunkWork, StreamOptions
from service.errors import LstmServeError, SequenceGap, SessionMoved, Unavailable
from tests.unit.engines import load_engine

MODEL = "tiny-lstm"  # a chars tokenizer: streamed text holds back what may still change
SERVICE = Path(__file__).resolve().parents[2] / "service"


@pytest.fixture
def engine(tiny_repo: Path) -> Engine:
    fresh = load_engine(tiny_repo)
    yield fresh
    fresh.close()


def tokens(*ids: int) -> np.ndarray:
    return np.array(ids, dtype=np.int64)


def text(session: Session, piece: str) -> tuple[np.ndarray, HeldChange]:
    """A text chunk decoded against the session's held text, as the session layer does."""
    before = session.held
    ids, after = tokens_from_stream(session.model.description, before, piece, 64, "text")
    return ids, held_change(before, ids, after)


async def open_session(engine: Engine) -> Session:
    return await engine.open_session(MODEL, 1, StreamOptions(every_step=True, top_k=2))


def progress(session: Session) -> tuple[Any, ...]:
    """Everything a transition writes, comparable."""
    last = session.last_result
    probs = None if last is None else (last.probs.tolist(), last.steps, last.total_steps)
    return (session.read_state().tolist(), session.last_seq, session.total_steps,
            session.held, probs)  # fmt: skip


def test_restore_brings_a_session_back_to_exactly_its_checkpoint(engine: Engine) -> None:
    async def main() -> None:
        session = await open_session(engine)
        await engine.apply_chunk(session, 1, *text(session, "ab"))
        point = session.checkpoint()
        before = progress(session)
        await engine.apply_chunk(session, 2, *text(session, "cd e"))
        assert progress(session) != before
        session.restore(point)
        assert progress(session) == before
        assert session.held is point.held and session.last_result is point.last_result
        assert isinstance(point, Checkpoint)

    asyncio.run(main())


def test_the_batcher_applies_the_held_text_with_the_result(engine: Engine) -> None:
    """The held text changes in the same step as seq and steps, not after the caller wakes."""

    async def main() -> None:
        session = await open_session(engine)
        ids, change = text(session, "abc")
        assert len(ids) and change.after != session.held
        future = session.model.submit(session, 1, ids, change)
        seen: list[Any] = []
        future.add_done_callback(lambda _: seen.append((session.last_seq, session.held)))
        await future
        assert seen == [(1, change.after)]  # already applied when the result was set

    asyncio.run(main())


def test_held_text_is_answered_by_a_probe_whose_state_is_not_kept(engine: Engine) -> None:
    async def main() -> None:
        session = await open_session(engine)
        await engine.apply_chunk(
            session, 1, tokens(1, 2), HeldChange(session.held, HeldText(known=True))
        )
        state = session.read_state()
        ids, change = text(session, "e")  # may still take a combining mark: held
        assert not len(ids) and change.after.tail
        held = await engine.apply_chunk(session, 2, ids, change)
        assert (held.seq, held.total_steps, held.held_characters) == (2, 3, 1)
        assert held.result is not None and held.result.steps == 1
        [whole] = await engine.classify(session.model, [tokens(1, 2, *change.after.tail)], True)
        np.testing.assert_array_equal(held.result.probs, whole.probs)
        np.testing.assert_array_equal(held.result.step_probs, whole.step_probs[-1:])  # type: ignore[index]
        np.testing.assert_array_equal(session.read_state(), state)  # still the settled state
        assert session.held == change.after and session.last_seq == 2
        assert session.settled_steps == 2 and session.total_steps == 3
        ids, change = text(session, "\u0301")  # "é": the probe's step is taken back
        again = await engine.apply_chunk(session, 3, ids, change)
        assert again.result is not None
        assert (again.result.rewound_steps, again.result.steps, again.total_steps) == (1, 1, 3)

    asyncio.run(main())


class Store:
    """A shared store that takes saves until told to refuse them (strict mode's rollback)."""

    class guard:  # what SessionContinuity reads of a backend's StoreGuard
        up = True

    def __init__(self) -> None:
        self.refuse = False

    async def save(self, *args: Any) -> int:
        if self.refuse:
            raise ConnectionError("the store did not answer")
        return WRITTEN

    async def load(self, session_id: str) -> None:
        return None

    async def end(self, session_id: str) -> None:
        return None

    async def close(self) -> None:
        return None


@pytest.mark.parametrize("batched", [False, True])
def test_a_refused_save_restores_the_checkpoint_in_strict_mode(
    engine: Engine, batched: bool
) -> None:
    keys = SnapshotKeys.parse("k1:" + base64.b64encode(b"x" * 32).decode())
    store = Store()
    engine.continuity = SessionContinuity(engine.store, keys, store, mode=STRICT)  # type: ignore[arg-type]

    async def main() -> None:
        session = await open_session(engine)
        await engine.apply_chunk(session, 1, *text(session, "ab"))
        before = progress(session)
        store.refuse = True
        ids, change = text(session, "cd e")
        if batched:
            [outcome] = await engine.apply_chunks([ChunkWork(session, 2, ids, change)])
            assert isinstance(outcome, Unavailable)
        else:
            with pytest.raises(Unavailable):
                await engine.apply_chunk(session, 2, ids, change)
        assert progress(session) == before  # state row, seq, steps, held text, last result
        store.refuse = False
        again = await engine.apply_chunk(session, 2, ids, change)  # the retry is applied
        assert again.seq == 2 and not again.duplicate and session.held == change.after

    asyncio.run(main())


# One session's messages, in order: (seq, token ids or streamed text).
SCRIPT: list[tuple[int, np.ndarray | str]] = [
    (1, tokens(1, 2, 3)), (1, tokens(1, 2, 3)), (3, tokens(4)), (2, "ab "), (3, "e"),
    (4, "\u0301 f"), (2, tokens(1)), (5, tokens(5, 6)), (5, tokens(5, 6)),
]  # fmt: skip


async def run_script(engine: Engine, batched: bool) -> list[Any]:
    session = await open_session(engine)
    seen: list[Any] = []
    for seq, given in SCRIPT:
        chunk, held = text(session, given) if isinstance(given, str) else (given, None)
        outcome: ChunkOutcome | LstmServeError
        if batched:
            [outcome] = await engine.apply_chunks([ChunkWork(session, seq, chunk, held)])
        else:
            try:
                outcome = await engine.apply_chunk(session, seq, chunk, held)
            except LstmServeError as exc:
                outcome = exc
        seen.append(summary(outcome))
    return seen


def summary(outcome: ChunkOutcome | LstmServeError) -> Any:
    if isinstance(outcome, LstmServeError):
        return type(outcome).__name__
    result = outcome.result
    probs = None if result is None else (result.probs.tolist(), result.steps)
    steps = None if result is None or result.step_probs is None else result.step_probs.tolist()
    return (outcome.seq, outcome.duplicate, outcome.total_steps, outcome.held_characters,
            probs, steps)  # fmt: skip


def test_apply_chunks_gives_the_outcomes_apply_chunk_gives(tiny_repo: Path) -> None:
    """Applied, resent (the last one's result replayed, an older one without), a gap, text
    held back and fed later, all of it held: the same outcome, alone or batched."""
    outcomes = []
    for batched in (False, True):
        engine = load_engine(tiny_repo)
        try:
            outcomes.append(asyncio.run(run_script(engine, batched)))
        finally:
            engine.close()
    alone, together = outcomes
    assert alone == together
    assert alone[1][1] and alone[1][4] is not None  # the resend of the last: its result
    assert alone[2] == SequenceGap.__name__
    assert alone[4][3] == 1 and alone[4][4][1] == 1  # "e" held, answered by a probe
    assert alone[6][1] and alone[6][4] is None  # an older resend: no result


def test_text_decoded_against_changed_held_text_is_refused_both_ways(engine: Engine) -> None:
    async def main() -> list[Any]:
        a = await open_session(engine)
        b = await open_session(engine)
        stale = {}
        for s in (a, b):
            await engine.apply_chunk(s, 1, *text(s, "ab"))
            stale[s.id] = text(s, "cd")  # decoded now, applied after another change
            await engine.apply_chunk(s, 2, *text(s, "x"))
        refused = []
        try:
            await engine.apply_chunk(a, 3, *stale[a.id])
        except SessionMoved as exc:
            refused.append(exc)
        [moved] = await engine.apply_chunks([ChunkWork(b, 3, *stale[b.id])])
        return [*refused, moved]

    assert [type(e) for e in asyncio.run(main())] == [SessionMoved, SessionMoved]


def test_only_the_session_writes_its_progress() -> None:
    """Nobody outside Session assigns last_seq, settled_steps, held or last_result (the codec,
    which sets protobuf fields of the same names, aside)."""
    assign = re.compile(
        r"\b(?!self\b)\w+\.(last_seq|total_steps|settled_steps|held|last_result)\s*(=|\+=)[^=]"
    )
    found = []
    for path in SERVICE.rglob("*.py"):
        if path.name == "codec.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if assign.search(line) and not line.lstrip().startswith("#"):
                found.append(f"{path.relative_to(SERVICE.parent)}:{n}: {line.strip()}")
    assert found == []
