"""The drain deadline's thread on its own: nothing before arm(), the exit status at the deadline
with the abandoned-work line logged, even when the report itself fails."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import pytest

from service.drain_deadline import EXIT_STATUS, DrainDeadline

MARGIN_S = 0.2


class Exits:
    def __init__(self) -> None:
        self.codes: list[int] = []
        self.at: list[float] = []
        self.done = threading.Event()

    def __call__(self, code: int) -> None:
        self.codes.append(code)
        self.at.append(time.monotonic())
        self.done.set()


def test_not_armed_never_exits() -> None:
    exits = Exits()
    DrainDeadline(0.0, dict, exit=exits, margin_s=0.0).start()
    assert not exits.done.wait(0.5)


def test_armed_exits_at_grace_plus_margin_logging_the_report(
    caplog: pytest.LogCaptureFixture,
) -> None:
    exits = Exits()
    deadline = DrainDeadline(0.3, lambda: {"stage": "grpc stop", "streams": 2},
                             exit=exits, margin_s=MARGIN_S).start()  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="service.drain_deadline"):
        armed = time.monotonic()
        deadline.arm()
        deadline.arm(100.0)  # a second signal does not move the deadline
        assert exits.done.wait(5)
    assert exits.codes == [EXIT_STATUS]
    assert 0.3 + MARGIN_S <= exits.at[0] - armed < 0.3 + MARGIN_S + 1.0
    fields: dict[str, Any] = caplog.records[-1].fields  # type: ignore[attr-defined]
    assert caplog.records[-1].getMessage().startswith("drain deadline passed")
    assert fields["stage"] == "grpc stop" and fields["streams"] == 2
    assert fields["exit_status"] == EXIT_STATUS


def test_a_report_that_fails_still_exits(caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> dict[str, Any]:
        raise RuntimeError("the loop's state is inconsistent")

    exits = Exits()
    deadline = DrainDeadline(0.0, broken, exit=exits, margin_s=MARGIN_S).start()
    with caplog.at_level(logging.WARNING, logger="service.drain_deadline"):
        deadline.arm()
        assert exits.done.wait(5)
    assert exits.codes == [EXIT_STATUS]
    assert "RuntimeError" in caplog.records[-1].fields["report_error"]  # type: ignore[attr-defined]
