"""`lstm-export config`: a starter config.pbtxt guessed from any ONNX file."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from google.protobuf import text_format
from torch import nn
from tritonclient.grpc import model_config_pb2 as mc

from export.starter import starter_config_text

ROOT = Path(__file__).resolve().parents[2]


class _TorchLSTM(nn.Module):
    """A user's LSTM as torch.onnx.export sees it: state (layers, B, H) in and out."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(5, 8, num_layers=2, batch_first=True)
        self.fc = nn.Linear(8, 3)

    def forward(
        self, x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        y, (h, c) = self.lstm(x, (h0, c0))
        return self.fc(y), h, c


def export_torch_lstm(path: Path) -> Path:
    args = (torch.randn(2, 4, 5), torch.zeros(2, 2, 8), torch.zeros(2, 2, 8))
    axes = {"x": {0: "B", 1: "T"}, "logits": {0: "B", 1: "T"}}
    axes |= {name: {1: "B"} for name in ("h0", "c0", "hn", "cn")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _TorchLSTM().eval(), args, str(path), input_names=["x", "h0", "c0"],
            output_names=["logits", "hn", "cn"], dynamic_axes=axes, dynamo=False,
        )  # fmt: skip
    return path


@pytest.fixture(scope="module")
def torch_lstm_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """REPO/torch-lstm/1/model.onnx with the starter config and a labels file beside it."""
    repo = tmp_path_factory.mktemp("starter")
    version = repo / "torch-lstm" / "1"
    version.mkdir(parents=True)
    model = export_torch_lstm(version / "model.onnx")
    (repo / "torch-lstm" / "config.pbtxt").write_text(starter_config_text(model))
    (repo / "torch-lstm" / "labels.txt").write_text("a\nb\nc\n")
    return repo


def _config(repo: Path) -> mc.ModelConfig:
    text = (repo / "torch-lstm" / "config.pbtxt").read_text()
    return text_format.Parse(text, mc.ModelConfig())


def test_torch_exported_lstm_gets_its_state_pairs_and_batch_axis(torch_lstm_repo: Path) -> None:
    config = _config(torch_lstm_repo)
    assert config.name == "torch-lstm" and config.backend == "onnxruntime"
    assert config.max_batch_size > 0
    pairs = [(s.input_name, s.output_name) for s in config.sequence_batching.state]
    assert pairs == [("h0", "hn"), ("c0", "cn")]
    for state in config.sequence_batching.state:
        assert list(state.dims) == [2, 8] and state.data_type == mc.TYPE_FP32
        assert state.initial_state[0].zero_data and list(state.initial_state[0].dims) == [2, 8]
    assert config.parameters["state_batch_axis"].string_value == "1"  # h0 is (layers, B, H)
    assert [(i.name, list(i.dims)) for i in config.input] == [("x", [-1, 5])]
    assert [(o.name, list(o.dims), o.label_filename) for o in config.output] == [
        ("logits", [-1, 3], "labels.txt")
    ]
    assert "output_kind" not in config.parameters  # the server reads it from the graph:
    header = (torch_lstm_repo / "torch-lstm" / "config.pbtxt").read_text().split("\nname:")[0]
    assert "# NOTE: output_kind logits: 'logits' ends in a " in header, header


def test_starter_is_accepted_by_the_lstm_serve_loader(torch_lstm_repo: Path) -> None:
    import onnxruntime as ort

    from service.engine.byo.binding import bind
    from service.tritonconfig import load_triton_config

    model = load_triton_config(torch_lstm_repo / "torch-lstm")
    assert [(s.input_name, s.output_name) for s in model.states] == [("h0", "hn"), ("c0", "cn")]
    assert model.labels(model.outputs[0], 3) == ("a", "b", "c")
    path = torch_lstm_repo / "torch-lstm" / "1" / "model.onnx"
    binding = bind(model, ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]), path)
    assert binding.input_kind == "features" and binding.feature_dim == 5
    assert [(s.shape, s.batch_axis) for s in binding.states] == [((2, 8), 1), ((2, 8), 1)]
    assert binding.step_output is not None and binding.step_output.name == "logits"


