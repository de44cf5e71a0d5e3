"""The native front (native/, `make native`) as a subprocess in front of a server's sockets.

Tests that need it skip when it is not built, unless LSTM_SERVE_REQUIRE_NATIVE=1 (CI builds
it: there a missing binary fails them). LSTM_SERVE_NATIVE_FRONT_BIN names another binary (the
variable lstm-serve reads for --native-front-bin).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUILT = ROOT / "native" / "build" / "lstm-serve-front"
LOAD_BUILT = ROOT / "native" / "build" / "lstm-serve-load"


def binary() -> Path:
    """The front's binary; skips (or, where it is required, fails) the test without it."""
    return _built(Path(os.environ.get("LSTM_SERVE_NATIVE_FRONT_BIN") or BUILT), "the native front")


def load_binary() -> Path:
    """The benchmarks' native load generator (native/build/lstm-serve-load), as `binary()`."""
    return _built(LOAD_BUILT, "the native load generator")


def _built(path: Path, what: str) -> Path:
    if path.is_file() and os.access(path, os.X_OK):
        return path
    why = f"{what} is not built ({path}): run `make native`"
    if os.environ.get("LSTM_SERVE_REQUIRE_NATIVE") == "1":
        pytest.fail(why)
    pytest.skip(why)


class NativeFront:
    """`lstm-serve-front --listen 127.0.0.1:0 --dir DIR`: the port it printed, then stop()."""

    def __init__(self, folder: Path, *extra: str) -> None:
        self.proc = subprocess.Popen(
            [str(binary()), "--listen", "127.0.0.1:0", "--dir", str(folder), *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(10)
            raise AssertionError(f"the native front did not start: {self.proc.stderr.read()}")
        self.port = int(json.loads(line)["port"])

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> str:
        """SIGTERM, then its last line (ticks and messages answered)."""
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            out, _ = self.proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        return out
