"""--native-front: lstm-serve runs the native front (native/) itself and keeps it running.

The front listens on the public gRPC address (--host, --grpc-port, the same TLS files) and
reaches this server on the Unix sockets of the private directory (service/native_front.py).
It is started once this server's own servers are up, its output goes to this server's log, it
is started again (same port, growing delay up to RESTART_MAX_S) whenever it ends unasked, and
it is stopped only after the drain has pushed its final snapshots through it. It ends by itself
when this process dies, SIGKILL included (`--parent-pid`: the kernel's parent-death signal).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import shutil
import signal
import stat
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from service import metrics
from service.errors import ConfigError

log = logging.getLogger(__name__)

BUILT = Path(__file__).resolve().parents[1] / "native" / "build" / "lstm-serve-front"
DEFAULT_BINARY = "lstm-serve-front"
START_TIMEOUT_S = 30.0  # until the front prints its port
STOP_TIMEOUT_S = 8.0  # the front's own stop gives calls in flight 5 s; then SIGKILL
RESTART_FIRST_S = 0.1
RESTART_MAX_S = 5.0
STEADY_S = 30.0  # a front that ran this long restarts after RESTART_FIRST_S again
TLS_RELOAD_S = 1  # the front reads the TLS files again this often (lstm-serve: on change)
MAX_LINE_BYTES = 8192  # longer output lines are cut (never buffered without bound)


def find_binary(name: str) -> Path:
    """--native-front-bin as a path, else on PATH, else (the default name) the checkout's build;
    a ConfigError naming the flag when none is an executable file."""
    if os.sep in name:
        path = Path(name)
        if path.is_file() and os.access(path, os.X_OK):
            return path
        raise ConfigError(f"--native-front-bin {name!r} is not an executable file")
    found = shutil.which(name)
    if found:
        return Path(found)
    if name == DEFAULT_BINARY and BUILT.is_file() and os.access(BUILT, os.X_OK):
        return BUILT
    where = f" nor at {BUILT}" if name == DEFAULT_BINARY else ""
    raise ConfigError(
        f"--native-front: the native front's binary {name!r} is not on PATH{where}; build it "
        "(`make native`) or name it with --native-front-bin"
    )


# The private temporary directories (without --native-front-dir): TMPDIR/PREFIX<pid>-XXXXXXXX,
# each locked (flock) by the lstm-serve that made it for as long as that process lives, and
# holding OWNER once it is locked. The kernel drops the lock when its process dies, SIGKILL
# included, so a directory whose lock can be taken and which holds OWNER was left by a dead
# lstm-serve: the next one removes it (remove_stale_socket_dirs). Neither pid reuse nor pid
# namespaces (containers sharing a /tmp) can make a live one look dead; the pid in the name is
# only for people.
PREFIX = "lstm-serve-front-"
OWNER = "owner"
_held: dict[str, int] = {}  # the directories this process made -> their locked descriptor


def socket_dir(configured: str) -> tuple[str, bool]:
    """The sockets' directory: --native-front-dir, else a new private temporary one (True:
    this server made it and removes it at the end, remove_socket_dir), after removing those
    that dead lstm-serve processes left behind."""
    if configured:
        return configured, False
    path = ""
    try:
        remove_stale_socket_dirs(Path(tempfile.gettempdir()))
        path = tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-")  # mode 0700
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)  # not inherited by the front
        _held[path] = fd
        fcntl.flock(fd, fcntl.LOCK_EX)  # a scan of another lstm-serve may hold it a moment
        (Path(path) / OWNER).write_text(f"{os.getpid()}\n")
    except OSError as exc:
        if path:
            remove_socket_dir(path)
        raise ConfigError(
            f"--native-front: cannot make a temporary directory for its sockets "
            f"({exc.strerror or exc}); set --native-front-dir"
        ) from None
    return path, True


def remove_socket_dir(path: str) -> None:
    """A temporary directory of socket_dir's removed (its lock let go after)."""
    shutil.rmtree(path, ignore_errors=True)
    fd = _held.pop(path, None)
    if fd is not None:
        os.close(fd)


