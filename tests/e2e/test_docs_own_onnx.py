"""docs/own-model-onnx.md runs as written: its code blocks, in order, in a temp dir.

A block with `title="FILE"` is written to FILE (folders made); a ```bash``` block is run by bash
with the test environment's bin/ first on PATH (so `python`, `lstm-export`, `lstm-serve` and
`lstm-client` are this checkout's); a block that starts `lstm-serve` is started in the
background (the doc says: in a terminal of its own) and the next block waits until it is ready.
A block without a title that is not bash is an illustration and is not run.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "own-model-onnx.md"
BLOCK = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```", re.S | re.M)


def doc_blocks() -> list[tuple[str, str, str]]:
    """(language, info after it, body) of every fenced block with a language, in order."""
    return [(m[1], m[2].strip(), m[3]) for m in BLOCK.finditer(DOC.read_text())]


def _env() -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    return os.environ | {"PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}


class _Background:
    """The doc's server, left running, its output kept."""

    def __init__(self, script: str, cwd: Path) -> None:
        port = int(re.search(r"--grpc-port (\d+)", script)[1])  # type: ignore[index]
        with socket.socket() as sock:
            busy = sock.connect_ex(("127.0.0.1", port)) == 0
        assert not busy, f"port {port} (the doc's) is taken on this machine"
        self.proc = subprocess.Popen(
            ["bash", "-c", "exec " + script.strip()], cwd=cwd, env=_env(), text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.lines: list[str] = []
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if " ready " in line:
                self.ready.set()

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready.wait(0.2):
            assert self.proc.poll() is None, "server exited:\n" + "".join(self.lines)
            assert time.monotonic() < deadline, "server not ready:\n" + "".join(self.lines)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


def _run_doc(tmp_path: Path) -> list[str]:
    """Every block in order; the stdout of each bash block that ran to completion."""
    server: _Background | None = None
    outputs: list[str] = []
    try:
        for lang, info, body in doc_blocks():
            title = re.fullmatch(r'title="([\w./-]+)"', info)
            if title:
                (tmp_path / title[1]).parent.mkdir(parents=True, exist_ok=True)
                (tmp_path / title[1]).write_text(body)
            elif lang != "bash":
                continue  # an illustration
            elif shlex.split(body)[0] == "lstm-serve":
                server = _Background(body, tmp_path)
            else:
                if server is not None:
                    server.wait_ready()
                done = subprocess.run(
                    ["bash", "-euo", "pipefail", "-c", body], cwd=tmp_path, env=_env(),
                    capture_output=True, text=True, timeout=240,
                )  # fmt: skip
                assert done.returncode == 0, f"{body}\n{done.stdout[-2000:]}{done.stderr[-3000:]}"
                outputs.append(done.stdout)
    finally:
        if server is not None:
            server.stop()
    return outputs


@pytest.mark.skipif(
    importlib.util.find_spec("onnxscript") is None,
    reason="torch.onnx.export's default exporter needs onnxscript (pip install -e '.[export]')",
)
def test_the_own_onnx_tutorial_runs_as_written(tmp_path: Path) -> None:
    assert [lang for lang, _, _ in doc_blocks()][:6] == [
        "python", "protobuf", "bash", "bash", "bash", "protobuf"
    ]  # fmt: skip
    verify, client = _run_doc(tmp_path)
    assert '"status": "PASS"' in verify and '"model": "digit-seen/1"' in verify
    listed, classify, *stream = client.splitlines()
    assert listed.startswith("digit-seen v1 (latest)  tokens vocab=38  S×H=4×32"), listed
    assert "labels=no-digit-yet,digit-seen" in listed
    assert classify.startswith("digit-seen v1  6 steps  digit-seen"), classify
    # What the doc says the stream shows: the digit is remembered through the state.
    answers = {m[1]: m[2] for line in stream if (m := re.match(r"'(.*)'\s+(\S+)", line))}
    assert answers["hello "] == "no-digit-yet" and answers["hello 2"] == "digit-seen", stream
    assert answers["hello 2 you"] == "digit-seen", stream
    assert "ended after 11 steps" in client


def test_the_pytorch_layout_example_is_a_config_lstm_serve_accepts(tmp_path: Path) -> None:
    """The illustration of PyTorch's (h0, c0) layout parses and passes the field check."""
    from service.engine.tritonconfig import load_triton_config

    illustration = [body for lang, info, body in doc_blocks() if lang == "protobuf" and not info]
    assert len(illustration) == 1
    folder = tmp_path / "digit-seen"
    folder.mkdir()
    (folder / "config.pbtxt").write_text(illustration[0])
    triton = load_triton_config(folder)
    assert [(s.input_name, s.dims) for s in triton.states] == [
        ("h0", (2, -1, 32)),
        ("c0", (2, -1, 32)),
    ]
