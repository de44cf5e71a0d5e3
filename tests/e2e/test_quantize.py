"""`lstm-export quantize` as a subprocess: the int8 copy keeps the v1 contract, verify passes it
at its stated tolerance (and fails a broken one), a real lstm-serve process serves and streams
it, and the int8 / float32 compute ceiling command runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from export.verify import INT8_MEAN_TOLERANCE, INT8_TOLERANCE, verify_model
from lstmserve.contract import read_description
from tests.e2e.conftest import ROOT, ServerProcess, run_client
from tests.e2e.test_client_cli import STEP_LINE


def _export(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "export.cli", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.fixture(scope="module")
def int8_repo(tiny_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository holding tiny-lstm-int8/1 and tiny-gru-int8/1, written by the CLI."""
    repo = tmp_path_factory.mktemp("int8")
    for name in ("tiny-lstm", "tiny-gru"):
        done = _export(
            "quantize", str(tiny_repo / name / "1"), "--out", str(repo / f"{name}-int8" / "1")
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert json.loads(done.stdout)["status"] == "PASS"
    return repo


def test_quantize_writes_an_int8_lstm_with_the_contract_and_a_card(int8_repo: Path) -> None:
    target = int8_repo / "tiny-lstm-int8" / "1"
    ops = {n.op_type for n in onnx.load(str(target / "model.onnx")).graph.node}
    assert "DynamicQuantizeLSTM" in ops and "MatMulInteger" in ops and "LSTM" not in ops
    desc = read_description(str(target / "model.onnx"))  # the metadata survived quantization
    assert (desc.name, desc.version) == ("tiny-lstm-int8", 1)
    assert desc.tokenizer is not None and desc.state_rows == 4 and desc.streamable
    q = desc.training["quantization"]
    assert q["source"] == "tiny-lstm/1" and q["quantized_ops"] == ["Gather", "LSTM", "MatMul"]
    assert q["tolerance"] == INT8_TOLERANCE and desc.cuda["wholly_on_cuda"] is False
    assert desc.cuda["cpu_fallback"] == [
        "DynamicQuantizeLSTM: a CPU kernel only (onnxruntime contrib op)"
    ]
    card = (target / "README.md").read_text()
    assert "Accuracy delta: n/a (no test set" in card  # a tiny random model has no test set
    assert f"max |diff| <= {INT8_TOLERANCE:g}" in card and "passed: True" in card


def test_a_gru_keeps_float32_recurrent_weights_and_says_so(int8_repo: Path) -> None:
    target = int8_repo / "tiny-gru-int8" / "1"
    ops = {n.op_type for n in onnx.load(str(target / "model.onnx")).graph.node}
    assert "GRU" in ops and "MatMulInteger" in ops  # only the head (and the embedding)
    q = read_description(str(target / "model.onnx")).training["quantization"]
    assert "GRU" not in q["quantized_ops"] and "GRU" in q["float32_ops"]
    assert "**GRU stays float32**" in (target / "README.md").read_text()


def test_verify_passes_the_int8_model_at_its_stated_tolerance(int8_repo: Path) -> None:
    done = _export("verify", str(int8_repo / "tiny-lstm-int8" / "1"))
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["status"] == "PASS" and report["tolerance"] == INT8_TOLERANCE
    assert report["mean_tolerance"] == INT8_MEAN_TOLERANCE
    assert 0 < report["max_diff_streaming_vs_whole"] <= INT8_TOLERANCE  # not bit-equal any more
    assert set(report["mean_diff"]) == {
        "torch_vs_onnxruntime", "padded_batch_vs_alone", "streaming_vs_whole"
    }  # fmt: skip


def test_verify_fails_an_int8_model_that_ignores_its_state(int8_repo: Path, tmp_path: Path) -> None:
    proto = onnx.load(str(int8_repo / "tiny-lstm-int8" / "1" / "model.onnx"))
    for node in proto.graph.node:
        if node.op_type == "DynamicQuantizeLSTM":
            node.input[5] = ""  # initial_h: every call starts from zeros
    broken = tmp_path / "tiny-lstm-int8" / "1"
    broken.mkdir(parents=True)
    onnx.save(proto, str(broken / "model.onnx"))
    report = verify_model(broken)
    assert not report.passed, report.to_dict()


def test_the_int8_model_is_served_and_streamed_by_a_real_server(int8_repo: Path) -> None:
    server = ServerProcess(int8_repo)
    try:
        server.wait_event("ready")
        listed = run_client("--address", server.address, "list")
        assert listed.returncode == 0, listed.stderr
        assert "tiny-lstm-int8 v1" in listed.stdout
        word = "streaming"
        out = run_client("--address", server.address, "stream", "tiny-lstm-int8", "--text", word)
        assert out.returncode == 0, out.stderr
        steps = [m for m in map(STEP_LINE.match, out.stdout.splitlines()) if m]
        assert [m["prefix"] for m in steps] == [word[: i + 1] for i in range(len(word))]
        assert out.stdout.splitlines()[-1] == f"ended after {len(word)} steps"
    finally:
        assert server.stop() == 0


def test_quantize_refuses_an_out_that_is_not_name_version(tiny_repo: Path, tmp_path: Path) -> None:
    done = _export("quantize", str(tiny_repo / "tiny-gru" / "1"), "--out", str(tmp_path / "x"))
    assert done.returncode == 2 and "REPO/NAME/VERSION" in done.stderr


def test_the_ceiling_command_reports_the_int8_ratio(tiny_repo: Path, int8_repo: Path) -> None:
    pair = f"{tiny_repo / 'tiny-lstm' / '1'}:{int8_repo / 'tiny-lstm-int8' / '1'}"
    done = subprocess.run(
        [sys.executable, "-m", "bench.ceiling", "int8", pair, "--seconds", "0.05", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = next(iter(json.loads(done.stdout).values()))
    assert [(r["batch"], r["steps"]) for r in rows] == [(1, 1), (1, 16), (64, 16)]
    assert all(r["ratio"] == r["int8_steps_per_s"] / r["float32_steps_per_s"] > 0 for r in rows)


def test_card_refreshes_an_int8_card_from_its_report(int8_repo: Path) -> None:
    target = int8_repo / "tiny-gru-int8" / "1"
    (target / "README.md").unlink()
    done = _export("card", str(target))
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["verify"]["passed"] is True
    assert "**GRU stays float32**" in (target / "README.md").read_text()
