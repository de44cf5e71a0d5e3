"""A user's own recurrent ONNX model with a Triton config.pbtxt, served unchanged.

The models are made here the way a Triton user makes them: a plain `torch.onnx.export` of
embedding -> 2-layer nn.LSTM -> linear, with a batch-first state input / output pair (Triton's
sequence_batching.state), or with PyTorch's own (h0, c0) layout (two states, batch on axis 1);
a config.pbtxt and a label file beside them. No lstm_serve metadata anywhere.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from torch import nn

from lstmserve.client import LstmClient, MultiStream
from lstmserve.v1 import lstm_serve_pb2 as pb
from lstmserve.v1 import lstm_serve_pb2_grpc as pb_grpc
from service.engine.byo.generic import GenericRuntime
from tests.integration.conftest import ServerThread, make_config, wait_for

KEY = "k1:" + base64.b64encode(b"shared-secret-for-all-replicas!!").decode()
VOCAB, EMBED, HIDDEN, LAYERS = 30, 8, 16, 2
LABELS = ["red", "green", "blue"]


class BatchFirstLstm(nn.Module):
    """tokens (B, T), state (B, 2 * layers, H): h of every layer, then c -> logits, state."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, EMBED)
        self.lstm = nn.LSTM(EMBED, HIDDEN, num_layers=LAYERS, batch_first=True)
        self.head = nn.Linear(HIDDEN, len(LABELS))

    def forward(self, tokens: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h0 = state[:, :LAYERS].transpose(0, 1).contiguous()  # (layers, B, H)
        c0 = state[:, LAYERS:].transpose(0, 1).contiguous()
        y, (h, c) = self.lstm(self.embedding(tokens), (h0, c0))
        return self.head(y), torch.cat([h, c], 0).transpose(0, 1)  # (B, T, C), (B, 2L, H)


class TorchLayoutLstm(BatchFirstLstm):
    """tokens (B, T), h0 and c0 (layers, B, H) as nn.LSTM takes them -> logits, hn, cn."""

    def forward(self, tokens: torch.Tensor, h0: torch.Tensor,  # type: ignore[override]
                c0: torch.Tensor) -> tuple[torch.Tensor, ...]:  # fmt: skip
        y, (h, c) = self.lstm(self.embedding(tokens), (h0, c0))
        return self.head(y), h, c


BATCH_FIRST_CONFIG = """name: "{name}"
backend: "onnxruntime"
max_batch_size: 64
input [ {{ name: "tokens" data_type: TYPE_INT64 dims: [ -1 ] }} ]
output [ {{ name: "logits" data_type: TYPE_FP32 dims: [ -1, 3 ] label_filename: "labels.txt" }} ]
sequence_batching {{
  max_sequence_idle_microseconds: 30000000
  oldest {{ max_queue_delay_microseconds: 500 preferred_batch_size: [ 8, 16 ] }}
  state [ {{
    input_name: "state_in" output_name: "state_out" data_type: TYPE_FP32 dims: [ {rows}, 16 ]
    initial_state: {{ data_type: TYPE_FP32 dims: [ {rows}, 16 ] zero_data: true name: "zero" }}
  }} ]
}}
instance_group [ {{ kind: KIND_CPU count: 1 }} ]
{extra}"""

TORCH_LAYOUT_CONFIG = """name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: 0
input [ { name: "tokens" data_type: TYPE_INT64 dims: [ -1, -1 ] } ]
output [ { name: "logits" data_type: TYPE_FP32 dims: [ -1, -1, 3 ] label_filename: "labels.txt" } ]
sequence_batching {
  state [
    { input_name: "h0" output_name: "hn" data_type: TYPE_FP32 dims: [ 2, -1, 16 ] },
    { input_name: "c0" output_name: "cn" data_type: TYPE_FP32 dims: [ 2, -1, 16 ] }
  ]
}
"""


def export_batch_first(folder: Path, seed: int = 0, version: int = 1) -> BatchFirstLstm:
    torch.manual_seed(seed)
    model = BatchFirstLstm().eval()
    (folder / str(version)).mkdir(parents=True)
    args = (torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 2 * LAYERS, HIDDEN))
    torch.onnx.export(
        model, args, str(folder / str(version) / "model.onnx"), input_names=["tokens", "state_in"],
        output_names=["logits", "state_out"], dynamo=False,
        dynamic_axes={"tokens": {0: "batch", 1: "time"}, "state_in": {0: "batch"},
                      "logits": {0: "batch", 1: "time"}, "state_out": {0: "batch"}},
    )  # fmt: skip
    return model


