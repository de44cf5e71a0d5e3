"""The chaos soak's replica kill on a real process that ignores SIGTERM: it is SIGKILLed once
OVERRUN_S past the drain grace and reported as overrun (what fails `python -m bench.chaos`)."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from pathlib import Path

import pytest

from bench import chaos

IGNORES_SIGTERM = (
    "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "print('ready', flush=True, file=sys.stderr); time.sleep(60)"
)


def test_a_replica_that_ignores_sigterm_is_killed_and_reported_as_overrun(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(chaos, "DRAIN_GRACE_S", 0.2)
    monkeypatch.setattr(chaos, "OVERRUN_S", 0.5)
    replica = chaos.Replica(0, 0, [sys.executable, "-c", IGNORES_SIGTERM], tmp_path)
    replica.spawn()
    log = tmp_path / "replica0.1.log"
    deadline = time.monotonic() + 20
    while "ready" not in log.read_text():  # the handler is set: SIGTERM is ignored from here
        assert time.monotonic() < deadline
        time.sleep(0.02)
    started = time.monotonic()
    code, overran = asyncio.run(replica.kill(signal.SIGTERM))
    assert overran and code == -signal.SIGKILL
    assert 0.7 <= time.monotonic() - started < 5
