"""The per-chunk path's batch-at-a-time pieces: BulkHistogram exposes what prometheus_client's
Histogram would, runs without per-step outputs give the same answer, a lone chunk and state row
take the short way."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from service.engine.compute.state import HostStateSlab
from service.engine.schedule.batcher import pad_chunks
from service.metrics import LATENCY_BUCKETS, BulkHistogram
from tests.unit.engines import load_worker


def _samples(registry: CollectorRegistry) -> list[str]:
    """The exposition lines of `registry` but _created (prometheus_client's own timestamp)."""
    text = generate_latest(registry).decode()
    return [line for line in text.splitlines() if line and "_created" not in line]


values = st.lists(
    st.floats(min_value=0.0, max_value=20.0, allow_nan=False) | st.sampled_from(LATENCY_BUCKETS),
    max_size=60,
)


@settings(max_examples=60, deadline=None)
@given(batches=st.lists(values, max_size=5), singles=values)
def test_bulk_histogram_exposes_what_a_histogram_would(
    batches: list[list[float]], singles: list[float]
) -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    bulk = BulkHistogram("t_seconds", "doc", ["model", "stage"], LATENCY_BUCKETS, ours)
    reference = Histogram("t_seconds", "doc", ["model", "stage"], buckets=LATENCY_BUCKETS,
                          registry=theirs)  # fmt: skip
    for batch in batches:
        bulk.labels("m", "queue").observe_many(np.array(batch, dtype=np.float64))
        series = reference.labels("m", "queue")  # a series exists once labelled, as ours
        for v in batch:
            series.observe(v)
    for v in singles:  # a bound itself counts in its own bucket (le), as prometheus does
        bulk.labels("m", "total").observe(v)
        reference.labels("m", "total").observe(v)
    ours_lines, their_lines = _samples(ours), _samples(theirs)
    assert [ln for ln in ours_lines if ln.startswith("#")] == [
        ln for ln in their_lines if ln.startswith("#")
    ]  # HELP and TYPE
    ours_lines = [ln for ln in ours_lines if not ln.startswith("#")]
    their_lines = [ln for ln in their_lines if not ln.startswith("#")]
    assert [ln.rsplit(" ", 1)[0] for ln in ours_lines] == [
        ln.rsplit(" ", 1)[0] for ln in their_lines
    ]  # the same series, in the same order
    for a, b in zip(ours_lines, their_lines, strict=True):
        assert float(a.rsplit(" ", 1)[1]) == pytest.approx(float(b.rsplit(" ", 1)[1]))


def test_bulk_histogram_wants_every_label() -> None:
    bulk = BulkHistogram("u_seconds", "doc", ["model", "stage"], (1.0,), CollectorRegistry())
    with pytest.raises(ValueError, match="takes labels"):
        bulk.labels("only-one")


def test_a_run_without_step_outputs_gives_the_same_answer(tiny_repo: Path) -> None:
    model = load_worker(tiny_repo / "tiny-gru" / "1" / "model.onnx")
    desc, runtime = model.description, model.runtime
    rng = np.random.default_rng(3)
    inputs = rng.integers(0, desc.vocab_size, size=(3, 5)).astype(np.int64)
    lengths = np.array([5, 2, 4], dtype=np.int64)
    state = rng.standard_normal((3, desc.state_rows, desc.hidden_size)).astype(np.float32)
    full = runtime.run(inputs, lengths, state)
    final = runtime.run(inputs, lengths, state, steps=False)
    assert final.step_probs is None and full.step_probs is not None
    np.testing.assert_array_equal(final.probs, full.probs)
    np.testing.assert_array_equal(final.state_out, full.state_out)


def test_a_lone_chunk_and_row_take_the_short_way_with_the_same_result() -> None:
    chunk = np.frombuffer(np.array([4, 1, 7], dtype=np.int64).tobytes(), dtype=np.int64)
    alone, lengths = pad_chunks([chunk])  # read-only, as StreamColumns decodes it
    padded, both = pad_chunks([chunk, chunk[:1]])
    np.testing.assert_array_equal(alone, padded[:1])
    assert lengths.tolist() == [3] and both.tolist() == [3, 1]
    slab = HostStateSlab(rows=2, hidden=3, capacity=4, max_capacity=4)
    slab.states[:] = np.arange(24, dtype=np.float32).reshape(4, 2, 3)
    one = slab.gather([2])
    np.testing.assert_array_equal(one, slab.gather([2, 0])[:1])
    one[0] += 100  # a copy: the slab is unchanged until scattered
    assert slab.states[2, 0, 0] == 12
    slab.scatter([2], one)
    np.testing.assert_array_equal(slab.states[2], one[0])
