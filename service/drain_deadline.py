"""The drain deadline: a server told to stop exits by --drain-grace-s + EXIT_MARGIN_S, whatever
is still pending.

A daemon thread, started with the server, watches a deadline that a signal handler arms (a plain
attribute write: safe in a handler, no lock). It does not depend on the event loop: a loop that
is stuck or idle forever, a step of the stop that never returns, executor threads that do not
end, all end with the process. On expiry it logs what it abandons (one WARNING, "drain deadline
passed") and calls os._exit(EXIT_STATUS); the log line gets LOG_WAIT_S (stderr may be blocked).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service.server import LstmServer

log = logging.getLogger(__name__)

EXIT_MARGIN_S = 4.0  # after the drain grace: the stop's own steps, then the interpreter's exit
EXIT_STATUS = 3  # the deadline passed: work was abandoned (0: drained, 1: load failed, 2: config)
LOG_WAIT_S = 1.0  # the abandoned-work line may take this long to write, then the process exits
POLL_S = 0.25  # how often the thread looks at the deadline (its precision)
MAX_LABELS = 12  # task kinds named in the log line (the rest counted as "<other>")


class DrainDeadline:
    """Exits the process `grace_s + EXIT_MARGIN_S` after `arm()`; `report()` says what is left."""

    def __init__(
        self, grace_s: float, report: Callable[[], dict[str, Any]],
        exit: Callable[[int], Any] = os._exit, margin_s: float = EXIT_MARGIN_S,
    ) -> None:  # fmt: skip
        self.grace_s = grace_s
        self.margin_s = margin_s
        self._report = report
        self._exit = exit
        self._deadline: float | None = None  # monotonic; written once, by arm()
        self._thread = threading.Thread(target=self._watch, name="drain-deadline", daemon=True)

    def start(self) -> DrainDeadline:
        self._thread.start()
        return self

    def arm(self, grace_s: float | None = None) -> None:
        """Start the countdown (signal-safe; the first call wins)."""
        if self._deadline is None:
            grace = self.grace_s if grace_s is None else grace_s
            self._deadline = time.monotonic() + grace + self.margin_s

    @property
    def armed(self) -> bool:
        return self._deadline is not None

    def _watch(self) -> None:
        while self._deadline is None or time.monotonic() < self._deadline:
            time.sleep(POLL_S)
        writer = threading.Thread(target=self._log_abandoned, name="drain-deadline-log",
                                  daemon=True)  # fmt: skip
        writer.start()
        writer.join(LOG_WAIT_S)
        self._exit(EXIT_STATUS)

    def _log_abandoned(self) -> None:
        fields: dict[str, Any] = {"exit_status": EXIT_STATUS, "grace_s": self.grace_s,
                                  "margin_s": self.margin_s}  # fmt: skip
        try:
            fields.update(self._report())
        except Exception as exc:  # the report is best effort: the exit is not
            fields["report_error"] = repr(exc)[:200]
        log.warning("drain deadline passed: exiting, abandoning what is still pending",
                    extra={"fields": fields})  # fmt: skip
        with contextlib.suppress(Exception):
            sys.stderr.flush()


def pending_work(app: LstmServer, loop: asyncio.AbstractEventLoop) -> dict[str, Any]:
    """What a stop that overran leaves behind, read from another thread: the stop's step, the
    engine's chunks, the store's held-back ends, the loop's tasks (streams, store operations),
    the threads still running and where the main thread is."""
    backend = app.engine.continuity.backend
    tasks = _tasks(loop)
    return {
        "stage": app.shutdown_stage or "not started (the event loop never ran the drain)",
        "inflight_chunks": app.engine.inflight,
        "store_ends_pending": backend.pending_ends if backend is not None else 0,
        "streams": tasks.pop("stream", 0),
        "store_operations": tasks.pop("store", 0),
        "tasks": dict(tasks),
        "threads": sorted(t.name for t in threading.enumerate()
                          if not t.daemon and t is not threading.main_thread()),
        "main_thread": _main_thread_at(),
    }  # fmt: skip


def _tasks(loop: asyncio.AbstractEventLoop) -> Counter[str]:
    """The loop's pending tasks by kind: "store" (in a Redis call), "stream" (a streaming RPC),
    else the task's name or its coroutine's."""
    kinds: Counter[str] = Counter()
    for task in asyncio.all_tasks(loop):
        kinds[_kind(task)] += 1
    if len(kinds) > MAX_LABELS:
        kept = Counter(dict(kinds.most_common(MAX_LABELS)))
        kept["<other>"] = sum(kinds.values()) - sum(kept.values())
        return kept
    return kinds


def _kind(task: asyncio.Task[Any]) -> str:
    files = [frame.f_code.co_filename for frame in task.get_stack()]
    if any("redis" in name for name in files):
        return "store"
    coro = getattr(task.get_coro(), "__qualname__", "?")
    if "stream" in coro.lower() or any("protocol/stream" in name for name in files):
        return "stream"
    name = task.get_name()
    return coro if name.startswith("Task-") else name


def _main_thread_at() -> list[str]:
    """The main thread's innermost frames, "file:line function" (a stuck loop shows where)."""
    frame = sys._current_frames().get(threading.main_thread().ident or -1)
    where: list[str] = []
    while frame is not None and len(where) < 3:
        code = frame.f_code
        where.append(f"{os.path.basename(code.co_filename)}:{frame.f_lineno} {code.co_name}")
        frame = frame.f_back
    return where
