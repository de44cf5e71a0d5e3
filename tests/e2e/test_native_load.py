"""The benchmarks' native load generator (native/build/lstm-serve-load via bench.native_load)
against the real lstm-serve, through the Python front and the native front, and against the
echo server: messages answered, no errors, the window's edges reported, and every sampled reply
equal to offline onnxruntime (0.0 difference)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest

from bench.load import SESSIONS_PER_CHANNEL, Load, message_sizes
from bench.load import drive as bench_drive
from bench.native_load import NativeWindow, SampledSession, drive_native, verify_exact
from bench.procs import start_echo, start_lstm_serve
from bench.run import measure
from export.tiny import TINY_VOCAB
from tests.e2e.conftest import ServerProcess
from tests.native_front import NativeFront, binary, load_binary

MODEL = "tiny-lstm"
SESSIONS, STEPS = 8, 3
WARMUP_S, SECONDS = 0.2, 1.0


@pytest.fixture(scope="module")
def fronts(tiny_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The Python front's address and the native front's, one lstm-serve process behind both."""
    load_binary()
    binary()
    folder = tmp_path_factory.mktemp("native-load") / "sockets"
    server = ServerProcess(tiny_repo, "--native-front-dir", str(folder))
    server.wait_event("ready", 60)
    front = NativeFront(folder)
    yield {"python": server.address, "native": front.address}
    front.stop()
    server.stop()


def drive(load: Load, address: str, model: str = MODEL) -> tuple[NativeWindow, list[float]]:
    """One run of the load generator; (its result, the times `on_window` was called)."""
    edges: list[tuple[str, float]] = []

    async def on_window(edge: str) -> None:
        edges.append((edge, time.perf_counter()))

    result = asyncio.run(
        drive_native(load, address, model, len(TINY_VOCAB), WARMUP_S, SECONDS, on_window)
    )
    assert [e for e, _ in edges] == ["start", "end"]
    return result, [t for _, t in edges]


@pytest.mark.parametrize("front", ["python", "native"])
def test_stream_load_through_each_front_is_answered_exactly(
    front: str, fronts: dict[str, str], tiny_repo: Path
) -> None:
    result, (start, end) = drive(Load("stream", SESSIONS, STEPS, SESSIONS), fronts[front])
    assert result.completed > 0 and result.sent >= result.completed
    assert 0.9 * SECONDS <= end - start <= SECONDS + 0.5
    assert result.seconds == pytest.approx(SECONDS, abs=1e-3)
    assert 0 < result.p50_ms <= result.p99_ms
    assert result.client_cpu_s > 0
    assert len(result.sample) == SESSIONS  # up to 32 sampled: all of them here
    for session in result.sample:
        assert session.version == 2  # the latest of tiny-lstm/1 and /2: the one it opened
        assert len(session.probabilities) > 0
        assert len(session.tokens) == STEPS * len(session.probabilities)  # every chunk answered
        assert session.tokens.min() >= 1 and session.tokens.max() < len(TINY_VOCAB)
    check = verify_exact(result.sample, tiny_repo, MODEL, STEPS)
    assert check["sessions"] == SESSIONS
    assert check["replies"] == sum(len(s.probabilities) for s in result.sample)
    assert check["mismatched"] == 0 and check["max_abs_diff"] == 0.0


@pytest.mark.parametrize("front", ["python", "native"])
def test_text_load_through_each_front_is_answered(front: str, fronts: dict[str, str]) -> None:
    """--text 1: each chunk STEPS random letters (tiny-lstm has a character tokenizer); the load
    generator fails the run on any reply that is not the chunk's (seq, total steps, no error)."""

    async def on_window(edge: str) -> None:
        pass

    load = Load("stream", SESSIONS, STEPS, SESSIONS)
    result = asyncio.run(drive_native(load, fronts[front], MODEL, len(TINY_VOCAB), WARMUP_S,
                                      SECONDS, on_window, sample=0, text=True))  # fmt: skip
    assert result.completed > 0 and result.sent >= result.completed and result.sample == []


