"""docs/own-model-from-torch.md runs as written: its code blocks, in order, in a temp dir.

A ```python title="FILE"``` block is written to FILE; a ```bash``` block is run by bash with the
test environment's bin/ first on PATH (so `python`, `lstm-export`, `lstm-serve` and
`lstm-client` are this checkout's); a block that starts `lstm-serve` is started in the
background (the doc says: in a terminal of its own) and the next block waits for it to be ready.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "own-model-from-torch.md"
BLOCK = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```", re.S | re.M)


def doc_blocks() -> list[tuple[str, str, str]]:
    """(language, info after it, body) of every fenced block, in order."""
    return [(m[1], m[2].strip(), m[3]) for m in BLOCK.finditer(DOC.read_text())]


def _env() -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    return os.environ | {"PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}


class _Background:
    """A doc command left running (the server), its output kept."""

    def __init__(self, script: str, cwd: Path) -> None:
        self.port = int(re.search(r"--grpc-port (\d+)", script)[1])  # type: ignore[index]
        with socket.socket() as sock:
            busy = sock.connect_ex(("127.0.0.1", self.port)) == 0
        assert not busy, f"port {self.port} (the doc's) is taken on this machine"
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


def test_the_from_torch_tutorial_runs_as_written(tmp_path: Path) -> None:
    blocks = doc_blocks()
    assert [lang for lang, _, _ in blocks] == ["python", "python", "bash", "bash", "bash"]
    server: _Background | None = None
    outputs: list[str] = []
    try:
        for lang, info, body in blocks:
            if lang == "python":
                title = re.fullmatch(r'title="([\w.]+)"', info)
                assert title, f"a python block without title=: {info!r}"
                (tmp_path / title[1]).write_text(body)
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
    assert (tmp_path / "repo" / "word-ending" / "1" / "model.onnx").is_file()
    assert '"status": "PASS"' in outputs[0] and '"recurrent": "encoder (GRU)"' in outputs[0]
    classify, stream = outputs[1].splitlines()[0], outputs[1]
    assert classify.startswith("word-ending v1  6 steps  vowel"), outputs[1]
    # What the doc says the stream ends with: the answer for the whole text.
    assert re.search(r"'sofa bed'\s+consonant 1\.000\nended after 8 steps", stream), stream
