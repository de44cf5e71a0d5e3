"""The int8 weights read back as the float32 ones (export/int8.py: per tensor and per channel,
both directions of a bidirectional LSTM), and what quantize_dynamic leaves float32."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from export.int8 import dequantized_initializers
from export.quantize import quantize_file


@pytest.mark.parametrize("per_channel", [False, True], ids=["per-tensor", "per-channel"])
def test_dequantized_weights_match_the_float32_ones(
    tiny_repo: Path, tmp_path: Path, per_channel: bool
) -> None:
    src = tiny_repo / "tiny-bilstm" / "1" / "model.onnx"
    dst = tmp_path / "model.onnx"
    info = quantize_file(src, dst, per_channel=per_channel)
    assert info["quantized_ops"] == ["Gather", "LSTM", "MatMul"]
    original = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(src)).graph.initializer}
    quantized = onnx.load(str(dst))
    back = dequantized_initializers(quantized)
    assert set(back) == set(original)
    for name in ("l0_W", "l0_R", "l1_W", "l1_R", "head_weight_t", "embedding"):
        scale = numpy_helper.to_array(
            next(t for t in quantized.graph.initializer if t.name == name + "_scale")
        )
        assert back[name].shape == original[name].shape, name
        # within half a quantization step of the float32 weight, every element
        assert np.abs(back[name] - original[name]).max() <= 0.51 * float(scale.max()), name
    assert np.array_equal(back["l0_B"], original["l0_B"])  # biases stay float32


def test_a_gru_is_left_float32_and_reported(tiny_repo: Path, tmp_path: Path) -> None:
    info = quantize_file(tiny_repo / "tiny-gru" / "1" / "model.onnx", tmp_path / "model.onnx")
    assert info["quantized_ops"] == ["Gather", "MatMul"]
    assert list(info["float32_ops"]) == ["GRU"]
