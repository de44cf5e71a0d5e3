"""The chaos soak's drain check on a synthetic result: a SIGTERMed replica that outlived its grace
by OVERRUN_S (SIGKILLed) or exited non-zero fails the run with one line naming it (the overrun
itself, on a real process: tests/e2e/test_chaos_overrun.py); the multi driver's places."""

from __future__ import annotations

import random
from typing import Any

from bench import chaos
from lstmserve.client import MultiStream
from lstmserve.v1 import lstm_serve_pb2 as pb


def _result(*kills: dict[str, Any], final: tuple[dict[str, Any], ...] = ()) -> dict[str, Any]:
    steps = {"lost": 0, "doubled": 0, "sessions_failed": 0}
    verify = {"mismatched": 0, "wrong_totals": 0, "final_mismatched": 0}
    return {"steps": steps, "verify": verify, "error_count": 0, "drivers_not_finished": 0,
            "kills": list(kills), "final_stop_failures": list(final)}  # fmt: skip


def _kill(signal: str, code: int, overran: bool = False, **more: Any) -> dict[str, Any]:
    return {"t": 12.5, "replica": 1, "generation": 4, "signal": signal, "exit_code": code,
            "overran": overran, **more}  # fmt: skip


def test_clean_drains_and_sigkills_pass() -> None:
    result = _result(_kill("SIGTERM", 0), _kill("SIGKILL", -9))
    assert chaos.drain_failures(result) == [] and chaos.passed(result)


def test_a_replica_alive_20_s_after_its_grace_fails_the_run_with_a_line_naming_it() -> None:
    result = _result(_kill("SIGTERM", -9, overran=True, log_tail=['{"event": "draining"}']))
    [line] = chaos.drain_failures(result)
    assert line.startswith("DRAIN FAILED: replica 1 (generation 4) SIGTERMed at t=12.5 s")
    assert f"still alive {chaos.OVERRUN_S:.0f} s after its" in line and "SIGKILLed" in line
    assert '{"event": "draining"}' in line
    assert not chaos.passed(result)


def test_a_drain_ended_by_its_deadline_or_at_the_end_of_the_run_fails_it() -> None:
    deadline = _kill("SIGTERM", 3)
    at_the_end = {**_kill("SIGTERM", -9, overran=True), "at_the_end": True}
    lines = chaos.drain_failures(_result(deadline, final=(at_the_end,)))
    assert "exited 3" in lines[0] and "at the end of the run" in lines[1]
    assert not chaos.passed(_result(deadline))


def test_a_multi_place_whose_session_failed_mid_retry_opens_afresh_and_sends_seq_1() -> None:
    """A chunk refused UNAVAILABLE (sent again), then its session failed: the place's next
    session starts at seq 1, not with the dropped session's refused chunk at seq 0."""
    load = chaos.Load("m", vocab=5, classes=2, chunks=(3, 3), max_steps=2, think_s=0.1)
    stats, rng, slot = chaos.Stats(), random.Random(0), chaos.Slot()
    opened = pb.SessionResult(session_id="a", opened=pb.SessionOpened(session_id="a"))
    chaos._multi_result(slot, MultiStream.open("m"), opened, load, stats, rng)
    chunk = chaos._entry(slot, load, rng, finishing=False)
    refused = pb.SessionResult(session_id="a", chunk=pb.ChunkResult(
        seq=1, error=pb.ErrorStatus(code="UNAVAILABLE", message="store down")))  # fmt: skip
    chaos._multi_result(slot, chunk, refused, load, stats, rng)
    assert slot.retries == 1
    failed = pb.SessionResult(session_id="a", error=pb.ErrorStatus(code="NOT_FOUND", message="x"))
    chaos._multi_result(slot, chaos._entry(slot, load, rng, finishing=False), failed, load,
                        stats, rng)  # fmt: skip
    assert slot.record is None
    assert chaos._entry(slot, load, rng, finishing=False).WhichOneof("kind") == "open"
    opened = pb.SessionResult(session_id="b", opened=pb.SessionOpened(session_id="b"))
    chaos._multi_result(slot, MultiStream.open("m"), opened, load, stats, rng)
    entry = chaos._entry(slot, load, rng, finishing=False)
    assert entry.session_id == "b" and entry.chunk.seq == 1
