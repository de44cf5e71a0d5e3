"""The lecture notes' Jordan network: a recurrent cell whose recurrent input is the previous
step's output rather than its hidden layer.

    h_t = tanh(W_xh x_t + W_yh y_{t-1} + b_h)
    y_t = softmax(W_hy h_t + b_y)

The fed-back output is y after the softmax, the class probabilities: they are bounded (like the
h of the other cells, which keeps the state comparable and well-conditioned), they are exactly
what the service streams after every step, and they are what Jordan (1986) fed back: the output
units' activations. The served state is that vector: S = 1 row of H = C (num_classes) values,
`layer0.fwd.y`; zeros (a fresh session) means "no previous output".

The ONNX graph is the v1 contract with one `Scan` over time whose body is the cell and the
head; the input projection W_xh x_t + b_h is computed for every step before the Scan.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from export.arch import ArchConfig
from export.graph import GraphBuilder, as_float32, finish_model, input_block
from export.model import RecurrentClassifier
from lstmserve import contract
from lstmserve.contract import ModelDescription

# Initializer names in the exported graph (inspect and trace read them).
W_XH, W_YH, B_H = "jordan_W_xh_t", "jordan_W_yh_t", "jordan_b_h"
HEAD_W, HEAD_B = "head_weight_t", "head_bias"
H_SEQUENCE = "jordan_h_steps"  # (T, B, H_hidden): the Scan's per-step hidden layer


class JordanClassifier(nn.Module):
    """Input layer -> Jordan cell (fed its own previous probabilities) -> per-step head."""

    def __init__(self, arch: ArchConfig) -> None:
        super().__init__()
        if arch.cell != "jordan":
            raise ValueError(f"JordanClassifier needs cell='jordan', got {arch.cell!r}")
        self.arch = arch
        if arch.input_kind == "tokens":
            self.embedding = nn.Embedding(arch.vocab_size, arch.embedding_dim)
        else:
            self.register_buffer("feature_mean", torch.zeros(arch.feature_dim))
            self.register_buffer("feature_std", torch.ones(arch.feature_dim))
        hid, n_cls = arch.hidden_size, arch.num_classes
        bound = 1.0 / math.sqrt(hid)  # nn.RNN's initialisation
        self.w_xh = nn.Parameter(torch.empty(hid, arch.input_size).uniform_(-bound, bound))
        self.w_yh = nn.Parameter(torch.empty(hid, n_cls).uniform_(-bound, bound))
        self.b_h = nn.Parameter(torch.empty(hid).uniform_(-bound, bound))
        self.dropout = nn.Dropout(arch.dropout)
        self.head = nn.Linear(hid, n_cls)

    def set_normalization(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(std.clamp_min(1e-6))

    def zero_state(self, batch: int) -> torch.Tensor:
        return torch.zeros(batch, 1, self.arch.num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        if self.arch.input_kind == "tokens":
            return self.embedding(x)
        return (x - self.feature_mean) / self.feature_std

    def run(
        self, x: torch.Tensor, lengths: torch.Tensor, state: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> logits (B, T, C), h (B, T, H_hidden), state_out (B, 1, C). A row past its length
        keeps its y; its padded steps are computed (and ignored) as the graph computes them."""
        if state is None:
            state = self.zero_state(x.shape[0]).to(x.device)
        y = state[:, 0]  # (B, C)
        u = torch.matmul(self.embed(x), self.w_xh.t()) + self.b_h  # (B, T, H)
        logits, hs = [], []
        for t in range(x.shape[1]):
            h = torch.tanh(u[:, t] + torch.matmul(y, self.w_yh.t()))
            logit = self.head(self.dropout(h))
            valid = (t < lengths).unsqueeze(1)
            y = torch.where(valid, torch.softmax(logit, dim=-1), y)
            logits.append(logit)
            hs.append(h)
        return torch.stack(logits, 1), torch.stack(hs, 1), y.unsqueeze(1)

    def step_logits(
        self, x: torch.Tensor, lengths: torch.Tensor, state: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits, _, state_out = self.run(x, lengths, state)
        return logits, state_out

    def contract_forward(
        self, x: torch.Tensor, lengths: torch.Tensor, state: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The v1 contract: (x, lengths, state) -> (step_probs, probs, state_out)."""
        logits, state_out = self.step_logits(x, lengths, state)
        return torch.softmax(logits, dim=-1), state_out[:, 0], state_out


def build_model(arch: ArchConfig) -> RecurrentClassifier | JordanClassifier:
    """The PyTorch model of any architecture."""
    return JordanClassifier(arch) if arch.cell == "jordan" else RecurrentClassifier(arch)


def _scan_body(hid: int, n_cls: int) -> onnx.GraphProto:
    """One step: (y_prev (B, C); u_t (B, H), valid_t (B, 1)) -> (y (B, C); p_t, h_t)."""
    nodes = [
        helper.make_node("MatMul", ["y_prev", W_YH], ["r"]),
        helper.make_node("Add", ["u_t", "r"], ["a"]),
        helper.make_node("Tanh", ["a"], ["h_t"]),
        helper.make_node("MatMul", ["h_t", HEAD_W], ["hw"]),
        helper.make_node("Add", ["hw", HEAD_B], ["logit"]),
        helper.make_node("Softmax", ["logit"], ["p_t"], axis=-1),
        helper.make_node("Where", ["valid_t", "p_t", "y_prev"], ["y_next"]),
    ]
    f = TensorProto.FLOAT
    inputs = [
        helper.make_tensor_value_info("y_prev", f, ["B", n_cls]),
        helper.make_tensor_value_info("u_t", f, ["B", hid]),
        helper.make_tensor_value_info("valid_t", TensorProto.BOOL, ["B", 1]),
    ]
    outputs = [
        helper.make_tensor_value_info("y_next", f, ["B", n_cls]),
        helper.make_tensor_value_info("p_t", f, ["B", n_cls]),
        helper.make_tensor_value_info("h_t", f, ["B", hid]),
    ]
    return helper.make_graph(nodes, "jordan_step", inputs, outputs)


def build_jordan_graph(model: JordanClassifier, description: ModelDescription) -> onnx.ModelProto:
    """The v1 graph of a Jordan network: input projection, Scan over time, outputs."""
    arch = model.arch
    hid, n_cls = arch.hidden_size, arch.num_classes
    g = GraphBuilder()
    x = input_block(g, model)  # (T, B, I)
    w_xh = g.init(W_XH, as_float32(model.w_xh).T.copy())
    g.init(W_YH, as_float32(model.w_yh).T.copy())
    g.init(HEAD_W, as_float32(model.head.weight).T.copy())
    g.init(HEAD_B, as_float32(model.head.bias))
    u = g.one("Add", [g.one("MatMul", [x, w_xh], "u_mm"), g.init(B_H, as_float32(model.b_h))], "u")
    # valid (T, B, 1) = t < lengths
    shape_x = g.one("Shape", [x], "x_shape")
    t_len = g.one("Gather", [shape_x, g.init("zero_i64", np.array(0, np.int64))], "t_len")
    steps = g.one("Range", [g.init("r_start", np.array(0, np.int64)), t_len,
                            g.init("r_delta", np.array(1, np.int64))], "t_index")  # fmt: skip
    axis1 = g.init("axes_1", np.array([1], dtype=np.int64))
    lt = g.one("Less", [g.one("Unsqueeze", [steps, axis1], "t_index_t1"),
                        contract.INPUT_LENGTHS], "valid_tb")  # fmt: skip
    valid = g.one("Unsqueeze", [lt, g.init("axes_2", np.array([2], np.int64))], "valid_tb1")
    y0 = g.one("Squeeze", [contract.INPUT_STATE, axis1], "y0")  # (B, C)
    g.node("Scan", [y0, u, valid], ["y_last", "p_steps", H_SEQUENCE],
           num_scan_inputs=2, body=_scan_body(hid, n_cls))  # fmt: skip
    g.one("Transpose", ["p_steps"], contract.OUTPUT_STEP_PROBS, perm=[1, 0, 2])  # (B, T, C)
    g.one("Identity", ["y_last"], contract.OUTPUT_PROBS)  # y at each row's last valid step
    g.one("Unsqueeze", ["y_last", axis1], contract.OUTPUT_STATE)  # (B, 1, C)

    if arch.input_kind == "tokens":
        x_in = helper.make_tensor_value_info(contract.INPUT_TOKENS, TensorProto.INT64, ["B", "T"])
    else:
        x_in = helper.make_tensor_value_info(
            contract.INPUT_FEATURES, TensorProto.FLOAT, ["B", "T", arch.feature_dim]
        )
    f = TensorProto.FLOAT
    inputs = [
        x_in,
        helper.make_tensor_value_info(contract.INPUT_LENGTHS, TensorProto.INT64, ["B"]),
        helper.make_tensor_value_info(contract.INPUT_STATE, f, ["B", 1, n_cls]),
    ]
    outputs = [
        helper.make_tensor_value_info(contract.OUTPUT_STEP_PROBS, f, ["B", "T", n_cls]),
        helper.make_tensor_value_info(contract.OUTPUT_PROBS, f, ["B", n_cls]),
        helper.make_tensor_value_info(contract.OUTPUT_STATE, f, ["B", 1, n_cls]),
    ]
    return finish_model(g.nodes, g.inits, inputs, outputs, description, "Jordan")


def jordan_from_initializers(arch: ArchConfig, inits: dict[str, np.ndarray]) -> JordanClassifier:
    """Rebuild the PyTorch Jordan network from an exported graph's initializers."""
    model = JordanClassifier(arch).eval()
    t = {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in inits.items()}
    with torch.no_grad():
        if arch.input_kind == "tokens":
            model.embedding.weight.copy_(t["embedding"])
        else:
            model.set_normalization(t["feature_mean"], 1.0 / t["feature_inv_std"])
        model.w_xh.copy_(t[W_XH].T)
        model.w_yh.copy_(t[W_YH].T)
        model.b_h.copy_(t[B_H])
        model.head.weight.copy_(t[HEAD_W].T)
        model.head.bias.copy_(t[HEAD_B])
    return model


def initializers(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
