"""A Triton model repository written the way Triton's docs show, served unchanged, in a server
process that cannot import onnx (the serving environment: `pip install -e .`, no extras).

The model is a plain `torch.onnx.export` of embedding -> nn.LSTM -> linear -> softmax (its output
already is probabilities), its (h, c) state pair as inputs / outputs and START / READY controls
as Triton's implicit-state and sequence examples have them; the config.pbtxt is Triton's, with a
`label_filename` and no lstm-serve parameter. Every protocol answers what PyTorch computes within
1e-5: native Stream and Classify, Triton gRPC and HTTP sequences, and lstm-client with token ids.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from torch import nn

from lstmserve.client import LstmClient
from tests.e2e.conftest import ServerProcess, run_client

NAME, VOCAB, HIDDEN = "lstm_sequence", 30, 16
LABELS = ["english", "german", "french", "dutch"]
WORD = np.array([3, 17, 5, 5, 29, 0, 11, 8, 21, 2, 14], dtype=np.int64)
CHUNKS = [4, 1, 3, 3]  # sums to len(WORD)

CONFIG = f"""name: "{NAME}"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [
  {{ name: "INPUT_TOKENS" data_type: TYPE_INT64 dims: [ -1 ] }}
]
output [
  {{ name: "OUTPUT" data_type: TYPE_FP32 dims: [ 4 ] label_filename: "labels.txt" }}
]
sequence_batching {{
  max_sequence_idle_microseconds: 60000000
  direct {{ }}
  control_input [
    {{ name: "START" control [ {{ kind: CONTROL_SEQUENCE_START fp32_false_true: [ 0, 1 ] }} ] }},
    {{ name: "READY" control [ {{ kind: CONTROL_SEQUENCE_READY fp32_false_true: [ 0, 1 ] }} ] }}
  ]
  state [
    {{
      input_name: "INPUT_STATE_H"
      output_name: "OUTPUT_STATE_H"
      data_type: TYPE_FP32
      dims: [ 1, {HIDDEN} ]
      initial_state: {{ data_type: TYPE_FP32 dims: [ 1, {HIDDEN} ] zero_data: true name: "zeros" }}
    }},
    {{
      input_name: "INPUT_STATE_C"
      output_name: "OUTPUT_STATE_C"
      data_type: TYPE_FP32
      dims: [ 1, {HIDDEN} ]
      initial_state: {{ data_type: TYPE_FP32 dims: [ 1, {HIDDEN} ] zero_data: true name: "zeros" }}
    }}
  ]
}}
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
"""


class SequenceLstm(nn.Module):
    """INPUT_TOKENS (B, T), START and READY (B, 1), the state pair (B, 1, H) each ->
    OUTPUT (B, 4) probabilities after the last step, and the new state pair."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, 8)
        self.lstm = nn.LSTM(8, HIDDEN, batch_first=True)
        self.head = nn.Linear(HIDDEN, len(LABELS))

    def forward(self, tokens: torch.Tensor, start: torch.Tensor, ready: torch.Tensor,
                h: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, ...]:  # fmt: skip
        keep = (ready * (1.0 - start))[:, :, None]  # START: the sequence's state starts at zero
        h0, c0 = (h * keep).transpose(0, 1).contiguous(), (c * keep).transpose(0, 1).contiguous()
        y, (hn, cn) = self.lstm(self.embedding(tokens), (h0, c0))
        probs = torch.softmax(self.head(y[:, -1]), dim=-1)  # (B, 4): already probabilities
        return probs, hn.transpose(0, 1), cn.transpose(0, 1)


