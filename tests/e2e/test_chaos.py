"""The chaos soak, short: `python -m bench.chaos` for a minute (3 replicas + Redis as real
processes, replicas SIGKILLed and SIGTERMed under 60 live sessions) must lose nothing, double
nothing, and answer every chunk exactly as offline onnxruntime does."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.e2e.conftest import ROOT

SECONDS = 60
SESSIONS = 60  # small enough for a 2-core machine next to other work
THINK_MS = 300  # each session's mean pause: ~200 replies/s in all


def soak(out: Path, seconds: int, *flags: str) -> dict:
    """`python -m bench.chaos` for `seconds` with `flags`; its chaos.json, once it exited 0 with
    nothing lost, doubled or answered differently from offline onnxruntime."""
    run = subprocess.run(
        [sys.executable, "-m", "bench.chaos", "--seconds", str(seconds), "--sessions",
         str(SESSIONS), "--think-ms", str(THINK_MS), "--out", str(out), *flags],
        cwd=ROOT, capture_output=True, text=True, timeout=seconds + 240,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    result = json.loads((out / "chaos.json").read_text())
    steps, check = result["steps"], result["verify"]
    assert steps["lost"] == 0 and steps["doubled"] == 0 and steps["sessions_failed"] == 0
    assert steps["applied"] == steps["acknowledged"] == steps["sent"] > 0
    assert check["mismatched"] == 0 and check["final_mismatched"] == 0, check
    assert result["error_count"] == 0, result["errors"]
    return result


def test_a_minute_of_chaos_loses_and_doubles_nothing(tmp_path: Path) -> None:
    out = tmp_path / "chaos"
    result = soak(out, SECONDS)
    check = result["verify"]
    assert check["replies"] == result["replies"] > 0
    assert check["wrong_totals"] == 0, check
    signals = {kill["signal"] for kill in result["kills"]}
    assert signals == {"SIGKILL", "SIGTERM"} and len(result["kills"]) >= 5
    assert result["failovers"] > 0 and result["multi_sessions"] > 0
    assert all(any(v is not None for v in result["series"][f"replica{i}"]) for i in range(3))
    assert (out / "chaos.png").stat().st_size > 0


def test_half_a_minute_of_chaos_through_native_fronts_loses_and_doubles_nothing(
    tmp_path: Path,
) -> None:
    """The same soak with every replica behind the native front, each kill taking the front
    too, as a pod's death does (`--native --kill-fronts`)."""
    from tests.native_front import binary

    binary()
    result = soak(tmp_path / "chaos", SECONDS // 2, "--native", "--kill-fronts")
    assert len(result["kills"]) >= 3


def test_half_a_minute_of_chaos_behind_native_fronts_that_stay_up(tmp_path: Path) -> None:
    """Replicas killed and restarted behind fronts that stay up (`--native`): each front
    reconnects to its new replica, and none dies (bench.chaos fails the run if one does)."""
    from tests.native_front import binary

    binary()
    result = soak(tmp_path / "chaos", SECONDS // 2, "--native")
    assert len(result["kills"]) >= 3
