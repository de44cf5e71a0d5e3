"""PyTorch vs onnxruntime parity for every architecture of the seeds (random weights)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from export.arch import ArchConfig
from export.onnx_export import describe, export_model
from export.tiny import random_model
from export.verify import TOLERANCE, open_session, torch_from_onnx, torch_parity

FEATURES = {"input_kind": "features", "feature_dim": 4}
TOKENS = {"input_kind": "tokens", "vocab_size": 13, "embedding_dim": 5}

ARCHS = {
    f"{cell}{'-peephole' if peep else ''}{'-cifg' if cifg else ''}-{'bi' if bi else 'uni'}-"
    f"{layers}l-{kind}": ArchConfig(
        cell=cell, peephole=peep, cifg=cifg, bidirectional=bi, num_layers=layers,
        hidden_size=6, num_classes=3, **(TOKENS if kind == "tok" else FEATURES),
    )
    for cell, peep, cifg in [
        ("rnn", False, False), ("gru", False, False), ("lstm", False, False),
        ("lstm", True, False), ("lstm", False, True), ("lstm", True, True),
    ]
    for bi in (False, True)
    for layers, kind in ((1, "tok"), (3, "feat"))
}  # fmt: skip


def _export(arch: ArchConfig, tmp_path: Path, seed: int = 0) -> tuple[torch.nn.Module, Path]:
    model = random_model(arch, seed=seed)
    desc = describe(model, "m", 1, ["a", "b", "c"], tokenizer=None)
    path = tmp_path / "model.onnx"
    export_model(model, desc, str(path))
    return model, path


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_torch_and_onnxruntime_agree_for_every_architecture(name: str, tmp_path: Path) -> None:
    model, path = _export(ARCHS[name], tmp_path)
    sess = open_session(path)
    _, desc = torch_from_onnx(path)
    rng = np.random.default_rng(1)
    worst = max(
        torch_parity(model, sess, desc, rng, batch, t_max)
        for batch in (1, 2, 7)
        for t_max in (1, 4, 13)
    )
    assert worst <= TOLERANCE, f"{name}: max abs diff {worst:.3e}"


@pytest.mark.parametrize(
    "name", ["lstm-peephole-cifg-bi-3l-feat", "gru-bi-1l-tok", "rnn-uni-3l-feat"]
)
def test_torch_model_rebuilt_from_onnx_has_the_exported_weights(name: str, tmp_path: Path) -> None:
    model, path = _export(ARCHS[name], tmp_path, seed=3)
    rebuilt, _ = torch_from_onnx(path)
    original = model.state_dict()
    for key, value in rebuilt.state_dict().items():
        assert torch.allclose(value, original[key], atol=1e-6), key


def test_state_layout_names_every_row(tmp_path: Path) -> None:
    arch = ArchConfig(cell="lstm", bidirectional=True, num_layers=2, hidden_size=4,
                      num_classes=2, **FEATURES)  # fmt: skip
    assert arch.state_rows == 8
    assert arch.state_row_names() == [
        "layer0.fwd.h", "layer0.bwd.h", "layer0.fwd.c", "layer0.bwd.c",
        "layer1.fwd.h", "layer1.bwd.h", "layer1.fwd.c", "layer1.bwd.c",
    ]  # fmt: skip
    gru = ArchConfig(cell="gru", num_layers=3, hidden_size=4, num_classes=2, **FEATURES)
    assert gru.state_rows == 3 and gru.state_slice(2, "h") == (2, 3)


def test_state_rows_hold_what_the_description_says(tmp_path: Path) -> None:
    """The c row of layer 1 in state_out is the c the torch layer returns (not h, not layer 0)."""
    arch = ArchConfig(cell="lstm", num_layers=2, hidden_size=5, num_classes=3, **TOKENS)
    model, path = _export(arch, tmp_path)
    sess = open_session(path)
    x = np.array([[1, 2, 3, 4]], dtype=np.int64)
    out = sess.run(
        None, {"tokens": x, "lengths": np.array([4]), "state": np.zeros((1, 4, 5), np.float32)}
    )
    with torch.no_grad():
        h0 = model.embedding(torch.from_numpy(x))
        y0, (h_a, c_a) = model.layers[0].rnn(h0)
        _, (h_b, c_b) = model.layers[1].rnn(y0)
    np.testing.assert_allclose(out[2][0, 0], h_a[0, 0].numpy(), atol=1e-6)
    np.testing.assert_allclose(out[2][0, 1], c_a[0, 0].numpy(), atol=1e-6)
    np.testing.assert_allclose(out[2][0, 2], h_b[0, 0].numpy(), atol=1e-6)
    np.testing.assert_allclose(out[2][0, 3], c_b[0, 0].numpy(), atol=1e-6)


def test_forget_gate_bias_initialisation_is_configurable() -> None:
    arch = ArchConfig(cell="lstm", hidden_size=4, num_classes=2, forget_bias=2.0, **FEATURES)
    from export.model import RecurrentClassifier

    rnn = RecurrentClassifier(arch).layers[0].rnn
    assert torch.all(rnn.bias_ih_l0[4:8] == 2.0) and torch.all(rnn.bias_hh_l0[4:8] == 0.0)
    cifg = ArchConfig(cell="lstm", cifg=True, hidden_size=4, num_classes=2, **FEATURES)
    rnn = RecurrentClassifier(cifg).layers[0].rnn
    assert torch.all(rnn.bias_ih_l0[0:4] == -1.0), "CIFG: f = 1 - i starts at sigmoid(1)"


def test_invalid_architectures_are_rejected() -> None:
    with pytest.raises(ValueError, match="peephole"):
        ArchConfig(cell="gru", peephole=True, hidden_size=4, num_classes=2, **FEATURES)
    with pytest.raises(ValueError, match="cell"):
        ArchConfig(cell="transformer", hidden_size=4, num_classes=2, **FEATURES)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="vocab_size"):
        ArchConfig(cell="rnn", hidden_size=4, num_classes=2, input_kind="tokens")


def test_exported_graph_runs_wholly_on_cuda_flag(tmp_path: Path) -> None:
    from lstmserve.contract import read_description

    _, path = _export(ARCHS["lstm-peephole-uni-1l-tok"], tmp_path)
    desc = read_description(str(path))
    assert desc.cuda["wholly_on_cuda"] is False and "peephole" in desc.cuda["cpu_fallback"][0]
    _, path = _export(ARCHS["gru-bi-1l-tok"], tmp_path)
    assert read_description(str(path)).cuda == {"wholly_on_cuda": True, "cpu_fallback": []}