def pytorch_probs(model: SequenceLstm, tokens: np.ndarray) -> np.ndarray:
    """(4,) what PyTorch computes after the whole of `tokens`, from the start of a sequence."""
    zeros, one = torch.zeros(1, 1, HIDDEN), torch.ones(1, 1)
    with torch.no_grad():
        return model(torch.from_numpy(tokens[None]), one, one, zeros, zeros)[0][0].numpy()


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SequenceLstm]:
    """REPO/lstm_sequence/{config.pbtxt, labels.txt, 1/model.onnx}, as for Triton."""
    repo = tmp_path_factory.mktemp("triton-repo")
    folder = repo / NAME
    (folder / "1").mkdir(parents=True)
    torch.manual_seed(7)
    model = SequenceLstm().eval()
    zeros, ones = torch.zeros(1, 1, HIDDEN), torch.ones(1, 1)
    torch.onnx.export(
        model, (torch.zeros(1, 3, dtype=torch.long), ones, ones, zeros, zeros),
        str(folder / "1" / "model.onnx"), dynamo=False,
        input_names=["INPUT_TOKENS", "START", "READY", "INPUT_STATE_H", "INPUT_STATE_C"],
        output_names=["OUTPUT", "OUTPUT_STATE_H", "OUTPUT_STATE_C"],
        dynamic_axes={"INPUT_TOKENS": {0: "batch", 1: "time"}, "START": {0: "batch"},
                      "READY": {0: "batch"}, "INPUT_STATE_H": {0: "batch"},
                      "INPUT_STATE_C": {0: "batch"}, "OUTPUT": {0: "batch"},
                      "OUTPUT_STATE_H": {0: "batch"}, "OUTPUT_STATE_C": {0: "batch"}},
    )  # fmt: skip
    (folder / "config.pbtxt").write_text(CONFIG, encoding="utf-8")
    (folder / "labels.txt").write_text("\n".join(LABELS) + "\n", encoding="utf-8")
    return repo, model


@pytest.fixture(scope="module")
def served(repository: tuple[Path, SequenceLstm]) -> Iterator[tuple[ServerProcess, dict]]:
    """The repository served without onnx; the log line that says what its outputs are."""
    server = ServerProcess(repository[0], "--model-control", "none",
                           module="tests.e2e.without_onnx")  # fmt: skip
    try:
        inferred = server.wait_event(f"model outputs read as {'probs'}", 60)
        server.wait_event("ready", 60)
        yield server, inferred
    finally:
        server.stop()
    assert any('"onnx blocked"' in line for line in server.lines), "the hook was not installed"
    assert not [line for line in server.lines if "onnx import refused" in line]


def chunks() -> list[np.ndarray]:
    bounds = np.cumsum([0, *CHUNKS])
    return [WORD[a:b] for a, b in itertools.pairwise(bounds)]


def expected(model: SequenceLstm) -> np.ndarray:
    """(chunks, 4): PyTorch's probabilities after each chunk of WORD."""
    ends = np.cumsum(CHUNKS)
    return np.stack([pytorch_probs(model, WORD[:end]) for end in ends])


def test_it_loads_without_onnx_and_says_its_outputs_are_probabilities(
    served: tuple[ServerProcess, dict[str, Any]],
) -> None:
    _, inferred = served
    assert inferred["model"] == NAME and inferred["output_kind"] == "probs"
    assert "'OUTPUT' ends in a Softmax over the classes" in inferred["rule"]
    assert inferred["vocab_size"] == VOCAB and "a Gather" in inferred["vocab_size_from"]

    async def info() -> Any:
        async with LstmClient(served[0].address) as client:
            return await client.get_model(NAME)

    model = asyncio.run(info())
    assert model.output_kind == "probs" and "Softmax" in model.output_kind_rule
    assert list(model.labels) == LABELS and model.vocab_size == VOCAB


def test_native_stream_and_classify_equal_pytorch(
    served: tuple[ServerProcess, dict[str, Any]], repository: tuple[Path, SequenceLstm]
) -> None:
    async def scenario() -> tuple[np.ndarray, np.ndarray]:
        async with LstmClient(served[0].address) as client:
            session = await client.open_session(NAME)
            got = [list((await session.step(chunk)).probabilities) for chunk in chunks()]
            await session.end()
            whole = await client.classify(NAME, [WORD])
            return np.array(got), np.array(whole.results[0].probabilities)

    streamed, classified = asyncio.run(scenario())
    want = expected(repository[1])
    np.testing.assert_allclose(streamed, want, atol=1e-5)  # exactly them: no second softmax
    np.testing.assert_allclose(classified, want[-1], atol=1e-5)


