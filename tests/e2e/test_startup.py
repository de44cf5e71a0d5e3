"""lstm-serve start-up as a real process: --help names every flag; a failure is a non-zero exit
within seconds, one line."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.config import FLAGS
from tests.e2e.conftest import ROOT

EXIT_WITHIN_S = 15  # start-up failures exit long before this (python and onnxruntime import)
PROGRESS = re.compile(r"^\S+ (DEBUG|INFO) ")  # text log lines below WARNING


def run_serve(*args: str) -> subprocess.CompletedProcess[str]:
    """`lstm-serve ARGS` (text logs, 127.0.0.1) until it exits; TimeoutExpired if it keeps on."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LSTM_SERVE_", "GRPC_"))}
    return subprocess.run(
        [sys.executable, "-m", "service.cli", "--host", "127.0.0.1", "--http-port", "0", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=EXIT_WITHIN_S, env=env,
    )  # fmt: skip


def problem_lines(stderr: str) -> list[str]:
    """The stderr lines that are not progress logs (INFO, DEBUG)."""
    return [ln for ln in stderr.splitlines() if ln.strip() and not PROGRESS.match(ln)]


def test_help_documents_every_flag() -> None:
    out = run_serve("--help")
    assert out.returncode == 0, out.stderr
    for name in FLAGS:
        assert "--" + name.replace("_", "-") in out.stdout
    assert "LSTM_SERVE_" in out.stdout


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A loopback port held by another listening socket."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def test_busy_grpc_port_exits_with_one_line_naming_it(tiny_repo: Path, busy_port: int) -> None:
    out = run_serve("--grpc-port", str(busy_port), "--metrics-port", "0",
                    "--model-repository", str(tiny_repo))  # fmt: skip
    assert out.returncode != 0
    lines = out.stderr.splitlines()
    assert len(lines) == 1, out.stderr  # neither a traceback nor grpc's own add_port.cc line
    assert f"127.0.0.1:{busy_port}" in lines[0] and "--grpc-port" in lines[0]


def test_busy_metrics_port_exits_with_one_line_naming_it(tiny_repo: Path, busy_port: int) -> None:
    out = run_serve("--grpc-port", "0", "--metrics-port", str(busy_port),
                    "--model-repository", str(tiny_repo))  # fmt: skip
    assert out.returncode != 0
    lines = out.stderr.splitlines()
    assert len(lines) == 1, out.stderr  # no traceback, not even grpc's "Event loop is closed"
    assert f"127.0.0.1:{busy_port}" in lines[0] and "--metrics-port" in lines[0]


def test_empty_repository_exits_with_one_line_naming_it(tmp_path: Path) -> None:
    empty = tmp_path / "empty-repo"
    empty.mkdir()
    out = run_serve("--grpc-port", "0", "--metrics-port", "0", "--model-repository", str(empty))
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    problems = problem_lines(out.stderr)
    assert len(problems) == 1, out.stderr
    assert str(empty) in problems[0] and re.search(r"\bno (\w+ )?models?\b", problems[0])


def test_truncated_model_exits_with_one_line_naming_the_file(
    tiny_repo: Path, tmp_path: Path
) -> None:
    model = tmp_path / "repo" / "tiny-gru" / "1" / "model.onnx"
    model.parent.mkdir(parents=True)
    shutil.copyfile(tiny_repo / "tiny-gru" / "1" / "model.onnx", model)
    with model.open("r+b") as f:
        f.truncate(model.stat().st_size // 3)
    out = run_serve("--grpc-port", "0", "--metrics-port", "0",
                    "--model-repository", str(tmp_path / "repo"))  # fmt: skip
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    problems = problem_lines(out.stderr)
    assert len(problems) == 1, out.stderr
    assert str(model) in problems[0]


def test_unknown_provider_names_the_accepted_and_available_ones(tiny_repo: Path) -> None:
    out = run_serve("--grpc-port", "0", "--metrics-port", "0", "--providers", "gpu",
                    "--model-repository", str(tiny_repo))  # fmt: skip
    assert out.returncode != 0
    problems = problem_lines(out.stderr)
    assert len(problems) == 1, out.stderr
    assert "--providers gpu" in problems[0]
    assert "cuda, cpu, tensorrt, rocm, coreml" in problems[0]
    assert "CPUExecutionProvider" in problems[0]  # available here


def test_bad_snapshot_key_names_the_key_id_not_the_secret() -> None:
    secret = "s3cret-not-base64!"
    out = run_serve("--snapshot-key", f"k1:{secret}")
    assert out.returncode == 2
    lines = out.stderr.splitlines()
    assert len(lines) == 1, out.stderr
    assert "--snapshot-key" in lines[0] and "'k1'" in lines[0] and "base64" in lines[0]
    assert secret not in out.stderr
