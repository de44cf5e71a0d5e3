"""Early decisions without a network: the rule (probability and margin forms, n consecutive
steps with one label), its written form, and a session's decision (taken once, replayed on a
resend, cleared by a reset, carried by a snapshot)."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import numpy as np
import pytest

from lstmserve.decisions import parse_decide_at
from service.engine.continuity.continuity import SessionContinuity
from service.engine.continuity.snapshots import SnapshotKeys
from service.engine.core import Engine
from service.engine.session.decisions import NO_RUN, judge
from service.engine.types import Decision, DecisionRule, StreamOptions
from service.errors import InvalidInput
from tests.unit.engines import load_engine

ROWS = np.array([
    [0.50, 0.30, 0.20],  # 1: top 0, margin 0.20
    [0.70, 0.20, 0.10],  # 2: top 0, margin 0.50
    [0.80, 0.15, 0.05],  # 3: top 0, margin 0.65
    [0.10, 0.85, 0.05],  # 4: top 1, margin 0.75
    [0.05, 0.90, 0.05],  # 5: top 1, margin 0.85
], dtype=np.float32)  # fmt: skip


def test_the_probability_form_needs_n_steps_in_a_row_with_one_label() -> None:
    assert judge(DecisionRule(0.7), NO_RUN, ROWS, 5, 0)[1] == Decision(0, ROWS[1, 0], 2)
    assert judge(DecisionRule(0.7, steps=2), NO_RUN, ROWS, 5, 0)[1] == Decision(0, ROWS[2, 0], 3)
    # three in a row above 0.7 with one label: 2, 3 are label 0, 4 switches to label 1
    assert judge(DecisionRule(0.7, steps=3), NO_RUN, ROWS, 5, 0)[1] is None
    assert judge(DecisionRule(0.95), NO_RUN, ROWS, 5, 10)[1] is None


def test_the_margin_form_and_both_conditions() -> None:
    assert judge(DecisionRule(margin=0.7), NO_RUN, ROWS, 5, 0)[1] == Decision(1, ROWS[3, 1], 4)
    assert judge(DecisionRule(margin=0.6, steps=2), NO_RUN, ROWS, 5, 0)[1].step == 5  # type: ignore[union-attr]
    both = DecisionRule(probability=0.75, margin=0.6)
    assert judge(both, NO_RUN, ROWS, 5, 0)[1] == Decision(0, ROWS[2, 0], 3)


def test_the_run_is_kept_at_the_settled_step_and_continues_across_chunks() -> None:
    rule = DecisionRule(0.6, steps=3)
    run, decided = judge(rule, NO_RUN, ROWS[:2], 2, 0)  # steps 1-2: one above 0.6
    assert run == (0, 1) and decided is None
    run, decided = judge(rule, run, ROWS[2:3], 0, 2)  # step 3 judged as a probe: not kept
    assert run == (0, 1) and decided is None
    run, decided = judge(rule, (0, 2), ROWS[3:], 1, 3)  # label 1 breaks label 0's run
    assert run == (1, 1) and decided is None
    assert judge(DecisionRule(0.6, steps=2), (0, 1), ROWS[2:3], 1, 2)[1] == Decision(
        0, ROWS[2, 0], 3
    )


@pytest.mark.parametrize(
    ("spec", "parsed"),
    [("0.9", (0.9, 0.0, 1)), ("0.9,3", (0.9, 0.0, 3)), ("margin:0.5,2", (0.0, 0.5, 2)),
     (" 1 , 4 ", (1.0, 0.0, 4))],
)  # fmt: skip
def test_the_written_form(spec: str, parsed: tuple[float, float, int]) -> None:
    assert parse_decide_at(spec) == parsed


@pytest.mark.parametrize("spec", ["", "x", "0", "1.5", "nan", "0.9,0", "0.9,x", "margin:", "-1"])
def test_a_wrong_written_form_says_what_is_wrong(spec: str) -> None:
    with pytest.raises(ValueError, match=repr(spec)):
        parse_decide_at(spec)


def test_a_rule_out_of_range_is_refused_naming_the_field(tiny_repo: Path) -> None:
    assert DecisionRule(0.9).problem() is None
    assert "set probability or margin" in str(DecisionRule().problem())
    assert "margin = 2.0" in str(DecisionRule(margin=2.0).problem())
    assert "steps = 0" in str(DecisionRule(0.5, steps=0).problem())
    engine = load_engine(tiny_repo)
    try:
        options = StreamOptions(decide=DecisionRule(probability=1.5))
        with pytest.raises(InvalidInput, match=r"options\.decide: probability = 1\.5"):
            asyncio.run(engine.open_session("tiny-lstm", 1, options))
    finally:
        engine.close()


def keyed(repo: Path) -> Engine:
    fresh = load_engine(repo)
    key = "k1:" + base64.b64encode(b"x" * 32).decode()
    fresh.continuity = SessionContinuity(fresh.store, SnapshotKeys.parse(key))
    return fresh


@pytest.fixture
def engines(tiny_repo: Path) -> tuple[Engine, Engine]:
    pair = keyed(tiny_repo), keyed(tiny_repo)
    yield pair
    for engine in pair:
        engine.close()


def test_a_session_decides_once_as_classify_step_by_step_shows(
    engines: tuple[Engine, Engine],
) -> None:
    engine, other = engines
    ids = np.array([1, 5, 9, 2, 7, 3, 8, 4, 6, 1, 2, 3], dtype=np.int64)

    async def main() -> None:
        model = engine.models().get("tiny-lstm", 1)
        [whole] = await engine.classify(model, [ids], True)
        top = whole.step_probs.max(axis=1)  # type: ignore[union-attr]
        threshold = float(np.sort(top)[len(top) // 2])  # reached about half-way
        rule = DecisionRule(threshold, steps=1)
        expected = judge(rule, NO_RUN, whole.step_probs, len(ids), 0)[1]  # type: ignore[arg-type]
        assert expected is not None
        session = await engine.open_session("tiny-lstm", 1, StreamOptions(decide=rule))
        seen = []
        for seq, chunk in enumerate(np.array_split(ids, 4), start=1):
            outcome = await engine.apply_chunk(session, seq, chunk)
            seen.append(outcome.result.decision)  # type: ignore[union-attr]
        assert [d for d in seen if d is not None] == [expected]  # reported once
        assert session.decision == expected
        resend = await engine.apply_chunk(session, 4, np.array_split(ids, 4)[3])
        assert resend.duplicate and resend.result.decision == seen[3]  # type: ignore[union-attr]
        blob = engine.continuity.snapshot(session)
        restored, _ = await other.continuity.restore(other.models(), blob)
        assert restored.decision == expected and restored.options.decide == rule
        assert restored.run == session.run
        await other.reset(restored, 5)
        assert restored.decision is None and restored.run == NO_RUN

    asyncio.run(main())
