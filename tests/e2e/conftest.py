"""The real lstm-serve as a subprocess (JSON logs parsed for its ports) and the real CLI."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.native_front import NativeFront, binary

ROOT = Path(__file__).resolve().parents[2]


class ServerProcess:
    """`python -m service.cli` with --log-json on 127.0.0.1, free ports. With `run_delay_ms`,
    every model run takes that much longer (tests/e2e/slow_serve.py); `module` runs another
    launcher of the same flags (tests/e2e/without_onnx.py)."""

    def __init__(self, repo: Path, *extra: str, run_delay_ms: int = 0,
                 module: str = "service.cli") -> None:  # fmt: skip
        main = ["tests.e2e.slow_serve", str(run_delay_ms)] if run_delay_ms else [module]
        cmd = [
            sys.executable, "-m", *main, "--log-json", "--host", "127.0.0.1",
            "--grpc-port", "0", "--metrics-port", "0", "--http-port", "0",
            "--model-repository", str(repo), *extra,
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
        )
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        listening = self.wait_event("listening")
        self.port = int(listening["grpc_port"])
        self.metrics_port = int(listening["metrics_port"])
        self.http_port = int(listening.get("http_port") or -1)

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            with contextlib.suppress(json.JSONDecodeError):
                self.events.put(json.loads(line))

    def wait_event(self, name: str, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {name!r} log line; got:\n{''.join(self.lines)}")
            try:
                event = self.events.get(timeout=remaining)
            except queue.Empty:
                continue
            if event.get("event") == name:
                return event

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.terminate()
        try:
            return self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


@pytest.fixture(scope="module")
def server_process(tiny_repo: Path) -> Iterator[ServerProcess]:
    server = ServerProcess(tiny_repo)
    server.wait_event("ready")
    yield server
    server.stop()


def run_client(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`python -m lstmserve.client_cli ARGS` (the lstm-client console script)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "lstmserve.client_cli", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env,
    )  # fmt: skip


def held_open(first: Iterable[Any]) -> tuple[Callable[[Any], None], AsyncIterator[Any]]:
    """A call's requests, open until the server ends the call: `first`, then each one given to
    the `send` returned beside them."""
    more: asyncio.Queue[Any] = asyncio.Queue()
    for request in first:
        more.put_nowait(request)

    async def requests() -> AsyncIterator[Any]:
        while True:
            yield await more.get()

    return more.put_nowait, requests()


# Opens a call through the front at the address, sets the event once the call is where the
# drain should find it, and appends each reply, then the status, to the list.
Hold = Callable[[str, asyncio.Event, list[object]], Awaitable[None]]


def drain_side_by_side(folder: Path, calls: Sequence[tuple[str, Hold]]) -> list[list[object]]:
    """Each (front, hold) of `calls` through the "python" or "native" front of one lstm-serve
    (--snapshot-key, --drain-grace-s 5), SIGTERM once every call is ready: what each got."""
    binary()
    server = ServerProcess(
        ROOT / "models", "--native-front-dir", str(folder / "sockets"),
        "--snapshot-key", "k1:" + "A" * 44, "--drain-grace-s", "5",
    )  # fmt: skip
    server.wait_event("ready", 60)
    front = NativeFront(folder / "sockets")
    addresses = {"python": server.address, "native": front.address}

    async def main() -> list[list[object]]:
        got: list[list[object]] = [[] for _ in calls]
        ready = [asyncio.Event() for _ in calls]
        work = zip(calls, ready, got, strict=True)
        tasks = [asyncio.create_task(hold(addresses[name], e, g)) for (name, hold), e, g in work]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in ready)), 30)
        server.terminate()
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
        return got

    try:
        return asyncio.run(main())
    finally:
        front.stop()
        server.stop()
