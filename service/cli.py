"""lstm-serve: the server's command line (`python -m service.cli --help`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import tempfile
from collections.abc import Callable, Sequence
from types import FrameType, TracebackType
from typing import IO

from service.config import ServerConfig, config_from_args
from service.drain_deadline import DrainDeadline, pending_work
from service.errors import ConfigError
from service.logs import configure_logging
from service.memory import pin_malloc_thresholds
from service.server import LstmServer, create_server

log = logging.getLogger("service.cli")

# grpc's C-core logs a line of its own ("E... add_port.cc:83] Failed to add port ...") when it
# cannot bind the gRPC port; the ConfigError says the same in one line, so that line is dropped.
GRPC_BIND_LOG = b"add_port.cc"


async def serve(config: ServerConfig) -> int:
    """Run the server until SIGTERM/SIGINT has drained it; 1 if the models failed to load. Once
    told to stop, the process ends by the drain deadline whatever is pending (drain_deadline.py)."""
    app, port = create_server_quietly(config)
    loop = asyncio.get_running_loop()
    deadline = DrainDeadline(config.drain_grace_s, lambda: pending_work(app, loop)).start()
    try:
        await app.start()
    except BaseException:  # e.g. a busy --metrics-port: the gRPC server had already started
        await _abandon(app)
        raise
    if app.native is not None:  # the native front serves the gRPC port (--native-front)
        port = app.native.port
    log.info("listening", extra={"fields": {
        "grpc_port": port, "metrics_port": app.metrics_port, "http_port": app.http_port,
        "host": config.host, "native_front": app.native is not None,
        "model_repository": str(config.model_repository),
        "health_port": app.health_port, "tls": app.tls is not None,
        "auth": config.auth_enabled, "reflection": config.reflection,
    }})  # fmt: skip
    stopping: set[asyncio.Task[None]] = set()  # held here: the loop keeps only weak references
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _handler(app, deadline, loop, stopping))
    loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(app.rescan()))  # re-scan
    try:
        await app.wait_until_loaded()
    except Exception:
        deadline.arm(0.0)
        await app.shutdown(grace_s=0)
        return 1
    await app.wait_for_termination()
    return 0


async def _abandon(app: LstmServer) -> None:
    """Stop what a failed start() had started, quietly: nothing was served yet."""
    await app.grpc.stop(None)
    app.engine.close()


Handler = Callable[[int, FrameType | None], None]


def _handler(
    app: LstmServer, deadline: DrainDeadline, loop: asyncio.AbstractEventLoop,
    stopping: set[asyncio.Task[None]],
) -> Handler:  # fmt: skip
    """SIGTERM / SIGINT: arm the drain deadline at once, then drain on the loop. A plain signal
    handler, not loop.add_signal_handler: the deadline must start even if the loop is stuck."""

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        deadline.arm()  # an attribute write: safe wherever the signal lands
        with contextlib.suppress(RuntimeError):  # the loop is closed: the deadline ends us
            loop.call_soon_threadsafe(_drain, app, signal.Signals(signum), stopping)

    return on_signal


def _drain(app: LstmServer, sig: signal.Signals, stopping: set[asyncio.Task[None]]) -> None:
    log.info("signal", extra={"fields": {"signal": sig.name}})
    task = asyncio.get_running_loop().create_task(app.shutdown())
    stopping.add(task)
    task.add_done_callback(stopping.discard)


def create_server_quietly(config: ServerConfig) -> tuple[LstmServer, int]:
    """create_server, without grpc's own log line for a port it cannot bind; all of grpc's output
    is kept when the user set GRPC_VERBOSITY."""
    if "GRPC_VERBOSITY" in os.environ:
        return create_server(config)
    held = HeldStderr()
    with held:
        try:
            return create_server(config)
        except ConfigError:
            held.drop(GRPC_BIND_LOG)
            raise


class HeldStderr:
    """File descriptor 2 (C code writes there too) held in a temporary file, then written back
    except the lines holding a dropped marker; holds nothing without a temporary file or fd 2."""

    def __init__(self) -> None:
        self._markers: list[bytes] = []
        self._saved: int | None = None
        self._file: IO[bytes] | None = None

    def drop(self, marker: bytes) -> None:
        """Leave out the held lines that contain `marker`."""
        self._markers.append(marker)

    def __enter__(self) -> HeldStderr:
        sys.stderr.flush()
        try:  # no temporary directory or no fd 2: nothing is held
            self._file = tempfile.TemporaryFile()
            self._saved = os.dup(2)
            os.dup2(self._file.fileno(), 2)
        except OSError:
            self._close()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        sys.stderr.flush()
        if self._saved is not None and self._file is not None:
            os.dup2(self._saved, 2)
            self._file.seek(0)
            lines = self._file.read().splitlines(keepends=True)
            _write_fd2(b"".join(ln for ln in lines if not any(m in ln for m in self._markers)))
        self._close()

    def _close(self) -> None:
        if self._saved is not None:
            os.close(self._saved)
            self._saved = None
        if self._file is not None:
            self._file.close()
            self._file = None


def _write_fd2(data: bytes) -> None:
    while data:
        data = data[os.write(2, data) :]


def serve_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `lstm-serve` console script."""
    try:
        config = config_from_args(argv)
    except ConfigError as exc:
        print(f"lstm-serve: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.log_json, config.log_level)
    pin_malloc_thresholds()
    try:
        return asyncio.run(serve(config))
    except ConfigError as exc:
        log.error("configuration error", extra={"fields": {"error": str(exc)}})
        return 2


if __name__ == "__main__":
    sys.exit(serve_main())