def remove_stale_socket_dirs(folder: Path) -> list[str]:
    """Remove the socket directories under `folder` that lstm-serve processes which have died
    left behind: this user's, not symbolic links, holding OWNER, their lock free. One being
    made (no OWNER yet) or held by a live process is left alone; so is whatever cannot be read.
    Returns the paths removed (each logged)."""
    removed = []
    try:
        entries = [e for e in os.scandir(folder) if e.name.startswith(PREFIX)]
    except OSError:
        return removed
    for entry in entries:
        if entry.path in _held:
            continue
        try:
            info = entry.stat(follow_symlinks=False)
            if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
                continue
            fd = os.open(entry.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if not os.path.lexists(os.path.join(entry.path, OWNER)):
                continue
            shutil.rmtree(entry.path, ignore_errors=True)
        except OSError:  # BlockingIOError: its lstm-serve lives
            continue
        finally:
            os.close(fd)
        removed.append(entry.path)
        log.info("removed a native front socket directory left by a dead lstm-serve",
                 extra={"fields": {"dir": entry.path}})  # fmt: skip
    return removed


@dataclass(frozen=True)
class FrontOptions:
    """What the front is started with."""

    binary: Path
    host: str
    port: int  # 0: the front picks one, kept for its restarts
    folder: Path
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    remove_folder: bool = False  # a temporary directory made for it


class NativeFrontProcess:
    """The supervised front: start() once, then restarted until stop()."""

    def __init__(self, options: FrontOptions,
                 on_up: Callable[[bool], None] = lambda up: None) -> None:  # fmt: skip
        self.options = options
        self.port = options.port  # the public port, known once started
        self.up = False  # listening on the port (False from an unasked end to the next start)
        self._on_up = on_up  # told each time `up` changes (lstm-serve's readiness follows)
        self.restarts = 0
        self._proc: asyncio.subprocess.Process | None = None
        self._stopping = False
        self._supervisor: asyncio.Task[None] | None = None
        self._readers: set[asyncio.Task[None]] = set()
        self._stderr_tail: deque[str] = deque(maxlen=3)  # for the message of a failed start
        self._running: metrics.ProcessId | None = None  # the front's process while it runs

    def running(self) -> metrics.ProcessId | None:
        """The front's process while it runs (its figures in /metrics), None while it is down."""
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return None
        return self._running

    def argv(self) -> list[str]:
        o = self.options
        argv = [str(o.binary), "--listen", f"{o.host}:{self.port}", "--dir", str(o.folder),
                "--parent-pid", str(os.getpid())]  # fmt: skip
        if o.tls_cert:
            argv += ["--tls-cert", o.tls_cert, "--tls-key", o.tls_key,
                     "--tls-reload-s", str(TLS_RELOAD_S)]  # fmt: skip
        if o.tls_client_ca:
            argv += ["--tls-client-ca", o.tls_client_ca]
        return argv

    async def start(self) -> int:
        """Start the front and wait for its port; a front that cannot start is a ConfigError
        (its own message: a busy port, unreadable TLS files)."""
        try:
            await self._launch()
        except _StartFailed as exc:
            self._remove_folder()
            raise ConfigError(f"--native-front: {exc}") from None
        self._supervisor = asyncio.create_task(self._supervise(), name="native-front")
        metrics.FRONT_PROCESS.track(self.running)
        return self.port

    async def _launch(self) -> None:
        """One start: the process, its first line (the port), then its output to the log."""
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.argv(), stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, limit=MAX_LINE_BYTES,
                start_new_session=True,  # a terminal's Ctrl-C is for lstm-serve: it drains first
            )  # fmt: skip
        except OSError as exc:  # the binary gone or not executable any more, no memory, ...
            raise _StartFailed(f"cannot run {self.options.binary}: {exc}") from None
        assert proc.stdout is not None and proc.stderr is not None
        self._proc = proc
        self._running = metrics.process_id(proc.pid)  # its start time: a reused pid is not it
        self._read(proc.stderr, self._stderr_line)
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), START_TIMEOUT_S)
            port = int(json.loads(line)["port"])
        except (TimeoutError, ValueError, KeyError, TypeError):
            await self._kill(proc)
            if self._readers:  # its last words, for the message
                await asyncio.wait(set(self._readers), timeout=1.0)
            said = " / ".join(self._stderr_tail) or "nothing on stderr"
            raise _StartFailed(
                f"{self.options.binary} did not start on {self.options.host}:{self.port} "
                f"(exit status {proc.returncode}): {said}"
            ) from None
        self.port = port
        self._read(proc.stdout, self._stdout_line)
        metrics.NATIVE_FRONT_UP.set(1)
        self.up = True
        self._on_up(True)
        log.info("native front started", extra={"fields": {
            "pid": proc.pid, "port": port, "dir": str(self.options.folder),
            "tls": bool(self.options.tls_cert),
        }})  # fmt: skip

    async def _supervise(self) -> None:
        """Wait for the front to end; unless asked to stop, start it again after a delay that
        doubles up to RESTART_MAX_S (back to RESTART_FIRST_S once a front ran STEADY_S)."""
        delay = RESTART_FIRST_S
        while not self._stopping:
            started = time.monotonic()
            assert self._proc is not None
            code = await self._proc.wait()
            if self._stopping:
                return
            metrics.NATIVE_FRONT_UP.set(0)
            self.up = False
            self._on_up(False)
            metrics.NATIVE_FRONT_RESTARTS.inc()
            self.restarts += 1
            if time.monotonic() - started >= STEADY_S:
                delay = RESTART_FIRST_S
            log.error("native front ended; starting it again", extra={"fields": {
                "exit_status": code, "restart_in_s": delay, "restarts": self.restarts,
            }})  # fmt: skip
            await asyncio.sleep(delay)
            delay = min(delay * 2, RESTART_MAX_S)
            try:
                if not self._stopping:
                    await self._launch()
            except _StartFailed as exc:  # the loop counts it, waits and tries again
                log.error("native front did not start", extra={"fields": {"error": str(exc)}})

    async def stop(self) -> None:
        """SIGTERM the front (calls in flight get 5 s), SIGKILL after STOP_TIMEOUT_S; then its
        output's last lines, and the temporary directory removed."""
        self._stopping = True
        if self._supervisor is not None:
            self._supervisor.cancel()
        proc = self._proc
        if proc is not None and proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)
            except TimeoutError:
                log.warning("native front did not stop in time: killed",
                            extra={"fields": {"timeout_s": STOP_TIMEOUT_S}})  # fmt: skip
                await self._kill(proc)
        if self._readers:
            await asyncio.wait(set(self._readers), timeout=1.0)
        for task in self._readers:
            task.cancel()
        self._remove_folder()
        log.info("native front stopped", extra={"fields": {
            "exit_status": proc.returncode if proc is not None else None,
        }})  # fmt: skip

    async def _kill(self, proc: asyncio.subprocess.Process) -> None:
        """SIGKILL; wait() also waits for its pipes to close, which a process it left behind
        could hold: bounded."""
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), 2.0)

    def _remove_folder(self) -> None:
        if self.options.remove_folder:
            remove_socket_dir(str(self.options.folder))

    def _read(self, stream: asyncio.StreamReader, on_line: _LineHandler) -> None:
        task = asyncio.create_task(_forward(stream, on_line))
        self._readers.add(task)
        task.add_done_callback(self._readers.discard)

    def _stderr_line(self, line: str) -> None:
        self._stderr_tail.append(line[:500])
        log.warning("native front", extra={"fields": {"stderr": line}})

    def _stdout_line(self, line: str) -> None:
        try:
            event = json.loads(line)
        except ValueError:
            event = None
        if isinstance(event, dict) and event.get("event") == "stopped":
            fields = {k: v for k, v in event.items() if k != "event"}
            log.info("native front exiting", extra={"fields": fields})
        else:
            log.info("native front", extra={"fields": {"stdout": line}})


