"""The compute ceiling: raw onnxruntime steps/s of a model at a batch size and chunk length, and
an int8 copy's against its float32 source (`lstm-export quantize --bench-seconds`; the
benchmarks' `python -m bench.ceiling` runs the same measurement)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

REPEATS = 3
# (batch, steps per call): one session stepping one at a time, and a batched chunk.
RATIO_POINTS = ((1, 1), (1, 16), (64, 16))


def compute_ceiling(
    path: Path,
    batch: int,
    steps: int,
    intra_op_threads: int,
    seconds: float,
    max_runs: int = 100_000,
) -> dict[str, float]:
    """Back-to-back runs of (batch, steps) token chunks with states fed back: steps/s, ms/run
    (the best of REPEATS windows)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = intra_op_threads
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    first, _, state_in = session.get_inputs()
    shape = state_in.shape  # state (B, S, H)
    rng = np.random.default_rng(0)
    if first.name == "tokens":
        x = rng.integers(1, 28, size=(batch, steps)).astype(np.int64)  # (B, T)
    else:  # features (B, T, F)
        x = rng.normal(size=(batch, steps, first.shape[2])).astype(np.float32)
    lengths = np.full(batch, steps, dtype=np.int64)  # (B,)
    state = np.zeros((batch, shape[1], shape[2]), dtype=np.float32)  # (B, S, H)
    feeds = {first.name: x, "lengths": lengths, "state": state}
    for _ in range(3):  # warm-up
        feeds["state"] = session.run(None, feeds)[2]
    best = 0.0
    for _ in range(REPEATS):  # best of a few windows: other processes only ever slow it down
        runs, started = 0, time.perf_counter()
        deadline = started + seconds / REPEATS
        while runs < max_runs and (runs < 2 or time.perf_counter() < deadline):
            feeds["state"] = session.run(None, feeds)[2]
            runs += 1
        best = max(best, runs / (time.perf_counter() - started))
    return {"steps_per_s": best * batch * steps, "ms_per_run": 1000 / best}


def model_file(path: Path) -> Path:
    """A model folder (NAME/VERSION) or a model.onnx."""
    return path / "model.onnx" if path.is_dir() else path


def ceiling_ratio(
    fp32: Path, int8: Path, seconds: float = 2.0,
    points: tuple[tuple[int, int], ...] = RATIO_POINTS, threads: int = 1, rounds: int = 3,
) -> list[dict[str, Any]]:  # fmt: skip
    """The single-thread compute ceiling of a float32 model and its int8 copy at each (batch,
    steps) point: `rounds` alternations of the two (so a drift in the machine's load hits both
    alike), `seconds` per model and point in all, the best of each; int8 / float32."""
    rows = []
    for batch, steps in points:
        best = {"fp32": 0.0, "int8": 0.0}
        for _ in range(rounds):
            for key, path in (("fp32", fp32), ("int8", int8)):
                got = compute_ceiling(model_file(path), batch, steps, threads, seconds / rounds)
                best[key] = max(best[key], got["steps_per_s"])
        rows.append({
            "batch": batch, "steps": steps, "threads": threads,
            "float32_steps_per_s": best["fp32"], "int8_steps_per_s": best["int8"],
            "ratio": best["int8"] / best["fp32"],
        })  # fmt: skip
    return rows


def ceiling_table(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown rows of ceiling_ratio's figures."""
    table = [
        "| batch | steps | threads | float32 steps/s | int8 steps/s | int8 / float32 |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        table.append(
            f"| {r['batch']} | {r['steps']} | {r['threads']} | {r['float32_steps_per_s']:,.0f} "
            f"| {r['int8_steps_per_s']:,.0f} | {r['ratio']:.2f}x |"
        )
    return table
