"""lstm-client as a real process against lstm-serve as a real process."""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

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


def test_stream_prints_each_prefix_once_when_a_letter_waits(server_process: ServerProcess) -> None:
    """ "q" is fed at once (no mark composes with it), the "u" after it waits: the line for "q"
    is not printed again while nothing new was fed."""
    word = "quiz"
    out = run_client("--address", server_process.address, "stream", "tiny-lstm", "--text", word)
    assert out.returncode == 0, out.stderr
    prefixes = [m["prefix"] for m in map(STEP_LINE.match, out.stdout.splitlines()) if m]
    assert prefixes == ["q", "qu", "qui", "quiz"], prefixes


def test_stream_decide_at_shows_the_decision_and_stops_when_it_ends_the_session(
    server_process: ServerProcess,
) -> None:
    out = run_client("--address", server_process.address, "stream", "tiny-lstm", "--text",
                     "streaming", "--decide-at", "0.01,2", "--end-when-decided")  # fmt: skip
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert re.search(
        r"^decided: class\d at step 2 \(p=0\.\d{3}\); the server ended", out.stdout, re.M
    )
    assert [m["prefix"] for m in map(STEP_LINE.match, lines) if m] == ["s", "st"]
    assert lines[-1] == "ended by its decision after 2 steps"
    bad = run_client("--address", server_process.address, "stream", "tiny-lstm", "--text", "a",
                     "--decide-at", "2")  # fmt: skip
    assert bad.returncode == 2 and "not in (0, 1]" in bad.stderr


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
    # every reply answers all the text sent so far: the resumed run's lines show the text from
    # before as "…" (never as a blank prefix), then what this run sent
    prefixes = [m["prefix"] for m in map(STEP_LINE.match, second.stdout.splitlines()) if m]
    assert prefixes == ["…c", "…cd"], second.stdout


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


def sessions_opened(server: ServerProcess, model: str) -> float:
    """lstm_serve_session_events_total{event="opened", model=MODEL} on the server's /metrics."""
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    wanted = {"event": "opened", "model": model}
    samples = (s for family in text_string_to_metric_families(text) for s in family.samples)
    name = "lstm_serve_session_events_total"
    return sum(s.value for s in samples if s.name == name and s.labels == wanted)


def test_stream_frames_to_a_token_model_is_refused_before_any_session(
    server_process: ServerProcess, tmp_path: Path
) -> None:
    np.save(tmp_path / "f.npy", np.ones((19, 5), dtype=np.float32))
    before = sessions_opened(server_process, "tiny-lstm")
    out = run_client("--address", server_process.address, "stream", "tiny-lstm",
                     "--frames", str(tmp_path / "f.npy"))  # fmt: skip
    assert out.returncode == 2, out.stdout + out.stderr
    assert "tiny-lstm" in out.stderr and "--text" in out.stderr and "not frames" in out.stderr
    assert out.stdout == ""  # no session line, no chunk line
    assert sessions_opened(server_process, "tiny-lstm") == before


def test_stream_text_to_a_frames_model_is_refused_before_any_session(
    server_process: ServerProcess,
) -> None:
    before = sessions_opened(server_process, "tiny-cifg-frames")
    out = run_client(
        "--address", server_process.address, "stream", "tiny-cifg-frames", "--text", "abc"
    )
    assert out.returncode == 2, out.stdout + out.stderr
    assert "tiny-cifg-frames" in out.stderr and "--frames" in out.stderr
    assert sessions_opened(server_process, "tiny-cifg-frames") == before


def test_frames_of_the_wrong_width_are_refused_before_any_session(
    server_process: ServerProcess, tmp_path: Path
) -> None:
    np.save(tmp_path / "wide.npy", np.ones((3, 7), dtype=np.float32))
    before = sessions_opened(server_process, "tiny-cifg-frames")
    out = run_client("--address", server_process.address, "stream", "tiny-cifg-frames",
                     "--frames", str(tmp_path / "wide.npy"))  # fmt: skip
    assert out.returncode == 2, out.stdout + out.stderr
    assert "7 features per frame" in out.stderr and "takes 5" in out.stderr
    assert sessions_opened(server_process, "tiny-cifg-frames") == before


def test_a_missing_frames_file_opens_no_session(
    server_process: ServerProcess, tmp_path: Path
) -> None:
    missing = tmp_path / "missing.npy"
    before = sessions_opened(server_process, "tiny-cifg-frames")
    out = run_client("--address", server_process.address, "stream", "tiny-cifg-frames",
                     "--frames", str(missing))  # fmt: skip
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"--frames {missing}" in out.stderr and "No such file" in out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""
    assert sessions_opened(server_process, "tiny-cifg-frames") == before


def test_a_chunk_refused_by_the_server_fails_the_stream(
    server_process: ServerProcess, tmp_path: Path
) -> None:
    frames = np.ones((3, 5), dtype=np.float32)
    frames[1, 2] = np.nan  # the server refuses the second chunk in-band (must be finite)
    np.save(tmp_path / "nan.npy", frames)
    out = run_client("--address", server_process.address, "stream", "tiny-cifg-frames",
                     "--frames", str(tmp_path / "nan.npy"))  # fmt: skip
    assert out.returncode == 1, out.stdout + out.stderr
    assert "'frame 2/3'  (refused: INVALID_ARGUMENT" in out.stdout
    assert out.stdout.splitlines()[-1] == "ended after 2 steps"
    assert "refused 1 of 3 chunks" in out.stderr
