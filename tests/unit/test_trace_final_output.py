"""`trace` on a model of your own whose output is final only (one row for the whole sequence, no
time axis): each step's probabilities are the graph's answer on the sequence so far."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch", reason="pip install -e '.[export]'")

from export.starter import starter_config_text  # noqa: E402
from export.trace_cmd import softmax, trace_model  # noqa: E402

LABELS = ["a", "b", "c", "d"]
HIDDEN = 8
TOKENS = [1, 2, 3, 4, 5, 6]


class FinalOnly(torch.nn.Module):
    """Embedding -> LSTM -> a head on the last step only: logits (B, C)."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = torch.nn.Embedding(10, 6)
        self.lstm = torch.nn.LSTM(6, HIDDEN, batch_first=True)
        self.head = torch.nn.Linear(HIDDEN, len(LABELS))

    def forward(self, tokens, h0, c0):  # type: ignore[no-untyped-def]
        out, (h, c) = self.lstm(self.embedding(tokens), (h0, c0))
        return self.head(out[:, -1]), h, c


@pytest.fixture(scope="module")
def final_only(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """REPO/final/1/model.onnx, its starter config.pbtxt and labels.txt."""
    folder = tmp_path_factory.mktemp("repo") / "final"
    (folder / "1").mkdir(parents=True)
    torch.manual_seed(0)
    state = torch.zeros(1, 2, HIDDEN)
    axes = {"tokens": {0: "B", 1: "T"}, "logits": {0: "B"}}
    axes |= {name: {1: "B"} for name in ("h0", "c0", "hn", "cn")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            FinalOnly().eval(), (torch.zeros(2, 5, dtype=torch.long), state, state),
            str(folder / "1" / "model.onnx"), input_names=["tokens", "h0", "c0"],
            output_names=["logits", "hn", "cn"], dynamic_axes=axes, dynamo=False,
        )  # fmt: skip
    (folder / "config.pbtxt").write_text(starter_config_text(folder / "1" / "model.onnx"))
    (folder / "labels.txt").write_text("".join(f"{label}\n" for label in LABELS))
    return folder


def test_each_step_is_the_final_output_of_the_sequence_so_far(final_only: Path) -> None:
    trace = trace_model(final_only, tokens=",".join(map(str, TOKENS)))
    assert trace.probs.shape == (len(TOKENS), len(LABELS)) and trace.labels == LABELS
    sess = ort.InferenceSession(str(final_only / "1" / "model.onnx"))
    zero = np.zeros((1, 1, HIDDEN), np.float32)
    for t in range(1, len(TOKENS) + 1):
        feeds = {"tokens": np.array([TOKENS[:t]], np.int64), "h0": zero, "c0": zero}
        logits = sess.run(["logits"], feeds)[0][0]
        np.testing.assert_allclose(trace.probs[t - 1], softmax(logits), atol=1e-6)
