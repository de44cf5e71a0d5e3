"""Building blocks of our ONNX graphs, shared by every architecture's exporter (onnx_export.py
for the native LSTM / GRU / RNN nodes, jordan.py for the Jordan network's Scan)."""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from export.model import RecurrentClassifier
from lstmserve import contract
from lstmserve.contract import DESCRIPTION_KEY, ModelDescription

OPSET = 17
IR_VERSION = 8


def as_float32(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().astype(np.float32)


class GraphBuilder:
    """Accumulates nodes and initializers with unique names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def init(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(value, name))
        return name

    def node(self, op: str, inputs: list[str], outputs: list[str], **attrs: object) -> list[str]:
        self.nodes.append(
            helper.make_node(op, inputs, outputs, name=outputs[0] + "_" + op, **attrs)
        )
        return outputs

    def one(self, op: str, inputs: list[str], output: str, **attrs: object) -> str:
        return self.node(op, inputs, [output], **attrs)[0]


def input_block(g: GraphBuilder, model: RecurrentClassifier) -> str:
    """Graph input -> time-major float input (T, B, I)."""
    arch = model.arch
    if arch.input_kind == "tokens":
        emb = g.init("embedding", as_float32(model.embedding.weight))
        x = g.one("Gather", [emb, contract.INPUT_TOKENS], "embedded", axis=0)  # (B, T, E)
    else:
        mean = g.init("feature_mean", as_float32(model.feature_mean))
        inv_std = g.init("feature_inv_std", 1.0 / as_float32(model.feature_std))
        centred = g.one("Sub", [contract.INPUT_FEATURES, mean], "centred")
        x = g.one("Mul", [centred, inv_std], "normalized")  # (B, T, F)
    return g.one("Transpose", [x], "x_tbi", perm=[1, 0, 2])  # (T, B, I)


def finish_model(
    nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto],
    inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto],
    description: ModelDescription, cell: str,
) -> onnx.ModelProto:  # fmt: skip
    """The graph as a checked model with its description in the metadata (the v1 contract)."""
    graph = helper.make_graph(nodes, description.name, inputs, outputs, inits)
    proto = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="lstm-serve export",
        producer_version="1",
        model_version=description.version,
        doc_string=f"{description.name} v{description.version}: {cell} sequence classifier",
    )
    proto.ir_version = IR_VERSION
    helper.set_model_props(proto, {DESCRIPTION_KEY: description.to_json()})
    onnx.checker.check_model(proto, full_check=True)
    return proto