def test_batch_first_state_needs_no_batch_axis_and_lengths_and_vocab_are_found(
    tmp_path: Path,
) -> None:
    from export.tiny import TINY_ARCHS, TINY_VOCAB, write_tiny_model

    path = write_tiny_model(tmp_path, "tiny-lstm", TINY_ARCHS["tiny-lstm"])
    config = text_format.Parse(starter_config_text(path), mc.ModelConfig())
    assert config.name == "tiny-lstm" and config.max_batch_size > 0
    assert [(s.input_name, s.output_name) for s in config.sequence_batching.state] == [
        ("state", "state_out")
    ]
    assert list(config.sequence_batching.state[0].dims) == [4, 8]  # S = 2 layers x (h, c)
    assert "state_batch_axis" not in config.parameters
    assert config.parameters["lengths_input"].string_value == "lengths"
    # the file's own description gives the vocabulary and the output kind to the server
    assert "vocab_size" not in config.parameters and "output_kind" not in config.parameters
    assert {i.name: list(i.dims) for i in config.input} == {"tokens": [-1], "lengths": [1]}
    lengths = next(i for i in config.input if i.name == "lengths")
    assert lengths.HasField("reshape") and list(lengths.reshape.shape) == []  # Triton's [B]

    import onnxruntime as ort

    from service.engine.byo.binding import bind
    from service.tritonconfig import load_triton_config

    text = starter_config_text(path)
    assert "# NOTE: this file carries an lstm-serve description" in text
    assert all(not o.label_filename for o in config.output)  # its own labels are kept
    (path.parent.parent / "config.pbtxt").write_text(text)
    triton = load_triton_config(path.parent.parent)
    binding = bind(
        triton, ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]), path
    )
    assert binding.lengths is not None and binding.lengths.name == "lengths"
    assert binding.input_kind == "tokens" and binding.vocab_size == len(TINY_VOCAB)
    assert binding.labels == ("class0", "class1", "class2")


def test_a_model_without_a_state_pair_gets_a_todo(tmp_path: Path) -> None:
    path = tmp_path / "mlp.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(nn.Linear(4, 2).eval(), (torch.randn(1, 4),), str(path),
                          input_names=["x"], output_names=["y"], dynamo=False)  # fmt: skip
    text = starter_config_text(path, name="mlp")
    assert "# TODO: no input/output pair looks like a recurrent state" in text
    config = text_format.Parse(text, mc.ModelConfig())
    assert config.name == "mlp" and not config.sequence_batching.state
    assert config.max_batch_size == 0  # dim 0 fixed (1): no batch axis to leave out
    assert list(config.input[0].dims) == [1, 4]


