"""service/native_supervisor.py with stand-in fronts (shell scripts that print the front's first
line): the flag and its variable, finding the binary, restarts with a doubling delay that stops
growing, a front deaf to SIGTERM killed, its output forwarded in bounded lines."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from service import metrics, native_supervisor
from service.config import config_from_args
from service.errors import ConfigError
from service.native_supervisor import FrontOptions, NativeFrontProcess

ROOT = Path(__file__).resolve().parents[2]
LISTENING = 'echo \'{"event": "listening", "port": 4321, "dir": "x"}\''


def script(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "front.sh"
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return path


def process(binary: Path, tmp_path: Path) -> NativeFrontProcess:
    return NativeFrontProcess(FrontOptions(binary, "127.0.0.1", 0, tmp_path))


def test_the_flag_and_its_variable() -> None:
    assert config_from_args([]).native_front is False
    assert config_from_args([], environ={"LSTM_SERVE_NATIVE_FRONT": "true"}).native_front
    config = config_from_args(["--native-front", "--native-front-bin", "/opt/front"])
    assert config.native_front and config.native_front_bin == "/opt/front"
    with pytest.raises(ConfigError, match="--native-front-bin is empty"):
        config_from_args(["--native-front", "--native-front-bin", " "])


def test_the_binary_is_a_path_a_name_on_path_or_the_checkouts_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    front = script(tmp_path, "exit 0")
    assert native_supervisor.find_binary(str(front)) == front
    monkeypatch.setenv("PATH", str(tmp_path))
    assert native_supervisor.find_binary("front.sh") == front
    with pytest.raises(ConfigError, match=r"--native-front-bin '/nope/front' is not an exec"):
        native_supervisor.find_binary("/nope/front")
    monkeypatch.setattr(native_supervisor, "BUILT", tmp_path / "not-built")
    with pytest.raises(ConfigError, match=r"not on PATH nor at .*not-built.*--native-front-bin"):
        native_supervisor.find_binary("lstm-serve-front")


def test_the_temporary_socket_directory_is_private() -> None:
    path, temporary = native_supervisor.socket_dir("")
    try:
        assert temporary and Path(path).stat().st_mode & 0o777 == 0o700
        assert Path(path).name.startswith(f"{native_supervisor.PREFIX}{os.getpid()}-")
    finally:
        native_supervisor.remove_socket_dir(path)
    assert not Path(path).exists()
    assert native_supervisor.socket_dir("/run/x") == ("/run/x", False)


HOLDER = """
import time
from service import native_supervisor
path, _ = native_supervisor.socket_dir("")
print(path, flush=True)
time.sleep(120)
"""


def holder(tmp_path: Path) -> tuple[subprocess.Popen[bytes], Path]:
    """A real process that made its socket directory under tmp_path (TMPDIR) and holds it."""
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-c", HOLDER], stdout=subprocess.PIPE, env=env)
    assert child.stdout is not None
    return child, Path(child.stdout.readline().decode().strip())


def test_directories_left_by_dead_processes_are_removed_live_ones_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SIGKILLed holder's directory is removed by the next socket_dir(); a live holder's, one
    still being made (no owner file), a symbolic link and a plain file of the same prefix are
    left alone."""
    killed, stale = holder(tmp_path)
    live, kept = holder(tmp_path)
    try:
        killed.kill()
        killed.wait()
        assert stale.is_dir() and (stale / native_supervisor.OWNER).read_text() == f"{killed.pid}\n"
        prefix = native_supervisor.PREFIX
        making = tmp_path / f"{prefix}1-making"
        making.mkdir(mode=0o700)
        target = tmp_path / "target"
        target.mkdir()
        (target / native_supervisor.OWNER).write_text("1\n")
        (tmp_path / f"{prefix}2-link").symlink_to(target)
        (tmp_path / f"{prefix}3-file").write_text("")
        monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
        path, _ = native_supervisor.socket_dir("")
        try:
            left = sorted(p.name for p in tmp_path.iterdir())
            assert not stale.exists() and kept.is_dir() and making.is_dir()
            assert (target / native_supervisor.OWNER).exists()
            assert left == sorted([kept.name, making.name, "target", f"{prefix}2-link",
                                   f"{prefix}3-file", Path(path).name])  # fmt: skip
            # The live holder's lock also keeps its directory from this process's next scan.
            assert native_supervisor.remove_stale_socket_dirs(tmp_path) == []
        finally:
            native_supervisor.remove_socket_dir(path)
        live.kill()
        live.wait()
        assert native_supervisor.remove_stale_socket_dirs(tmp_path) == [str(kept)]
        assert making.is_dir()  # never judged: it could be a live process's, being made
    finally:
        for child in (killed, live):
            child.kill()
            child.wait()


