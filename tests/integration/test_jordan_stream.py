"""A Jordan network served by the unchanged server: a stream in random chunks gives exactly the
offline whole-sequence answer after every step."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from export.tiny import TINY_JORDAN, write_tiny_model
from lstmserve.client import LstmClient
from tests.integration.conftest import Reference, ServerThread, make_config


@pytest.fixture(scope="module")
def jordan_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("jordan_repo")
    write_tiny_model(repo, "tiny-jordan", TINY_JORDAN)
    return repo


@pytest.fixture(scope="module")
def jordan_server(jordan_repo: Path) -> Iterator[ServerThread]:
    srv = ServerThread(make_config(jordan_repo)).start()
    yield srv
    srv.stop()


async def _stream(address: str, seq: np.ndarray, seed: int) -> tuple[list[np.ndarray], list]:
    rng = random.Random(seed)
    steps: list[np.ndarray] = []
    async with LstmClient(address) as client:
        session = await client.open_session("tiny-jordan", version=1, every_step=True)
        start = 0
        while start < len(seq):
            end = min(len(seq), start + rng.randint(1, 6))
            await session.send(seq[start:end])
            reply = (await session.receive()).chunk
            assert not reply.HasField("error") and reply.total_steps == end
            steps.extend(np.array(p.values) for p in reply.step_probabilities)
            start = end
        await session.end()
    return steps, list(reply.probabilities)


def test_jordan_stream_in_random_chunks_equals_the_whole_sequence(
    jordan_server: ServerThread, jordan_repo: Path
) -> None:
    reference = Reference(jordan_repo)
    rng = np.random.default_rng(5)
    for seed in range(4):
        seq = rng.integers(0, TINY_JORDAN.vocab_size, size=int(rng.integers(3, 30)))
        steps, probs = asyncio.run(_stream(jordan_server.address, seq.astype(np.int64), seed))
        whole_probs, whole_steps = reference.run("tiny-jordan", seq.astype(np.int64))
        assert len(steps) == len(seq)
        np.testing.assert_allclose(np.stack(steps), whole_steps, rtol=0, atol=1e-6)
        np.testing.assert_allclose(probs, whole_probs, rtol=0, atol=1e-6)