def _tokens(cls: Any, chunk: np.ndarray) -> Any:
    tensor = cls("INPUT_TOKENS", [1, len(chunk)], "INT64")
    tensor.set_data_from_numpy(chunk[None])
    return tensor


def test_triton_grpc_and_http_sequences_equal_pytorch(
    served: tuple[ServerProcess, dict[str, Any]], repository: tuple[Path, SequenceLstm]
) -> None:
    server, want = served[0], expected(repository[1])
    parts = chunks()
    with grpcclient.InferenceServerClient(server.address) as client:
        assert client.get_model_config(NAME).config.output[0].label_filename == "labels.txt"
        got = [client.infer(NAME, [_tokens(grpcclient.InferInput, chunk)], sequence_id=11,
                            sequence_start=i == 0, sequence_end=i == len(parts) - 1
                            ).as_numpy("OUTPUT")[0] for i, chunk in enumerate(parts)]  # fmt: skip
    np.testing.assert_allclose(np.array(got), want, atol=1e-5)
    client = httpclient.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    try:
        got = [client.infer(NAME, [_tokens(httpclient.InferInput, chunk)], sequence_id=12,
                            sequence_start=i == 0, sequence_end=i == len(parts) - 1
                            ).as_numpy("OUTPUT")[0] for i, chunk in enumerate(parts)]  # fmt: skip
    finally:
        client.close()
    np.testing.assert_allclose(np.array(got), want, atol=1e-5)


LINE = re.compile(r"^'token (?P<n>\d+)/(?P<of>\d+) \((?P<id>\d+)\)'\s+(?P<label>\S+) (?P<p>\S+)$")


def test_lstm_client_sends_token_ids(
    served: tuple[ServerProcess, dict[str, Any]], repository: tuple[Path, SequenceLstm],
    tmp_path: Path,
) -> None:  # fmt: skip
    server, model = served[0], repository[1]
    want = pytorch_probs(model, WORD)
    ids = " ".join(str(t) for t in WORD)
    out = run_client("--address", server.address, "classify", NAME, "--tokens", ids, "--json")
    assert out.returncode == 0, out.stderr
    (top,) = json.loads(out.stdout)["top"]
    assert top["label"] == LABELS[int(want.argmax())]
    assert top["probability"] == pytest.approx(float(want.max()), abs=1e-5)
    file = tmp_path / "word.txt"
    file.write_text(",".join(str(t) for t in WORD[:5]) + "\n" + " ".join(map(str, WORD[5:])))
    out = run_client("--address", server.address, "stream", NAME, "--tokens-file", str(file))
    assert out.returncode == 0, out.stderr
    steps = [m for m in map(LINE.match, out.stdout.splitlines()) if m]
    assert [int(m["id"]) for m in steps] == WORD.tolist()
    for m in steps:
        probs = pytorch_probs(model, WORD[: int(m["n"])])
        assert m["label"] == LABELS[int(probs.argmax())]
        assert float(m["p"]) == pytest.approx(float(probs.max()), abs=5e-4)  # printed to 3 places
    assert out.stdout.splitlines()[-1] == f"ended after {len(WORD)} steps"


def test_lstm_client_says_how_to_send_token_ids_and_checks_them(
    served: tuple[ServerProcess, dict[str, Any]], tmp_path: Path
) -> None:
    address = served[0].address
    out = run_client("--address", address, "stream", NAME, "--text", "hello")
    assert out.returncode == 2 and "it takes token ids, not --text: give --tokens" in out.stderr
    out = run_client("--address", address, "stream", NAME, "--tokens", "3 30 4")
    assert out.returncode == 2 and "token 2 is id 30: lstm_sequence v1 takes ids 0 .. 29" in (
        out.stderr
    )  # fmt: skip
    assert out.stdout == ""  # refused before any session
    out = run_client("--address", address, "classify", NAME, "--tokens", "3 x 4")
    assert out.returncode == 2 and "--tokens: token 2 is 'x', not a token id" in out.stderr
    out = run_client("--address", address, "classify", NAME, "--tokens-file", str(tmp_path / "no"))
    assert out.returncode == 2 and "--tokens-file" in out.stderr