_LineHandler = Callable[[str], None]


class _StartFailed(Exception):
    """The front ended (or said nothing) before printing its port."""


async def _forward(stream: asyncio.StreamReader, on_line: _LineHandler) -> None:
    """Each line of the front's output to `on_line` until it closes; a line longer than
    MAX_LINE_BYTES is cut there (the rest of it dropped)."""
    while True:
        try:
            raw = await stream.readuntil(b"\n")
        except asyncio.IncompleteReadError as exc:  # the end: a last line without newline
            if exc.partial.strip():
                on_line(exc.partial.decode(errors="replace").rstrip())
            return
        except asyncio.LimitOverrunError as exc:  # the buffer holds up to ~2x the limit
            raw = await stream.readexactly(exc.consumed)
            on_line(raw[:MAX_LINE_BYTES].decode(errors="replace").rstrip() + " [cut]")
            await _skip_line(stream)
            continue
        line = raw.decode(errors="replace").rstrip()
        if line:
            on_line(line)


async def _skip_line(stream: asyncio.StreamReader) -> None:
    """Drop the rest of an over-long line, in bounded reads."""
    while True:
        try:
            await stream.readuntil(b"\n")
            return
        except asyncio.IncompleteReadError:
            return
        except asyncio.LimitOverrunError as exc:
            await stream.readexactly(exc.consumed)
