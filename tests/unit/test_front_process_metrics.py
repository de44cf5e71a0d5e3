"""The supervised native front's process figures (service.metrics.FrontProcessFigures), read
from /proc of a real process at each scrape: present while it runs, absent once it ended (gone,
or its pid taken by another process), absent before anything is tracked; and the streams held
for native fronts summed over every tracked ticks server."""

from __future__ import annotations

import os
import subprocess
import sys

from prometheus_client import generate_latest
from prometheus_client.registry import CollectorRegistry

from service import metrics
from service.metrics import FrontProcessFigures, ProcessId

SERIES = (
    "lstm_serve_native_front_cpu_seconds_total",
    "lstm_serve_native_front_resident_memory_bytes",
    "lstm_serve_native_front_threads",
    "lstm_serve_native_front_open_fds",
)


def scraped(registry: CollectorRegistry) -> dict[str, float]:
    lines = generate_latest(registry).decode().splitlines()
    return {ln.split()[0]: float(ln.split()[1]) for ln in lines if ln and not ln.startswith("#")}


def test_figures_of_a_running_process_then_none_once_it_ended() -> None:
    registry = CollectorRegistry()
    figures = FrontProcessFigures(registry)
    assert scraped(registry) == {}  # nothing tracked: not even registered
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == b"up\n"  # started
        which = metrics.process_id(child.pid)
        assert which is not None
        current: list[ProcessId | None] = [which]
        figures.track(lambda: current[0])
        running = scraped(registry)
        assert set(running) == set(SERIES)
        assert running["lstm_serve_native_front_resident_memory_bytes"] > 1 << 20  # Python
        assert running["lstm_serve_native_front_threads"] == 1.0
        assert running["lstm_serve_native_front_open_fds"] >= 3
        # Another process that had the same pid (a different start time) is not it.
        current[0] = ProcessId(child.pid, which.start_ticks + 1)
        assert scraped(registry) == {}
        current[0] = which
        child.kill()
        child.wait()
        assert scraped(registry) == {}  # gone: nothing, and no exception in the scrape
    finally:
        child.kill()
        child.wait()


def test_a_zombie_is_not_running() -> None:
    registry = CollectorRegistry()
    child = subprocess.Popen(["sleep", "60"])
    try:
        which = metrics.process_id(child.pid)
        assert which is not None
        FrontProcessFigures(registry).track(lambda: which)
        assert set(scraped(registry)) == set(SERIES)
        child.kill()
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # dead, not reaped: a zombie
        assert scraped(registry) == {}
    finally:
        child.kill()
        child.wait()


class Held:
    def __init__(self, n: int) -> None:
        self.n = n

    def streams_held(self) -> int:
        return self.n


def test_streams_held_sum_every_tracked_server() -> None:
    registry = CollectorRegistry()
    gauge = metrics.Gauge("held", "streams", registry=registry)
    held = metrics.NativeStreamsHeld(gauge)
    a, b = Held(3), Held(4)
    held.track(a)
    held.track(b)
    assert scraped(registry)["held"] == 7.0
    del b  # a server gone (a test's, or a stopped one) no longer counts
    assert scraped(registry)["held"] == 3.0
