"""What the server reads from a user's graph without the onnx package (service/engine/byo/
onnxgraph.py) and what it infers from it (service/engine/byo/inferred.py): the output kind from
the tail of each class output, the vocabulary size from the embedding table; config.pbtxt
overrides both. Graphs are built with onnx.helper (the test environment has onnx; the server
does not need it) and checked against onnx's own parser."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from lstmserve.contract import KIND_LOG_PROBS, KIND_LOGITS, KIND_PROBS, ModelDescription
from service.engine.byo.binding import bind
from service.engine.byo.inferred import embedding_rows, output_kind
from service.engine.byo.onnxgraph import OnnxFormatError, parse_model, read_graph
from service.engine.types import StepResult, probabilities
from service.errors import ConfigError
from service.tritonconfig import load_triton_config

C, V = 4, 23


def model_bytes(nodes: list[onnx.NodeProto], out: str = "y", rank: int = 2, opset: int = 17,
                inits: list[onnx.TensorProto] | None = None) -> bytes:  # fmt: skip
    """tokens (B, T) int64 -> ... -> `out` float (B, C) or (B, T, C)."""
    shape = ["B", C] if rank == 2 else ["B", "T", C]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("tokens", TensorProto.INT64, ["B", "T"])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, shape)], initializer=inits or [],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return model.SerializeToString()


def table(rows: int = V, name: str = "emb.weight") -> onnx.TensorProto:
    return numpy_helper.from_array(np.zeros((rows, C), np.float32), name)


def head(op: str, **attrs: int) -> list[onnx.NodeProto]:
    """Embedding (Gather) -> ReduceMean over T -> `op` as the tail."""
    return [
        helper.make_node("Gather", ["emb.weight", "tokens"], ["e"]),
        helper.make_node("ReduceMean", ["e"], ["z"], axes=[1], keepdims=0),
        helper.make_node(op, ["z"], ["y"], **attrs),
    ]


def kind_of(data: bytes, out: str = "y", rank: int = 2) -> str:
    return output_kind(parse_model(data), out, rank)[0]


def test_the_reader_sees_what_onnx_sees_in_a_torch_export(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(V, 8), nn.Linear(8, C), nn.LogSoftmax(-1)).eval()
    path = tmp_path / "m.onnx"
    torch.onnx.export(model, (torch.zeros(1, 3, dtype=torch.long),), str(path), dynamo=False,
                      input_names=["tokens"], output_names=["y"],
                      dynamic_axes={"tokens": {0: "B", 1: "T"}})  # fmt: skip
    proto, graph = onnx.load(str(path)), read_graph(path)
    assert [(n.op_type, tuple(n.input), tuple(n.output)) for n in proto.graph.node] == [
        (n.op_type, n.inputs, n.outputs) for n in graph.nodes
    ]
    assert {t.name: tuple(t.dims) for t in proto.graph.initializer} == graph.initializers
    assert graph.opset == proto.opset_import[0].version
    tail = graph.producers["y"]
    assert tail.op_type == "LogSoftmax" and tail.ints["axis"] == -1  # a negative int64
    assert output_kind(graph, "y", 3)[0] == KIND_LOG_PROBS
    assert embedding_rows(graph, "tokens") == (
        V, "the rows of the table '0.weight' that input 'tokens' indexes (a Gather: an embedding)"
    )  # fmt: skip


@pytest.mark.parametrize(
    ("nodes", "kind", "says"),
    [
        (head("Softmax", axis=-1), KIND_PROBS, "'y' ends in a Softmax over the classes"),
        (head("Softmax", axis=1), KIND_PROBS, "Softmax over the classes"),  # rank 2: axis 1 last
        (head("LogSoftmax", axis=-1), KIND_LOG_PROBS, "ends in a LogSoftmax over the classes"),
        (head("Relu"), KIND_LOGITS, "'y' ends in a Relu node (no Softmax or LogSoftmax)"),
        (head("Softmax", axis=0), KIND_LOGITS, "over another axis than the classes (axis 0)"),
        ([*head("Softmax", axis=-1)[:2], helper.make_node("Softmax", ["z"], ["p"], axis=-1),
          helper.make_node("Log", ["p"], ["y"])], KIND_LOG_PROBS, "Log of a Softmax"),
        ([*head("Softmax", axis=-1)[:2], helper.make_node("Softmax", ["z"], ["p"], axis=-1),
          helper.make_node("Identity", ["p"], ["q"]), helper.make_node("Cast", ["q"], ["y"], to=1)],
         KIND_PROBS, "ends in a Softmax"),
    ],
)  # fmt: skip
def test_the_output_kind_is_inferred_from_the_tail_with_its_rule(
    nodes: list[onnx.NodeProto], kind: str, says: str
) -> None:
    got, rule = output_kind(parse_model(model_bytes(nodes, inits=[table()])), "y", 2)
    assert got == kind and says in rule, rule
    meaning = {KIND_PROBS: "served as they are", KIND_LOG_PROBS: "are their exp",
               KIND_LOGITS: "are their softmax"}  # fmt: skip
    assert meaning[kind] in rule


def test_before_opset_13_softmax_normalises_from_axis_1() -> None:
    """Softmax(axis default 1) of a [B, C] output is over the classes; of a [B, T, C] output
    it is over T x C (the input flattened at axis 1): not a distribution per step."""
    final = [*head("Softmax")[:2], helper.make_node("Softmax", ["z"], ["y"])]
    assert kind_of(model_bytes(final, opset=11, inits=[table()])) == KIND_PROBS
    steps = [helper.make_node("Gather", ["emb.weight", "tokens"], ["e"]),
             helper.make_node("Softmax", ["e"], ["y"])]  # fmt: skip
    assert kind_of(model_bytes(steps, rank=3, opset=11, inits=[table()]), rank=3) == KIND_LOGITS
    assert kind_of(model_bytes(steps, rank=3, opset=13, inits=[table()]), rank=3) == KIND_PROBS


def test_the_vocabulary_is_the_smallest_table_the_token_ids_index() -> None:
    nodes = [
        helper.make_node("Cast", ["tokens"], ["ids"], to=TensorProto.INT64),
        helper.make_node("Gather", ["big", "ids"], ["a"]),
        helper.make_node("Constant", [], ["small"], value=numpy_helper.from_array(
            np.zeros((7, C), np.float32))),
        helper.make_node("Gather", ["small", "tokens"], ["b"]),
        helper.make_node("Add", ["a", "b"], ["s"]),
        helper.make_node("ReduceMean", ["s"], ["y"], axes=[1], keepdims=0),
    ]  # fmt: skip
    graph = parse_model(model_bytes(nodes, inits=[table(40, "big")]))
    rows, rule = embedding_rows(graph, "tokens")  # type: ignore[misc]
    assert rows == 7 and "'small'" in rule
    assert embedding_rows(parse_model(model_bytes(head("Relu"), inits=[])), "tokens") is None


def test_bytes_that_are_not_onnx_are_refused_by_the_reader() -> None:
    with pytest.raises(OnnxFormatError):
        parse_model(b"\x0a\xff\xff")  # a field longer than the file
    with pytest.raises(OnnxFormatError, match="no graph"):
        parse_model(b"\x08\x07")  # ir_version 7 and nothing else


@pytest.mark.parametrize(
    ("kind", "values", "probs"),
    [
        (KIND_PROBS, [0.2, 0.3, 0.5], [0.2, 0.3, 0.5]),
        (KIND_LOG_PROBS, np.log([0.2, 0.3, 0.5]), [0.2, 0.3, 0.5]),
        (KIND_LOGITS, np.log([0.2, 0.3, 0.5]) + 7.0, [0.2, 0.3, 0.5]),
    ],
)
def test_a_result_keeps_the_models_values_and_gives_probabilities(
    kind: str, values: list[float], probs: list[float]
) -> None:
    row = np.asarray(values, np.float32)
    result = StepResult(row, np.stack([row, row]), 2, 2, kind)
    assert result.values is row  # what the Triton protocol returns, as computed
    np.testing.assert_allclose(result.probs, probs, atol=1e-6)
    np.testing.assert_allclose(result.step_probs, [probs, probs], atol=1e-6)  # type: ignore[arg-type]
    assert (StepResult(row, None, 2, 2).probs is row) and probabilities(row[:0], kind).size == 0


# -- bind: config.pbtxt over the graph --------------------------------------------------------

CONFIG = """
max_batch_size: 8
input [ { name: "tokens" data_type: TYPE_INT64 dims: [ -1 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ 4 ] } ]
sequence_batching {
  state [ { input_name: "s" output_name: "s_out" data_type: TYPE_FP32 dims: [ 4 ] } ]
}
"""


class Recurrent(nn.Module):
    """tokens (B, T), s (B, 4) -> the last step's class outputs of `kind`, s_out."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.embedding = nn.Embedding(V, 4)
        self.rnn = nn.RNN(4, 4, batch_first=True)

    def forward(self, tokens: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y, h = self.rnn(self.embedding(tokens), s[None])
        z = y[:, -1]
        tail = {"probs": lambda: torch.softmax(z, -1), "log_probs": lambda: torch.log_softmax(
            z, -1), "logits": lambda: 3.0 * z}  # fmt: skip
        return tail[self.kind](), h[0]


def export_repo(tmp_path: Path, kind: str, extra: str = "") -> Path:
    folder = tmp_path / kind
    (folder / "1").mkdir(parents=True)
    torch.manual_seed(0)
    torch.onnx.export(Recurrent(kind).eval(), (torch.zeros(1, 2, dtype=torch.long),
                      torch.zeros(1, 4)), str(folder / "1" / "model.onnx"), dynamo=False,
                      input_names=["tokens", "s"], output_names=["y", "s_out"],
                      dynamic_axes={"tokens": {0: "B", 1: "T"}, "s": {0: "B"}, "y": {0: "B"},
                                    "s_out": {0: "B"}})  # fmt: skip
    (folder / "config.pbtxt").write_text(CONFIG + extra)
    return folder / "1" / "model.onnx"


def description(path: Path) -> ModelDescription:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    binding = bind(load_triton_config(path.parent.parent), session, path)
    return binding.describe("m", 1, 1, 4, ("s",))


@pytest.mark.parametrize("kind", [KIND_PROBS, KIND_LOG_PROBS, KIND_LOGITS])
def test_a_model_is_described_with_the_kind_of_its_outputs_and_its_vocabulary(
    tmp_path: Path, kind: str
) -> None:
    desc = description(export_repo(tmp_path, kind))
    assert desc.output_kind == kind and "'y' ends in a" in desc.output_kind_rule
    assert desc.vocab_size == V and "embedding.weight" in desc.architecture["vocab_size_from"]


def test_config_pbtxt_overrides_what_the_graph_says(tmp_path: Path) -> None:
    params = ('parameters { key: "output_kind" value: { string_value: "logits" } }\n'
              'parameters { key: "vocab_size" value: { string_value: "9" } }\n')  # fmt: skip
    desc = description(export_repo(tmp_path, KIND_PROBS, params))
    assert desc.output_kind == KIND_LOGITS
    assert desc.output_kind_rule.startswith("parameters output_kind 'logits' in config.pbtxt")
    assert desc.vocab_size == 9
    assert desc.architecture["vocab_size_from"] == "parameters vocab_size in config.pbtxt"


def test_an_unknown_output_kind_is_refused_by_name(tmp_path: Path) -> None:
    odds = 'parameters { key: "output_kind" value: { string_value: "odds" } }\n'
    path = export_repo(tmp_path, KIND_PROBS, odds)
    with pytest.raises(ConfigError, match="output_kind 'odds' is not one of probs, log_probs"):
        load_triton_config(path.parent.parent)


def test_a_graph_that_cannot_be_read_is_never_guessed_about(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The config must then say both facts; with them, the model loads."""
    import service.engine.byo.binding as binding

    def unreadable(path: Path) -> None:
        raise OnnxFormatError("wire type 7 (field 3) at byte 12")

    monkeypatch.setattr(binding, "read_graph", unreadable)
    with pytest.raises(ConfigError, match=r"could not be read \(wire type 7.*set parameters"):
        description(export_repo(tmp_path / "a", KIND_PROBS))
    params = ('parameters { key: "output_kind" value: { string_value: "probs" } }\n'
              'parameters { key: "vocab_size" value: { string_value: "23" } }\n')  # fmt: skip
    desc = description(export_repo(tmp_path / "b", KIND_PROBS, params))
    assert (desc.output_kind, desc.vocab_size) == (KIND_PROBS, V)
