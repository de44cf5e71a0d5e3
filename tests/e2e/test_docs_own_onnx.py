"""docs/own-model-onnx.md runs as written (tests/e2e/docs_runner.py)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from tests.e2e.docs_runner import doc_blocks, run_doc

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "own-model-onnx.md"


@pytest.mark.skipif(
    importlib.util.find_spec("onnxscript") is None,
    reason="torch.onnx.export's default exporter needs onnxscript (pip install -e '.[export]')",
)
def test_the_own_onnx_tutorial_runs_as_written(tmp_path: Path) -> None:
    assert [lang for lang, _, _ in doc_blocks(DOC)][:6] == [
        "python", "protobuf", "bash", "bash", "bash", "protobuf"
    ]  # fmt: skip
    verify, client = run_doc(DOC, tmp_path)
    assert '"status": "PASS"' in verify and '"model": "digit-seen/1"' in verify
    listed, classify, *stream = client.splitlines()
    assert listed.startswith("digit-seen v1 (latest)  tokens vocab=38  S×H=4×32"), listed
    assert "labels=no-digit-yet,digit-seen" in listed
    assert classify.startswith("digit-seen v1  6 steps  digit-seen"), classify
    # What the doc says the stream shows: the digit is remembered through the state.
    answers = {m[1]: m[2] for line in stream if (m := re.match(r"'(.*)'\s+(\S+)", line))}
    assert answers["hello "] == "no-digit-yet" and answers["hello 2"] == "digit-seen", stream
    assert answers["hello 2 you"] == "digit-seen", stream
    assert "ended after 11 steps" in client


def test_the_pytorch_layout_example_is_a_config_lstm_serve_accepts(tmp_path: Path) -> None:
    """The illustration of PyTorch's (h0, c0) layout parses and passes the field check."""
    from service.tritonconfig import load_triton_config

    illustration = [body for lang, info, body in doc_blocks(DOC) if lang == "protobuf" and not info]
    assert len(illustration) == 1
    folder = tmp_path / "digit-seen"
    folder.mkdir()
    (folder / "config.pbtxt").write_text(illustration[0])
    triton = load_triton_config(folder)
    assert [(s.input_name, s.dims) for s in triton.states] == [
        ("h0", (2, -1, 32)),
        ("c0", (2, -1, 32)),
    ]
