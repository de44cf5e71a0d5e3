"""Trained weights -> an ONNX graph of native LSTM / GRU / RNN nodes implementing the v1 contract.

The graph is built by hand with onnx.helper because torch's exporters either unroll `nn.RNN` or
freeze the sequence length of bidirectional layers. Facts that shape it:
- onnxruntime rejects `layout=1`, so the recurrent nodes run time-major with Transposes around;
- ONNX gate orders differ from PyTorch's: LSTM iofc (torch ifgo), GRU zrh (torch rzn);
- GRU uses `linear_before_reset=1`, the variant PyTorch implements;
- a `sequence_lens` of 0 would return zeros, so the contract requires lengths >= 1;
- the IR version is set explicitly (onnx 1.23 stamps 14, which onnxruntime may refuse).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from export.graph import GraphBuilder, as_float32, finish_model, input_block
from export.jordan import build_jordan_graph
from export.model import RecurrentClassifier
from lstmserve import contract
from lstmserve.contract import ModelDescription

# ONNX gate block k is PyTorch gate block ONNX_FROM_TORCH[cell][k].
ONNX_FROM_TORCH: dict[str, tuple[int, ...]] = {
    "lstm": (0, 3, 1, 2),  # torch i, f, g, o -> onnx i, o, f, c
    "gru": (1, 0, 2),  # torch r, z, n -> onnx z, r, h
    "rnn": (0,),
}


def reorder_gates(w: np.ndarray, cell: str, hidden: int, to_onnx: bool = True) -> np.ndarray:
    """Reorder the gate blocks along axis 0 between PyTorch's order and ONNX's."""
    order = ONNX_FROM_TORCH[cell]
    if not to_onnx:
        order = tuple(order.index(k) for k in range(len(order)))
    return np.concatenate([w[k * hidden : (k + 1) * hidden] for k in order], axis=0)


def recurrent_initializers(model: RecurrentClassifier, layer_index: int) -> dict[str, np.ndarray]:
    """W [D, G*H, I], R [D, G*H, H], B [D, 2*G*H] and, for peepholes, P [D, 3H] (order i, o, f)."""
    arch = model.arch
    layer = model.layers[layer_index]
    hid = arch.hidden_size
    ws, rs, bs, ps = [], [], [], []
    for d in range(arch.directions):
        p = layer.direction_params(d)
        ws.append(reorder_gates(as_float32(p["w_ih"]), arch.cell, hid))
        rs.append(reorder_gates(as_float32(p["w_hh"]), arch.cell, hid))
        b_ih = reorder_gates(as_float32(p["b_ih"]), arch.cell, hid)
        b_hh = reorder_gates(as_float32(p["b_hh"]), arch.cell, hid)
        bs.append(np.concatenate([b_ih, b_hh]))
        if arch.peephole:
            p_i, p_f, p_o = np.split(as_float32(p["peephole"]), 3)
            ps.append(np.concatenate([p_i, p_o, p_f]))
    out = {"W": np.stack(ws), "R": np.stack(rs), "B": np.stack(bs)}
    if arch.peephole:
        out["P"] = np.stack(ps)
    return out


def _recurrent_block(
    g: GraphBuilder, model: RecurrentClassifier, x: str, seq_lens: str, state: str
) -> tuple[str, list[str]]:
    """Stacked recurrent nodes; returns the last layer's (T, B, D*H) output and the state rows."""
    arch = model.arch
    hid, dirs = arch.hidden_size, arch.directions
    direction = "bidirectional" if arch.bidirectional else "forward"
    shape_tb_dh = g.init("shape_tb_dh", np.array([0, 0, dirs * hid], dtype=np.int64))
    rows: list[str] = []
    for index in range(arch.num_layers):
        prm = {
            k: g.init(f"l{index}_{k}", v) for k, v in recurrent_initializers(model, index).items()
        }
        initial = {}
        for kind in arch.state_kinds:
            lo, hi = arch.state_slice(index, kind)
            starts = g.init(f"l{index}_{kind}_start", np.array([lo], dtype=np.int64))
            ends = g.init(f"l{index}_{kind}_end", np.array([hi], dtype=np.int64))
            initial[kind] = g.one("Slice", [state, starts, ends], f"l{index}_{kind}0")  # (D, B, H)
        y, y_h = f"l{index}_Y", f"l{index}_Y_h"
        if arch.cell == "lstm":
            inputs = [x, prm["W"], prm["R"], prm["B"], seq_lens, initial["h"], initial["c"]]
            inputs.append(prm.get("P", ""))
            outs = [y, y_h, f"l{index}_Y_c"]
            g.node("LSTM", inputs, outs, hidden_size=hid, direction=direction,
                   input_forget=int(arch.cifg))  # fmt: skip
            rows += [y_h, outs[2]]
        else:
            op = "GRU" if arch.cell == "gru" else "RNN"
            extra = {"linear_before_reset": 1} if arch.cell == "gru" else {}
            inputs = [x, prm["W"], prm["R"], prm["B"], seq_lens, initial["h"]]
            g.node(op, inputs, [y, y_h], hidden_size=hid, direction=direction, **extra)
            rows.append(y_h)
        y_tbdh = g.one("Transpose", [y], f"l{index}_Y_tbdh", perm=[0, 2, 1, 3])  # (T, B, D, H)
        x = g.one("Reshape", [y_tbdh, shape_tb_dh], f"l{index}_out")  # (T, B, D*H)
    return x, rows


