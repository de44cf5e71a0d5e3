"""The benchmark report's floor columns and target line, on a small synthetic results dict (the
floor itself, a real subprocess: tests/e2e/test_bench_floor.py)."""

from __future__ import annotations

from typing import Any

from bench import report
from bench.model import BENCH_MODEL


def _row(server: str, mode: str, s: int, k: int, msgs: float) -> dict[str, Any]:
    per = 256 if mode == "multi" else 1
    return {"server": server, "mode": mode, "sessions": s, "steps": k, "model": BENCH_MODEL,
            "messages_per_s": msgs, "steps_per_s": msgs * per * k, "p50_ms": 1.0,
            "p99_ms": 2.0, "mean_batch": None, "server_cpu_pct": 90.0}  # fmt: skip


def _results() -> dict[str, Any]:
    points = [_row("batched", "stream", 256, 1, 6000), _row("naive", "stream", 256, 1, 2000),
              _row("echo", "stream", 256, 1, 12000), _row("floor", "stream", 256, 1, 8000),
              _row("batched", "multi", 1024, 1, 80), _row("echo", "multi", 1024, 1, 10000),
              _row("floor", "stream", 64, 1, 9000)]  # fmt: skip
    return {"points": points, "ceilings": [], "memory": None}


def test_report_table_has_floor_columns_and_dashes_where_no_floor_ran() -> None:
    lines = report.table(_results(), BENCH_MODEL).splitlines()
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    assert head[head.index("% echo") + 1 : head.index("% echo") + 3] == ["floor msg/s", "% floor"]
    assert len(lines[1].split("|")) == len(lines[0].split("|"))  # the separator has every column
    cells = {line.split("|")[1].strip(): line.split("|")[1:-1] for line in lines[2:]}
    stream, multi = (
        [c.strip() for c in cells[m]][head.index("floor msg/s") :][:2] for m in ("stream", "multi")
    )
    assert stream == ["8,000", "75 %"]  # batched 6,000 / floor 8,000
    assert multi == ["-", "-"]
    assert len(lines) == 4  # a floor row alone (S=64) makes no line: _keys skips non-batched


def test_target_line_gives_the_floors_own_share_of_echo() -> None:
    text = report.targets(_results())
    assert "MISSED: S=256 k=1 6,000 msg/s = 50 % of echo 12,000 (>= 80 %)" in text
    assert "(the protocol floor reaches 67 % of echo: 8,000 msg/s)" in text
