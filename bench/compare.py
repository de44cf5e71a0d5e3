"""Two bench.run results side by side: batched messages/s (or steps/s) and p50 per point.

    python -m bench.compare BEFORE/results.json AFTER/results.json

For a change to the server: run `python -m bench.run` on the old commit and on the new one, on
the same machine one after the other, and compare. Prints a markdown table; rows the two runs
do not share are left out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

Row = dict[str, Any]
Key = tuple[str, str, int, int]


def _rows(results: dict[str, Any], server: str) -> dict[Key, Row]:
    """One server's points, by (model, mode, S, k)."""
    return {
        (r["model"], r["mode"], r["sessions"], r["steps"]): r
        for r in results["points"]
        if r["server"] == server
    }


def compare(before: dict[str, Any], after: dict[str, Any]) -> str:
    """The markdown table of every point both runs measured."""
    old, new = _rows(before, "batched"), _rows(after, "batched")
    old_echo, new_echo = _rows(before, "echo"), _rows(after, "echo")
    lines = [
        "| model | mode | S | k | steps/s before | steps/s after | after / before "
        "| % echo before | % echo after | p50 ms before | p50 ms after |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key in sorted(old.keys() & new.keys(), key=lambda k: (k[0], k[1] != "stream", k[3], k[2])):
        b, a = old[key], new[key]
        cells = [
            key[0], key[1], str(key[2]), str(key[3]),
            f"{b['steps_per_s']:,.0f}", f"{a['steps_per_s']:,.0f}",
            f"{a['steps_per_s'] / b['steps_per_s']:.2f}x",
            _pct(b, old_echo.get(key)), _pct(a, new_echo.get(key)),
            f"{b['p50_ms']:.2f}", f"{a['p50_ms']:.2f}",
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _pct(row: Row, echo: Row | None) -> str:
    if echo is None:
        return "-"
    return f"{100 * row['messages_per_s'] / echo['messages_per_s']:.0f} %"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__)
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    args = parser.parse_args(argv)
    before, after = (json.loads(p.read_text()) for p in (args.before, args.after))
    print(compare(before, after))
    return 0


if __name__ == "__main__":
    sys.exit(main())
