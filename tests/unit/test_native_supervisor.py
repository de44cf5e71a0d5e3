"""service/native_supervisor.py with stand-in fronts (shell scripts that print the front's first
line): the flag and its variable, finding the binary, restarts with a doubling delay that stops
growing, a front deaf to SIGTERM killed, its output forwarded in bounded lines."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from pathlib import Path

import pytest

from service import metrics, native_supervisor
from service.config import config_from_args
from service.errors import ConfigError
from service.native_supervisor import FrontOptions, NativeFrontProcess

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
    finally:
        os.rmdir(path)
    assert native_supervisor.socket_dir("/run/x") == ("/run/x", False)


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
