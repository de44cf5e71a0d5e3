"""lstm-client as a real process against lstm-serve as a real process."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from tests.e2e.conftest import ROOT, ServerProcess, run_client

STEP_LINE = re.compile(r"^'(?P<prefix>[^']*)'\s+(?P<label>\S+) (?P<prob>[01]\.\d{3})")


def test_list_shows_every_model(server_process: ServerProcess) -> None:
    out = run_client("--address", server_process.address, "list")
    assert out.returncode == 0, out.stderr
    assert "tiny-lstm v2 (latest)" in out.stdout and "tiny-bilstm v1" in out.stdout
    assert "streamable=false" in out.stdout and "CPUExecutionProvider" in out.stdout


def test_stream_prints_the_evolving_label_per_character(server_process: ServerProcess) -> None:
    word = "streaming"
    out = run_client("--address", server_process.address, "stream", "tiny-lstm", "--text", word)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("session ") and "tiny-lstm v2" in lines[0]
    steps = [m for m in map(STEP_LINE.match, lines) if m]
    assert [m["prefix"] for m in steps] == [word[: i + 1] for i in range(len(word))]
    assert all(m["label"].startswith("class") for m in steps)
    assert len({m["prob"] for m in steps}) > 1  # the probability moves as characters arrive
    assert lines[-1] == f"ended after {len(word)} steps"


def test_stream_keep_then_resume_by_id(server_process: ServerProcess) -> None:
    first = run_client(
        "--address", server_process.address, "stream", "tiny-gru", "--text", "ab", "--keep"
    )
    assert first.returncode == 0, first.stderr
    session_id = first.stdout.split()[1]
    second = run_client(
        "--address", server_process.address, "stream", "--session", session_id, "--text", "cd"
    )
    assert second.returncode == 0, second.stderr
    assert second.stdout.splitlines()[-1] == "ended after 4 steps"


def test_failover_to_the_second_address(server_process: ServerProcess) -> None:
    out = run_client(
        "--address", "127.0.0.1:1", "--address", server_process.address, "--timeout", "5",
        "classify", "tiny-gru", "--text", "hello",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "tiny-gru v1  5 steps  class" in out.stdout


@pytest.mark.parametrize("suffix", [".npy", ".csv"])
def test_classify_frames_from_a_file(
    server_process: ServerProcess, tmp_path: Path, suffix: str
) -> None:
    frames = np.random.default_rng(1).normal(size=(6, 5)).astype(np.float32)
    path = tmp_path / f"frames{suffix}"
    if suffix == ".npy":
        np.save(path, frames)
    else:
        np.savetxt(path, frames, delimiter=",")
    out = run_client(
        "--address", server_process.address, "classify", "tiny-rnn-frames",
        "--frames", str(path), "--top-k", "2", "--json",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert '"model": "tiny-rnn-frames"' in out.stdout and out.stdout.count('"label"') == 2


def test_stream_frames_one_per_chunk(server_process: ServerProcess, tmp_path: Path) -> None:
    np.save(tmp_path / "f.npy", np.ones((3, 5), dtype=np.float32))
    out = run_client("--address", server_process.address, "stream", "tiny-cifg-frames",
                     "--frames", str(tmp_path / "f.npy"))  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "'frame 3/3'" in out.stdout and out.stdout.splitlines()[-1] == "ended after 3 steps"


def test_errors_are_reported_with_their_status(server_process: ServerProcess) -> None:
    out = run_client("--address", server_process.address, "stream", "tiny-bilstm", "--text", "a")
    assert out.returncode == 1 and "FAILED_PRECONDITION" in out.stderr


LANGID = ROOT / "models" / "langid-chars"


@pytest.mark.skipif(not LANGID.is_dir(), reason="models/langid-chars is not trained yet")
def test_stream_a_word_to_langid_chars() -> None:
    server = ServerProcess(ROOT / "models")
    try:
        server.wait_event("ready", timeout=60)
        out = run_client("--address", server.address, "stream", "langid-chars",
                         "--text", "bonjour", "--top-k", "2")  # fmt: skip
    finally:
        server.stop()
    assert out.returncode == 0, out.stderr
    steps = [m for m in map(STEP_LINE.match, out.stdout.splitlines()) if m]
    assert len(steps) == len("bonjour")
