"""The protobuf <-> numpy codec, both ways."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lstmserve.client import to_input
from lstmserve.v1 import lstm_serve_pb2 as pb
from service import codec
from service.engine.model.registry import ModelRegistry
from service.errors import InvalidInput, MalformedRequest
from tests.unit.engines import load_engine


@pytest.fixture(scope="module")
def registry(tiny_repo: Path) -> ModelRegistry:
    return load_engine(tiny_repo).registry


def test_frames_round_trip_flat_and_rows(registry: ModelRegistry) -> None:
    desc = registry.get("tiny-rnn-frames").description
    frames = np.random.default_rng(0).normal(size=(3, 5)).astype(np.float32)  # (T, F)
    flat = codec.decode_input(to_input(frames), desc, 10, "x")
    assert flat.dtype == codec.FRAME_DTYPE and flat.shape == (3, 5)
    np.testing.assert_array_equal(flat, frames)
    rows = pb.SequenceInput(frames=pb.Frames(frames=[pb.Frame(values=r) for r in frames]))
    np.testing.assert_array_equal(codec.decode_input(rows, desc, 10, "x"), frames)
    both = pb.SequenceInput(frames=pb.Frames(values=[0.0] * 5, frames=[pb.Frame(values=[0] * 5)]))
    with pytest.raises(InvalidInput, match="not both"):
        codec.decode_input(both, desc, 10, "x")


def test_tokens_and_text(registry: ModelRegistry) -> None:
    desc = registry.get("tiny-lstm").description
    ids = codec.decode_input(to_input([3, 4]), desc, 10, "x")
    assert ids.dtype == codec.TOKEN_DTYPE and ids.tolist() == [3, 4]
    assert codec.decode_input(to_input("cd"), desc, 10, "x").tolist() == [3, 4]


def test_top_labels_are_sorted_and_capped(registry: ModelRegistry) -> None:
    desc = registry.get("tiny-lstm").description
    top = codec.top_labels(desc, np.array([0.2, 0.5, 0.3], np.float32), 5)
    assert [t.label for t in top] == ["class1", "class2", "class0"]
    assert [t.index for t in top] == [1, 2, 0] and top[0].probability == pytest.approx(0.5)
    assert len(codec.top_labels(desc, np.array([0.2, 0.5, 0.3], np.float32), 0)) == 1


def test_error_status_in_band() -> None:
    status = codec.encode_error(InvalidInput("chunk.text = '' is empty"))
    assert (status.code, status.numeric_code) == ("INVALID_ARGUMENT", 3)
    assert status.message == "chunk.text = '' is empty"


def test_model_info_carries_tokenizer_and_provider(registry: ModelRegistry) -> None:
    info = codec.model_info(registry.get("tiny-gru"), latest=True)
    assert info.tokenizer.vocab[0] == "<unk>" and info.tokenizer.lowercase
    assert info.provider == "CPUExecutionProvider" and info.load_seconds > 0
    assert info.state == pb.MODEL_STATE_READY and info.latest and info.sessions == 0


def test_lenient_parser_never_raises() -> None:
    parse = codec.lenient_parser(pb.ClassifyRequest)
    good = pb.ClassifyRequest(model="tiny-gru", sequences=[pb.SequenceInput(text="ab")])
    assert parse(good.SerializeToString()) == good
    assert parse(b"") == pb.ClassifyRequest()
    bad = parse(b"\xff\xff\xff\xff")
    assert bad == codec.Malformed("lstmserve.v1.ClassifyRequest", 4)
    error = bad.error()
    assert isinstance(error, MalformedRequest) and error.code == "INVALID_ARGUMENT"
    assert str(error) == "the request is not a valid lstmserve.v1.ClassifyRequest (4 bytes)"


def test_lenient_parser_on_invalid_utf8_and_truncated_fields() -> None:
    parse = codec.lenient_parser(pb.StreamRequest)
    opened = pb.StreamRequest(open=pb.OpenSession(model="tiny-gru")).SerializeToString()
    assert isinstance(parse(opened[:-2]), codec.Malformed)  # length runs past the end
    bad_text = pb.SequenceInput(text="x").SerializeToString().replace(b"x", b"\xff")
    assert isinstance(codec.lenient_parser(pb.SequenceInput)(bad_text), codec.Malformed)


def test_in_band_error_messages_are_capped() -> None:
    status = codec.encode_error(InvalidInput("x" * 10_000))
    assert len(status.message.encode()) <= 1024
