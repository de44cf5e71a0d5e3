"""`lstm-export from-torch` as a subprocess on users' own modules (their own attribute names):
the written model streams like the module itself, a real server serves it, and a module it
cannot map is refused naming the part. And the generic path's first step, `lstm-export config`:
its starter config.pbtxt, unedited, serves a torch.onnx.export'ed LSTM."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import numpy as np
import onnxruntime as ort
import pytest
import torch

from tests.e2e.conftest import ROOT, ServerProcess

USER_MODULES = textwrap.dedent('''
    import torch
    from torch import nn


    class CharGRU(nn.Module):
        """embedding -> 2-layer GRU -> linear on the last step, returning logits."""

        def __init__(self, vocab: int = 28, dim: int = 6, hidden: int = 10, classes: int = 3):
            super().__init__()
            self.embed = nn.Embedding(vocab, dim)
            self.encoder = nn.GRU(dim, hidden, num_layers=2, batch_first=True, dropout=0.2)
            self.classifier = nn.Linear(hidden, classes)

        def forward(self, tokens):
            out, _ = self.encoder(self.embed(tokens))
            return self.classifier(out[:, -1])


    class FramesLSTM(nn.Module):
        """features (T, B, F) -> LSTM (batch_first=False) -> linear on every step, probs."""

        def __init__(self, features: int = 5, hidden: int = 7, classes: int = 4):
            super().__init__()
            self.rnn = nn.LSTM(features, hidden)
            self.out = nn.Linear(hidden, classes)

        def forward(self, frames):
            y, (h, c) = self.rnn(frames)
            return torch.softmax(self.out(y), dim=-1)


    class StackedBiLSTM(nn.Module):
        """two bidirectional LSTM modules in a Sequential-like stack, Classify only."""

        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(28, 4)
            self.first = nn.LSTM(4, 5, batch_first=True, bidirectional=True)
            self.second = nn.LSTM(10, 5, batch_first=True, bidirectional=True)
            self.drop = nn.Dropout(0.3)
            self.fc = nn.Linear(10, 2)

        def forward(self, x):
            y, _ = self.first(self.emb(x))
            y, _ = self.second(self.drop(y))
            return self.fc(y[:, -1])


    class ElmanNoBias(nn.Module):
        """head registered first; a 3-layer tanh RNN without biases; log-probs at every step."""

        def __init__(self):
            super().__init__()
            self.head = nn.Linear(6, 3, bias=False)
            self.body = nn.RNN(5, 6, num_layers=3, bias=False, batch_first=True)

        def forward(self, x):
            y, _ = self.body(x)
            return torch.log_softmax(self.head(y), dim=-1)


    class PackedLSTM(nn.Module):
        """forward(x, lengths) with pack_padded_sequence, the head on h_n of the top layer."""

        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(28, 6)
            self.lstm = nn.LSTM(6, 9, num_layers=2, batch_first=True)
            self.fc = nn.Linear(9, 3)

        def forward(self, x, lengths):
            packed = nn.utils.rnn.pack_padded_sequence(
                self.emb(x), lengths.cpu(), batch_first=True, enforce_sorted=False
            )
            _, (h, _) = self.lstm(packed)
            return self.fc(h[-1])


    class IgnoresLengths(PackedLSTM):
        """Takes lengths but runs the padding through: padded rows differ from served ones."""

        def forward(self, x, lengths):
            y, _ = self.lstm(self.emb(x))
            return self.fc(y[:, -1])


    class BinaryGRU(nn.Module):
        """A one-output head (trained with BCEWithLogitsLoss), returning (B,) logits."""

        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(28, 5)
            self.gru = nn.GRU(5, 7, batch_first=True)
            self.score = nn.Linear(7, 1)

        def forward(self, x):
            y, _ = self.gru(self.emb(x))
            return self.score(y[:, -1]).squeeze(-1)


    class WithConv(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(5, 5, 3)
            self.lstm = nn.LSTM(5, 4, batch_first=True)
            self.fc = nn.Linear(4, 2)


    class LinearBetween(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm1 = nn.LSTM(5, 4, batch_first=True)
            self.proj = nn.Linear(4, 4)
            self.lstm2 = nn.LSTM(4, 4, batch_first=True)
            self.fc = nn.Linear(4, 2)


    class MlpHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(5, 4, batch_first=True)
            self.head = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


    class Projected(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(5, 4, proj_size=2, batch_first=True)
            self.fc = nn.Linear(2, 2)


    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(4, 4, batch_first=True)
            self.attn = nn.MultiheadAttention(4, 1, batch_first=True)
            self.fc = nn.Linear(4, 2)


    class HiddenTanh(nn.Module):
        """Maps (Embedding, GRU, Linear), but forward adds a tanh the export cannot see."""

        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(28, 4)
            self.gru = nn.GRU(4, 6, batch_first=True)
            self.fc = nn.Linear(6, 2)

        def forward(self, x):
            y, _ = self.gru(self.emb(x))
            return self.fc(torch.tanh(y[:, -1]) * 3)


    class LongDiffers(nn.Module):
        """Agrees with its parts up to 10 steps, then scales its logits."""

        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(28, 4)
            self.gru = nn.GRU(4, 6, batch_first=True)
            self.fc = nn.Linear(6, 2)

        def forward(self, x):
            y, _ = self.gru(self.emb(x))
            logits = self.fc(y[:, -1])
            return logits * 2 if x.shape[1] > 10 else logits
''')
VOCAB = ["<unk>", *"abcdefghijklmnopqrstuvwxyz", " "]
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The user's module file, a state dict per class (random weights), labels and vocab."""
    work = tmp_path_factory.mktemp("user")
    (work / "user_models.py").write_text(USER_MODULES)
    module = _import(work / "user_models.py")
    torch.manual_seed(0)
    user_classes = [
        c for c in vars(module).values() if isinstance(c, type) and c.__module__ == module.__name__
    ]
    for cls in user_classes:
        torch.save(cls().state_dict(), work / f"{cls.__name__}.pt")
    for classes in (2, 3, 4):
        (work / f"labels{classes}.txt").write_text("".join(f"c{i}\n" for i in range(classes)))
    (work / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return work


def _import(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("user_models_under_test", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _user(user_dir: Path, name: str) -> torch.nn.Module:
    module = getattr(_import(user_dir / "user_models.py"), name)()
    module.load_state_dict(torch.load(user_dir / f"{name}.pt", weights_only=True))
    return module.eval()


def from_torch(user_dir: Path, cls: str, out: Path, *extra: str,
               classes: int = 3) -> subprocess.CompletedProcess[str]:  # fmt: skip
    return subprocess.run(
        [sys.executable, "-m", "export.cli", "from-torch",
         "--module", f"{user_dir / 'user_models.py'}:{cls}",
         "--weights", str(user_dir / f"{cls}.pt"),
         "--labels", str(user_dir / f"labels{classes}.txt"), "--out", str(out), *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
    )  # fmt: skip


def _session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _stream(sess: ort.InferenceSession, name: str, x: np.ndarray,
            chunks: list[int]) -> tuple[np.ndarray, list[np.ndarray]]:  # fmt: skip
    """onnxruntime fed chunk by chunk, state passed on: (step_probs, probs after each chunk)."""
    meta = sess.get_inputs()[2].shape  # state [B, S, H]
    state = np.zeros((x.shape[0], meta[1], meta[2]), np.float32)
    pos, steps, after = 0, [], []
    for size in chunks:
        lengths = np.full(x.shape[0], size, np.int64)
        sp, probs, state = sess.run(None, {name: x[:, pos : pos + size], "lengths": lengths,
                                           "state": state})  # fmt: skip
        steps.append(sp)
        after.append(probs)
        pos += size
    return np.concatenate(steps, axis=1), after


def test_own_gru_module_streams_like_itself_and_is_served(user_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "repo" / "chargru" / "1"
    done = from_torch(user_dir, "CharGRU", out, "--tokenizer", f"chars:{user_dir / 'vocab.txt'}")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["status"] == "PASS"
    assert report["mapping"] == {"embedding": "embed (Embedding)", "recurrent": "encoder (GRU)",
                                 "head": "classifier (Linear)"}  # fmt: skip
    assert "softmax(logits)" in report["verify_user_module"]["forward"]
    assert {p.name for p in out.iterdir()} == {"model.onnx", "README.md"}
    assert "served probs = softmax(logits)" in (out / "README.md").read_text()

    user = _user(user_dir, "CharGRU")
    sess = _session(out / "model.onnx")
    x = torch.randint(0, len(VOCAB), (4, 11), generator=torch.Generator().manual_seed(5))
    _, after = _stream(sess, "tokens", x.numpy(), [3, 1, 5, 2])
    for end, probs in zip((3, 4, 9, 11), after, strict=True):
        with torch.no_grad():
            expected = torch.softmax(user(x[:, :end]), dim=-1).numpy()
        np.testing.assert_allclose(probs, expected, atol=TOLERANCE)

    server = ServerProcess(tmp_path / "repo")
    try:
        server.wait_event("ready")
        replies = asyncio.run(_stream_text(server.address, ["hel", "lo w", "orld"]))
    finally:
        server.stop()
    text = "hello world"
    for total_steps, probabilities in replies:
        assert total_steps >= 1
        ids = torch.tensor([[VOCAB.index(ch) for ch in text[:total_steps]]])
        with torch.no_grad():
            expected = torch.softmax(user(ids), dim=-1)[0].numpy()
        np.testing.assert_allclose(probabilities, expected, atol=TOLERANCE)
    assert replies[-1][0] >= len(text) - 1  # the server may hold the last character back


async def _stream_text(address: str, chunks: list[str]) -> list[tuple[int, list[float]]]:
    from lstmserve.client import LstmClient

    async with LstmClient([address]) as client:
        session = await client.open_session("chargru")
        replies = []
        for chunk in chunks:
            result = await session.step(chunk)
            assert not result.HasField("error"), result.error
            replies.append((int(result.total_steps), list(result.probabilities)))
        await session.end()
    return replies


BLOCK_TRAINING_STACK = """
import sys
# What [train] adds to [export] (pip install --dry-run --report of each), the main ones.
TRAINING_ONLY = ('aeon', 'tqdm', 'sklearn', 'scipy', 'pandas', 'numba')
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in TRAINING_ONLY:
            raise ImportError('the [export] environment has no ' + name)
sys.meta_path.insert(0, _Block())
from export.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_time_major_features_lstm_every_step_without_the_training_stack(
    user_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "repo" / "frames" / "2"
    done = subprocess.run(
        [sys.executable, "-c", BLOCK_TRAINING_STACK, "from-torch", "--input", "features",
         "--module", f"{user_dir / 'user_models.py'}:FramesLSTM",
         "--weights", str(user_dir / "FramesLSTM.pt"), "--labels", str(user_dir / "labels4.txt"),
         "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    forward = report["verify_user_module"]["forward"]
    assert forward.startswith("input time-major; output on every step, time-major; probabilities")
    assert report["verify_user_module"]["max_diff_user_module_vs_streamed_chunks"] <= TOLERANCE

    user = _user(user_dir, "FramesLSTM")
    sess = _session(out / "model.onnx")
    x = torch.randn(3, 13, 5, generator=torch.Generator().manual_seed(2))
    step_probs, _ = _stream(sess, "features", x.numpy(), [1, 4, 6, 2])
    with torch.no_grad():
        expected = user(x.transpose(0, 1)).transpose(0, 1).numpy()  # (T, B, C) -> (B, T, C)
    np.testing.assert_allclose(step_probs, expected, atol=TOLERANCE)


def test_stacked_bidirectional_modules_are_mapped_as_classify_only(
    user_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "repo" / "bi" / "1"
    done = from_torch(user_dir, "StackedBiLSTM", out, classes=2)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["mapping"]["recurrent"] == "first (LSTM), second (LSTM)"
    assert report["architecture"]["num_layers"] == 2 and report["architecture"]["bidirectional"]
    assert report["verify_user_module"]["max_diff_user_module_vs_streamed_chunks"] is None
    from lstmserve.contract import read_description

    assert read_description(str(out / "model.onnx")).streamable is False


def test_a_forward_taking_lengths_is_called_with_them(user_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "repo" / "packed" / "1"
    done = from_torch(user_dir, "PackedLSTM", out)
    assert done.returncode == 0, done.stderr[-3000:]
    parity = json.loads(done.stdout)["verify_user_module"]
    assert parity["forward"].startswith(
        "forward(x, lengths), input batch-major; output on the last"
    )
    assert parity["max_diff_user_module_vs_streamed_chunks"] <= TOLERANCE

    user = _user(user_dir, "PackedLSTM")
    x = torch.randint(0, 28, (2, 8), generator=torch.Generator().manual_seed(6))
    _, after = _stream(_session(out / "model.onnx"), "tokens", x.numpy(), [5, 3])
    with torch.no_grad():
        expected = torch.softmax(user(x, torch.tensor([8, 8])), dim=-1).numpy()
    np.testing.assert_allclose(after[-1], expected, atol=TOLERANCE)


def test_a_forward_that_ignores_its_lengths_fails_on_the_padded_batch(
    user_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "repo" / "ignores" / "1"
    done = from_torch(user_dir, "IgnoresLengths", out)
    assert done.returncode == 4
    assert "probs at lengths [16, 3, 9] in one padded batch" in done.stderr, done.stderr
    assert not out.exists()


def test_a_one_output_head_is_a_binary_classifier_through_a_sigmoid(
    user_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "repo" / "binary" / "1"
    done = from_torch(user_dir, "BinaryGRU", out, classes=2)
    assert done.returncode == 0, done.stderr[-3000:]
    parity = json.loads(done.stdout)["verify_user_module"]
    assert parity["forward"].endswith("one logit z: served probs = [1 - sigmoid(z), sigmoid(z)]")

    user = _user(user_dir, "BinaryGRU")
    x = torch.randint(0, 28, (3, 10), generator=torch.Generator().manual_seed(8))
    _, after = _stream(_session(out / "model.onnx"), "tokens", x.numpy(), [4, 6])
    with torch.no_grad():
        p = torch.sigmoid(user(x)).numpy()
    np.testing.assert_allclose(after[-1], np.stack([1 - p, p], axis=-1), atol=TOLERANCE)

    three = from_torch(user_dir, "BinaryGRU", tmp_path / "r" / "b" / "1", classes=3)
    assert three.returncode == 2 and "a one-output head takes 2 labels" in three.stderr


def test_biasless_elman_rnn_with_its_head_registered_first(user_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "repo" / "elman" / "1"
    done = from_torch(user_dir, "ElmanNoBias", out, "--input", "features")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["mapping"] == {"recurrent": "body (RNN)", "head": "head (Linear)"}
    assert report["architecture"]["cell"] == "rnn" and report["architecture"]["num_layers"] == 3
    assert report["verify_user_module"]["forward"].startswith(
        "input batch-major; output on every step, batch-major; log-probabilities"
    )
    user = _user(user_dir, "ElmanNoBias")
    x = torch.randn(2, 9, 5, generator=torch.Generator().manual_seed(4))
    step_probs, _ = _stream(_session(out / "model.onnx"), "features", x.numpy(), [2, 2, 5])
    with torch.no_grad():
        expected = torch.exp(user(x)).numpy()
    np.testing.assert_allclose(step_probs, expected, atol=TOLERANCE)


@pytest.mark.parametrize(
    ("cls", "named"),
    [
        ("WithConv", "'conv' (Conv1d)"),
        ("LinearBetween", "'proj' (Linear): a Linear between recurrent layers"),
        ("MlpHead", "'head.1' (ReLU)"),
        ("Projected", "'lstm' (LSTM): proj_size=2"),
        ("Attention", "'attn' (MultiheadAttention)"),
    ],
)
def test_a_module_it_cannot_map_is_refused_naming_the_part(
    user_dir: Path, tmp_path: Path, cls: str, named: str
) -> None:
    out = tmp_path / "repo" / "m" / "1"
    done = from_torch(user_dir, cls, out, classes=2)
    assert done.returncode != 0
    assert "unsupported module" in done.stderr and named in done.stderr, done.stderr[-2000:]
    assert "torch.onnx.export" in done.stderr and "docs/own-model-onnx.md" in done.stderr
    assert not out.exists()


def test_a_forward_that_differs_from_the_mapping_fails_loudly(
    user_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "repo" / "tanh" / "1"
    done = from_torch(user_dir, "HiddenTanh", out, classes=2)
    assert done.returncode != 0
    assert "verification FAILED" in done.stderr and "max abs diff" in done.stderr, done.stderr
    assert "T=7" in done.stderr  # where: the length it was run at
    assert not out.exists()


def test_a_difference_at_one_length_is_reported_with_the_length_and_chunks(
    user_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "repo" / "long" / "1"
    done = from_torch(user_dir, "LongDiffers", out, classes=2)
    assert done.returncode != 0
    assert "verification FAILED" in done.stderr, done.stderr
    assert "probs at length 16 (B=3, one call): max abs diff" in done.stderr
    assert re.search(r"probs after 1[1-6] steps at length 16 streamed in chunks \[", done.stderr)
    assert "at length 5" not in done.stderr  # the lengths that agree are not blamed
    assert not out.exists()


def test_weights_that_are_not_a_state_dict_are_refused_clearly(
    user_dir: Path, tmp_path: Path
) -> None:
    whole = tmp_path / "whole.pt"
    # An object torch.load(weights_only=True) refuses, as it refuses a pickled whole module.
    torch.save({"model": argparse.Namespace(layers=2)}, whole)
    done = subprocess.run(
        [sys.executable, "-m", "export.cli", "from-torch", "--weights", str(whole),
         "--module", f"{user_dir / 'user_models.py'}:CharGRU",
         "--labels", str(user_dir / "labels3.txt"), "--out", str(tmp_path / "r" / "m" / "1")],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert done.returncode == 2
    assert "--weights 'whole.pt' is not a state dict saved with torch.save" in done.stderr
    assert "Traceback" not in done.stderr


def _word_tokenizer(path: Path) -> list[str]:
    """A word-level tokenizer.json (Hugging Face tokenizers) of 8 words + [UNK]; its words."""
    tokenizers = pytest.importorskip("tokenizers")
    words = ["[UNK]", "hello", "world", "stream", "the", "a", "model", "serve", "it"]
    model = tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]")
    tok = tokenizers.Tokenizer(model)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(path))
    return words


def test_a_subword_tokenizer_json_goes_beside_the_model_and_is_served(
    user_dir: Path, tmp_path: Path
) -> None:
    words = _word_tokenizer(tmp_path / "tokenizer.json")
    out = tmp_path / "repo" / "chargru" / "3"
    done = from_torch(user_dir, "CharGRU", out, "--tokenizer", str(tmp_path / "tokenizer.json"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["tokenizer"] == "subwords: tokenizer.json beside model.onnx"
    assert (out / "tokenizer.json").read_bytes() == (tmp_path / "tokenizer.json").read_bytes()

    text = "the model serve it"
    server = ServerProcess(tmp_path / "repo")
    try:
        server.wait_event("ready")
        probs = asyncio.run(_classify_text(server.address, text))
    finally:
        server.stop()
    ids = torch.tensor([[words.index(w) for w in text.split()]])
    with torch.no_grad():
        expected = torch.softmax(_user(user_dir, "CharGRU")(ids), dim=-1)[0].numpy()
    np.testing.assert_allclose(probs, expected, atol=TOLERANCE)


async def _classify_text(address: str, text: str) -> list[float]:
    from lstmserve.client import LstmClient

    async with LstmClient([address]) as client:
        reply = await client.classify("chargru", [text])
    return list(reply.results[0].probabilities)


def test_a_tokenizer_with_more_ids_than_embedding_rows_is_refused(
    user_dir: Path, tmp_path: Path
) -> None:
    vocab = tmp_path / "big.txt"
    vocab.write_text("\n".join(["<unk>", *(chr(0x4E00 + i) for i in range(40))]) + "\n")
    done = from_torch(user_dir, "CharGRU", tmp_path / "r" / "m" / "1", "--tokenizer",
                      f"chars:{vocab}")  # fmt: skip
    assert done.returncode == 2
    assert "--tokenizer has 41 entries, the Embedding only 28" in done.stderr


class _ExportedLSTM(torch.nn.Module):
    """What a user passes to torch.onnx.export: state (layers, B, H) in and out."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = torch.nn.LSTM(5, 8, num_layers=2, batch_first=True)
        self.fc = torch.nn.Linear(8, 3)

    def forward(
        self, x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        y, (h, c) = self.lstm(x, (h0, c0))
        return self.fc(y), h, c


def test_config_starter_serves_a_torch_onnx_exported_lstm_unedited(tmp_path: Path) -> None:
    import warnings

    torch.manual_seed(1)
    module = _ExportedLSTM().eval()
    version = tmp_path / "repo" / "torch-lstm" / "1"
    version.mkdir(parents=True)
    axes = {"x": {0: "B", 1: "T"}, "logits": {0: "B", 1: "T"}}
    axes |= {name: {1: "B"} for name in ("h0", "c0", "hn", "cn")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, (torch.randn(2, 4, 5), torch.zeros(2, 2, 8), torch.zeros(2, 2, 8)),
            str(version / "model.onnx"), input_names=["x", "h0", "c0"],
            output_names=["logits", "hn", "cn"], dynamic_axes=axes, dynamo=False,
        )  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "export.cli", "config", str(version / "model.onnx")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    (version.parent / "config.pbtxt").write_text(done.stdout)
    (version.parent / "labels.txt").write_text("a\nb\nc\n")

    frames = np.random.default_rng(0).normal(size=(9, 5)).astype(np.float32)
    server = ServerProcess(tmp_path / "repo")
    try:
        server.wait_event("ready")
        replies = asyncio.run(_stream_frames(server.address, frames, [3, 1, 5]))
    finally:
        server.stop()
    for end, probabilities in zip((3, 4, 9), replies, strict=True):
        zeros = torch.zeros(2, 1, 8)
        with torch.no_grad():
            logits, _, _ = module(torch.from_numpy(frames[None, :end]), zeros, zeros)
        expected = torch.softmax(logits[0, -1], dim=-1).numpy()
        np.testing.assert_allclose(probabilities, expected, atol=TOLERANCE)


async def _stream_frames(address: str, frames: np.ndarray, chunks: list[int]) -> list[list[float]]:
    from lstmserve.client import LstmClient

    async with LstmClient([address]) as client:
        session = await client.open_session("torch-lstm")
        replies, pos = [], 0
        for size in chunks:
            result = await session.step(frames[pos : pos + size])
            assert not result.HasField("error"), result.error
            replies.append(list(result.probabilities))
            pos += size
        await session.end()
    return replies
