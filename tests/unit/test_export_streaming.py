"""Streaming equivalence and padding invariance of exported models, property-based."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from export.verify import (
    TOLERANCE,
    open_session,
    padding_diff,
    random_inputs,
    streaming_diff,
    torch_from_onnx,
    verify_model,
)

STREAMABLE = [
    "tiny-lstm",
    "tiny-gru",
    "tiny-rnn-frames",
    "tiny-peephole-frames",
    "tiny-cifg-frames",
]


@st.composite
def chunkings(draw: st.DrawFn) -> tuple[int, list[int]]:
    """A sequence length and a split of it into chunks of >= 1 step."""
    total = draw(st.integers(min_value=1, max_value=40))
    chunks, left = [], total
    while left:
        size = draw(st.integers(min_value=1, max_value=left))
        chunks.append(size)
        left -= size
    return total, chunks


@pytest.mark.parametrize("name", STREAMABLE)
@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(case=chunkings(), seed=st.integers(0, 2**16))
def test_chunked_stream_equals_one_call_on_the_whole_sequence(
    tiny_repo: Path, name: str, case: tuple[int, list[int]], seed: int
) -> None:
    total, chunks = case
    path = tiny_repo / name / "1" / "model.onnx"
    _, desc = torch_from_onnx(path)
    sess = open_session(path)
    x, _, state = random_inputs(desc, np.random.default_rng(seed), 1, total)
    assert streaming_diff(sess, desc, x[0], state[0], chunks) <= TOLERANCE


@pytest.mark.parametrize("name", ["tiny-lstm", "tiny-cifg-frames", "tiny-bilstm"])
@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(batch=st.integers(1, 9), t_max=st.integers(1, 25), seed=st.integers(0, 2**16))
def test_each_row_of_a_mixed_length_batch_gets_what_it_gets_alone(
    tiny_repo: Path, name: str, batch: int, t_max: int, seed: int
) -> None:
    path = tiny_repo / name / "1" / "model.onnx"
    _, desc = torch_from_onnx(path)
    diff = padding_diff(open_session(path), desc, np.random.default_rng(seed), batch, t_max)
    assert diff <= TOLERANCE


def test_one_step_chunks_equal_the_whole_sequence(tiny_repo: Path) -> None:
    path = tiny_repo / "tiny-peephole-frames" / "1" / "model.onnx"
    _, desc = torch_from_onnx(path)
    x, _, state = random_inputs(desc, np.random.default_rng(0), 1, 30)
    assert streaming_diff(open_session(path), desc, x[0], state[0], [1] * 30) <= TOLERANCE


def test_padding_values_do_not_change_a_row(tiny_repo: Path) -> None:
    """Garbage past a row's length (any token id) leaves its results unchanged."""
    path = tiny_repo / "tiny-lstm" / "1" / "model.onnx"
    sess = open_session(path)
    state = np.zeros((1, 4, 8), np.float32)
    a = np.array([[3, 4, 5, 0, 0, 0]], np.int64)
    b = np.array([[3, 4, 5, 26, 1, 9]], np.int64)
    out_a = sess.run(None, {"tokens": a, "lengths": np.array([3]), "state": state})
    out_b = sess.run(None, {"tokens": b, "lengths": np.array([3]), "state": state})
    np.testing.assert_array_equal(out_a[1], out_b[1])
    np.testing.assert_array_equal(out_a[2], out_b[2])
    np.testing.assert_array_equal(out_a[0][:, :3], out_b[0][:, :3])


def test_a_zero_state_is_a_fresh_session(tiny_repo: Path) -> None:
    """state_out differs from the input state after a step, and zeros reproduce a cold start."""
    sess = open_session(tiny_repo / "tiny-gru" / "1" / "model.onnx")
    tokens = np.array([[1, 2]], np.int64)
    zeros = np.zeros((1, 1, 8), np.float32)
    first = sess.run(None, {"tokens": tokens, "lengths": np.array([2]), "state": zeros})
    again = sess.run(None, {"tokens": tokens, "lengths": np.array([2]), "state": zeros})
    np.testing.assert_array_equal(first[1], again[1])
    assert np.abs(first[2]).max() > 0


@pytest.mark.parametrize("name", [*STREAMABLE, "tiny-bilstm"])
def test_verify_passes_on_every_tiny_architecture(tiny_repo: Path, name: str) -> None:
    report = verify_model(tiny_repo / name / "1")
    assert report.passed, report.to_dict()
    assert (report.streaming is None) == (name == "tiny-bilstm")