def test_a_file_that_is_not_onnx_is_refused_by_name(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.onnx"
    bogus.write_bytes(b"\x00 not onnx")
    with pytest.raises(ValueError, match=r"bogus\.onnx: not an ONNX model"):
        starter_config_text(bogus)


@pytest.mark.parametrize(
    ("inp", "out", "paired"),
    [
        ("h0", "hn", True),
        ("c_in", "c_out", True),
        ("hidden", "hidden_out", True),
        ("state_in", "state_out", True),
        ("input_state", "output_state", True),
        ("lstm.h.prev", "lstm.h.next", True),
        ("x", "y", False),
        ("input", "output", False),
        ("features", "features_out", False),  # same shape, marked, but not a state's name
    ],
)
def test_state_pairs_are_guessed_from_names(inp: str, out: str, paired: bool) -> None:
    from onnx import TensorProto

    from export.starter import Tensor, state_pairs

    shape = (None, 2, 8)
    found = state_pairs([Tensor(inp, TensorProto.FLOAT, shape)],
                        [Tensor(out, TensorProto.FLOAT, shape)])  # fmt: skip
    assert bool(found) == paired


def test_a_state_pair_needs_one_type_and_shape() -> None:
    from onnx import TensorProto

    from export.starter import Tensor, state_pairs

    h0 = Tensor("h0", TensorProto.FLOAT, (2, None, 8))
    assert not state_pairs([h0], [Tensor("hn", TensorProto.FLOAT, (2, None, 9))])
    assert not state_pairs([h0], [Tensor("hn", TensorProto.FLOAT16, (2, None, 8))])
    assert state_pairs([h0], [Tensor("hn", TensorProto.FLOAT, (2, None, 8))])


def _triton_style_graph(path: Path) -> Path:
    """A Triton-style sequence model: INPUT, START [B, 1] int32, READY [B] bool, a state."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("ReduceSum", ["INPUT", "axis1"], ["pooled"], keepdims=0),
        helper.make_node("MatMul", ["pooled", "W"], ["OUTPUT"]),
        helper.make_node("Identity", ["state_in"], ["state_out"]),
    ]
    inits = [numpy_helper.from_array(np.array([1], np.int64), "axis1"),
             numpy_helper.from_array(np.ones((4, 3), np.float32), "W")]  # fmt: skip
    inputs = [
        helper.make_tensor_value_info("INPUT", TensorProto.FLOAT, ["B", "T", 4]),
        helper.make_tensor_value_info("START", TensorProto.INT32, ["B", 1]),
        helper.make_tensor_value_info("READY", TensorProto.BOOL, ["B"]),
        helper.make_tensor_value_info("state_in", TensorProto.FLOAT, ["B", 2, 8]),
    ]
    outputs = [
        helper.make_tensor_value_info("OUTPUT", TensorProto.FLOAT, ["B", 3]),
        helper.make_tensor_value_info("state_out", TensorProto.FLOAT, ["B", 2, 8]),
    ]
    graph = helper.make_graph(nodes, "seq", inputs, outputs, inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.save_model(proto, str(path))
    return path


def test_triton_sequence_controls_become_control_inputs(tmp_path: Path) -> None:
    import onnxruntime as ort

    from service.engine.byo.binding import bind
    from service.tritonconfig import load_triton_config

    version = tmp_path / "seq" / "1"
    version.mkdir(parents=True)
    path = _triton_style_graph(version / "model.onnx")
    text = starter_config_text(path)
    config = text_format.Parse(text, mc.ModelConfig())
    assert [i.name for i in config.input] == ["INPUT"]  # controls and states are not inputs
    controls = {c.name: c.control[0] for c in config.sequence_batching.control_input}
    kinds = mc.ModelSequenceBatching.Control
    assert controls["START"].kind == kinds.CONTROL_SEQUENCE_START
    assert list(controls["START"].int32_false_true) == [0, 1]
    assert controls["READY"].kind == kinds.CONTROL_SEQUENCE_READY
    assert list(controls["READY"].bool_false_true) == [False, True]

    (version.parent / "config.pbtxt").write_text(text)
    (version.parent / "labels.txt").write_text("a\nb\nc\n")
    triton = load_triton_config(version.parent)
    binding = bind(
        triton, ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]), path
    )
    assert {c.name: c.kind for c, _ in binding.controls} == {"START": "START", "READY": "READY"}


def test_an_output_declared_static_but_following_the_input_is_written_dynamic(
    tmp_path: Path,
) -> None:
    """torch's dynamo exporter declares the example's T on outputs; running the graph shows."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["logits"]),
         helper.make_node("Identity", ["h_in"], ["h_out"])],
        "declared",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "T", 2]),
         helper.make_tensor_value_info("h_in", TensorProto.FLOAT, ["B", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", 5, 2]),
         helper.make_tensor_value_info("h_out", TensorProto.FLOAT, ["B", 4])],
    )  # fmt: skip
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    path = tmp_path / "declared.onnx"
    onnx.save_model(proto, str(path))
    text = starter_config_text(path)
    assert "output 'logits' is declared [-1, 5, 2], but its axes [1] follow" in text
    config = text_format.Parse(text, mc.ModelConfig())
    assert [list(o.dims) for o in config.output] == [[-1, 2]]
    assert [(s.input_name, s.output_name) for s in config.sequence_batching.state] == [
        ("h_in", "h_out")
    ]