def export_torch_layout(folder: Path, seed: int = 1) -> TorchLayoutLstm:
    torch.manual_seed(seed)
    model = TorchLayoutLstm().eval()
    (folder / "1").mkdir(parents=True)
    zeros = torch.zeros(LAYERS, 1, HIDDEN)
    torch.onnx.export(
        model, (torch.zeros(1, 3, dtype=torch.long), zeros, zeros),
        str(folder / "1" / "model.onnx"), input_names=["tokens", "h0", "c0"],
        output_names=["logits", "hn", "cn"], dynamo=False,
        dynamic_axes={"tokens": {0: "batch", 1: "time"}, "h0": {1: "batch"}, "c0": {1: "batch"},
                      "logits": {0: "batch", 1: "time"}, "hn": {1: "batch"}, "cn": {1: "batch"}},
    )  # fmt: skip
    return model


def write_model(repo: Path, name: str, kind: str = "batch-first", extra: str = "",
                rows: int = 2 * LAYERS, labels: list[str] = LABELS) -> nn.Module:  # fmt: skip
    """A Triton model folder: NAME/config.pbtxt, NAME/labels.txt, NAME/1/model.onnx."""
    folder = repo / name
    if kind == "batch-first":
        model: nn.Module = export_batch_first(folder)
        config = BATCH_FIRST_CONFIG.format(name=name, rows=rows, extra=extra)
    else:
        model = export_torch_layout(folder)
        config = TORCH_LAYOUT_CONFIG.replace("{name}", name)
    (folder / "config.pbtxt").write_text(config, encoding="utf-8")
    (folder / "labels.txt").write_text("".join(f"{label}\n" for label in labels), "utf-8")
    return model


def torch_step_logits(model: nn.Module, tokens: np.ndarray) -> np.ndarray:
    """(T, C) logits after every step of one sequence from a zero state (what Triton returns)."""
    x = torch.from_numpy(tokens[None].astype(np.int64))
    with torch.no_grad():
        if isinstance(model, TorchLayoutLstm):
            zeros = torch.zeros(LAYERS, 1, HIDDEN)
            return model(x, zeros, zeros)[0][0].numpy()
        return model(x, torch.zeros(1, 2 * LAYERS, HIDDEN))[0][0].numpy()


def torch_step_probs(model: nn.Module, tokens: np.ndarray) -> np.ndarray:
    """(T, C) softmax probabilities after every step of one sequence from a zero state."""
    return torch.softmax(torch.from_numpy(torch_step_logits(model, tokens)), -1).numpy()


@pytest.fixture(scope="module")
def triton_repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, nn.Module]]:
    """Two good models and three a Triton user could get wrong."""
    repo = tmp_path_factory.mktemp("triton-repo")
    models = {
        "chars": write_model(repo, "chars"),
        "chars-torch": write_model(repo, "chars-torch", kind="torch"),
    }
    write_model(repo, "bad-field", extra="optimization { priority: PRIORITY_MAX }\n")
    write_model(repo, "bad-state", rows=3)
    write_model(repo, "bad-labels", labels=["red", "green"])
    return repo, models


@pytest.fixture(scope="module")
def triton_server(triton_repo: tuple[Path, dict[str, nn.Module]]) -> Iterator[ServerThread]:
    config = make_config(triton_repo[0], model_control="poll", snapshot_key=KEY)
    srv = ServerThread(config).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def replica(triton_repo: tuple[Path, dict[str, nn.Module]]) -> Iterator[ServerThread]:
    """A second server of the same repository that shares the snapshot key."""
    srv = ServerThread(make_config(triton_repo[0], model_control="poll", snapshot_key=KEY)).start()
    yield srv
    srv.stop()


WORD = np.array([3, 17, 5, 5, 29, 0, 11, 8, 21, 2, 14], dtype=np.int64)
CHUNKS = [1, 3, 2, 1, 4]  # sums to len(WORD)


