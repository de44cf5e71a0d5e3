"""Early decisions: a session's stopping rule, judged over its steps' probabilities.

The rule (`DecisionRule`, service/engine/types.py) holds at a step when the top label's
probability is at least `probability` and beats the second label's by at least `margin`; the
session is decided at the step where it has held `steps` times in a row with the same top
label. A session keeps that run (top label, length) as of its settled steps; streamed text's
held tail is judged after it in each reply and never kept, so a reply decides exactly what
Classify of the text so far shows step by step. A decision is final: taken once, reported in
the reply where it was taken (and a resend of it), kept in snapshots.
"""

from __future__ import annotations

import numpy as np

from service.engine.types import Decision, DecisionRule

Run = tuple[int, int]  # (top label, consecutive steps the rule held with it); (-1, 0): none
NO_RUN: Run = (-1, 0)


def judge(
    rule: DecisionRule, run: Run, rows: np.ndarray, settled: int, base: int
) -> tuple[Run, Decision | None]:
    """The run after the first `settled` of `rows` (T, C), the probabilities after each step
    run (what the session keeps), and the decision if the rule is reached at any of them;
    `base`: the session's steps before the first row."""
    top = rows.argmax(axis=1)  # (T,): the first of ties, as replies name the top label
    if rows.shape[1] > 1:
        ordered = np.partition(rows, -2, axis=1)  # (T, C)
        first, second = ordered[:, -1], ordered[:, -2]
    else:
        first, second = rows[:, 0], np.zeros(len(rows), dtype=rows.dtype)
    holds = ((first >= rule.probability) & (first - second >= rule.margin)).tolist()
    label, count = run
    kept, decision = run, None
    for i, (ok, best) in enumerate(zip(holds, top.tolist(), strict=True)):
        count = (count + 1 if best == label else 1) if ok else 0
        label = best if ok else -1
        if decision is None and count >= rule.steps:
            decision = Decision(best, float(first[i]), base + i + 1)
        if i + 1 == settled:
            kept = (label, count)
        if decision is not None and i + 1 >= settled:
            break
    return kept, decision