def _head_block(g: GraphBuilder, model: RecurrentClassifier, y: str) -> None:
    """(T, B, D*H) -> step_probs (B, T, C) and probs (B, C) at each row's last valid step."""
    y_btd = g.one("Transpose", [y], "y_btd", perm=[1, 0, 2])  # (B, T, D*H)
    w = g.init("head_weight_t", as_float32(model.head.weight).T.copy())  # (D*H, C)
    b = g.init("head_bias", as_float32(model.head.bias))
    logits = g.one("Add", [g.one("MatMul", [y_btd, w], "head_mm"), b], "logits")  # (B, T, C)
    step_probs = g.one("Softmax", [logits], contract.OUTPUT_STEP_PROBS, axis=-1)
    one = g.init("one_i64", np.array(1, dtype=np.int64))
    last = g.one("Sub", [contract.INPUT_LENGTHS, one], "last_step")  # (B,)
    shape_b11 = g.init("shape_b11", np.array([-1, 1, 1], dtype=np.int64))
    last_b11 = g.one("Reshape", [last, shape_b11], "last_b11")  # (B, 1, 1)
    classes = g.init("shape_11c", np.array([1, 1, model.arch.num_classes], dtype=np.int64))
    index = g.one("Expand", [last_b11, classes], "last_b1c")  # (B, 1, C)
    picked = g.one("GatherElements", [step_probs, index], "probs_b1c", axis=1)
    axis1 = g.init("axis1", np.array([1], dtype=np.int64))
    g.one("Squeeze", [picked, axis1], contract.OUTPUT_PROBS)  # (B, C)


def build_graph(model: RecurrentClassifier, description: ModelDescription) -> onnx.ModelProto:
    """The whole v1 graph for `model`, with `description` embedded in the metadata."""
    arch = model.arch
    g = GraphBuilder()
    x = input_block(g, model)
    seq_lens = g.one("Cast", [contract.INPUT_LENGTHS], "seq_lens", to=TensorProto.INT32)
    state = g.one("Transpose", [contract.INPUT_STATE], "state_sbh", perm=[1, 0, 2])  # (S, B, H)
    y, rows = _recurrent_block(g, model, x, seq_lens, state)
    _head_block(g, model, y)
    state_sbh = g.one("Concat", rows, "state_out_sbh", axis=0)  # (S, B, H)
    g.one("Transpose", [state_sbh], contract.OUTPUT_STATE, perm=[1, 0, 2])  # (B, S, H)

    s, h, c = arch.state_rows, arch.hidden_size, arch.num_classes
    if arch.input_kind == "tokens":
        x_in = helper.make_tensor_value_info(contract.INPUT_TOKENS, TensorProto.INT64, ["B", "T"])
    else:
        x_in = helper.make_tensor_value_info(
            contract.INPUT_FEATURES, TensorProto.FLOAT, ["B", "T", arch.feature_dim]
        )
    inputs = [
        x_in,
        helper.make_tensor_value_info(contract.INPUT_LENGTHS, TensorProto.INT64, ["B"]),
        helper.make_tensor_value_info(contract.INPUT_STATE, TensorProto.FLOAT, ["B", s, h]),
    ]
    outputs = [
        helper.make_tensor_value_info(contract.OUTPUT_STEP_PROBS, TensorProto.FLOAT, ["B", "T", c]),
        helper.make_tensor_value_info(contract.OUTPUT_PROBS, TensorProto.FLOAT, ["B", c]),
        helper.make_tensor_value_info(contract.OUTPUT_STATE, TensorProto.FLOAT, ["B", s, h]),
    ]
    return finish_model(g.nodes, g.inits, inputs, outputs, description, arch.cell)


def describe(
    model: RecurrentClassifier,
    name: str,
    version: int,
    labels: list[str],
    tokenizer: dict | None = None,
    training: dict | None = None,
) -> ModelDescription:
    """The description of `model` under the v1 contract."""
    from lstmserve.contract import Tokenizer

    arch = model.arch
    fallback = arch.cuda_fallback_reasons
    architecture = arch.to_dict() | {"directions": arch.directions}
    return ModelDescription(
        name=name,
        version=version,
        labels=tuple(labels),
        input_kind=arch.input_kind,
        vocab_size=arch.vocab_size,
        feature_dim=arch.feature_dim,
        tokenizer=Tokenizer.from_dict(tokenizer) if tokenizer else None,
        state_rows=arch.state_rows,
        hidden_size=arch.state_width,
        state_row_names=tuple(arch.state_row_names()),
        streamable=arch.streamable,
        architecture=architecture,
        cuda={"wholly_on_cuda": not fallback, "cpu_fallback": fallback},
        training=training or {},
    )


def export_model(
    model: RecurrentClassifier, description: ModelDescription, path: str
) -> onnx.ModelProto:
    """Write `model` with its description to `path` (model.onnx)."""
    model.eval()
    if model.arch.cell == "jordan":  # a Scan over time: no native ONNX node feeds back outputs
        proto = build_jordan_graph(model, description)
    else:
        proto = build_graph(model, description)
    onnx.save_model(proto, path)
    return proto