def test_a_front_that_ends_is_started_again_with_a_doubling_bounded_delay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(native_supervisor, "RESTART_FIRST_S", 0.02)
    monkeypatch.setattr(native_supervisor, "RESTART_MAX_S", 0.08)
    front = process(script(tmp_path, f"{LISTENING}; exit 3"), tmp_path)
    delays: list[float] = []
    sleep = asyncio.sleep

    async def recorded(delay: float, *args: object) -> None:
        if sys._getframe(1).f_code.co_name == "_supervise":  # asyncio's own sleeps are not
            delays.append(delay)
        await sleep(delay, *args)

    monkeypatch.setattr(native_supervisor.asyncio, "sleep", recorded)
    before = metrics.NATIVE_FRONT_RESTARTS._value.get()

    async def main() -> None:
        assert await front.start() == 4321
        deadline = time.monotonic() + 20
        while front.restarts < 5 and time.monotonic() < deadline:
            await sleep(0.01)
        await front.stop()

    asyncio.run(main())
    assert delays[:5] == [0.02, 0.04, 0.08, 0.08, 0.08]
    assert metrics.NATIVE_FRONT_RESTARTS._value.get() - before == front.restarts >= 5


def test_a_front_that_cannot_start_again_is_logged_and_tried_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(native_supervisor, "RESTART_FIRST_S", 0.01)
    marker = tmp_path / "started-once"
    body = f"[ -e {marker} ] && {{ echo 'cannot listen' >&2; exit 1; }}; touch {marker}"
    front = process(script(tmp_path, f"{body}; {LISTENING}; exit 3"), tmp_path)

    async def main() -> None:
        await front.start()
        deadline = time.monotonic() + 20
        while front.restarts < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await front.stop()

    with caplog.at_level(logging.INFO, logger="service.native_supervisor"):
        asyncio.run(main())
    failed = [r for r in caplog.records if r.getMessage() == "native front did not start"]
    assert front.restarts >= 3 and len(failed) >= 2
    assert "cannot listen" in failed[0].fields["error"]


def test_a_front_that_cannot_start_is_a_configuration_error_with_its_words(
    tmp_path: Path,
) -> None:
    front = process(script(tmp_path, "echo 'cannot listen on 127.0.0.1:0' >&2; exit 1"), tmp_path)
    with pytest.raises(
        ConfigError, match=r"did not start on 127.0.0.1:0 \(exit status .*\): cannot listen"
    ):
        asyncio.run(front.start())


def test_a_front_deaf_to_sigterm_is_killed_after_the_stop_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(native_supervisor, "STOP_TIMEOUT_S", 0.3)
    front = process(script(tmp_path, f"trap '' TERM; {LISTENING}; exec sleep 30"), tmp_path)

    async def main() -> float:
        await front.start()
        started = time.monotonic()
        await front.stop()
        return time.monotonic() - started

    assert asyncio.run(main()) < 5
    assert front._proc is not None and front._proc.returncode == -9


def test_output_is_forwarded_in_bounded_lines(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    long = native_supervisor.MAX_LINE_BYTES * 3
    body = f"{LISTENING}; head -c {long} /dev/zero | tr '\\000' x >&2; echo >&2; echo bye >&2"
    front = process(script(tmp_path, f"{body}; exec sleep 30"), tmp_path)

    def lines() -> list[str]:
        return [r.fields["stderr"] for r in caplog.records if "stderr" in getattr(r, "fields", {})]

    async def main() -> None:
        await front.start()
        deadline = time.monotonic() + 10
        while "bye" not in lines() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await front.stop()

    with caplog.at_level(logging.INFO, logger="service.native_supervisor"):
        asyncio.run(main())
    lines = lines()
    assert lines[0] == "x" * native_supervisor.MAX_LINE_BYTES + " [cut]"
    assert lines[-1] == "bye" and len(lines) == 2
