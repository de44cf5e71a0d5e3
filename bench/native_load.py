"""The native load generator (native/build/lstm-serve-load, `make native`) in bench.load's place.

`drive_native` runs the same load as `bench.load.drive` (modes `stream` and `echo`: S sessions,
k steps per message, ping-pong, SESSIONS_PER_CHANNEL streams per channel, warm-up then the
window, `on_window("start"/"end")` at the window's edges) from a C++ process that costs a few µs
of CPU per message instead of ~45, so that on a 2-core machine the client no longer caps the
system it measures. `verify_exact` compares the replies of its sampled sessions with offline
onnxruntime on the same token ids: every reply must be exact (0.0 difference).
"""

from __future__ import annotations

import asyncio
import base64
import json
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.load import SESSIONS_PER_CHANNEL, Load

LOAD_BINARY = Path(__file__).resolve().parent.parent / "native" / "build" / "lstm-serve-load"
MAX_MESSAGES = 5_000_000  # in all, whatever the window
SAMPLE_SESSIONS = 32
OPEN_MARGIN_S = 60.0  # for opening every stream before the warm-up starts


@dataclass(frozen=True)
class SampledSession:
    """Every token id one session sent and every reply's probabilities, in order."""

    session: int
    version: int  # the model version its `opened` reply named
    tokens: np.ndarray  # (messages * k,) int64
    probabilities: np.ndarray  # (replies, C) float32


@dataclass
class NativeWindow:
    """What the load generator measured in the window (bench.load.Window's rule), and its CPU."""

    completed: int  # messages answered in the window
    seconds: float  # the window's length
    p50_ms: float
    p95_ms: float
    p99_ms: float
    client_cpu_s: float  # the load generator's user + system CPU seconds in the window
    sent: int
    channels: int
    threads: int
    sample: list[SampledSession] = field(default_factory=list)


def built() -> bool:
    return LOAD_BINARY.is_file()


def load_argv(
    load: Load, address: str, model: str, vocab: int, warmup_s: float, seconds: float,
    seed: int = 0, threads: int = 1, sample: int = SAMPLE_SESSIONS, text: bool = False,
) -> list[str]:  # fmt: skip
    """The command line of one point (bench.load's modes `stream` and `echo` only); `text`:
    each chunk `steps` random characters (a model with a character tokenizer; `sample` 0)."""
    if load.mode not in ("stream", "echo") or load.streams != load.sessions:
        raise ValueError(f"the native load generator runs stream and echo loads, not {load}")
    argv = [
        str(LOAD_BINARY), "--address", address, "--mode", load.mode, "--model", model,
        "--sessions", str(load.sessions), "--steps", str(load.steps),
        "--per-channel", str(SESSIONS_PER_CHANNEL), "--warmup", str(warmup_s),
        "--seconds", str(seconds), "--vocab", str(vocab), "--seed", str(seed),
        "--sample", str(sample), "--threads", str(threads),
        "--max-seconds", str(warmup_s + seconds + OPEN_MARGIN_S),
        "--max-messages", str(MAX_MESSAGES),
    ]  # fmt: skip
    if load.mode == "echo":
        request, reply = load.echo_sizes
        argv += ["--request-bytes", str(request), "--reply-bytes", str(reply)]
    if text:
        argv += ["--text", "1"]
    return argv


