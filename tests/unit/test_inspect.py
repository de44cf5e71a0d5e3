"""`inspect` reads each cell kind's gates exactly as the PyTorch module holds them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from export.arch import ArchConfig
from export.inspect_cmd import format_report, inspect_model
from export.onnx_export import describe, export_model
from export.tiny import TINY_ARCHS, TINY_JORDAN, random_model
from tests.integration.test_generic_models import HIDDEN, LAYERS, write_model

ROOT = Path(__file__).resolve().parents[2]
# ONNX gate name -> the block index in PyTorch's own order (LSTM i f g o, GRU r z n).
TORCH_BLOCK = {"LSTM": {"i": 0, "f": 1, "c": 2, "o": 3}, "GRU": {"r": 0, "z": 1, "h": 2},
               "RNN": {"h": 0}}  # fmt: skip
ARCHS = {**TINY_ARCHS, "tiny-bigru": ArchConfig(cell="gru", bidirectional=True, hidden_size=5,
         num_classes=3, input_kind="features", feature_dim=4, num_layers=2)}  # fmt: skip


def _norm(t: torch.Tensor) -> float:
    return float(np.linalg.norm(t.detach().numpy().astype(np.float32)))


def _export(arch: ArchConfig, tmp_path: Path, seed: int = 0) -> tuple[torch.nn.Module, Path]:
    model = random_model(arch, seed=seed)
    labels = [f"c{i}" for i in range(arch.num_classes)]
    path = tmp_path / "model.onnx"
    export_model(model, describe(model, "m", 1, labels), str(path))
    return model, path


def _check_gates(layer: dict, rnn: torch.nn.RNNBase, index: int, hid: int) -> None:
    """Every gate's W, R, Wb, Rb norm and the forget bias against the torch parameters."""
    order = TORCH_BLOCK[layer["op"]]
    for d, entry in enumerate(layer["per_direction"]):
        sfx = f"_l{index}" + ("_reverse" if d else "")
        torch_params = {k: getattr(rnn, f"{k}{sfx}") for k in ("weight_ih", "weight_hh",
                                                                "bias_ih", "bias_hh")}  # fmt: skip
        for gate in entry["gates"]:
            k = order[gate["gate"]]
            for key, name in (("W", "weight_ih"), ("R", "weight_hh"), ("Wb", "bias_ih"),
                              ("Rb", "bias_hh")):  # fmt: skip
                block = torch_params[name][k * hid : (k + 1) * hid]
                assert gate[key]["shape"] == list(block.shape)
                assert gate[key]["l2_norm"] == pytest.approx(_norm(block), abs=1e-5), (gate, key)
        fb = entry["forget_bias"]
        if layer["op"] == "RNN":
            assert fb is None
            continue
        k = 1 if layer["op"] == "GRU" else (0 if layer["coupled_input_forget"] else 1)
        b = (torch_params["bias_ih"] + torch_params["bias_hh"]).detach()[k * hid : (k + 1) * hid]
        expected = -b if layer["coupled_input_forget"] else b
        assert fb["mean"] == pytest.approx(float(expected.mean()), abs=1e-5)
        assert fb["min"] == pytest.approx(float(expected.min()), abs=1e-5)
        assert fb["max"] == pytest.approx(float(expected.max()), abs=1e-5)


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_inspect_matches_the_torch_parameters(name: str, tmp_path: Path) -> None:
    arch = ARCHS[name]
    model, path = _export(arch, tmp_path)
    report = inspect_model(path)
    assert len(report["layers"]) == arch.num_layers
    torch_recurrent = sum(p.numel() for p in model.layers.parameters())
    assert report["recurrent_parameters"] == torch_recurrent
    for index, layer in enumerate(report["layers"]):
        assert layer["op"] == arch.cell.upper() and layer["directions"] == arch.directions
        assert layer["coupled_input_forget"] == arch.cifg and layer["peepholes"] == arch.peephole
        _check_gates(layer, model.layers[index].rnn, 0, arch.hidden_size)
        if arch.peephole:
            torch_p = model.layers[index].peephole  # (D, 3H) in i, f, o order
            for d, entry in enumerate(layer["per_direction"]):
                i, f, o = torch_p[d].split(arch.hidden_size)
                norms = {t["name"]: t["l2_norm"] for t in entry["peepholes"]}
                for key, value in (("P_i", i), ("P_f", f), ("P_o", o)):
                    assert norms[key] == pytest.approx(_norm(value), abs=1e-5)
        for entry in layer["per_direction"]:
            if entry["forget_bias"] is not None:
                assert entry["forget_bias"]["initialised_to"] == 1.0
    assert f"layer {arch.num_layers - 1}" in format_report(report)


def test_inspect_jordan_matches_its_parameters(tmp_path: Path) -> None:
    model, path = _export(TINY_JORDAN, tmp_path)
    (layer,) = inspect_model(path)["layers"]
    norms = {t["name"].split()[0]: t for t in layer["tensors"]}
    assert norms["W_xh"]["shape"] == list(model.w_xh.shape)
    assert norms["W_yh"]["shape"] == [TINY_JORDAN.hidden_size, TINY_JORDAN.num_classes]
    for key, param in (("W_xh", model.w_xh), ("W_yh", model.w_yh), ("b_h", model.b_h)):
        assert norms[key]["l2_norm"] == pytest.approx(_norm(param), abs=1e-5)


def test_inspect_a_generic_torch_onnx_export_of_nn_lstm(tmp_path: Path) -> None:
    module = write_model(tmp_path, "own-lstm")
    report = inspect_model(tmp_path / "own-lstm")
    assert report["architecture"] is None and report["config_pbtxt"]
    assert [layer["op"] for layer in report["layers"]] == ["LSTM"] * LAYERS
    for index, layer in enumerate(report["layers"]):
        _check_gates(layer, module.lstm, index, HIDDEN)
        assert "initialised_to" not in layer["per_direction"][0]["forget_bias"]
    assert report["recurrent_parameters"] == sum(p.numel() for p in module.lstm.parameters())


@pytest.mark.parametrize("model", ["speaker-vowels/1", "langid-chars", "speaker-vowels-jordan/1"])
def test_inspect_the_shipped_models(model: str) -> None:
    report = inspect_model(ROOT / "models" / model)
    assert report["recurrent_parameters"] > 1000
    text = format_report(report)
    if "jordan" not in model:
        fb = report["layers"][0]["per_direction"][0]["forget_bias"]
        assert fb["initialised_to"] == 1.0 and fb["min"] <= fb["mean"] <= fb["max"]
        assert "notes advise 1-2" in text
