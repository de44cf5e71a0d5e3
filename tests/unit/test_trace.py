"""`trace` equals onnxruntime step by step on every architecture, writes its PNG, and fails
loudly when numpy and onnxruntime disagree."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from export.arch import ArchConfig
from export.tiny import TINY_ARCHS, TINY_JORDAN, write_tiny_model
from export.trace_cmd import TraceMismatch, softmax, trace_model, write_trace
from export.verify import open_session
from lstmserve.contract import read_description
from tests.integration.test_generic_models import HIDDEN, LAYERS, write_model

ARCHS: dict[str, ArchConfig] = {**TINY_ARCHS, "tiny-jordan": TINY_JORDAN}
TEXT = "schmetterling"


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("trace_models")
    for name, arch in ARCHS.items():
        write_tiny_model(root, name, arch)
    return root


def _input(arch: ArchConfig, tmp: Path) -> tuple[dict, np.ndarray]:
    if arch.input_kind == "tokens":
        from export.tiny import TINY_VOCAB

        return {"text": TEXT}, np.array([TINY_VOCAB.index(c) for c in TEXT], np.int64)
    frames = np.random.default_rng(0).normal(size=(11, arch.feature_dim)).astype(np.float32)
    csv = tmp / "frames.csv"
    csv.write_text("\n".join(",".join(f"{v:.6f}" for v in row) for row in frames))
    return {"frames": csv}, np.loadtxt(csv, delimiter=",", dtype=np.float32, ndmin=2)


def _prefix_runs(path: Path, x: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """onnxruntime on the plain file: step_probs of the whole sequence, and state_out after
    every prefix (a unidirectional model's state rows are its h / c / y at that step)."""
    desc = read_description(str(path))
    sess = open_session(path)
    zero = np.zeros((1, desc.state_rows, desc.hidden_size), np.float32)
    feeds = {desc.input_name: x[None], "lengths": np.array([len(x)]), "state": zero}
    step_probs = sess.run(None, feeds)[0][0]
    states = [
        sess.run(None, feeds | {"lengths": np.array([t])})[2][0] for t in range(1, len(x) + 1)
    ]
    return step_probs, states


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_trace_equals_onnxruntime_per_step(name: str, repo: Path, tmp_path: Path) -> None:
    arch = ARCHS[name]
    path = repo / name / "1" / "model.onnx"
    kwargs, x = _input(arch, tmp_path)
    trace = trace_model(path.parent, **kwargs)
    step_probs, states = _prefix_runs(path, x)
    np.testing.assert_allclose(trace.probs, step_probs, rtol=0, atol=1e-5)
    rows = read_description(str(path)).state_row_names
    for t, state in enumerate(states):
        for row, value in zip(rows, state, strict=True):
            layer, direction, kind = row.split(".")
            if kind == "y":  # Jordan: the state is the output after step t
                np.testing.assert_allclose(value, trace.probs[t], rtol=0, atol=1e-5)
                continue
            gates = trace.gates[f"{layer}.{direction}"]
            last = t == len(states) - 1
            if direction == "bwd":  # a reverse direction's final h is its value at step 0
                if last:
                    np.testing.assert_allclose(value, gates[kind][0], rtol=0, atol=1e-5)
                continue
            # Above a bidirectional layer a prefix is another input: only the whole one counts.
            if arch.bidirectional and layer != "layer0" and not last:
                continue
            np.testing.assert_allclose(value, gates[kind][t], rtol=0, atol=1e-5)
    expected = {"lstm": {"i", "f", "o", "g", "c", "h"}, "gru": {"z", "r", "n", "h"},
                "rnn": {"h"}, "jordan": {"h", "y_prev"}}[arch.cell]  # fmt: skip
    assert all(set(g) == expected for g in trace.gates.values())
    assert max(trace.checks.values()) <= 1e-5


def test_trace_writes_json_and_a_png(repo: Path, tmp_path: Path) -> None:
    trace = trace_model(repo / "tiny-lstm" / "1", text=TEXT)
    files = write_trace(trace, tmp_path / "out")
    png = Path(files["png"]).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    data = json.loads(Path(files["json"]).read_text())
    assert [s["input"] for s in data["steps"]] == list(TEXT)
    assert set(data["activations"]) == {"layer0.fwd", "layer1.fwd"}
    assert len(data["activations"]["layer0.fwd"]["f"]) == len(TEXT)
    assert all(0 <= s["probability"] <= 1 for s in data["steps"])


def test_trace_fails_loudly_when_onnxruntime_computes_something_else(
    repo: Path, tmp_path: Path
) -> None:
    proto = onnx.load(str(repo / "tiny-jordan" / "1" / "model.onnx"))
    scan = next(n for n in proto.graph.node if n.op_type == "Scan")
    body = scan.attribute[0].g
    next(n for n in body.node if n.op_type == "Tanh").op_type = "Sigmoid"
    bad = tmp_path / "bad" / "1"
    bad.mkdir(parents=True)
    onnx.save(proto, str(bad / "model.onnx"))
    with pytest.raises(TraceMismatch, match="differ"):
        trace_model(bad, text=TEXT)


def test_trace_a_generic_torch_onnx_export_of_nn_lstm(tmp_path: Path) -> None:
    module = write_model(tmp_path, "own-lstm")
    ids = [3, 1, 4, 1, 5, 9, 2, 6]
    trace = trace_model(tmp_path / "own-lstm", tokens=",".join(map(str, ids)))
    assert set(trace.gates) == {f"layer{i}.fwd" for i in range(LAYERS)}
    import torch

    with torch.no_grad():
        logits, state = module(torch.tensor([ids]), torch.zeros(1, 2 * LAYERS, HIDDEN))
    np.testing.assert_allclose(trace.probs, softmax(logits[0].double().numpy()), atol=1e-5)
    for layer in range(LAYERS):  # the final h of each layer, from PyTorch itself
        h = trace.gates[f"layer{layer}.fwd"]["h"][-1]
        np.testing.assert_allclose(h, state[0, layer].numpy(), atol=1e-5)
    assert trace.labels == ["red", "green", "blue"]


def test_trace_text_without_a_tokenizer_names_the_way_out(tmp_path: Path) -> None:
    write_model(tmp_path, "own-lstm")
    with pytest.raises(ValueError, match="--tokens"):
        trace_model(tmp_path / "own-lstm", text="hello")