async def drive_native(
    load: Load, address: str, model: str, vocab: int, warmup_s: float, seconds: float,
    on_window: Callable[[str], Awaitable[None]], seed: int = 0, threads: int = 1,
    sample: int = SAMPLE_SESSIONS, text: bool = False,
) -> NativeWindow:  # fmt: skip
    """`bench.load.drive` with the native load generator as a subprocess, bounded by a timeout;
    RuntimeError if it reported an error (with the count and the first) or did not finish."""
    argv = load_argv(load, address, model, vocab, warmup_s, seconds, seed, threads, sample, text)
    timeout_s = warmup_s + seconds + OPEN_MARGIN_S + 15
    with tempfile.TemporaryFile() as stderr:  # gRPC's own log lines, whatever their volume
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=stderr, limit=1 << 30
        )
        try:
            result = await asyncio.wait_for(_follow(proc, on_window), timeout_s)
            await asyncio.wait_for(proc.wait(), 15)
        except TimeoutError as exc:
            raise RuntimeError(f"the native load generator ran past {timeout_s:.0f} s") from exc
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        if result is None:
            stderr.seek(0)
            err = stderr.read().decode(errors="replace")[-2000:]
            raise RuntimeError(f"the native load generator exited {proc.returncode}: {err}")
    if result["errors"]:
        raise RuntimeError(
            f"native load: {result['errors']} errors, first: {result['first_error']}"
        )
    return _window(result)


async def _follow(
    proc: asyncio.subprocess.Process, on_window: Callable[[str], Awaitable[None]]
) -> dict[str, Any] | None:
    """Call `on_window` at each edge the process reports; its result line (None: none)."""
    assert proc.stdout is not None
    async for line in proc.stdout:
        event = json.loads(line)
        if event["event"] in ("start", "end"):
            await on_window(event["event"])
        elif event["event"] == "result":
            return dict(event)
    return None


def _window(result: dict[str, Any]) -> NativeWindow:
    nan = float("nan")
    sample = [
        SampledSession(
            session=s["session"], version=s["version"],
            tokens=np.asarray(s["tokens"], dtype=np.int64),
            probabilities=np.frombuffer(base64.b64decode(s["probabilities"]), dtype="<f4")
            .reshape(-1, max(1, s["classes"])),
        )
        for s in result["sample"]
    ]  # fmt: skip
    return NativeWindow(
        completed=int(result["completed"]), seconds=float(result["window_s"]),
        p50_ms=result["p50_ms"] if result["p50_ms"] is not None else nan,
        p95_ms=result["p95_ms"] if result["p95_ms"] is not None else nan,
        p99_ms=result["p99_ms"] if result["p99_ms"] is not None else nan,
        client_cpu_s=float(result["cpu_s"]), sent=int(result["sent"]),
        channels=int(result["channels"]), threads=int(result["threads"]), sample=sample,
    )  # fmt: skip


def verify_exact(
    sample: list[SampledSession], repo: Path, model: str, steps: int
) -> dict[str, Any]:
    """Every sampled reply against offline onnxruntime (repo/model/VERSION/model.onnx, the
    version each session opened) on the session's whole token sequence from a zero state:
    reply j is the probabilities after step j * k."""
    import onnxruntime as ort

    sessions: dict[int, Any] = {}
    out = {"sessions": 0, "replies": 0, "mismatched": 0, "max_abs_diff": 0.0}
    for s in sample:
        replies = len(s.probabilities)
        if replies == 0:
            continue
        if s.version not in sessions:
            path = repo / model / str(s.version) / "model.onnx"
            sessions[s.version] = ort.InferenceSession(
                str(path), providers=["CPUExecutionProvider"]
            )
        sess = sessions[s.version]
        state_shape = {i.name: i for i in sess.get_inputs()}["state"].shape[1:]
        if len(s.tokens) < replies * steps:
            raise ValueError(f"session {s.session}: {replies} replies to {len(s.tokens)} tokens")
        tokens = s.tokens[: replies * steps]
        feeds = {
            "tokens": tokens[None], "lengths": np.array([len(tokens)], dtype=np.int64),
            "state": np.zeros((1, *state_shape), dtype=np.float32),
        }  # fmt: skip
        step_probs = sess.run(None, feeds)[0][0]  # (T, C)
        want = step_probs[np.arange(1, replies + 1) * steps - 1]  # (replies, C)
        diff = np.abs(s.probabilities - want).max(axis=1)
        out["sessions"] += 1
        out["replies"] += replies
        out["mismatched"] += int((diff != 0.0).sum())
        out["max_abs_diff"] = max(out["max_abs_diff"], float(diff.max()))
    return out
