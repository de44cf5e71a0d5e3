"""Run a Markdown document's code blocks as written, in order, in a temp dir.

A block with `title="FILE"` is written to FILE (folders made); a ```bash``` block is run by bash
with the test environment's bin/ first on PATH (so `python`, `lstm-export`, `lstm-serve` and
`lstm-client` are this checkout's); a block that starts `lstm-serve` is started in the
background (the docs say: in a terminal of its own) and the next block waits until it is ready.
A block without a title that is not bash is an illustration and is not run. `only` picks the
blocks between the Markdown comments `<!-- run: NAME -->` and `<!-- end: NAME -->`.
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

BLOCK = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```", re.S | re.M)


def doc_blocks(doc: Path, only: str | None = None) -> list[tuple[str, str, str]]:
    """(language, info after it, body) of every fenced block with a language, in order."""
    text = doc.read_text()
    if only is not None:
        start, end = f"<!-- run: {only} -->", f"<!-- end: {only} -->"
        assert start in text and end in text, f"{doc.name} has no {start} ... {end}"
        text = text[text.index(start) : text.index(end)]
    return [(m[1], m[2].strip(), m[3]) for m in BLOCK.finditer(text)]


def doc_env() -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    return os.environ | {"PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}


class Background:
    """The doc's server, left running, its output kept."""

    def __init__(self, script: str, cwd: Path) -> None:
        port = int(re.search(r"--grpc-port (\d+)", script)[1])  # type: ignore[index]
        with socket.socket() as sock:
            busy = sock.connect_ex(("127.0.0.1", port)) == 0
        assert not busy, f"port {port} (the doc's) is taken on this machine"
        self.proc = subprocess.Popen(
            ["bash", "-c", "exec " + script.strip()], cwd=cwd, env=doc_env(), text=True,
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


def run_doc(doc: Path, cwd: Path, only: str | None = None) -> list[str]:
    """Every block in order; the stdout of each bash block that ran to completion."""
    server: Background | None = None
    outputs: list[str] = []
    try:
        for lang, info, body in doc_blocks(doc, only):
            title = re.fullmatch(r'title="([\w./-]+)"', info)
            if title:
                (cwd / title[1]).parent.mkdir(parents=True, exist_ok=True)
                (cwd / title[1]).write_text(body)
            elif lang != "bash":
                continue  # an illustration
            elif shlex.split(body)[0] == "lstm-serve":
                server = Background(body, cwd)
            else:
                if server is not None:
                    server.wait_ready()
                done = subprocess.run(
                    ["bash", "-euo", "pipefail", "-c", body], cwd=cwd, env=doc_env(),
                    capture_output=True, text=True, timeout=240,
                )  # fmt: skip
                assert done.returncode == 0, f"{body}\n{done.stdout[-2000:]}{done.stderr[-3000:]}"
                outputs.append(done.stdout)
    finally:
        if server is not None:
            server.stop()
    return outputs
