"""An int8 copy (`lstm-export quantize`) read back: its quantization entry in the description,
and its weights as float32 (verify rebuilds the PyTorch twin from them)."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from lstmserve.contract import ModelDescription


def quantization_of(desc: ModelDescription) -> dict[str, Any] | None:
    """The description's quantization entry, None for a float32 model."""
    entry = desc.training.get("quantization")
    return entry if isinstance(entry, dict) else None


def dequantized_initializers(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The float32 initializers of a quantized graph under their original names: each
    NAME_quantized with NAME_scale and NAME_zero_point becomes (q - zero_point) * scale, and the
    recurrent W / R that DynamicQuantizeLSTM stores as [D, I, 4H] go back to [D, 4H, I]."""
    arrays = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    lstm_weights = {
        name
        for n in proto.graph.node
        if n.op_type == "DynamicQuantizeLSTM"
        for name in n.input[1:3]
    }
    out = {k: v.astype(np.float32) if v.dtype == np.float64 else v for k, v in arrays.items()}
    for name, q in arrays.items():
        if not name.endswith("_quantized"):
            continue
        base = name[: -len("_quantized")]
        scale = arrays[base + "_scale"].astype(np.float32)
        zero = arrays[base + "_zero_point"].astype(np.float32)
        values = q.astype(np.float32)
        if name in lstm_weights:  # [D, I, 4H], scale per direction or per (direction, gate row)
            d = q.shape[0]
            shape = (d, 1, -1) if scale.size % d == 0 else (1, 1, -1)
            w = (values - zero.reshape(shape)) * scale.reshape(shape)
            out[base] = np.ascontiguousarray(w.transpose(0, 2, 1))
        else:  # per tensor, or per output column of a MatMul weight
            out[base] = (values - zero) * scale
        for suffix in ("_quantized", "_scale", "_zero_point"):
            out.pop(base + suffix, None)
    return out