def _pieces(tokens: np.ndarray, chunks: list[int]) -> list[list[int]]:
    bounds = np.cumsum([0, *chunks])
    return [tokens[a:b].tolist() for a, b in itertools.pairwise(bounds)]


def _steps(result: pb.ChunkResult) -> np.ndarray:
    assert not result.HasField("error"), result.error
    return np.array([list(p.values) for p in result.step_probabilities])


def test_list_models_shows_the_label_file_and_the_state_layout(triton_server: ServerThread) -> None:
    async def scenario() -> dict[str, pb.ModelInfo]:
        async with LstmClient(triton_server.address) as client:
            return {m.name: m for m in await client.list_models()}

    models = asyncio.run(scenario())
    assert list(models["chars"].labels) == LABELS and list(models["chars-torch"].labels) == LABELS
    chars = models["chars"]
    assert chars.input_kind == "tokens" and chars.vocab_size == VOCAB and chars.streamable
    assert (chars.state_rows, chars.hidden_size) == (2 * LAYERS, HIDDEN)
    torch_layout = models["chars-torch"]
    assert list(torch_layout.state_row_names) == ["h0[0]", "h0[1]", "c0[0]", "c0[1]"]
    # what the outputs were taken to be, and why (the head is a MatMul + Add: logits)
    assert chars.output_kind == "logits"
    assert chars.output_kind_rule.startswith("'logits' ends in a ")
    assert "(no Softmax or LogSoftmax): logits (the native API's probabilities are their " in (
        chars.output_kind_rule
    )  # fmt: skip
    assert "a Gather" in json.loads(chars.architecture_json)["vocab_size_from"]


@pytest.mark.parametrize("name", ["chars", "chars-torch"])
def test_streaming_chunk_by_chunk_equals_pytorch_with_the_state_carried(
    triton_server: ServerThread, triton_repo: tuple[Path, dict[str, nn.Module]], name: str
) -> None:
    async def scenario() -> np.ndarray:
        async with LstmClient(triton_server.address) as client:
            session = await client.open_session(name, every_step=True)
            got = [_steps(await session.step(piece)) for piece in _pieces(WORD, CHUNKS)]
            await session.end()
            return np.concatenate(got)

    expected = torch_step_probs(triton_repo[1][name], WORD)
    np.testing.assert_allclose(asyncio.run(scenario()), expected, atol=1e-5)


@pytest.mark.parametrize("name", ["chars", "chars-torch"])
def test_snapshot_restore_and_resume_continue_exactly(
    triton_server: ServerThread, replica: ServerThread,
    triton_repo: tuple[Path, dict[str, nn.Module]], name: str,
) -> None:  # fmt: skip
    async def scenario() -> np.ndarray:
        async with LstmClient(triton_server.address) as here, LstmClient(replica.address) as client:
            first = await here.open_session(name, every_step=True)
            got = [_steps(await first.step(WORD[:4].tolist()))]
            snap = await first.snapshot()
            await first.end()
            second = await client.restore_session(snap.data, every_step=True)  # another replica
            got.append(_steps(await second.step(WORD[4:7].tolist())))
            await second.close()  # the stream breaks; the session stays
            third = await client.resume_session(second.session_id)
            assert third.opened.last_applied_seq == 2 and third.opened.total_steps == 7
            got.append(_steps(await third.step(WORD[7:].tolist())))
            await third.end()
            return np.concatenate(got)

    expected = torch_step_probs(triton_repo[1][name], WORD)
    np.testing.assert_allclose(asyncio.run(scenario()), expected, atol=1e-5)


