"""bench.inproc's lone-client harness drives a real session through the session layer."""

from __future__ import annotations

import asyncio
from pathlib import Path

from bench.inproc import lone_stream
from service.config import ServerConfig
from service.server import create_server


def test_the_lone_stream_harness_answers_every_message(tiny_repo: Path) -> None:
    async def scenario() -> tuple[list[float], int]:
        config = ServerConfig(model_repository=tiny_repo, host="127.0.0.1", grpc_port=0,
                              metrics_port=-1, http_port=-1)  # fmt: skip
        app, _ = create_server(config)
        await app.start()
        await app.wait_until_loaded(60)
        try:
            times = await lone_stream(app.layer, 40, "tiny-lstm")
            return times, len(app.engine.store)
        finally:
            await app.shutdown(grace_s=0)

    times, open_sessions = asyncio.run(scenario())
    assert len(times) == 40 and all(t > 0 for t in times)
    assert open_sessions == 1  # the harness leaves its session open (it measures, then stops)
