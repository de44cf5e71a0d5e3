"""bench.inproc's lone-client harness drives a real session through the session layer."""

from __future__ import annotations

import asyncio
from pathlib import Path

from bench.inproc import lone_stream, served


def test_the_lone_stream_harness_answers_every_message(tiny_repo: Path) -> None:
    async def scenario() -> tuple[list[float], int]:
        async with served(tiny_repo) as app:
            times = await lone_stream(app.layer, 40, "tiny-lstm")
            return times, len(app.engine.store)

    times, open_sessions = asyncio.run(scenario())
    assert len(times) == 40 and all(t > 0 for t in times)
    assert open_sessions == 1  # the harness leaves its session open (it measures, then stops)
