"""bench.compare: two runs' batched points side by side."""

from __future__ import annotations

from typing import Any

from bench.compare import compare


def _run(steps: float, p50: float, echo: float | None) -> dict[str, Any]:
    row = {"model": "m", "mode": "stream", "sessions": 64, "steps": 1}
    points = [row | {"server": "batched", "steps_per_s": steps, "messages_per_s": steps,
                     "p50_ms": p50}]  # fmt: skip
    if echo is not None:
        points.append(row | {"server": "echo", "steps_per_s": echo, "messages_per_s": echo,
                             "p50_ms": 0.1})  # fmt: skip
    only_here = row | {"sessions": 1, "server": "batched", "steps_per_s": 1.0,
                       "messages_per_s": 1.0, "p50_ms": 1.0}  # fmt: skip
    return {"points": [*points, only_here] if echo is None else points}


def test_compare_gives_the_ratio_and_both_shares_of_echo() -> None:
    table = compare(_run(5000, 9.0, 10000), _run(6000, 8.0, 12000))
    row = table.splitlines()[2]
    assert row == "| m | stream | 64 | 1 | 5,000 | 6,000 | 1.20x | 50 % | 50 % | 9.00 | 8.00 |"


def test_points_only_one_run_measured_are_left_out() -> None:
    table = compare(_run(5000, 9.0, None), _run(6000, 8.0, 12000))
    assert len(table.splitlines()) == 3  # header, rule, the shared point
    assert "| - | 50 % |" in table
