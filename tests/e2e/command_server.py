"""lstm-serve started by any command line (another environment's venv, a container), read like
ServerProcess: JSON log lines on stderr, the `listening` line's ports."""

from __future__ import annotations

import os
import queue
import subprocess
import threading
from pathlib import Path
from typing import Any

from tests.e2e.conftest import ServerProcess

PORT_FLAGS = ("--log-json", "--host", "127.0.0.1", "--grpc-port", "0", "--http-port", "0",
              "--metrics-port", "0")  # fmt: skip


class CommandServer(ServerProcess):
    """`argv` (ending in lstm-serve and its flags; PORT_FLAGS pick free loopback ports)."""

    def __init__(
        self, argv: list[str], cwd: Path | None = None, env: dict[str, str] | None = None
    ) -> None:
        self.proc = subprocess.Popen(
            argv, cwd=cwd, env=env or dict(os.environ), text=True,
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        listening = self.wait_event("listening", 90)
        self.port = int(listening["grpc_port"])
        self.metrics_port = int(listening["metrics_port"])
        self.http_port = int(listening.get("http_port") or -1)