def test_stream_multi_batches_sessions_of_both_layouts_and_lengths_exactly(
    triton_server: ServerThread, triton_repo: tuple[Path, dict[str, nn.Module]]
) -> None:
    rng = np.random.default_rng(3)
    names = ["chars", "chars-torch"] * 3
    words = [rng.integers(0, VOCAB, size=9) for _ in names]
    splits = [[1, 8], [4, 5], [2, 2, 5], [9], [3, 6], [5, 4]]

    async def scenario() -> list[np.ndarray]:
        async with LstmClient(triton_server.address) as client:
            multi = client.multi_stream()
            opened = await multi.exchange([MultiStream.open(n, every_step=True) for n in names])
            ids = [r.session_id for r in opened]
            got: list[list[np.ndarray]] = [[] for _ in ids]
            pieces = [_pieces(w, s) for w, s in zip(words, splits, strict=True)]
            for round_ in range(3):
                entries, who = [], []
                for i, sid in enumerate(ids):
                    if round_ < len(pieces[i]):
                        entries.append(MultiStream.chunk(sid, round_ + 1, pieces[i][round_]))
                        who.append(i)
                for i, result in zip(who, await multi.exchange(entries), strict=True):
                    got[i].append(_steps(result.chunk))
            await multi.exchange([MultiStream.end(sid) for sid in ids])
            await multi.close()
            return [np.concatenate(g) for g in got]

    for name, word, probs in zip(names, words, asyncio.run(scenario()), strict=True):
        np.testing.assert_allclose(probs, torch_step_probs(triton_repo[1][name], word), atol=1e-5)


@pytest.mark.parametrize("name", ["chars", "chars-torch"])
def test_classify_of_mixed_lengths_equals_pytorch(
    triton_server: ServerThread, triton_repo: tuple[Path, dict[str, nn.Module]], name: str
) -> None:
    words = [WORD, WORD[:3], WORD[2:9]]

    async def scenario() -> pb.ClassifyResponse:
        async with LstmClient(triton_server.address) as client:
            return await client.classify(name, [w.tolist() for w in words])

    reply = asyncio.run(scenario())
    for word, result in zip(words, reply.results, strict=True):
        expected = torch_step_probs(triton_repo[1][name], word)[-1]
        np.testing.assert_allclose(result.probabilities, expected, atol=1e-5)


def test_config_settings_reach_the_loaded_model(triton_server: ServerThread) -> None:
    assert triton_server.app is not None
    worker = triton_server.app.engine.registry.find("chars", 0)
    assert isinstance(worker.runtime, GenericRuntime)
    assert worker.triton_config is not None and worker.triton_config.name == "chars"
    assert worker.idle_timeout_s == 30.0  # max_sequence_idle_microseconds
    assert worker.batcher.policy.max_queue_delay_s == 0.0005
    assert worker.batcher.policy.max_batch_size == 16  # the largest preferred_batch_size
    assert worker.runtime.providers == ("CPUExecutionProvider",)  # KIND_CPU
    assert worker.runtime.equal_lengths  # no lengths input: batches of one length


async def _index(address: str) -> dict[str, pb.RepositoryModel]:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await pb_grpc.LstmServeStub(channel).RepositoryIndex(pb.RepositoryIndexRequest())
        return {m.name: m for m in reply.models}


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("bad-field", "field optimization is not supported"),
        ("bad-state", "sequence_batching.state 'state_in' is [?, 3, 16] in config.pbtxt but "
                      "[?, 4, 16] in the ONNX file"),
        ("bad-labels", "labels.txt: label_filename of output 'logits' has 2 lines, the output "
                       "has 3 classes"),
    ],
)  # fmt: skip
def test_a_config_the_model_does_not_fit_is_refused_naming_what(
    triton_server: ServerThread, name: str, says: str
) -> None:
    row = asyncio.run(_index(triton_server.address))[name]
    assert row.state == pb.MODEL_STATE_UNAVAILABLE
    assert says in row.reason, row.reason
    assert asyncio.run(_index(triton_server.address))["chars"].state == pb.MODEL_STATE_READY


def test_a_fixed_config_is_loaded_on_the_next_scan(
    triton_server: ServerThread, triton_repo: tuple[Path, dict[str, nn.Module]]
) -> None:
    repo = triton_repo[0]
    shutil.copy(repo / "chars" / "labels.txt", repo / "bad-labels" / "labels.txt")
    assert triton_server.app is not None
    triton_server.call(triton_server.app.engine.control.scan())
    wait_for(
        lambda: (
            asyncio.run(_index(triton_server.address))["bad-labels"].state == pb.MODEL_STATE_READY
        ),
        what="the fixed label file to load",
    )


