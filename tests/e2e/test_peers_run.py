"""`python -m bench.peers` as its docstring promises: every system (lstm-serve, the native front,
tritonserver 2.51, TorchServe over HTTP and gRPC, the echo server, the protocol floor) starts as
a real process on 127.0.0.1 and answers the same load, and the results carry every system's row.
Needs what `--setup` and `make native` install (.venv-peers, Java 17, native/build): skipped,
with what to run, where they are missing (CI does not build .venv-peers)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import peers
from tests.e2e.conftest import ROOT


def test_every_system_starts_and_answers_one_short_point(tmp_path: Path) -> None:
    missing = {why: None for system in peers.SYSTEMS if (why := peers.missing(system))}
    if missing:
        pytest.skip("; ".join(missing))
    out = tmp_path / "peers.json"
    run = subprocess.run(
        [sys.executable, "-m", "bench.peers", "--seconds", "0.5", "--warmup", "0.2",
         "--streams", "2", "--repeat", "1", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    result = json.loads(out.read_text())
    rows = {r["system"]: r for r in result["rows"]}
    assert set(rows) == set(peers.SYSTEMS), run.stdout[-4000:]
    for system, row in rows.items():
        assert "error" not in row, (system, row)
        assert row["messages_per_s"] > 0 and row["streams"] == 2
    assert set(result["start_seconds"]) == {"lstm-serve", "lstm-serve-native", "tritonserver",
                                            "torchserve", "echo", "floor"}  # fmt: skip
    summary = {r["system"]: r for r in result["summary"]}
    assert "x_native" in summary["torchserve-grpc"] and "x_lstm_serve" in summary["tritonserver"]
    assert result["targets"] == []  # the targets are at S = 1, 64 and 256 only
