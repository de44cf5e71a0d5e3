"""The Jordan network: PyTorch == onnxruntime, chunked streaming == whole sequence, the state is
the previous output, and it trains."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from export.arch import ArchConfig
from export.data import Example
from export.jordan import JordanClassifier, build_model
from export.onnx_export import describe, export_model
from export.tiny import TINY_JORDAN, random_model, write_tiny_model
from export.train import TrainConfig, fit
from export.verify import (
    TOLERANCE,
    open_session,
    random_chunks,
    random_inputs,
    run_onnx,
    streaming_diff,
    torch_from_onnx,
    torch_parity,
    verify_model,
)

FRAMES = ArchConfig(cell="jordan", hidden_size=7, num_classes=4, input_kind="features",
                    feature_dim=5)  # fmt: skip


@pytest.fixture(scope="module", params=["tokens", "features"])
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    arch = TINY_JORDAN if request.param == "tokens" else FRAMES
    return write_tiny_model(tmp_path_factory.mktemp("jordan"), f"j-{request.param}", arch)


def test_arch_describes_the_state_as_the_previous_output() -> None:
    assert TINY_JORDAN.state_rows == 1 and TINY_JORDAN.state_width == TINY_JORDAN.num_classes
    assert TINY_JORDAN.state_row_names() == ["layer0.fwd.y"]
    with pytest.raises(ValueError, match="one forward layer"):
        replace(TINY_JORDAN, num_layers=2)
    with pytest.raises(ValueError, match="one forward layer"):
        replace(TINY_JORDAN, bidirectional=True)
    assert isinstance(build_model(TINY_JORDAN), JordanClassifier)


def test_torch_and_onnxruntime_agree(exported: Path) -> None:
    model, desc = torch_from_onnx(exported)
    assert desc.state_rows == 1 and desc.hidden_size == model.arch.num_classes
    sess = open_session(exported)
    rng = np.random.default_rng(0)
    worst = max(
        torch_parity(model, sess, desc, rng, batch, t_max)
        for batch in (1, 3, 8)
        for t_max in (1, 5, 17)
    )
    assert worst <= TOLERANCE, worst


def test_chunked_streaming_equals_the_whole_sequence(exported: Path) -> None:
    _, desc = torch_from_onnx(exported)
    sess = open_session(exported)
    rng = np.random.default_rng(2)
    for t_max in (1, 6, 31):
        x, _, state = random_inputs(desc, rng, 1, t_max)
        zero = np.zeros_like(state[0])
        for chunks in ([1] * t_max, random_chunks(rng, t_max), [t_max]):
            assert streaming_diff(sess, desc, x[0], zero, chunks) == 0.0
    assert verify_model(exported).passed


def test_the_state_out_is_the_last_output_and_feeds_the_next_step(exported: Path) -> None:
    _, desc = torch_from_onnx(exported)
    sess = open_session(exported)
    x, lengths, _ = random_inputs(desc, np.random.default_rng(3), 4, 6)
    zero = np.zeros((4, 1, desc.hidden_size), np.float32)
    step_probs, probs, state_out = run_onnx(sess, desc, x, lengths, zero)
    np.testing.assert_array_equal(state_out[:, 0], probs)
    for b in range(4):
        np.testing.assert_array_equal(probs[b], step_probs[b, lengths[b] - 1])
    # The same first step from another previous output gives another answer.
    first = x[:, :1]
    ones = np.ones(4, np.int64)
    fresh = run_onnx(sess, desc, first, ones, zero)[1]
    primed = run_onnx(sess, desc, first, ones, state_out)[1]
    assert np.abs(fresh - primed).max() > 1e-3


def _random_examples(n: int, seed: int) -> list[Example]:
    rng = np.random.default_rng(seed)
    return [
        Example(rng.integers(0, TINY_JORDAN.vocab_size, size=int(rng.integers(2, 9))), int(label))
        for label in rng.integers(0, TINY_JORDAN.num_classes, size=n)
    ]


def test_a_few_training_steps_then_export_and_verify(tmp_path: Path) -> None:
    model = build_model(TINY_JORDAN)
    before = [p.detach().clone() for p in model.parameters()]
    report = fit(model, _random_examples(48, 0), [], TrainConfig(epochs=2, batch_size=16))
    assert all(np.isfinite(r["train_loss"]) for r in report["history"])
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    desc = describe(model, "jt", 1, ["a", "b", "c"], tokenizer=None)
    assert desc.hidden_size == 3 and desc.state_row_names == ("layer0.fwd.y",)
    path = tmp_path / "model.onnx"
    export_model(model, desc, str(path))
    assert verify_model(path).passed
    rebuilt, _ = torch_from_onnx(path)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(rebuilt.state_dict()[name], value, rtol=0, atol=0)


def test_random_model_sets_every_jordan_weight() -> None:
    model = random_model(TINY_JORDAN, seed=4)
    assert isinstance(model, JordanClassifier)
    assert float(model.w_yh.detach().abs().sum()) > 0