class ForgetfulLstm(BatchFirstLstm):
    """An export bug: the state input is taken and ignored (every call starts from zeros)."""

    def forward(self, tokens: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return super().forward(tokens, state * 0.0)


@pytest.mark.parametrize("name", ["chars", "chars-torch"])
def test_lstm_export_verify_passes_on_a_users_own_export(
    triton_repo: tuple[Path, dict[str, nn.Module]], name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from export.cli import main

    assert main(["verify", str(triton_repo[0] / name / "1")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["status"] == "PASS" and report["model"] == f"{name}/1"
    assert report["max_diff_streaming_vs_whole"] <= 1e-5 and report["cases"] > 20
    assert report["output_kind"] == "logits" and "no Softmax" in report["output_kind_rule"]


class SoftmaxLstm(BatchFirstLstm):
    """The same LSTM whose per-step output already is probabilities (softmax in the graph)."""

    def forward(self, tokens: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits, state_out = super().forward(tokens, state)
        return torch.softmax(logits, -1), state_out


def export_softmax(folder: Path, extra: str) -> None:
    torch.manual_seed(0)
    (folder / "1").mkdir(parents=True)
    torch.onnx.export(
        SoftmaxLstm().eval(), (torch.zeros(1, 3, dtype=torch.long),
                               torch.zeros(1, 2 * LAYERS, HIDDEN)),
        str(folder / "1" / "model.onnx"), input_names=["tokens", "state_in"],
        output_names=["logits", "state_out"], dynamo=False,
        dynamic_axes={"tokens": {0: "batch", 1: "time"}, "state_in": {0: "batch"},
                      "logits": {0: "batch", 1: "time"}, "state_out": {0: "batch"}},
    )  # fmt: skip
    config = BATCH_FIRST_CONFIG.format(name=folder.name, rows=2 * LAYERS, extra=extra)
    (folder / "config.pbtxt").write_text(config.replace(' label_filename: "labels.txt"', ""))


@pytest.mark.parametrize(
    ("kind", "status", "says"),
    [
        ("", "PASS", ""),  # inferred from the Softmax: probs
        ("logits", "FAIL", "output_kind logits, but every output seen is already a "
                           "distribution (probs): a softmax of it would flatten the answer"),
        ("log_probs", "FAIL", "output_kind log_probs, but the outputs are not log-probabilities"),
    ],
)  # fmt: skip
def test_lstm_export_verify_fails_outputs_that_contradict_their_kind(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str, status: str, says: str
) -> None:
    """A model whose outputs already are probabilities, told they are logits, would be answered
    with a second softmax: verify says so instead of PASS."""
    from export.cli import main

    param = f'parameters {{ key: "output_kind" value: {{ string_value: "{kind}" }} }}'
    extra = param if kind else ""
    export_softmax(tmp_path / "already-probs", extra)
    assert main(["verify", str(tmp_path / "already-probs" / "1")]) == (status == "FAIL")
    report = json.loads(capsys.readouterr().out)
    assert report["status"] == status and report["output_kind"] == (kind or "probs")
    assert report.get("problem", "").startswith(says), report
    assert report["max_diff_streaming_vs_whole"] <= 1e-5  # the other checks pass


def test_lstm_export_describe_prints_what_the_server_reads_from_the_config_and_graph(
    triton_repo: tuple[Path, dict[str, nn.Module]], capsys: pytest.CaptureFixture[str]
) -> None:
    from export.cli import main

    assert main(["describe", str(triton_repo[0] / "chars")]) == 0  # the model folder: latest
    desc = json.loads(capsys.readouterr().out)
    assert (desc["name"], desc["version"], desc["labels"]) == ("chars", 1, LABELS)
    assert desc["output_kind"] == "logits" and "no Softmax" in desc["output_kind_rule"]
    assert desc["vocab_size"] == VOCAB
    assert desc["architecture"]["vocab_size_from"] == (
        "the rows of the table 'embedding.weight' that input 'tokens' indexes (a Gather: an "
        "embedding)"
    )


def test_lstm_export_verify_fails_an_export_that_drops_its_state(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from export.cli import main

    folder = tmp_path / "forgetful"
    torch.manual_seed(0)
    model = ForgetfulLstm().eval()
    (folder / "1").mkdir(parents=True)
    torch.onnx.export(
        model, (torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 2 * LAYERS, HIDDEN)),
        str(folder / "1" / "model.onnx"), input_names=["tokens", "state_in"],
        output_names=["logits", "state_out"], dynamo=False,
        dynamic_axes={"tokens": {0: "batch", 1: "time"}, "state_in": {0: "batch"},
                      "logits": {0: "batch", 1: "time"}, "state_out": {0: "batch"}},
    )  # fmt: skip
    config = BATCH_FIRST_CONFIG.format(name="forgetful", rows=2 * LAYERS, extra="")
    (folder / "config.pbtxt").write_text(config.replace(' label_filename: "labels.txt"', ""))
    assert main(["verify", str(folder / "1")]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["status"] == "FAIL" and report["max_diff_streaming_vs_whole"] > 1e-3


def test_with_the_redis_store_another_replica_resumes_a_generic_session_exactly(
    triton_repo: tuple[Path, dict[str, nn.Module]], redis_url: str, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(triton_repo[0] / "chars-torch", repo / "chars-torch")
    config = make_config(repo, snapshot_key=KEY, session_store=redis_url)
    a, b = ServerThread(config).start(), ServerThread(config).start()

    async def scenario() -> np.ndarray:
        async with LstmClient(a.address) as ca, LstmClient(b.address) as cb:
            first = await ca.open_session("chars-torch", every_step=True)
            got = [_steps(await first.step(WORD[:5].tolist()))]
            await first.close()  # the stream breaks; the session lives on in Redis
            second = await cb.resume_session(first.session_id)
            assert second.opened.last_applied_seq == 1 and second.opened.total_steps == 5
            got.append(_steps(await second.step(WORD[5:].tolist())))
            await second.end()
            return np.concatenate(got)

    try:
        got = asyncio.run(scenario())
    finally:
        a.stop()
        b.stop()
    expected = torch_step_probs(triton_repo[1]["chars-torch"], WORD)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_a_new_version_is_loaded_by_model_control_and_sessions_stay_pinned(
    triton_repo: tuple[Path, dict[str, nn.Module]], tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(triton_repo[0] / "chars", repo / "chars")
    config = make_config(repo, model_control="explicit", load_models=("chars",))
    server = ServerThread(config).start()
    old = triton_repo[1]["chars"]

    async def scenario() -> tuple[np.ndarray, np.ndarray, nn.Module]:
        async with LstmClient(server.address) as client:
            session = await client.open_session("chars", every_step=True)
            got = [_steps(await session.step(WORD[:4].tolist()))]
            new = export_batch_first(repo / "chars", seed=5, version=2)
            assert server.app is not None
            await server.app.engine.control.load("chars")  # LoadModel
            latest = {m.version: m.latest for m in await client.list_models()}
            assert latest == {1: False, 2: True}
            got.append(_steps(await session.step(WORD[4:].tolist())))  # still on version 1
            await session.end()
            fresh = await client.open_session("chars", every_step=True)
            assert fresh.opened.version == 2
            on_new = _steps(await fresh.step(WORD.tolist()))
            await fresh.end()
            return np.concatenate(got), on_new, new

    try:
        pinned, on_new, new = server.call(scenario())
    finally:
        server.stop()
    np.testing.assert_allclose(pinned, torch_step_probs(old, WORD), atol=1e-5)
    np.testing.assert_allclose(on_new, torch_step_probs(new, WORD), atol=1e-5)


class Controlled(BatchFirstLstm):
    """BatchFirstLstm with START and CORRID control inputs that show in its logits."""

    def forward(self, tokens: torch.Tensor, start: torch.Tensor,  # type: ignore[override]
                corrid: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, ...]:  # fmt: skip
        logits, state_out = super().forward(tokens, state)
        shift = 2.0 * start + 0.05 * torch.remainder(corrid, 97).float()  # (B, 1)
        return logits + shift[:, :, None] * torch.tensor([1.0, 0.0, 0.0]), state_out  # class 0


CONTROLS = """  control_input [
    { name: "start" control [ { kind: CONTROL_SEQUENCE_START int32_false_true: [ 0, 1 ] } ] },
    { name: "corrid" control [ { kind: CONTROL_SEQUENCE_CORRID data_type: TYPE_INT64 } ] }
  ]
"""


def test_start_and_corrid_controls_reach_the_model_through_the_batcher(tmp_path: Path) -> None:
    folder = tmp_path / "repo" / "controlled"
    torch.manual_seed(7)
    model = Controlled().eval()
    (folder / "1").mkdir(parents=True)
    args = (torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 1, dtype=torch.int32),
            torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 2 * LAYERS, HIDDEN))  # fmt: skip
    names = ["tokens", "start", "corrid", "state_in"]
    torch.onnx.export(
        model, args, str(folder / "1" / "model.onnx"), input_names=names,
        output_names=["logits", "state_out"], dynamo=False,
        dynamic_axes={**{n: {0: "batch"} for n in names}, "tokens": {0: "batch", 1: "time"},
                      "logits": {0: "batch", 1: "time"}, "state_out": {0: "batch"}},
    )  # fmt: skip
    config = BATCH_FIRST_CONFIG.format(name="controlled", rows=2 * LAYERS, extra="")
    config = config.replace("  state [", CONTROLS + "  state [")
    (folder / "config.pbtxt").write_text(config.replace(' label_filename: "labels.txt"', ""))
    server = ServerThread(make_config(tmp_path / "repo")).start()

    async def scenario() -> tuple[str, list[np.ndarray]]:
        async with LstmClient(server.address) as client:
            session = await client.open_session("controlled", every_step=True)
            got = [_steps(await session.step(piece)) for piece in _pieces(WORD, [3, 8])]
            await session.end()
            return session.session_id, got

    try:
        session_id, got = asyncio.run(scenario())
    finally:
        server.stop()
    corrid = torch.tensor([[int(session_id[:16], 16) >> 1]])
    state = torch.zeros(1, 2 * LAYERS, HIDDEN)
    for piece, probs, start in zip(_pieces(WORD, [3, 8]), got, (1, 0), strict=True):
        with torch.no_grad():
            logits, state = model(torch.tensor([piece]), torch.tensor([[start]], dtype=torch.int32),
                                  corrid, state)  # fmt: skip
        np.testing.assert_allclose(probs, torch.softmax(logits, -1)[0].numpy(), atol=1e-5)


class FramesGru(nn.Module):
    """features (B, T, 5), a float16 state (B, 1, 6) -> final probabilities (B, 3) only."""

    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(5, 6, batch_first=True)
        self.head = nn.Linear(6, 3)

    def forward(self, frames: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y, h = self.gru(frames, state.float().transpose(0, 1))
        return torch.softmax(self.head(y[:, -1]), -1), h.transpose(0, 1).half()


FRAMES_CONFIG = """max_batch_size: 8
input [ { name: "frames" data_type: TYPE_FP32 dims: [ -1, 5 ] } ]
output [ { name: "probs" data_type: TYPE_FP32 dims: [ 3 ] label_filename: "labels.txt" } ]
sequence_batching { state [ { input_name: "h" output_name: "h_next" data_type: TYPE_FP16
                              dims: [ 1, 6 ] } ] }
parameters { key: "output_kind" value: { string_value: "probs" } }
"""


def test_a_frames_model_with_a_final_output_and_a_float16_state_streams_and_classifies(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "repo" / "frames"
    torch.manual_seed(8)
    model = FramesGru().eval()
    (folder / "1").mkdir(parents=True)
    torch.onnx.export(
        model, (torch.zeros(1, 2, 5), torch.zeros(1, 1, 6, dtype=torch.float16)),
        str(folder / "1" / "model.onnx"), input_names=["frames", "h"],
        output_names=["probs", "h_next"], dynamo=False,
        dynamic_axes={"frames": {0: "b", 1: "t"}, "h": {0: "b"}, "probs": {0: "b"},
                      "h_next": {0: "b"}},
    )  # fmt: skip
    (folder / "config.pbtxt").write_text(FRAMES_CONFIG)
    (folder / "labels.txt").write_text("".join(f"{label}\n" for label in LABELS))
    frames = np.random.default_rng(9).normal(size=(7, 5)).astype(np.float32)
    server = ServerThread(make_config(tmp_path / "repo")).start()

    async def scenario() -> tuple[np.ndarray, pb.ClassifyResponse]:
        async with LstmClient(server.address) as client:
            session = await client.open_session("frames", every_step=True)
            got = [_steps(await session.step(frames[a:b])) for a, b in ((0, 3), (3, 4), (4, 7))]
            await session.end()
            whole = await client.classify("frames", [frames, frames[:2]])
            return np.concatenate(got), whole

    try:
        streamed, whole = asyncio.run(scenario())
    finally:
        server.stop()
    with torch.no_grad():  # the answer after every prefix, from a zero state
        zero = torch.zeros(1, 1, 6, dtype=torch.float16)
        expected = np.stack([model(torch.from_numpy(frames[None, :t]), zero)[0][0].numpy()
                             for t in range(1, 8)])  # fmt: skip
    np.testing.assert_allclose(streamed, expected, atol=2e-3)  # float16 state between steps
    np.testing.assert_allclose(whole.results[0].probabilities, expected[-1], atol=2e-3)
    np.testing.assert_allclose(whole.results[1].probabilities, expected[1], atol=2e-3)
    assert [t.label for t in whole.results[0].top] == [LABELS[int(expected[-1].argmax())]]


class TwoSteps(BatchFirstLstm):
    """BatchFirstLstm exported with a fixed time dimension of 2 steps."""


def test_a_fixed_time_window_is_stepped_and_a_chunk_it_cannot_take_fails_in_band(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "repo" / "pairs"
    torch.manual_seed(11)
    model = TwoSteps().eval()
    (folder / "1").mkdir(parents=True)
    torch.onnx.export(
        model, (torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2 * LAYERS, HIDDEN)),
        str(folder / "1" / "model.onnx"), input_names=["tokens", "state_in"],
        output_names=["logits", "state_out"], dynamo=False,
        dynamic_axes={"tokens": {0: "batch"}, "state_in": {0: "batch"}, "logits": {0: "batch"},
                      "state_out": {0: "batch"}},
    )  # fmt: skip
    config = BATCH_FIRST_CONFIG.format(name="pairs", rows=2 * LAYERS, extra="")
    config = config.replace("dims: [ -1 ] }", "dims: [ 2 ] }").replace("[ -1, 3 ]", "[ 2, 3 ]")
    (folder / "config.pbtxt").write_text(config)
    (folder / "labels.txt").write_text("".join(f"{label}\n" for label in LABELS))
    server = ServerThread(make_config(tmp_path / "repo")).start()
    tokens = WORD[:8]

    async def scenario() -> tuple[pb.ChunkResult, list[np.ndarray]]:
        async with LstmClient(server.address) as client:
            session = await client.open_session("pairs", every_step=True)
            got = [_steps(await session.step(tokens[:4].tolist()))]
            got.append(_steps(await session.step(tokens[4:8].tolist())))
            await session.end()
            other = await client.open_session("pairs")
            refused = await other.step(tokens[4:7].tolist())  # 3 steps: not a multiple of 2
            await other.end()
            return refused, got

    try:
        refused, got = asyncio.run(scenario())
    finally:
        server.stop()
    assert refused.error.code == "INVALID_ARGUMENT"
    assert "fixed time dimension of 2 steps: a chunk of 3 steps" in refused.error.message
    np.testing.assert_allclose(np.concatenate(got), torch_step_probs(model, tokens), atol=1e-5)


class Crowded(BatchFirstLstm):
    """An export bug: every row's logits see the batch's mean (rows are not independent)."""

    def forward(self, tokens: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits, state_out = super().forward(tokens, state)
        return logits + logits.mean(0, keepdim=True), state_out


def test_lstm_export_verify_fails_an_export_whose_batch_rows_interact(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from export.cli import main

    folder = tmp_path / "crowded"
    torch.manual_seed(0)
    (folder / "1").mkdir(parents=True)
    torch.onnx.export(
        Crowded().eval(), (torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 2 * LAYERS, HIDDEN)),
        str(folder / "1" / "model.onnx"), input_names=["tokens", "state_in"],
        output_names=["logits", "state_out"], dynamo=False,
        dynamic_axes={"tokens": {0: "batch", 1: "time"}, "state_in": {0: "batch"},
                      "logits": {0: "batch", 1: "time"}, "state_out": {0: "batch"}},
    )  # fmt: skip
    config = BATCH_FIRST_CONFIG.format(name="crowded", rows=2 * LAYERS, extra="")
    (folder / "config.pbtxt").write_text(config.replace(' label_filename: "labels.txt"', ""))
    assert main(["verify", str(folder / "1")]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["status"] == "FAIL" and report["max_diff_padded_batch_vs_alone"] > 1e-3
    assert report["max_diff_streaming_vs_whole"] <= 1e-5  # one row at a time is fine