def test_token_ids_are_random_but_the_same_per_session_run_after_run(
    fronts: dict[str, str],
) -> None:
    load = Load("stream", 2, STEPS, 2)
    first, _ = drive(load, fronts["python"])
    second, _ = drive(load, fronts["python"])
    for a, b in zip(first.sample, second.sample, strict=True):
        n = min(len(a.tokens), len(b.tokens))
        assert n > 100 and np.array_equal(a.tokens[:n], b.tokens[:n])
    a, b = first.sample
    assert not np.array_equal(a.tokens[:100], b.tokens[:100])  # sessions differ
    assert len(np.unique(a.tokens)) > 10


def test_the_exactness_check_finds_one_reply_off_by_one_ulp(
    fronts: dict[str, str], tiny_repo: Path
) -> None:
    result, _ = drive(Load("stream", 1, STEPS, 1), fronts["native"])
    session = result.sample[0]
    probabilities = session.probabilities.copy()
    probabilities[len(probabilities) // 2, 0] = np.nextafter(
        probabilities[len(probabilities) // 2, 0], np.float32(1)
    )
    off = SampledSession(session.session, session.version, session.tokens, probabilities)
    assert verify_exact([session], tiny_repo, MODEL, STEPS)["mismatched"] == 0
    check = verify_exact([off], tiny_repo, MODEL, STEPS)
    assert check["mismatched"] == 1 and check["max_abs_diff"] > 0.0


def test_errors_are_reported_with_the_first_message(fronts: dict[str, str]) -> None:
    with pytest.raises(RuntimeError, match=r"native load: 2 errors, first: session \d: status 5"):
        drive(Load("stream", 2, STEPS, 2), fronts["native"], model="no-such-model")


def test_echo_load_against_the_echo_server() -> None:
    load_binary()
    echo = start_echo()
    try:
        sizes = message_sizes(1, 1, mode="stream")
        result, _ = drive(Load("echo", 16, 1, 16, sizes), echo.address)
    finally:
        echo.stop()
    assert result.completed > 0
    assert 0 < result.p50_ms <= result.p99_ms
    assert result.sample == []  # nothing to check against a model
    assert result.client_cpu_s > 0


def test_both_clients_offer_the_echo_server_the_same_connections() -> None:
    """bench.load's grpc.aio channels share one connection (gRPC's subchannel pool); the native
    load generator's channels do too, so the two clients load a server alike."""
    load_binary()
    echo = start_echo()
    counts: dict[str, int] = {}

    def counter(client: str) -> Callable[[str], Awaitable[None]]:
        async def on_window(edge: str) -> None:
            if edge == "start":
                counts[client] = sum(
                    1 for c in psutil.net_connections("tcp")
                    if c.raddr and c.raddr.port == echo.port and c.status == "ESTABLISHED"
                )  # fmt: skip

        return on_window

    load = Load("echo", 2 * SESSIONS_PER_CHANNEL, 1, 2 * SESSIONS_PER_CHANNEL, (12, 78))
    try:
        asyncio.run(bench_drive(load, echo.address, "", 2, 0.2, 0.3, counter("python")))
        asyncio.run(drive_native(load, echo.address, "", 2, 0.2, 0.3, counter("native")))
    finally:
        echo.stop()
    assert counts == {"python": 1, "native": 1}


def test_bench_run_measures_lstm_serve_and_the_floor_with_the_native_client(
    tiny_repo: Path,
) -> None:
    """bench.run's `measure` with `client="native"`: the row says so, with the server's CPU
    sampled at the window's edges, the client's own CPU, and a sample that checks exact."""
    load_binary()
    server, floor = start_lstm_serve(tiny_repo, []), start_echo(protocol=True)
    try:
        load = Load("stream", 4, STEPS, 4)
        row = measure(server, load, MODEL, len(TINY_VOCAB), WARMUP_S, 0.5, client="native")
        at_floor = measure(floor, load, MODEL, len(TINY_VOCAB), WARMUP_S, 0.5, client="native")
    finally:
        server.stop()
        floor.stop()
    for r in (row, at_floor):
        assert r["client"] == "native" and r["messages_per_s"] > 0
        assert r["server_cpu_pct"] > 0 and 0 < r["client_us_per_msg"] < 10_000
        assert 0 < r["p50_ms"] <= r["p99_ms"]
    check = verify_exact(row["native_sample"].sample, tiny_repo, MODEL, STEPS)
    assert check["sessions"] == 4 and check["replies"] > 0 and check["mismatched"] == 0
